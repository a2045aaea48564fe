"""Reliability: resume after SIGKILL, NaN guard, bad config / data fail fast, quoting, atomic writes."""
import dataclasses
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import micro_specs as specs
from conftest import REPO, copy_workflow, run
from cwdpo.specs import to_json


def _pairs_and_ref(tiny_model_dir, shapes_records, tmp_path):
    from cwdpo.negatives import build_pairs, write_pairs
    from cwdpo.reference import reference_logps
    recs = [r for r in shapes_records if r.split == "finetune"][:16]
    pairs, _ = build_pairs(recs, specs.negatives(pairs_per_image=2, p_easy=0.5), rho=1.0, seed=0)
    path = str(tmp_path / "pairs.jsonl")
    write_pairs(path, pairs, specs.PROMPT)
    ref = str(tmp_path / "ref.json")
    reference_logps(tiny_model_dir, path, ref, specs.vlm())
    return path, ref


def _cw_spec(tiny_model_dir, shapes_dir, pairs, ref, steps, save_steps):
    return specs.train("cw_dpo", tiny_model_dir, os.path.join(shapes_dir, "dataset_shapes.json"), seed=3,
                       pairs=pairs, ref_logps=ref,
                       hparams={"lr": 5e-4, "steps": steps, "batch_size": 4, "schedule": "cosine_with_min_lr",
                                "warmup_steps": 5, "weight_decay": 0.01},
                       train={"logging_steps": 10, "save_steps": save_steps, "save_total_limit": 2})


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_gives_identical_final_metrics(tiny_model_dir, shapes_dir, shapes_records,
                                                                        tmp_path):
    pairs, ref = _pairs_and_ref(tiny_model_dir, shapes_records, tmp_path)
    spec = to_json(_cw_spec(tiny_model_dir, shapes_dir, pairs, ref, steps=60, save_steps=10))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    run(["cwdpo", "train", "--spec", spec, "--out", whole, "--threads", "1"], env=env)
    proc = subprocess.Popen(["cwdpo", "train", "--spec", spec, "--out", killed, "--threads", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while proc.poll() is None and not glob.glob(os.path.join(killed, "checkpoints", "checkpoint-20",
                                                                "trainer_state.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # a node preemption: no cleanup, no final save
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "metrics.json")), "the run finished before it was killed"
    run(["cwdpo", "train", "--spec", spec, "--out", killed, "--threads", "1"], env=env)
    a, b = json.load(open(os.path.join(whole, "metrics.json"))), json.load(open(os.path.join(killed, "metrics.json")))
    assert b["resumed_from"] and b["resumed_from"].startswith("checkpoint-")
    for k in ("final_loss", "steps", "mean_w_c", "mean_accuracies", "mean_filtered_frac"):
        assert a[k] == b[k], k
    assert open(os.path.join(whole, "train_log.csv")).read() == open(os.path.join(killed, "train_log.csv")).read()
    from safetensors.torch import load_file
    wa, wb = load_file(os.path.join(whole, "model", "model.safetensors")), \
        load_file(os.path.join(killed, "model", "model.safetensors"))
    assert all((wa[k] == wb[k]).all() for k in wa)
    # only the last `save_total_limit` checkpoints are kept
    assert len(glob.glob(os.path.join(killed, "checkpoints", "checkpoint-*"))) <= 2


@pytest.mark.train
def test_stale_checkpoints_of_another_spec_are_not_resumed(tiny_model_dir, shapes_dir, shapes_records, tmp_path):
    from cwdpo.train import run_training
    pairs, ref = _pairs_and_ref(tiny_model_dir, shapes_records, tmp_path)
    out = str(tmp_path / "run")
    run_training(_cw_spec(tiny_model_dir, shapes_dir, pairs, ref, steps=6, save_steps=3), out)
    base = _cw_spec(tiny_model_dir, shapes_dir, pairs, ref, steps=6, save_steps=3)
    other = dataclasses.replace(base, hparams={**base.hparams, "lr": 1e-4})
    m = run_training(other, out)
    assert m["resumed_from"] is None  # the lr changed: the old checkpoints were discarded


@pytest.mark.train
def test_injected_nan_stops_training_naming_step_and_method(tiny_model_dir, shapes_dir, shapes_records, tmp_path):
    from cwdpo.train import TrainingDiverged, run_training
    pairs, ref = _pairs_and_ref(tiny_model_dir, shapes_records, tmp_path)
    spec = _cw_spec(tiny_model_dir, shapes_dir, pairs, ref, steps=10, save_steps=2)
    spec = dataclasses.replace(spec, train={**spec.train, "inject_nan_step": 5})
    with pytest.raises(TrainingDiverged, match=r"non-finite gradient at step 5 of method cw_dpo"):
        run_training(spec, str(tmp_path / "run"))
    ckpts = sorted(glob.glob(str(tmp_path / "run" / "checkpoints" / "checkpoint-*")))
    assert [os.path.basename(c) for c in ckpts] == ["checkpoint-2", "checkpoint-4"]  # the last good ones
    assert not os.path.exists(tmp_path / "run" / "model")


@pytest.mark.parametrize("batch_size,grad_accum", [(64, 1), (8, 8)])
def test_batch_larger_than_the_pairs_fails_before_training(tiny_model_dir, shapes_dir, shapes_records, tmp_path,
                                                           batch_size, grad_accum):
    """With 32 pairs, one step of 64 pairs would take no optimizer step (incomplete batches are dropped)
    and still end "successfully" with the Stage-1 weights: it stops before training, naming the numbers."""
    from cwdpo.config import ConfigError
    from cwdpo.train import run_training
    pairs, ref = _pairs_and_ref(tiny_model_dir, shapes_records, tmp_path)
    spec = _cw_spec(tiny_model_dir, shapes_dir, pairs, ref, steps=6, save_steps=3)
    spec = dataclasses.replace(spec, hparams={**spec.hparams, "batch_size": batch_size, "grad_accum": grad_accum})
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"batch_size {batch_size} × grad_accum {grad_accum} × 1 process\(es\) = "
                       rf"64 pairs, but the training data has 32 pairs: not one full step of the 6 asked fits"):
        run_training(spec, str(out))
    assert not out.exists()  # before the checkpoints folder, the model, anything


def test_a_run_that_stops_short_is_an_error_not_a_model(tiny_model_dir, shapes_dir, shapes_records, tmp_path,
                                                         monkeypatch):
    from transformers.trainer_utils import TrainOutput

    from cwdpo.train import CWDPOTrainer, TrainingIncomplete, run_training
    pairs, ref = _pairs_and_ref(tiny_model_dir, shapes_records, tmp_path)
    spec = _cw_spec(tiny_model_dir, shapes_dir, pairs, ref, steps=6, save_steps=3)
    monkeypatch.setattr(CWDPOTrainer, "train", lambda self, **kw: TrainOutput(0, 0.0, {}))  # a silent no-op
    with pytest.raises(TrainingIncomplete, match=r"cw_dpo: the Trainer stopped after 0 of the 6 steps asked "
                                                 r"\(32 training items\)"):
        run_training(spec, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "metrics.json").exists()


@pytest.fixture(scope="module")
def whole_run(tiny_model_dir, shapes_dir, shapes_records, tmp_path_factory):
    """An uninterrupted 10-step CW-DPO run (checkpoints every 2 steps) and its pairs."""
    from cwdpo.train import run_training
    tmp = tmp_path_factory.mktemp("whole")
    pairs, ref = _pairs_and_ref(tiny_model_dir, shapes_records, tmp)
    spec = _cw_spec(tiny_model_dir, shapes_dir, pairs, ref, steps=10, save_steps=2)
    run_training(spec, str(tmp / "run"))
    return spec, str(tmp / "run")


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


@pytest.mark.train
@pytest.mark.parametrize("damage", [
    lambda ck: _truncate(os.path.join(ck, "model.safetensors")),
    lambda ck: _truncate(os.path.join(ck, "optimizer.pt")),
    lambda ck: open(os.path.join(ck, "trainer_state.json"), "w").write('{"global_step": 6, "log_hi'),
], ids=["weights-truncated", "optimizer-truncated", "state-garbled"])
def test_unreadable_newest_checkpoint_falls_back_to_the_previous_one(whole_run, tmp_path, damage):
    from safetensors.torch import load_file

    from cwdpo.train import TrainingDiverged, run_training
    spec, whole = whole_run
    out = str(tmp_path / "run")
    # stop the run after step 6 (checkpoints 4 and 6 kept; the test hook is not part of the spec's identity)
    with pytest.raises(TrainingDiverged):
        run_training(dataclasses.replace(spec, train={**spec.train, "inject_nan_step": 7}), out)
    ckpts = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(ckpts)) == ["checkpoint-4", "checkpoint-6", "spec.sha256"]
    damage(os.path.join(ckpts, "checkpoint-6"))  # e.g. the node died while writing it
    m = run_training(spec, out)
    assert m["resumed_from"] == "checkpoint-4" and m["steps"] == 10
    wa = load_file(os.path.join(whole, "model", "model.safetensors"))
    wb = load_file(os.path.join(out, "model", "model.safetensors"))
    assert all((wa[k] == wb[k]).all() for k in wa)  # the same weights as the run that was never interrupted


