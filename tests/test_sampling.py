"""On-policy sampling: real, seeded samples from the model (hf backend); the vLLM backend's requests."""
import importlib.util
import os

import numpy as np
import pytest

import micro_specs as specs
from cwdpo import sampling
from cwdpo.metrics import corpus_scorer


@pytest.fixture(scope="module")
def hf_sampler(tiny_model_dir):
    return sampling.HFSampler(tiny_model_dir, specs.vlm(), batch_size=8)


@pytest.mark.slow
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
    # no video inputs: with vLLM's default video limit the engine profiles dummy videos at start
    assert kw["limit_mm_per_prompt"] == {"image": 1, "video": 0} and kw["gpu_memory_utilization"] == 0.5
    assert kw["enable_lora"] is False and s.adapter is None
    # the model's own dtype (vLLM's "auto" runs a float32 model in bfloat16) and raw log-probs
    assert kw["dtype"] == specs.vlm().dtype == "float32" and kw["logprobs_mode"] == "raw_logprobs"
    # config `negatives.onpolicy.vllm` overrides cwdpo's own arguments
    s2 = sampling.VLLMSampler(tiny_model_dir, specs.vlm(), build_engine=False, llm_kwargs={"dtype": "bfloat16"})
    assert s2.engine_kwargs["dtype"] == "bfloat16"


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
    monkeypatch.delenv("VLLM_USE_FLASHINFER_SAMPLER", raising=False)  # what a bare GPU install has
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


@pytest.mark.slow
def test_vllm_sampling_chunks_seeds_lora_and_decoding(fake_vllm, lora_policy, tiny_model_dir, shapes_dir, tmp_path):
    """The vLLM path of `cwdpo sample-onpolicy`, every call recorded: images go in chunks of
    `onpolicy.batch_size` (each chunk's images opened for its call only), one seed per image such that no
    two samples of any image or run share a stream, the adapter as a LoRARequest, explicit sampling
    parameters (no top-k, no penalties), recorded in the summary."""
    import json
    from cwdpo.specs import SampleSpec
    data_json = os.path.join(shapes_dir, "dataset_shapes.json")
    onpolicy = {**specs.config()["negatives"]["onpolicy"], "backend": "vllm", "k": 3, "batch_size": 4,
                "temperature": 0.9, "top_p": 0.8, "max_new_tokens": 7, "vllm": {"gpu_memory_utilization": 0.5},
                "parity_samples": 0}  # (a stand-in without log-probs: real parity in tests/test_gpu_stack.py)
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
    # FlashInfer's sampler is JIT-compiled with nvcc at engine start: off in every job's engine process
    assert engine["env:VLLM_USE_FLASHINFER_SAMPLER"] == "0" and "logprob_parity" not in summary
    assert engine["mm_processor_kwargs"] == {"min_pixels": specs.vlm().min_pixels, "max_pixels": specs.vlm().max_pixels}
    assert len(streams) == 2 * 13 * 3


@pytest.mark.slow
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


def _two_object_record(shapes_records):
    return next(r for r in shapes_records if len(r.attributes["objects"]) == 2 and r.attributes["relation"] == "h")


def test_grounding_selection_keeps_the_samples_the_image_contradicts(shapes_records):
    """select: grounding (shapes) — a sample is a negative when the parse against the image's attribute record
    finds something wrong, whatever its CIDEr-D; a correct caption that is no reference is not one."""
    rec = _two_object_record(shapes_records)
    left, right = rec.attributes["objects"]
    a = f"a {left['size']} {left['colour']} {left['shape']}"
    b = f"a {right['size']} {right['colour']} {right['shape']}"
    other = next(c for c in ("red", "green", "blue", "black") if c not in (left["colour"], right["colour"]))
    samples = [f"{a} to the left of {b}",                       # right, and not one of the references' wordings
               f"{a} and a {other} {right['shape']}",           # a colour the image does not have
               a,                                               # an object left out
               f"{b} to the left of {a}",                       # the relation reversed
               f"{a} and a {other} {right['shape']}", "", rec.captions[0]]
    if samples[0] in rec.captions:
        samples[0] = f"two shapes: {a} and {b}"
    scorer = corpus_scorer(shapes_records)
    got = sampling.score_samples([rec], [samples], scorer, select="grounding")[0]["samples"]
    assert [s["kind"] for s in got[:4]] == [None, "hallucinated_missing", "missing", "relation"]
    # kept: wrong, and neither empty, a reference nor a repeat of a kept sample of the same image
    assert [s["kept"] for s in got] == [False, True, True, True, False, False, False]
    assert got[6]["is_reference"]
    # the same samples by an absolute CIDEr-D threshold keep a different set (the correct one among them)
    absolute = sampling.score_samples([rec], [samples], scorer, select="absolute", threshold=100.0)[0]["samples"]
    assert absolute[0]["kept"] and "kind" not in absolute[0]


def test_a_wrong_count_is_a_contradiction():
    from cwdpo.grounding import contradiction, ground
    scene = {"objects": [{"shape": "star", "colour": "red", "size": "small", "cell": [1, 1]}], "relation": None}
    assert contradiction(ground("two red stars", scene)) == "count"
    assert contradiction(ground("a small red star in the middle", scene)) is None
    assert contradiction(ground("a small red star in the top left", scene)) == "relation"


