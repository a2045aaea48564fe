"""Shared fixtures: a small `shapes` dataset and a tiny Qwen2.5-VL built offline, once per test session."""
import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import micro_specs as specs  # noqa: E402  (tests/micro_specs.py: job specs built through cwdpo.plan from the micro config)


FAST_LOOP = "not slow and not train and not gpu_stack"  # the fast loop's marker expression (README § Developing)


@pytest.fixture(autouse=True)
def _no_training_in_the_fast_loop(request, monkeypatch):
    """In the fast loop (`-m FAST_LOOP`) a test that trains a model fails, naming the mark it lacks:
    `transformers.Trainer.train` refuses. (Training in a subprocess is not seen: the tests that start training
    jobs through the CLI or Snakemake are marked too.)"""
    if "not train" not in (request.config.getoption("markexpr") or "") or request.node.get_closest_marker("train"):
        return
    from transformers import Trainer

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} trains a model: mark it @pytest.mark.train (the fast loop, "
                             f"-m {FAST_LOOP!r}, runs no training)")
    monkeypatch.setattr(Trainer, "train", refuse)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    from cwdpo import shapes
    out = tmp_path_factory.mktemp("shapes")
    shapes.generate(str(out), shapes.ShapesSpec(splits={"train": 120, "finetune": 40, "test": 16}, seed=3),
                    progress=False)
    return str(out)


@pytest.fixture(scope="session")
def shapes_records(shapes_dir):
    from cwdpo.data import load_karpathy
    return load_karpathy(os.path.join(shapes_dir, "dataset_shapes.json"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, shapes_records):
    from cwdpo.models import build_tiny
    out = tmp_path_factory.mktemp("tiny")
    corpus = [c for r in shapes_records for c in r.captions]
    build_tiny(str(out), corpus, specs.tiny_model_spec(), specs.PROMPT, seed=0)
    return str(out)


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    from cwdpo.models import load_processor
    return load_processor(tiny_model_dir)


@pytest.fixture(scope="session")
def vlm():
    return specs.vlm()


@pytest.fixture()
def encoder(processor):
    from cwdpo.logprobs import Encoder
    return Encoder(processor, specs.PROMPT, max_response_tokens=40)


def copy_workflow(dest):
    """Copy what `snakemake` needs (Snakefile, workflow/, config/, profiles/, the micro config) to `dest`."""
    import shutil
    os.makedirs(dest, exist_ok=True)
    for name in ("Snakefile", "workflow", "config", "profiles"):
        src = os.path.join(REPO, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name))
        else:
            shutil.copy(src, os.path.join(dest, name))
    shutil.copy(os.path.join(REPO, "tests", "configs", "micro.yaml"), os.path.join(dest, "micro.yaml"))
    return str(dest)


def run(cmd, cwd=None, env=None, timeout=None):
    """Run a command, failing the test with its output when it fails. No time limit by default: a busy
    machine makes a workflow slow, and a test passes or fails by what it wrote, never by the clock."""
    import subprocess
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    return proc

