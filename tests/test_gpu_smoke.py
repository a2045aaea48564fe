"""scripts/gpu_smoke.py end to end on CPU at its `tiny` preset (the GPU presets are only shape-checked
here, on the meta device: no GPU on the test machines)."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = os.path.join(REPO, "scripts", "gpu_smoke.py")
FIELDS = {"params", "params_text", "params_vision", "train_tokens_per_s", "mfu", "mfu_split", "gen_tokens_per_s",
          "gen_new_tokens", "losses", "loss_finite", "step_s", "peak_tflops", "seq_len", "image_tokens",
          "precision", "device", "zero_stage"}


def _load():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args, deepspeed_no_shm=False):
    """Run the script in a child process; its last stdout line is the JSON result."""
    if deepspeed_no_shm:
        # single process: skip the CPU shared-memory allreduce kernel DeepSpeed would JIT-compile (1-2 min)
        code = ("import sys, runpy; import deepspeed.comm.torch as d; d.build_shm_op = lambda: None; "
                f"sys.argv = [{SCRIPT!r}] + sys.argv[1:]; runpy.run_path({SCRIPT!r}, run_name='__main__')")
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, SCRIPT, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "result.json"
    res = _run("--preset", "tiny", "--device", "cpu", "--steps", "4", "--json-out", str(out))
    assert json.loads(out.read_text()) == res
    return res


@pytest.mark.train
def test_tiny_cpu_run_trains_generates_and_reports(tiny):
    assert FIELDS <= set(tiny)
    assert tiny["device"] == "cpu" and tiny["precision"] == "fp32" and tiny["zero_stage"] is None
    assert tiny["params"] == tiny["params_text"] + tiny["params_vision"] and tiny["params_vision"] > 0
    losses = tiny["losses"]
    assert len(losses) == 2 + 4 and tiny["loss_finite"] and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]                                 # AdamW on a fixed batch: it learns
    # 112 px: 8x8 patches of 14 px, 16 image tokens after the 2x2 merge; 16 text tokens + 2 vision markers
    assert tiny["image_tokens"] == 16 and tiny["seq_len"] == 16 + 16 + 2
    assert tiny["gen_new_tokens"] == 2 * 8 and tiny["gen_tokens_per_s"] > 0
    assert tiny["train_tokens_per_s"] == pytest.approx(2 * tiny["seq_len"] / tiny["step_s"], rel=1e-6)
    assert tiny["mfu"] == pytest.approx(6 * tiny["params"] * tiny["train_tokens_per_s"] / 989e12, rel=1e-9)
    assert 0 < tiny["mfu_split"] < 1


@pytest.mark.train
def test_deepspeed_zero2_path_matches_the_plain_run(tiny):
    res = _run("--preset", "tiny", "--device", "cpu", "--steps", "4", "--deepspeed",
               os.path.join(REPO, "workflow", "deepspeed", "zero2.json"), "--no-generate", deepspeed_no_shm=True)
    assert res["zero_stage"] == 2 and "gen_tokens_per_s" not in res
    assert res["losses"] == pytest.approx(tiny["losses"], rel=1e-4)


def test_448px_batch_has_256_image_tokens():
    import torch
    g = _load()
    args = g.parse_args(["--preset", "tiny", "--image-size", "448", "--text-tokens", "40", "--batch-size", "3"])
    model_ids = dict(pad=1018, eos=1019, vision_start=1020, vision_end=1021, image=1022, video=1023)
    b = g.synthetic_batch(args, model_ids, torch, torch.device("cpu"), torch.float32)
    assert b["pixel_values"].shape == (3 * 1024, 3 * 2 * 14 * 14)
    assert b["image_grid_thw"].tolist() == [[1, 32, 32]] * 3
    assert (b["input_ids"] == 1022).sum(dim=1).tolist() == [256] * 3
    assert b["input_ids"].shape == (3, 40 + 256 + 2)
    assert ((b["labels"] != -100).sum(dim=1) == 32).all()         # the text after the image


@pytest.mark.parametrize("preset,low,high", [("0.5b", 0.7e9, 0.95e9), ("1b", 2.0e9, 2.4e9), ("3b", 3.6e9, 3.9e9),
                                             ("7b", 8.0e9, 8.5e9)])
def test_gpu_presets_are_the_published_configs(preset, low, high):
    """Built on the meta device (no memory): the 3b and 7b presets are Qwen2.5-VL-3B/7B-Instruct as published
    (cwdpo/estimate.py's KNOWN: 36 layers for the 3B, not 28), the smaller ones a published Qwen2.5 language
    model behind Qwen2.5-VL's vision tower; the script counts what `cwdpo estimate` counts."""
    import torch
    from cwdpo.estimate import KNOWN, QWEN_VISION, count_parameters
    g = _load()
    args = g.parse_args(["--preset", preset])
    with torch.device("meta"):
        model, ids = g.build_model(args, torch)
    n, vis = g.count_params(model, "all"), g.count_params(model, "vision")
    assert low < n < high, n
    cfg = model.config
    assert cfg.image_token_id == ids["image"] == 151655 and cfg.vision_config.hidden_size == 1280
    if preset in ("3b", "7b"):
        pub = KNOWN[f"Qwen/Qwen2.5-VL-{preset.upper()}-Instruct"]
        assert (args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.vocab) == (
            pub["hidden_size"], pub["num_hidden_layers"], pub["num_attention_heads"], pub["num_key_value_heads"],
            pub["intermediate_size"], pub["vocab_size"])
        assert bool(args.tie) == pub["tie_word_embeddings"]
        assert args.vision_depth == 32 and cfg.vision_config.fullatt_block_indexes == [7, 15, 23, 31]
        expected = count_parameters({k: v for k, v in pub.items() if k != "out_hidden_size"}, QWEN_VISION)
        assert (n, vis) == (expected["total"], expected["vision"])
    if preset == "3b":
        assert cfg.text_config.rope_parameters["mrope_section"] == [16, 24, 24] and args.layers == 36


def test_cuda_device_gets_an_index_before_set_device(monkeypatch):
    """The default device was `cuda` without an index, and `torch.cuda.set_device` refuses that ("Expected a
    torch.device with a specified index"): the script crashed at start on every GPU. Faked CUDA here."""
    import torch
    g = _load()
    seen = []

    def set_device(device):
        if isinstance(device, torch.device) and device.index is None:  # what torch does
            raise ValueError("Expected a torch.device with a specified index or an integer, but got:cuda")
        seen.append(device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    assert g.setup_device(None, torch) == torch.device("cuda", 0)
    assert g.setup_device("cuda", torch) == torch.device("cuda", 0)
    assert g.setup_device("cuda:1", torch) == torch.device("cuda", 1)
    assert seen == [torch.device("cuda", 0), torch.device("cuda", 0), torch.device("cuda", 1)]
    assert g.setup_device("cpu", torch) == torch.device("cpu")