@pytest.mark.train
def test_training_errors_end_the_job_with_one_line_after_the_traceback(tiny_model_dir, shapes_dir, shapes_records,
                                                                        tmp_path):
    """`cwdpo train` (as a rule runs it): a diverged run and a batch too large for the data each end with
    one line `cwdpo train: <message>`; the traceback above it stays in the job's log."""
    pairs, ref = _pairs_and_ref(tiny_model_dir, shapes_records, tmp_path)
    spec = _cw_spec(tiny_model_dir, shapes_dir, pairs, ref, steps=6, save_steps=2)
    cases = [(dataclasses.replace(spec, train={**spec.train, "inject_nan_step": 3}),
              "cwdpo train: non-finite gradient at step 3 of method cw_dpo; the last good checkpoint is kept"),
             (dataclasses.replace(spec, hparams={**spec.hparams, "batch_size": 40}),
              "cwdpo train: stage1 (cw_dpo): one optimizer step takes batch_size 40 × grad_accum 1 × 1 process(es) "
              "= 40 pairs, but the training data has 32 pairs: not one full step of the 6 asked fits. Lower the "
              "batch size or grad_accum (config stage1), or give it more data")]
    for i, (bad, line) in enumerate(cases):
        proc = subprocess.run(["cwdpo", "train", "--spec", to_json(bad), "--out", str(tmp_path / f"run{i}"),
                               "--threads", "1"], capture_output=True, text=True)
        assert proc.returncode == 1
        assert proc.stderr.splitlines()[-1] == line, proc.stderr[-3000:]
        assert "Traceback (most recent call last)" in proc.stderr


