"""A stand-in for the `vllm` package (tests only: the real one needs a CUDA torch). It records every call
the sampler makes — engine arguments (and the process's VLLM_USE_FLASHINFER_SAMPLER), each `generate` call's
requests, sampling parameters and LoRA request — in `CALLS`, and answers each request with K texts that name
their vLLM seed (`seed + j`, as vLLM seeds the j-th sample of a request with n = K)."""
import gc
import os
import weakref

CALLS = {"engine": [], "generate": []}


class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = dict(kwargs)
        for key, value in kwargs.items():
            setattr(self, key, value)


class _Completion:
    def __init__(self, text):
        self.text = text


class _Output:
    def __init__(self, outputs):
        self.outputs = outputs


class LLM:
    def __init__(self, **kwargs):
        flashinfer = os.environ.get("VLLM_USE_FLASHINFER_SAMPLER")
        CALLS["engine"].append({**kwargs, "env:VLLM_USE_FLASHINFER_SAMPLER": flashinfer})
        self._earlier_images = []

    def generate(self, requests, params, lora_request=None, use_tqdm=True):
        gc.collect()
        alive = sum(ref() is not None for ref in self._earlier_images)  # images of earlier calls still held
        self._earlier_images = [weakref.ref(r["multi_modal_data"]["image"]) for r in requests]
        CALLS["generate"].append({"n_requests": len(requests), "prompts": [r["prompt"] for r in requests],
                                  "image_sizes": [r["multi_modal_data"]["image"].size for r in requests],
                                  "params": [p.kwargs for p in params], "lora_request": lora_request,
                                  "earlier_images_alive": alive})
        return [_Output([_Completion(f" sample  {p.seed + j} ") for j in range(p.n)]) for p in params]
