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


@pytest.fixture()
def fake_vllm(monkeypatch):
    """tests/fake_vllm on sys.path: `import vllm` gets the recorder (the real vllm needs a CUDA torch)."""
    import sys
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "fake_vllm"))
    import vllm
    vllm.CALLS["engine"].clear()
    vllm.CALLS["generate"].clear()
    return vllm.CALLS


@pytest.fixture(scope="module")
def lora_policy(tiny_model_dir, tmp_path_factory):
    """A Stage-1 output of a LoRA recipe: a peft adapter (rank 4) with the processor, on the tiny base."""
    from cwdpo.models import load_model, load_processor
    out = str(tmp_path_factory.mktemp("policy"))
    model = load_model(tiny_model_dir, trainable=True, lora={"r": 4, "target_modules": r".*language_model.*\.q_proj"})
    model.save_pretrained(out)
    load_processor(tiny_model_dir).save_pretrained(out)
    return out


def test_vllm_sampling_chunks_seeds_lora_and_decoding(fake_vllm, lora_policy, tiny_model_dir, shapes_dir, tmp_path):
    """The vLLM path of `cwdpo sample-onpolicy`, every call recorded: images go in chunks of
    `onpolicy.batch_size` (each chunk's images opened for its call only), one seed per image such that no
    two samples of any image or run share a stream, the adapter as a LoRARequest, explicit sampling
    parameters (no top-k, no penalties), recorded in the summary."""
    import json
    from cwdpo.specs import SampleSpec
    data_json = os.path.join(shapes_dir, "dataset_shapes.json")
    onpolicy = {**specs.config()["negatives"]["onpolicy"], "backend": "vllm", "k": 3, "batch_size": 4,
                "temperature": 0.9, "top_p": 0.8, "max_new_tokens": 7, "vllm": {"gpu_memory_utilization": 0.5}}
    streams = {}
    for run_seed in (0, 1):
        spec = SampleSpec(vlm=specs.vlm(base=tiny_model_dir), model=lora_policy, onpolicy=onpolicy, seed=run_seed,
                          data=specs.data(data_json, ["finetune"], stage="stage2"),
                          probe_data=specs.data(data_json, ["test"]), probe_images=3)
        fake_vllm["generate"].clear()
        summary = sampling.run(spec, str(tmp_path / f"s{run_seed}.jsonl"), str(tmp_path / f"s{run_seed}.json"))
        calls = fake_vllm["generate"]
        n_images = summary["images"] + summary["probe_images"]
        assert n_images == 10 + 3
        assert [c["n_requests"] for c in calls] == [4, 4, 4, 1]  # chunks of batch_size
        assert all(c["earlier_images_alive"] == 0 for c in calls)  # no image outlives its chunk
        assert all(size == (112, 112) for c in calls for size in c["image_sizes"])
        assert all(c["lora_request"].lora_path == lora_policy and c["lora_request"].lora_name == "policy"
                   for c in calls)
        params = [p for c in calls for p in c["params"]]
        for p in params:
            assert {k: v for k, v in p.items() if k != "seed"} == {
                "n": 3, "temperature": 0.9, "top_p": 0.8, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                "presence_penalty": 0.0, "frequency_penalty": 0.0, "max_tokens": 7}
        for i, p in enumerate(params):  # vLLM seeds sample j of a request with `seed + j`
            for j in range(3):
                assert (p["seed"] + j) not in streams, (run_seed, i, j)
                streams[p["seed"] + j] = (run_seed, i, j)
        assert summary["decoding"] == {"backend": "vllm", **{k: v for k, v in params[0].items() if k != "seed"}}
        rows = [json.loads(x) for x in open(tmp_path / f"s{run_seed}.jsonl")]
        first = rows[0]["samples"]
        assert [s["text"] for s in first] == [f"sample {params[0]['seed'] + j}" for j in range(3)]
    engine = fake_vllm["engine"][-1]
    assert engine["model"] == tiny_model_dir and engine["enable_lora"] and engine["max_lora_rank"] == 8
    assert engine["generation_config"] == "vllm" and engine["gpu_memory_utilization"] == 0.5
    assert engine["mm_processor_kwargs"] == {"min_pixels": specs.vlm().min_pixels, "max_pixels": specs.vlm().max_pixels}
    assert len(streams) == 2 * 13 * 3


def test_hf_decoding_ignores_the_models_generation_config(tiny_model_dir, shapes_records, tmp_path):
    """A hub model's generation_config (Qwen2.5-VL-Instruct: top_k 1, repetition_penalty 1.05) must not
    change what `generate_captions` decodes: a model whose config sets hostile values samples and beams
    exactly like the same weights with a bare config."""
    import shutil
    from transformers import GenerationConfig
    from cwdpo.generation import generate_captions
    from cwdpo.logprobs import Encoder
    from cwdpo.models import load_model, load_processor
    hostile = tmp_path / "hostile"
    shutil.copytree(tiny_model_dir, hostile)
    cfg = GenerationConfig.from_pretrained(tiny_model_dir)
    cfg.update(top_k=1, top_p=0.001, temperature=0.1, repetition_penalty=3.0, no_repeat_ngram_size=1,
               length_penalty=-2.0, num_beams=4, do_sample=True)
    cfg.save_pretrained(str(hostile))
    enc = Encoder(load_processor(tiny_model_dir), specs.PROMPT)
    paths = [r.path for r in shapes_records[:3]]
    clean, bad = load_model(tiny_model_dir), load_model(str(hostile))
    assert bad.generation_config.top_k == 1
    for kw in (dict(num_return=3, do_sample=True, temperature=1.0, top_p=0.95, seed=3),
               dict(num_beams=3, num_return=2)):
        a = generate_captions(clean, enc, paths, max_new_tokens=8, batch_size=2, **kw)
        b = generate_captions(bad, enc, paths, max_new_tokens=8, batch_size=2, **kw)
        assert a == b, kw
    assert bad.generation_config.top_k == 1  # restored after generating
