"""On-policy negatives: K samples per image from the Stage-1 model, scored by CIDEr-D with corpus df.

Two backends behind one interface (`Sampler.sample(image_paths) -> [[K texts], ...]`):
- `hf`: transformers `generate` (do_sample, temperature, top-p, `num_return_sequences=K`), seeded per
  batch — the CPU default, reproducible on CPU.
- `vllm`: `vllm.LLM.generate` with `multi_modal_data`, `SamplingParams(n=K, seed=..., max_tokens=...)`,
  a `LoRARequest` when the model folder is a peft adapter, and the same min/max pixels as training
  (`mm_processor_kwargs`). Images go to vLLM `onpolicy.batch_size` at a time, each chunk's images opened
  only for its call (28k COCO images at once would be ~200 GB of pixel values). Installed by the `gpu`
  extra and in the container only.

Both decode with explicit settings (`decoding` of the sampler, recorded in the summary): temperature and
top-p sampling, no top-k, no penalties — never the model's generation_config. Seeds never overlap: vLLM
gives the j-th of a request's n = K samples the seed `seed + j`, so image i of N gets
`(run seed · N + i) · K` and its samples (run seed · N + i) · K + j are distinct for every run seed, image
and sample.

Each sample gets its CIDEr-D against the image's references with document frequencies from the whole
reference corpus (`cwdpo.metrics.CiderD`), so a score does not depend on which other images were sampled
in the same call; samples below `threshold` that are not a reference themselves become negatives.
"""
from __future__ import annotations

import json
import os

from .metrics import CiderD, corpus_scorer, simple_tokenize