@pytest.mark.slow
def test_micro_stage2_batch_larger_than_its_pairs_fails_before_training_in_one_line(tmp_path):
    """The micro config with a Stage-2 batch of 64 (its Stage 2 has 48 pairs): the stage2 job stops before
    training, and the one line naming the batch and the pairs reaches Snakemake's own output (the
    workflow profile, which also prints failed logs, switched off), with the traceback in the job's log."""
    wf = copy_workflow(tmp_path / "wf")
    cfg = tmp_path / "big_batch.yaml"
    cfg.write_text("stage2: {defaults: {batch_size: 64}}\n")
    target = "results/micro/stage2/base/s0/dpo/metrics.json"
    run_dir = os.path.join(wf, os.path.dirname(target))
    proc = subprocess.run([sys.executable, "-m", "snakemake", target, "--cores", "2",
                           "--workflow-profile", "none", "--configfile", "micro.yaml", str(cfg)], cwd=wf,
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    lines = re.findall(r"^cwdpo train: .*$", out, re.M)
    assert lines == ["cwdpo train: stage2 (dpo): one optimizer step takes batch_size 64 × grad_accum 1 × 1 "
                     "process(es) = 64 pairs, but the training data has 48 pairs: not one full step of the 6 asked "
                     "fits. Lower the batch size or grad_accum (config stage2), or give it more data"], out[-4000:]
    assert "Traceback" not in out  # the traceback stays in the job's log
    log = open(os.path.join(wf, "results", "micro", "logs", "stage2", "base_s0_dpo.log")).read()
    assert "Traceback (most recent call last)" in log and log.rstrip().endswith(lines[0])
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))  # no training started
    assert not os.path.exists(os.path.join(run_dir, "metrics.json"))


