"""Local GPU runs: every GPU job gets GPUs of its own (cwdpo gpus), whatever Snakemake starts at once."""
import json
import os
import subprocess
import sys
import time

import pytest

import micro_specs as specs
from conftest import copy_workflow, run

CHILD = ("import json, os, sys, time; t0 = time.time(); time.sleep(float(sys.argv[2])); "
         "open(sys.argv[1], 'w').write(json.dumps({'gpus': os.environ.get('CUDA_VISIBLE_DEVICES'), "
         "'start': t0, 'end': time.time()}))")


def _start(tmp_path, name, n, seconds, env):
    out = tmp_path / f"{name}.json"
    cmd = ["cwdpo", "gpus", "--n", str(n), "--", sys.executable, "-c", CHILD, str(out), str(seconds)]
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True), out


@pytest.mark.slow
def test_concurrent_jobs_never_share_a_gpu(tmp_path):
    """Two visible GPUs (CWDPO_GPUS, as nvidia-smi would list them), five jobs started at once — one of them
    wants both: each job's CUDA_VISIBLE_DEVICES is its own, overlapping jobs hold disjoint GPUs, and jobs
    that found no free GPU waited for one instead of starting on GPU 0."""
    env = {**os.environ, "CWDPO_GPUS": "0,1", "CWDPO_GPU_LOCK_DIR": str(tmp_path / "locks")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    jobs = [_start(tmp_path, f"j{i}", 2 if i == 2 else 1, 1.5, env) for i in range(5)]
    for p, _ in jobs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    runs = [json.loads(out.read_text()) for _, out in jobs]
    assert runs[2]["gpus"] == "0,1" and all(r["gpus"] in ("0", "1") for i, r in enumerate(runs) if i != 2)
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            if a["start"] < b["end"] and b["start"] < a["end"]:  # ran at the same time
                assert not set(a["gpus"].split(",")) & set(b["gpus"].split(",")), (a, b)
    span = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    assert span >= 3 * 1.5 - 0.2  # at most two GPUs' worth of work at a time: they queued


def test_locks_are_released_when_the_job_dies(tmp_path):
    env = {**os.environ, "CWDPO_GPUS": "0", "CWDPO_GPU_LOCK_DIR": str(tmp_path / "locks")}
    p, _ = _start(tmp_path, "killed", 1, 60, env)
    time.sleep(1.0)
    p.kill()
    p.wait()
    t = time.time()
    q, out = _start(tmp_path, "next", 1, 0.1, env)
    assert q.wait(timeout=30) == 0 and json.loads(out.read_text())["gpus"] == "0" and time.time() - t < 10


def test_cpu_machine_and_exit_codes(tmp_path):
    env = {**os.environ, "CWDPO_GPUS": "", "CWDPO_GPU_LOCK_DIR": str(tmp_path / "locks")}
    p = subprocess.run(["cwdpo", "gpus", "--n", "1", "--", sys.executable, "-c", "import sys; sys.exit(7)"], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 7 and "no GPU visible" in p.stderr
    env["CWDPO_GPUS"] = "0"
    p = subprocess.run(["cwdpo", "gpus", "--n", "2", "--", "true"], env=env, capture_output=True, text=True)
    assert p.returncode != 0 and "needs 2 GPU(s) but 1 are visible" in p.stderr


@pytest.mark.slow
def test_gpu_rules_start_through_the_slot_wrapper_and_cpu_configs_do_not(tmp_path):
    from cwdpo.config import load_config
    from cwdpo.plan import Plan
    plan = Plan(load_config(specs.MICRO_CONFIG, overrides={"compute": {"gpus_per_train_job": 2,
                                                                       "gpus_per_infer_job": 1}},
                            check_paths=False))
    assert plan.gpu_prefix("train") == "cwdpo gpus --n 2 -- " and plan.gpu_prefix("infer") == "cwdpo gpus --n 1 -- "
    assert specs.micro_plan().gpu_prefix("train") == ""  # the tiny/micro configs run on CPU: no wrapper
    wf = copy_workflow(tmp_path / "wf")
    (tmp_path / "wf" / "gpu.yaml").write_text("compute: {gpus_per_train_job: 2, gpus_per_infer_job: 1}\n")
    text = run(["snakemake", "-n", "-p", "--configfile", "micro.yaml", "gpu.yaml"], cwd=wf).stdout
    assert "cwdpo gpus --n 2 -- torchrun --standalone --nproc_per_node 2 --no-python cwdpo train" in text
    for command in ("sample-onpolicy", "ref-logps", "evaluate"):
        assert f"cwdpo gpus --n 1 -- cwdpo {command}" in text, command
    text = run(["snakemake", "-n", "-p", "--configfile", "micro.yaml"], cwd=wf).stdout
    assert "cwdpo gpus" not in text
