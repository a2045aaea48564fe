"""Hub-id models: the workflow's own Hugging Face cache, offline jobs, the fingerprint of a hub model, and
inference placement (GPU when CUDA is present; batches follow the model)."""
import json
import os
import subprocess
import sys

import pytest

import micro_specs as specs
from cwdpo import hub

REPO_ID = "cwdpo-test/Qwen2.5-VL-tiny"


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_model_dir):
    """A Hugging Face home whose hub cache holds the tiny model as the hub id REPO_ID."""
    home = tmp_path_factory.mktemp("hf_home")
    hub.publish_to_cache(tiny_model_dir, REPO_ID, str(home / "hub"))
    return str(home)


def offline_env(hf_home):
    return {**os.environ, "HF_HOME": hf_home, "HF_HUB_CACHE": os.path.join(hf_home, "hub"), "HF_HUB_OFFLINE": "1",
            "HF_ENDPOINT": "http://127.0.0.1:9"}  # a closed port: any network access fails at once


def test_published_snapshot_is_found_offline_and_fetch_downloads_nothing(hf_home, tiny_model_dir, tmp_path):
    snap = hub.snapshot_path(REPO_ID, cache_dir=os.path.join(hf_home, "hub"))
    assert sorted(os.listdir(snap)) == sorted(os.listdir(tiny_model_dir))
    assert hub.snapshot_path(REPO_ID, os.path.join(hf_home, "hub")) == snap  # deterministic commit
    doc = hub.fetch(REPO_ID, os.path.join(hf_home, "hub"))
    assert not doc["downloaded"] and doc["commit"] == os.path.basename(snap) and "model.safetensors" in doc["files"]
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        hub.snapshot_path("cwdpo-test/absent", cache_dir=os.path.join(hf_home, "hub"))
    assert hub.is_hub_id("Qwen/Qwen2.5-VL-3B-Instruct") and not hub.is_hub_id("tiny")
    assert not hub.is_hub_id(tiny_model_dir) and not hub.is_hub_id("./models/x")


