"""DeepSpeed ZeRO-2 and ZeRO-3 through our own trainer (`cwdpo.train.run_training`) on CPU.

Each run is a separate single-process "distributed" job (RANK=0, WORLD_SIZE=1, gloo through DeepSpeed's
CPU accelerator), in a subprocess so that its environment and process group stay out of the other tests.
The same spec runs once without DeepSpeed: a ZeRO run must train the same model (same losses, same
weights up to float reordering), write DeepSpeed's own checkpoint layout, and save full weights.
"""
import csv
import json
import math
import os
import socket
import subprocess
import sys

import pytest

import micro_specs as specs
from conftest import REPO
from cwdpo.specs import to_json

DS_DIR = os.path.join(REPO, "workflow", "deepspeed")
pytestmark = pytest.mark.slow  # three trainings in subprocesses (DeepSpeed's import alone takes seconds)

CHILD = r"""
import json, sys
import deepspeed.comm.torch as dct
# World size 1: the shared-memory allreduce kernel that DeepSpeed JIT-compiles for CPU on first use
# (1-2 minutes of g++) would have nothing to reduce; everything else is DeepSpeed's normal path.
dct.build_shm_op = lambda: None
from cwdpo.specs import TrainSpec, from_json
from cwdpo.train import run_training
spec, out = from_json(TrainSpec, sys.argv[1]), sys.argv[2]
print("METRICS", json.dumps(run_training(spec, out, threads=1)))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(model_dir, shapes_dir, deepspeed):
    return specs.train("sft", model_dir, os.path.join(shapes_dir, "dataset_shapes.json"),
                       hparams={"lr": 3e-3, "steps": 6, "batch_size": 4, "schedule": "constant", "warmup_steps": 0,
                                "weight_decay": 0.0},
                       train={"logging_steps": 1, "save_steps": 3, "save_total_limit": 2, "deepspeed": deepspeed})


def _train(tmp_path_factory, model_dir, shapes_dir, name, deepspeed):
    """Run one training in a child process; returns (out dir, metrics, losses per step, stdout)."""
    out = str(tmp_path_factory.mktemp(name))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1"}
    if deepspeed is None:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key)
    p = subprocess.run([sys.executable, "-c", CHILD, to_json(_spec(model_dir, shapes_dir, deepspeed)), out],
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{name} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    metrics = json.loads(p.stdout.split("METRICS ", 1)[1].splitlines()[0])
    with open(os.path.join(out, "train_log.csv")) as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    return out, metrics, losses, p.stdout + p.stderr


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_model_dir, shapes_dir):
    return _train(tmp_path_factory, tiny_model_dir, shapes_dir, "plain", None)


def _weights(run_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(run_dir, "model", "model.safetensors"))


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_like_the_plain_trainer(tmp_path_factory, tiny_model_dir, shapes_dir, plain, stage):
    config = os.path.join(DS_DIR, f"zero{stage}.json")
    out, metrics, losses, log = _train(tmp_path_factory, tiny_model_dir, shapes_dir, f"zero{stage}", config)
    # DeepSpeed really ran: its engine wrote its own checkpoint layout
    ckpt = os.path.join(out, "checkpoints", "checkpoint-3", "global_step3")
    files = set(os.listdir(ckpt))
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in files, files
    assert ("zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt") in files
    # it trained: finite, decreasing loss, all steps done
    assert metrics["steps"] == 6 and len(losses) == 6
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.3, losses
    # the same optimisation as without DeepSpeed (same seed, data order, AdamW, schedule, clipping)
    _, plain_metrics, plain_losses, _ = plain
    assert losses == pytest.approx(plain_losses, rel=1e-3), (losses, plain_losses)
    # the saved model is complete (ZeRO-3: 16-bit weights gathered on save) and equal to the plain one
    got, ref = _weights(out), _weights(plain[0])
    for key, tensor in ref.items():
        assert got[key].shape == tensor.shape, key
        assert (got[key].float() - tensor.float()).abs().max().item() < 1e-3, key
    assert os.path.isfile(os.path.join(out, "model", "processor_config.json"))


def test_configs_leave_the_tuned_values_to_the_trainer():
    """'auto' wherever the HF Trainer integration fills in its own arguments; no optimizer/scheduler
    sections, so the Trainer's AdamW and our learning-rate schedule are used (and no DeepSpeed op has to
    be compiled: the image has no CUDA compiler)."""
    for stage in (2, 3):
        cfg = json.load(open(os.path.join(DS_DIR, f"zero{stage}.json")))
        assert cfg["zero_optimization"]["stage"] == stage
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
                    "train_batch_size"):
            assert cfg[key] == "auto", key
        assert cfg["bf16"]["enabled"] == "auto"
        assert "optimizer" not in cfg and "scheduler" not in cfg
        assert cfg["zero_optimization"]["reduce_bucket_size"] == "auto"
    z3 = json.load(open(os.path.join(DS_DIR, "zero3.json")))["zero_optimization"]
    assert z3["stage3_gather_16bit_weights_on_model_save"] is True
    assert z3["stage3_prefetch_bucket_size"] == z3["stage3_param_persistence_threshold"] == "auto"


LOAD_CHILD = r"""
import json, sys
import deepspeed.comm.torch as dct
dct.build_shm_op = lambda: None
from cwdpo.specs import TrainSpec, from_json
from cwdpo.train import load_for_training
spec, out = from_json(TrainSpec, sys.argv[1]), sys.argv[2]
args, model = load_for_training(spec, out)
base = [(n, p) for n, p in model.named_parameters() if "lora_" not in n]
print("LOADED", json.dumps({
    "base": len(base),
    "partitioned": sum(hasattr(p, "ds_id") and p.numel() == 0 for _, p in base),
    "full_numel": sum(int(getattr(p, "ds_numel", 0) or p.numel()) for _, p in base),
    "trainable": [n for n, p in model.named_parameters() if p.requires_grad]}))
"""


@pytest.mark.parametrize("lora", [None, {"r": 4, "target_modules": r".*language_model.*\.(q_proj|v_proj)"}],
                         ids=["full", "lora"])
def test_zero3_partitions_the_weights_while_loading(tmp_path, tiny_model_dir, shapes_dir, lora):
    """run_training builds its TrainingArguments (with the ZeRO-3 config) before loading the model, so
    transformers loads it inside deepspeed.zero.Init: every base weight is partitioned as it is read (an
    empty local tensor, its full size in ds_numel) instead of being held whole by every rank."""
    import dataclasses
    from safetensors import safe_open
    spec = dataclasses.replace(_spec(tiny_model_dir, shapes_dir, os.path.join(DS_DIR, "zero3.json")), lora=lora)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", LOAD_CHILD, to_json(spec), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    info = json.loads(p.stdout.split("LOADED ", 1)[1].splitlines()[0])
    assert info["base"] > 20 and info["partitioned"] == info["base"], info
    with safe_open(os.path.join(tiny_model_dir, "model.safetensors"), "pt") as f:
        stored = sum(f.get_tensor(k).numel() for k in f.keys())
    assert info["full_numel"] == stored  # every weight of the file, partitioned (tied embeddings stored once)
    if lora is None:
        assert len(info["trainable"]) == info["base"]
    else:  # the adapter's fresh weights are what trains
        assert info["trainable"] and all("lora_" in n for n in info["trainable"])