def test_atomic_writes_leave_no_truncated_file(tmp_path, monkeypatch):
    from cwdpo import data
    path = str(tmp_path / "table.json")
    data.write_json(path, {"a": 1})

    class Boom(Exception):
        pass

    def broken_dump(obj, f, **kw):
        f.write('{"a": 2, "trunc')
        raise Boom

    monkeypatch.setattr(data.json, "dump", broken_dump)
    with pytest.raises(Boom):
        data.write_json(path, {"a": 2})
    monkeypatch.undo()
    assert json.load(open(path)) == {"a": 1}  # the old complete file, never a truncated one


@pytest.mark.parametrize("case", ["missing", "corrupt", "empty_caption", "missing_field"])
def test_bad_data_errors_naming_file_and_image_or_is_skipped_and_counted(tmp_path, case):
    from PIL import Image
    root = tmp_path / "data"
    root.mkdir()
    images = []
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 50, 0, 0)).save(root / f"img{i}.png")
        images.append({"filename": f"img{i}.png", "imgid": i, "cocoid": 100 + i, "split": "test",
                       "sentences": [{"raw": "a red square"}]})
    if case == "missing":
        os.remove(root / "img1.png")
    elif case == "corrupt":
        (root / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    elif case == "empty_caption":
        images[1]["sentences"][0]["raw"] = ""
    else:
        del images[1]["split"]
    dj = root / "dataset.json"
    dj.write_text(json.dumps({"images": images}))
    out = tmp_path / "validated.json"
    spec = {"json": str(dj), "image_root": str(root), "on_bad_input": "error"}
    proc = subprocess.run(["cwdpo", "validate-data", "--spec", json.dumps(spec), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and str(dj) in proc.stderr and "(id 101)" in proc.stderr
    spec["on_bad_input"] = "skip"
    run(["cwdpo", "validate-data", "--spec", json.dumps(spec), "--out", str(out)])
    report = json.load(open(out))
    assert report["skipped"] == 1 and report["items"][0]["image_id"] == "101"
    from cwdpo.data import load_records
    recs = load_records(specs.data(str(dj), ["test"], image_root=str(root), on_bad_input="skip",
                                   validated=str(out)))
    assert [r.image_id for r in recs] == ["100", "102"]


BAD_CONFIGS = [
    ("stage2: {recipes: {x: {method: ppo}}}", "stage2.recipes.x.method", "dpo"),
    ("negatives: {onpolicy: {backend: sglang}}", "negatives.onpolicy.backend", "vllm"),
    ("stage2: {defaults: {beta: 0}}", "stage2.defaults.beta", "minimum"),
    ("stage2: {defaults: {tau: -1}}", "stage2.defaults.tau", "minimum"),
    ("negatives: {sets: {mix: {rho: 1.5}}}", "negatives.sets.mix.rho", "maximum of 1"),
    ("stage1: {fraction: -0.1}", "stage1.fraction", "minimum of 0"),
    ("stage2: {defaults: {l_floor: men}}", "stage2.defaults.l_floor", "mean"),
    ("data: {source: karpathy, karpathy: {json: /nonexistent/dataset_coco.json}}", "data.karpathy.json",
     "does not exist"),
    ("model: {source: /nonexistent/qwen}\npretrain: {enabled: false}", "model.source", "does not exist"),
    ("negatives: {external: /nonexistent/neg.jsonl}", "negatives.external", "does not exist"),
    ("trainn: {logging_steps: 5}", "trainn", "typo"),
]


@pytest.fixture(scope="module")
def wf(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("wf"))


@pytest.mark.slow
@pytest.mark.parametrize("text,key,allowed", BAD_CONFIGS, ids=[c[1] for c in BAD_CONFIGS])
def test_bad_config_fails_before_any_job_naming_key_and_allowed(wf, tmp_path, text, key, allowed):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text + "\n")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--configfile", str(cfg)], cwd=wf,
                          capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert key in out and allowed in out, out[-2000:]
    assert "Job stats" not in out and not os.path.exists(os.path.join(wf, "results"))


@pytest.mark.slow
def test_paths_with_spaces_quotes_and_semicolons_run_and_execute_nothing(tmp_path):
    """A Karpathy dataset and an external negatives file under hostile names go through real rules."""
    from PIL import Image
    wf = copy_workflow(tmp_path / "wf")
    weird = tmp_path / "my data; touch PWNED 'q' \"d\" $(touch PWNED2)"
    (weird / "imgs").mkdir(parents=True)
    images = []
    for i in range(6):
        Image.new("RGB", (56, 56), (40 * i, 90, 10)).save(weird / "imgs" / f"a b;{i}.png")
        images.append({"filename": f"a b;{i}.png", "filepath": "imgs", "imgid": i, "cocoid": i,
                       "split": "train" if i < 4 else "test",
                       "sentences": [{"raw": f"a red dog number {i}"}, {"raw": "a dog on the left"}]})
    (weird / "data set.json").write_text(json.dumps({"images": images}))
    (weird / "neg; rm -rf x.jsonl").write_text('{"image_id": 1, "negative": "a blue cat"}\n')
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({
        "experiment": "weird",
        "data": {"source": "karpathy", "karpathy": {"json": str(weird / "data set.json"), "image_root": str(weird)},
                 "splits": {"pretrain": ["train"], "finetune": ["train"], "test": ["test"], "val": ["test"],
                            "probe": ["test"]}},
        "negatives": {"external": str(weird / "neg; rm -rf x.jsonl")},
        "model": {"source": "tiny"}}))
    targets = ["results/weird/eval/trivial/captions.json", "results/weird/eval/heldout_pairs.jsonl",
               "results/weird/negatives/sft/s0/pairs_rho1.jsonl"]
    run([sys.executable, "-m", "snakemake", *targets, "--cores", "1", "--configfile", str(cfg)], cwd=wf)
    assert not list(tmp_path.rglob("PWNED*")) and not os.path.exists(os.path.join(wf, "PWNED"))
    caps = json.load(open(os.path.join(wf, targets[0])))
    assert set(caps["captions"]) == {"4", "5"}  # the test split, read through the hostile paths
    pairs = [json.loads(x) for x in open(os.path.join(wf, targets[2]))]
    assert any(p["source"] == "external" and p["rejected"][0]["content"][0]["text"] == "a blue cat" for p in pairs)
    assert all(os.path.isfile(p["images"][0]) for p in pairs)


def test_no_unsafe_deserialisation_in_the_package():
    """Models and checkpoints load from safetensors; every torch.load is weights_only; no pickle;
    trust_remote_code stays off unless a config sets it."""
    pkg = os.path.join(REPO, "cwdpo")
    for name in os.listdir(pkg):
        if not name.endswith(".py"):
            continue
        src = open(os.path.join(pkg, name)).read()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", src):
            assert "weights_only=True" in m.group(1), (name, m.group(0))
        assert not re.search(r"^\s*import pickle|^\s*from pickle|pickle\.load", src, re.M), name
        assert "trust_remote_code=True" not in src, name
    import yaml
    schema = yaml.safe_load(open(os.path.join(REPO, "workflow", "schemas", "config.schema.yaml")))
    assert schema["properties"]["model"]["properties"]["trust_remote_code"]["default"] is False
    models = open(os.path.join(pkg, "models.py")).read()
    assert "use_safetensors=True" in models
