"""On-policy sampling: real, seeded samples from the model (hf backend); the vLLM backend's requests."""
import importlib.util
import os

import pytest

import specs
from cwdpo import sampling
from cwdpo.metrics import corpus_scorer


@pytest.fixture(scope="module")
def hf_sampler(tiny_model_dir):
    return sampling.HFSampler(tiny_model_dir, specs.vlm(), batch_size=8)


def test_hf_samples_are_real_seeded_and_reproducible(hf_sampler, shapes_records):
    paths = [r.path for r in shapes_records[:4]]
    kw = dict(k=3, temperature=1.0, top_p=1.0, max_new_tokens=8)
    a = hf_sampler.sample(paths, seed=5, **kw)
    b = hf_sampler.sample(paths, seed=5, **kw)
    c = hf_sampler.sample(paths, seed=6, **kw)
    assert a == b and a != c
    assert len(a) == 4 and all(len(x) == 3 for x in a)
    # samples of a random-init model differ from each other (real sampling, not beam search)
    assert any(len(set(x)) > 1 for x in a)
    # ...and each is a decoded continuation of the model: its log-prob under the model is finite
    import torch
    from cwdpo.logprobs import completion_logps
    enc = hf_sampler.encoder
    rows = [(0, t) for t in a[0] if t]
    if rows:
        out = completion_logps(hf_sampler.model, enc.build([paths[0]], rows), enc.image_token_id)
        assert torch.isfinite(out.sums).all()


def test_scored_samples_never_keep_a_reference(shapes_records):
    recs = shapes_records[:3]
    samples = [[recs[0].captions[0], "a completely different text"], [recs[1].captions[2].upper()],
               ["", "red"]]
    scorer = corpus_scorer(shapes_records)
    scored = sampling.score_samples(recs, samples, scorer, threshold=100.0)
    assert scored[0]["samples"][0]["is_reference"] and not scored[0]["samples"][0]["kept"]
    assert scored[0]["samples"][1]["kept"]
    assert scored[1]["samples"][0]["is_reference"] and not scored[1]["samples"][0]["kept"]
    assert not scored[2]["samples"][0]["kept"]  # empty samples are no negatives
    # a score above the threshold is not kept either
    high = sampling.score_samples(recs[:1], [[recs[0].captions[1] + " x"]], scorer, threshold=0.0)
    assert not high[0]["samples"][0]["kept"] and high[0]["samples"][0]["score"] > 0


def test_vllm_backend_builds_requests_without_an_engine(tiny_model_dir, shapes_records, tmp_path):
    s = sampling.VLLMSampler(tiny_model_dir, specs.vlm(min_pixels=3136, max_pixels=12544), build_engine=False,
                             llm_kwargs={"gpu_memory_utilization": 0.5})
    reqs = s.requests([r.path for r in shapes_records[:2]])
    assert reqs[0]["prompt"].count("<|image_pad|>") == 1 and reqs[0]["prompt"].endswith("assistant\n")
    assert "Describe the image." in reqs[0]["prompt"]
    assert reqs[0]["multi_modal_data"]["image"].size == (112, 112)
    kw = s.engine_kwargs
    assert kw["mm_processor_kwargs"] == {"min_pixels": 3136, "max_pixels": 12544}
    assert kw["limit_mm_per_prompt"] == {"image": 1} and kw["gpu_memory_utilization"] == 0.5
    assert kw["enable_lora"] is False and s.adapter is None


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vllm is not installed (GPU extra / container only; its wheel pins a CUDA torch)")
def test_vllm_sampling_params_and_lora_request(tiny_model_dir, tmp_path):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    s = sampling.VLLMSampler(tiny_model_dir, specs.vlm(), build_engine=False)
    p = s.sampling_params(k=4, temperature=0.8, top_p=0.9, max_new_tokens=20, seed=7)
    assert isinstance(p, SamplingParams) and p.n == 4 and p.seed == 7 and p.max_tokens == 20
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "%s"}' % tiny_model_dir)
    for name in os.listdir(tiny_model_dir):
        if not name.endswith(".safetensors"):
            (adapter / name).write_bytes(open(os.path.join(tiny_model_dir, name), "rb").read())
    s2 = sampling.VLLMSampler(str(adapter), specs.vlm(), build_engine=False)
    assert isinstance(s2.lora_request(), LoRARequest) and s2.engine_kwargs["enable_lora"]


def test_unknown_backend_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="allowed: hf, vllm"):
        sampling.make_sampler({**specs.config()["negatives"]["onpolicy"], "backend": "sglang"}, tiny_model_dir,
                              specs.vlm())


def test_a_sample_equal_to_a_reference_up_to_punctuation_is_no_negative(shapes_records):
    """`is_reference` compares tokens (case, punctuation and spacing ignored): a model that ends its caption
    with a period has not produced a negative."""
    rec = shapes_records[0]
    scorer = corpus_scorer(shapes_records)
    variants = [rec.captions[0] + ".", rec.captions[0].upper() + " .", "  " + rec.captions[0].replace(" ", "  ")]
    scored = sampling.score_samples([rec], [variants], scorer, threshold=100.0)
    assert all(s["is_reference"] and not s["kept"] for s in scored[0]["samples"])


def _adapter(tmp_path, tiny_model_dir, r, rank_pattern=None):
    import json
    adapter = tmp_path / f"adapter_r{r}"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": tiny_model_dir, "r": r, "rank_pattern": rank_pattern or {}}))
    for name in os.listdir(tiny_model_dir):
        if not name.endswith(".safetensors") and name != "config.json":
            (adapter / name).write_bytes(open(os.path.join(tiny_model_dir, name), "rb").read())
    return str(adapter)


def test_vllm_max_lora_rank_comes_from_the_adapter(tiny_model_dir, tmp_path):
    """vLLM refuses an adapter whose rank exceeds `max_lora_rank`: it is the adapter's own rank (rounded up
    to a value vLLM accepts), not a fixed 64."""
    for r, pattern, expected in ((128, None, 128), (16, None, 16), (64, {"q_proj": 100}, 128)):
        s = sampling.VLLMSampler(_adapter(tmp_path, tiny_model_dir, r, pattern), specs.vlm(), build_engine=False)
        assert s.engine_kwargs["enable_lora"] and s.engine_kwargs["max_lora_rank"] == expected, (r, pattern)
    with pytest.raises(ValueError, match="below the adapter's rank 128"):
        sampling.VLLMSampler(str(tmp_path / "adapter_r128"), specs.vlm(), build_engine=False,
                             llm_kwargs={"max_lora_rank": 64})