@pytest.mark.slow
def test_ref_logps_of_a_hub_id_runs_offline_and_keys_on_the_snapshot(hf_home, shapes_records, tmp_path):
    """Stage 2 from the base model (`stage1: base`, the "DPO (from base)" row): the reference is the hub id.
    `model_fingerprint` listed a directory named like the hub id (FileNotFoundError); it now keys the
    cache on the id and the snapshot's commit."""
    from cwdpo.negatives import build_pairs, write_pairs
    from cwdpo.specs import RefSpec, to_json
    recs = [r for r in shapes_records if r.split == "finetune"][:3]
    pairs, _ = build_pairs(recs, specs.negatives(pairs_per_image=1), rho=1.0, seed=0, scorer=lambda t, r: 0.0)
    path = str(tmp_path / "pairs.jsonl")
    write_pairs(path, pairs, specs.PROMPT)
    spec = RefSpec(vlm=specs.vlm(base=REPO_ID), model=REPO_ID, batch_size=2)
    out = tmp_path / "ref.json"
    p = subprocess.run([sys.executable, "-m", "cwdpo.cli", "ref-logps", "--spec", to_json(spec), "--pairs", path,
                        "--out", str(out)], env=offline_env(hf_home), capture_output=True, text=True, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["n_pairs"] == 3 and len(doc["ref_chosen_logps"]) == 3
    import hashlib
    commit = os.path.basename(hub.snapshot_path(REPO_ID, os.path.join(hf_home, "hub")))
    assert doc["key"]["model"] == hashlib.sha256(f"hub:{REPO_ID}@{commit}".encode()).hexdigest()


class _Recorder:
    """Wraps `from_pretrained`: records its keyword arguments, loads on the CPU (there is no GPU here)."""

    def __init__(self, monkeypatch):
        from transformers import AutoModelForImageTextToText
        self.calls = []
        real = AutoModelForImageTextToText.from_pretrained.__func__
        cls = AutoModelForImageTextToText

        def fake(klass, *args, **kwargs):
            self.calls.append(dict(kwargs))
            kwargs.pop("device_map", None)
            return real(klass, *args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(fake))


def test_inference_models_are_placed_on_the_gpus_when_cuda_is_present(monkeypatch, tiny_model_dir, tmp_path):
    """Every inference job (reference pass, hf sampling, evaluation) loads through `load_for_inference`:
    with CUDA it asks for `device_map="auto"` (the job's GPUs), without it nothing (CPU)."""
    from cwdpo import models
    rec = _Recorder(monkeypatch)
    models.load_for_inference(tiny_model_dir, specs.vlm(), processor=False)
    assert "device_map" not in rec.calls[-1]  # this machine: no CUDA, no placement
    monkeypatch.setattr(models, "cuda_available", lambda: True)  # what torch.cuda.is_available says on a GPU
    models.load_for_inference(tiny_model_dir, specs.vlm(), processor=False)
    assert rec.calls[-1]["device_map"] == "auto"
    # an adapter folder: its base model is placed, the adapter follows it
    from cwdpo.models import load_model
    lora = load_model(tiny_model_dir, trainable=True, lora={"r": 4, "target_modules": ["q_proj"]})
    lora.save_pretrained(str(tmp_path / "adapter"))
    models.load_for_inference(str(tmp_path / "adapter"), specs.vlm(base=tiny_model_dir), processor=False)
    assert rec.calls[-1]["device_map"] == "auto"
    # the jobs' own loaders go through it
    from cwdpo import sampling
    sampler = sampling.HFSampler(tiny_model_dir, specs.vlm(), batch_size=4)
    assert rec.calls[-1]["device_map"] == "auto" and sampler.model is not None


def test_reference_pass_moves_its_batches_to_the_model(monkeypatch, tiny_model_dir, shapes_records, tmp_path):
    """reference.py built its batches on the CPU and never moved them: on a GPU model every forward would
    fail (or, before placement, run on the CPU). Each batch now goes to `model.device`."""
    from cwdpo.logprobs import SeqBatch
    from cwdpo.negatives import build_pairs, write_pairs
    from cwdpo.reference import reference_logps
    moved = []
    real_to = SeqBatch.to

    def to(self, device):
        moved.append(str(device))
        return real_to(self, device)
    monkeypatch.setattr(SeqBatch, "to", to)
    recs = [r for r in shapes_records if r.split == "finetune"][:2]
    pairs, _ = build_pairs(recs, specs.negatives(pairs_per_image=2), rho=1.0, seed=0, scorer=lambda t, r: 0.0)
    path = str(tmp_path / "pairs.jsonl")
    write_pairs(path, pairs, specs.PROMPT)
    doc = reference_logps(tiny_model_dir, path, str(tmp_path / "ref.json"), specs.vlm(), batch_size=2)
    assert doc["n_pairs"] == 4 and moved == ["cpu", "cpu"]  # one move per batch, to the model's device


# rules whose jobs load the (base) model, its tokenizer or an adapter on top of it
MODEL_RULES = {"stage1", "stage2", "sample_onpolicy", "ref_logps", "evaluate", "make_pairs", "heldout_pairs"}


def _jobs(text: str) -> list:
    """(rule, input line) of every job a `snakemake -n` printed."""
    import re
    return [(m.group(1), m.group(2) or "") for m in
            re.finditer(r"^rule (\w+):\n(?:    input: (.*)\n)?", text, re.MULTILINE)]


@pytest.fixture(scope="module")
def qwen3b_wf(tmp_path_factory, tiny_model_dir):
    """A copy of the workflow with the apptainer shim, a one-image COCO-style data folder, and the tiny model
    published in the workflow's cache under qwen3b's hub id (nothing can be downloaded here)."""
    from PIL import Image
    from conftest import copy_workflow
    from test_containers import write_apptainer_shim
    wf = copy_workflow(tmp_path_factory.mktemp("qwen3b") / "wf")
    coco = os.path.join(wf, "data", "coco")
    os.makedirs(os.path.join(coco, "images", "val2014"))
    Image.new("RGB", (64, 48), (200, 30, 30)).save(os.path.join(coco, "images", "val2014", "x.jpg"))
    img = {"filename": "x.jpg", "filepath": "val2014", "imgid": 0, "cocoid": 1, "split": "test",
           "sentences": [{"raw": "A red square."}, {"raw": "a red picture"}]}
    json.dump({"images": [img]}, open(os.path.join(coco, "dataset_coco.json"), "w"))
    write_apptainer_shim(os.path.join(wf, "bin"))
    hub.publish_to_cache(tiny_model_dir, "Qwen/Qwen2.5-VL-3B-Instruct",
                         os.path.join(wf, "resources", "huggingface", "hub"))
    return wf


def _smk(wf, *args):
    from conftest import run
    env = {**os.environ, "APPTAINER_SHIM_LOG": os.path.join(wf, "shim.log"), "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HOME": os.path.join(wf, "elsewhere")}  # the host's HF_HOME is not what the jobs use
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_HUB_OFFLINE", None)
    path = [p for p in env["PATH"].split(os.pathsep) if not os.path.exists(os.path.join(p, "apptainer"))]
    env["PATH"] = os.pathsep.join([os.path.join(wf, "bin")] + path)
    return run(["snakemake", *args], cwd=wf, env=env)


@pytest.mark.slow
def test_qwen3b_dry_run_fetches_the_model_once_before_every_job_that_loads_it(qwen3b_wf):
    out = _smk(qwen3b_wf, "-n", "--use-singularity", "--configfile", "config/qwen3b.yaml")
    text = out.stdout + out.stderr
    jobs = _jobs(text)
    marker = "resources/huggingface/cwdpo-fetched/Qwen--Qwen2.5-VL-3B-Instruct.json"
    assert [r for r, _ in jobs].count("fetch_model") == 1
    loading = [(r, inp) for r, inp in jobs if r in MODEL_RULES]
    assert {r for r, _ in loading} == MODEL_RULES
    for rule, inp in loading:
        assert marker in inp, (rule, inp)
    for rule, inp in jobs:  # jobs that never load a model do not wait for it
        if rule in {"validate_data", "probe_set", "trivial_baseline", "score", "table", "figure"}:
            assert marker not in inp, rule


@pytest.mark.slow
def test_tiny_scale_gets_no_fetch_rule_and_no_hf_environment(tmp_path):
    from conftest import copy_workflow, run
    wf = copy_workflow(tmp_path / "wf")
    text = run(["snakemake", "-n", "--quiet", "rules"], cwd=wf).stdout
    assert "fetch_model" not in text
    from cwdpo.config import load_config
    from cwdpo.plan import Plan
    plan = Plan(load_config(os.path.join(wf, "config", "config.yaml"), check_paths=False))
    assert not plan.hub and plan.hf_env() == "" and plan.model_inputs() == []


@pytest.mark.slow
def test_fetch_runs_locally_then_every_job_reads_the_workflow_cache_offline(qwen3b_wf):
    """Through the apptainer shim (as `apptainer exec --home <workdir>`): fetch_model finds the model in the
    workflow's cache (it was published there; a real run downloads it) and writes its marker; a job that
    loads the tokenizer (the held-out pairs) then runs with HF_HOME/HF_HUB_CACHE set to that cache and
    HF_HUB_OFFLINE=1, while the host's HF_HOME points elsewhere and the hub endpoint is unreachable."""
    wf = qwen3b_wf
    log = os.path.join(wf, "shim.log")
    if os.path.exists(log):
        os.remove(log)
    _smk(wf, "results/qwen3b/eval/heldout_pairs.jsonl", "--cores", "1", "--use-singularity",
         "--configfile", "config/qwen3b.yaml")
    lines = open(log).read().splitlines()
    fetch = [x for x in lines if "cwdpo fetch-model" in x]
    pairs = [x for x in lines if "cwdpo make-pairs" in x]
    assert len(fetch) == 1 and len(pairs) == 1
    cache = 'export HF_HOME="$PWD"/resources/huggingface; export HF_HUB_CACHE="$HF_HOME/hub" HF_HUB_OFFLINE=1'
    for line in fetch + pairs:
        assert line.startswith(f"exec --home {wf} ") and cache in line, line
    assert "HF_HUB_OFFLINE=0 cwdpo fetch-model" in fetch[0]  # the one job allowed on the network
    marker = json.load(open(os.path.join(wf, "resources", "huggingface", "cwdpo-fetched",
                                         "Qwen--Qwen2.5-VL-3B-Instruct.json")))
    assert marker["downloaded"] is False and marker["snapshot"].startswith("models--Qwen--Qwen2.5-VL-3B-Instruct/")
    summary = json.load(open(os.path.join(wf, "results", "qwen3b", "eval", "heldout_pairs_summary.json")))
    assert summary["truncated"]["max_response_tokens"] == 64
    assert not os.path.exists(os.path.join(wf, "elsewhere"))