def test_relative_selection_keeps_the_worse_samples_of_each_image(shapes_records):
    """select: relative (real captions) — the worse half of the image's own samples by CIDEr-D, so a model whose
    every sample scores high still yields negatives, and an image's best samples never are."""
    recs = shapes_records[:3]
    scorer = corpus_scorer(shapes_records)
    samples = [[recs[0].captions[1] + " and more", "a purple star", "something else entirely", "red"],
               ["a cat", "a cat", "a dog", "a bird"],
               [recs[2].captions[0], recs[2].captions[1] + " x", "a bird", ""]]
    rows = sampling.score_samples(recs, samples, scorer, select="relative", quantile=0.5)
    s0 = rows[0]["samples"]
    worst_two = sorted(range(4), key=lambda j: s0[j]["score"])[:2]
    assert [s["kept"] for s in s0] == [j in worst_two for j in range(4)]
    assert max(s0[j]["score"] for j in worst_two) <= min(s0[j]["score"] for j in range(4) if j not in worst_two)
    # ties (all CIDEr-D 0) go by sample order; a repeat of a kept sample is not kept again
    assert [s["kept"] for s in rows[1]["samples"]] == [True, False, False, False]
    # an empty sample or a reference is never a negative, even among the worse half
    s2 = rows[2]["samples"]
    assert not s2[0]["kept"] and not s2[3]["kept"] and s2[2]["kept"]
    assert sum(s["kept"] for s in s2) == 1
    assert np.argsort([s["score"] for s in s2], kind="stable")[:2].tolist() == [2, 3]


def test_select_auto_is_grounding_on_shapes_and_relative_without_attribute_records(shapes_records):
    import dataclasses
    from cwdpo.data import DataError
    assert sampling.select_rule("auto", shapes_records[:3]) == "grounding"
    bare = [dataclasses.replace(r, attributes=None) for r in shapes_records[:3]]
    assert sampling.select_rule("auto", bare) == "relative"
    assert sampling.select_rule("absolute", bare) == "absolute"
    with pytest.raises(DataError, match="grounding needs an attribute record per image"):
        sampling.select_rule("grounding", bare)


@pytest.mark.slow
def test_logprob_parity_rescores_the_sampled_tokens_with_the_trainers_forward(tiny_model_dir, shapes_records):
    """`logprob_parity` against an independent path: "sampler" log-probs from the stock processor and
    `model(**inputs)` forward agree with the trainer's forward to float32 round-off; a wrong log-prob shows as
    its error, a prompt the trainer would expand otherwise is counted."""
    import torch
    from cwdpo.logprobs import chat_prompt
    from cwdpo.models import load_model, load_processor
    vlm = specs.vlm()
    proc = load_processor(tiny_model_dir, vlm.min_pixels, vlm.max_pixels)
    model = load_model(tiny_model_dir)
    rows = []
    for rec in shapes_records[:3]:
        from PIL import Image
        with Image.open(rec.path) as im:
            inputs = proc(text=[chat_prompt(proc, vlm.prompt)], images=[im.convert("RGB")], return_tensors="pt")
        ids = proc.tokenizer(rec.captions[0] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        full = torch.cat([inputs["input_ids"], torch.tensor([ids])], 1)
        kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        if "mm_token_type_ids" in inputs:
            kw["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(ids)).long()], 1)
        with torch.no_grad():
            logits = model(input_ids=full, attention_mask=torch.ones_like(full), **kw).logits[0]
        lp = torch.log_softmax(logits[:-1].double(), -1).gather(-1, full[0, 1:].unsqueeze(-1)).squeeze(-1)[-len(ids):]
        rows.append((rec.path, inputs["input_ids"][0].tolist(), ids, lp.tolist()))
    out = sampling.logprob_parity(tiny_model_dir, vlm, rows)
    assert out["tokens"] == sum(len(r[2]) for r in rows) and out["samples"] == 3 and out["prompts_equal"] == 3
    assert out["mean_abs"] < 1e-5 and out["max_abs"] < 1e-4 and out["dtype"] == "float32"
    path, prompt, ids, lps = rows[0]
    bad = [(path, prompt[:-1] + [prompt[0]], ids, [lps[0] - 0.5] + lps[1:])] + rows[1:]
    off = sampling.logprob_parity(tiny_model_dir, vlm, bad)
    assert abs(off["max_abs"] - 0.5) < 1e-4 and off["prompts_equal"] == 2


def test_vllm_serves_lora_on_the_vision_tower_when_the_adapter_has_it(tiny_model_dir, lora_policy, tmp_path):
    """vLLM applies LoRA to the language model only unless `enable_tower_connector_lora` is set, and drops the
    vision tower's LoRA weights with a warning: its samples would come from another model than the one the
    trainer scores. Bare target names (`gate_proj`) also match the vision blocks' MLPs."""
    from cwdpo.models import load_model, load_processor
    out = str(tmp_path / "bare")
    load_model(tiny_model_dir, trainable=True, lora={"r": 4, "target_modules": ["gate_proj"]}).save_pretrained(out)
    load_processor(tiny_model_dir).save_pretrained(out)
    assert sampling.vision_lora_weights(out) and not sampling.vision_lora_weights(lora_policy)
    tower = sampling.VLLMSampler(out, specs.vlm(base=tiny_model_dir), build_engine=False)
    assert tower.engine_kwargs["enable_lora"] and tower.engine_kwargs["enable_tower_connector_lora"] is True
    lm = sampling.VLLMSampler(lora_policy, specs.vlm(base=tiny_model_dir), build_engine=False)
    assert lm.engine_kwargs["enable_lora"] and "enable_tower_connector_lora" not in lm.engine_kwargs