class HFSampler:
    """transformers `generate` sampling (the CPU default)."""

    def __init__(self, model_dir: str, vlm, *, batch_size: int = 64):
        from .logprobs import make_encoder
        from .models import load_for_inference
        self.model, self.processor = load_for_inference(model_dir, vlm)
        self.encoder = make_encoder(self.processor, vlm)
        self.batch_size = batch_size
        self.device = str(self.model.device)

    def decoding(self, *, k: int, temperature: float, top_p: float, max_new_tokens: int) -> dict:
        from .generation import decoding_settings
        return {"backend": "hf", **decoding_settings(num_return=k, do_sample=True, temperature=temperature,
                                                     top_p=top_p, max_new_tokens=max_new_tokens)}

    def sample(self, image_paths: list, *, k: int, temperature: float, top_p: float, max_new_tokens: int,
               seed: int) -> list:
        from .generation import generate_captions
        return generate_captions(self.model, self.encoder, image_paths, num_return=k, do_sample=True,
                                 temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                 batch_size=max(1, self.batch_size // k), seed=seed, desc="sample on-policy")


def request_seed(seed: int, index: int, n_images: int, k: int) -> int:
    """The vLLM seed of image `index` of `n_images`: vLLM seeds its j-th sample `seed + j` (j < k), so
    requests k apart, and runs n_images·k apart, never share a sample's stream."""
    return (int(seed) * int(n_images) + int(index)) * int(k)


class VLLMSampler:
    """vLLM offline sampling: one request per image with n=K samples and a fixed per-request seed, sent
    `batch_size` images per `generate` call."""

    def __init__(self, model_dir: str, vlm, *, llm_kwargs: dict | None = None, build_engine: bool = True,
                 batch_size: int = 64):
        from .logprobs import chat_prompt
        from .models import is_adapter_dir, load_processor
        self.model_dir, self.prompt, self.batch_size = model_dir, vlm.prompt, int(batch_size)
        self.device = "vllm"  # the engine places the model on the job's GPUs
        # the exact prompt text of training (our model folders carry their processor and chat template)
        self.prompt_text = chat_prompt(load_processor(model_dir, vlm.min_pixels, vlm.max_pixels,
                                                      vlm.trust_remote_code), vlm.prompt)
        self.adapter = model_dir if is_adapter_dir(model_dir) else None
        self.engine_model = (vlm.base or self._adapter_base(model_dir)) if self.adapter else model_dir
        self.mm_kwargs = {"min_pixels": int(vlm.min_pixels), "max_pixels": int(vlm.max_pixels)}
        self.engine_kwargs = dict(model=self.engine_model, dtype=vlm.dtype if vlm.dtype != "float32" else "auto",
                                  trust_remote_code=vlm.trust_remote_code, limit_mm_per_prompt={"image": 1},
                                  mm_processor_kwargs=self.mm_kwargs, generation_config="vllm", seed=0,
                                  enable_lora=self.adapter is not None, **(llm_kwargs or {}))
        if self.adapter is not None:
            rank = adapter_rank(self.adapter)
            self.engine_kwargs.setdefault("max_lora_rank", vllm_max_lora_rank(rank))
            limit = self.engine_kwargs["max_lora_rank"]
            if limit < rank:
                raise ValueError(f"negatives.onpolicy.vllm.max_lora_rank {limit} is below the adapter's rank {rank} "
                                 f"({self.adapter}); vLLM would refuse the adapter")
        self.llm = None
        if build_engine:
            from vllm import LLM
            self.llm = LLM(**self.engine_kwargs)

    @staticmethod
    def _adapter_base(path: str) -> str:
        with open(os.path.join(path, "adapter_config.json")) as f:
            return json.load(f)["base_model_name_or_path"]

    def requests(self, image_paths: list) -> list:
        """One vLLM request per image: the training prompt text (with its single image placeholder, which
        vLLM expands) and the image as `multi_modal_data` (opened now: call it per chunk)."""
        from PIL import Image
        text = self.prompt_text
        out = []
        for p in image_paths:
            with Image.open(p) as im:
                out.append({"prompt": text, "multi_modal_data": {"image": im.convert("RGB")}})
        return out

    def decoding(self, *, k: int, temperature: float, top_p: float, max_new_tokens: int) -> dict:
        """The `SamplingParams` fields of every request but its seed (the engine ignores the model's
        generation_config: `generation_config="vllm"`): sampling as the hf backend does it."""
        return {"backend": "vllm", "n": int(k), "temperature": float(temperature), "top_p": float(top_p), "top_k": 0,
                "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "max_tokens": int(max_new_tokens)}

    def sampling_params(self, *, k: int, temperature: float, top_p: float, max_new_tokens: int, seed: int):
        from vllm import SamplingParams
        fields = self.decoding(k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        fields.pop("backend")
        return SamplingParams(**fields, seed=int(seed))

    def lora_request(self):
        if self.adapter is None:
            return None
        from vllm.lora.request import LoRARequest
        return LoRARequest("policy", 1, self.adapter)

    def sample(self, image_paths: list, *, k: int, temperature: float, top_p: float, max_new_tokens: int,
               seed: int) -> list:
        n = len(image_paths)
        texts = []
        for start in range(0, n, self.batch_size):
            chunk = image_paths[start:start + self.batch_size]
            reqs = self.requests(chunk)  # only this chunk's images are open
            # one SamplingParams per request so each image's samples are pinned by its own seed
            params = [self.sampling_params(k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                           seed=request_seed(seed, start + i, n, k)) for i in range(len(reqs))]
            outs = self.llm.generate(reqs, params, lora_request=self.lora_request(), use_tqdm=False)
            texts += [[" ".join(c.text.split()) for c in o.outputs] for o in outs]
            del reqs
        return texts


# the max_lora_rank values vLLM accepts (vllm.config.lora.MaxLoRARanks, vLLM 0.33)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def adapter_rank(path: str) -> int:
    """The largest LoRA rank of a peft adapter folder (`r`, or a larger one of its `rank_pattern`)."""
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    return max([int(cfg["r"])] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()])


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds an adapter of `rank` (vLLM rejects r > it)."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


def make_sampler(onpolicy: dict, model_dir: str, vlm):
    """The sampler of config `negatives.onpolicy` (backend hf or vllm) for `model_dir`."""
    if onpolicy["backend"] == "hf":
        return HFSampler(model_dir, vlm, batch_size=onpolicy["batch_size"])
    if onpolicy["backend"] == "vllm":
        return VLLMSampler(model_dir, vlm, llm_kwargs=onpolicy["vllm"], batch_size=onpolicy["batch_size"])
    raise ValueError(f"unknown sampling backend {onpolicy['backend']!r}; allowed: hf, vllm")


def score_samples(records: list, samples: list, scorer: CiderD, threshold: float) -> list:
    """Per image: every sample with its CIDEr-D, whether it equals a reference, and whether it is kept."""
    out = []
    for rec, texts in zip(records, samples):
        refs = [simple_tokenize(c) for c in rec.captions]
        ref_set = set(refs)  # case, punctuation and spacing ignored: "A dog runs." is the reference "a dog runs"
        entries = []
        for t in texts:
            score = float(scorer.score_one(simple_tokenize(t), refs))
            is_ref = simple_tokenize(t) in ref_set
            entries.append({"text": t, "score": score, "is_reference": is_ref,
                            "kept": bool(t.strip()) and not is_ref and score < threshold})
        out.append({"image_id": rec.image_id, "samples": entries})
    return out


def run(spec, out: str, summary_out: str, threads: int = 0) -> dict:
    """`cwdpo sample-onpolicy` (a `SampleSpec`): K samples per Stage-2 image (and per probe image) from the
    spec's model, each scored by CIDEr-D with the document frequencies of the whole split; writes the
    samples JSONL and a summary."""
    from .data import load_records, stage_records, write_json, write_text
    from .models import set_threads
    set_threads(threads)
    o = spec.onpolicy
    finetune = load_records(spec.data)
    stage2 = stage_records(finetune, spec.data)
    probe = load_records(spec.probe_data)[: spec.probe_images] if spec.probe_data else []
    sampler = make_sampler(o, spec.model, spec.vlm)
    texts = sampler.sample([r.path for r in stage2 + probe], k=int(o["k"]), temperature=float(o["temperature"]),
                           top_p=float(o["top_p"]), max_new_tokens=int(o["max_new_tokens"]), seed=spec.seed)
    scored = score_samples(stage2, texts[:len(stage2)], corpus_scorer(finetune), float(o["threshold"]))
    if probe:  # probe images: scored against the probe references (only read by the probe set)
        for entry in score_samples(probe, texts[len(stage2):], corpus_scorer(probe), float(o["threshold"])):
            scored.append({**entry, "split": "probe"})
    write_text(out, "".join(json.dumps(x, sort_keys=True) + "\n" for x in scored))
    stage2_scored = [x for x in scored if x.get("split") != "probe"]
    n = sum(len(x["samples"]) for x in stage2_scored)
    summary = {"images": len(stage2_scored), "probe_images": len(probe), "samples": n,
               "kept": sum(s["kept"] for x in stage2_scored for s in x["samples"]),
               "equal_to_a_reference": sum(s["is_reference"] for x in stage2_scored for s in x["samples"]),
               "backend": o["backend"], "k": o["k"], "threshold": o["threshold"], "seed": spec.seed,
               "device": sampler.device,
               "decoding": sampler.decoding(k=int(o["k"]), temperature=float(o["temperature"]), top_p=float(o["top_p"]),
                                            max_new_tokens=int(o["max_new_tokens"])),
               "mean_score": sum(s["score"] for x in stage2_scored for s in x["samples"]) / max(1, n)}
    write_json(summary_out, summary)
    return summary


# ---------------------------------------------------------------------------------------------------
# the model's own wrong beams (negatives set `beams`)

def beam_kind(grounded: dict) -> str | None:
    """Why a beam is wrong, from its grounding counts (`cwdpo.grounding.ground`): it names an object the
    image does not have ("hallucinated"), leaves one of the image's objects out ("missing"), or both; None
    when it is right about which objects are there."""
    hallucinated = grounded["hallucinated"] > 0
    missing = grounded["recalled"] < grounded["objects"]
    if hallucinated and missing:
        return "hallucinated_missing"
    return "hallucinated" if hallucinated else ("missing" if missing else None)


def ground_beams(records: list, beams: list, scorer: CiderD) -> list:
    """Per image: each beam (best first) with its grounding, CIDEr-D and whether it is kept as a negative (it
    is wrong, not empty, not a reference and not a repeat of a higher beam) — the samples format of
    `read_samples`."""
    from .grounding import ground
    out = []
    for rec, texts in zip(records, beams):
        refs = [simple_tokenize(c) for c in rec.captions]
        ref_set = {" ".join(c.lower().split()) for c in rec.captions}
        seen, entries = set(), []
        for rank, t in enumerate(texts):
            g = ground(t, rec.attributes)
            norm = " ".join(t.lower().split())
            kind = beam_kind(g)
            entries.append({"text": t, "rank": rank, "score": float(scorer.score_one(simple_tokenize(t), refs)),
                            "hallucinated": g["hallucinated"], "missing": g["objects"] - g["recalled"],
                            "kind": kind, "is_reference": norm in ref_set,
                            "kept": bool(t.strip()) and kind is not None and norm not in ref_set and norm not in seen})
            seen.add(norm)
        out.append({"image_id": rec.image_id, "samples": entries})
    return out


def run_beams(spec, out: str, summary_out: str, threads: int = 0) -> dict:
    """`cwdpo beam-negatives` (a `BeamSpec`): the k beams of a size-k beam search of the spec's model on every
    Stage-2 image, grounded in the image's attribute record; the wrong ones are the negatives. Writes the
    beams JSONL and a summary of the counts (also printed to the job's log)."""
    import sys
    from .data import DataError, load_records, stage_records, write_json, write_text
    from .generation import generate_captions
    from .logprobs import make_encoder
    from .models import load_for_inference, set_threads
    set_threads(threads)
    finetune = load_records(spec.data)
    stage2 = stage_records(finetune, spec.data)
    bare = [r.image_id for r in stage2 if r.attributes is None]
    if bare:
        raise DataError(f"{spec.data.json}: image {bare[0]} has no attribute record; beam negatives are grounded in "
                        "the `shapes` attribute records")
    model, processor = load_for_inference(spec.model, spec.vlm)
    beams = generate_captions(model, make_encoder(processor, spec.vlm), [r.path for r in stage2], num_beams=spec.k,
                              num_return=spec.k, max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size,
                              desc="beams")
    rows = ground_beams(stage2, beams, corpus_scorer(finetune))
    write_text(out, "".join(json.dumps(x, sort_keys=True) + "\n" for x in rows))
    entries = [e for x in rows for e in x["samples"]]
    summary = {"images": len(rows), "k": spec.k, "beams": len(entries),
               "wrong": sum(e["kind"] is not None for e in entries),
               "hallucinated": sum(e["hallucinated"] > 0 for e in entries),
               "missing": sum(e["missing"] > 0 for e in entries),
               "kept": sum(e["kept"] for e in entries),
               "equal_to_a_reference": sum(e["is_reference"] for e in entries),
               "images_with_a_kept_beam": sum(any(e["kept"] for e in x["samples"]) for x in rows)}
    write_json(summary_out, summary)
    print(f"[cwdpo beam-negatives] {summary['beams']} beams of {summary['images']} images: {summary['wrong']} wrong "
          f"({summary['hallucinated']} with a hallucinated object, {summary['missing']} missing one), "
          f"{summary['kept']} kept as negatives", file=sys.stderr)
    return summary
