#!/usr/bin/env python
"""The GPU check of a session lent one GPU (run through scripts/gpu_check.sh): one command, one JSON.

1. `gpu_smoke`: scripts/gpu_smoke.py on a random-init Qwen2.5-VL-3B built from its published config
   (preset 3b), bf16 weights and AdamW: training-step tokens/s and MFU, `generate` tokens/s.
2. `rehearsal`: the jobs of the qwen3b rehearsal (tests/configs/rehearsal.yaml) for one seed, on the GPU,
   with a random-init ~0.7B stand-in (scripts/rehearsal_setup.py --model 0.5b: Qwen2.5-0.5B's language
   model behind 16 Qwen2.5-VL vision blocks) published as a hub id in the workflow's Hugging Face cache,
   bf16 as in config/qwen3b.yaml: fetch, validation, on-policy sampling (hf), probe sets, Stage-1 SFT-C
   (LoRA), pairs, the cached reference pass, Stage-2 CW-DPO, evaluation. Each job is the `cwdpo` command
   its Snakemake rule runs, with the spec cwdpo.plan builds for it (so Snakemake itself is not needed on
   the machine); the check asserts that every model sat on `cuda` (the jobs record their device).

Needs torch, transformers, peft, accelerate, pyyaml, pillow, tokenizers, huggingface_hub (all in the image and on
a lent GPU machine) and jsonschema, which a GPU machine may lack: the script carries it and what it needs as
wheels (scripts/wheels/, 1.4 MB: jsonschema, jsonschema-specifications, referencing, attrs, typing-extensions,
rpds-py for CPython 3.11-3.13 on x86-64) and installs the missing ones into a scratch folder on the
PYTHONPATH (`pip --no-index`: no network; the machine's own environment is not touched). `--wheels DIR` names
another folder. No network.
`--cpu` runs the same on the CPU at toy sizes (the smoke test's tiny preset, the tiny stand-in): what the
test suite runs. Writes one JSON (`--out`, default $OUT/gpu_check.json or results/gpu_check.json) and exits
non-zero when a part failed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDED = ["torch", "transformers", "peft", "accelerate", "jsonschema", "yaml", "PIL", "tokenizers", "huggingface_hub",
          "safetensors", "numpy", "tqdm", "jinja2"]


DISTRIBUTIONS = {"yaml": "pyyaml", "PIL": "pillow"}


def modules() -> dict:
    """{import name: version, or 'missing: ...'} of what the check needs."""
    from importlib import metadata
    out = {}
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except Exception as e:  # a missing or broken package
            out[name] = f"missing: {type(e).__name__}: {e}"
            continue
        try:
            out[name] = metadata.version(DISTRIBUTIONS.get(name, name))
        except metadata.PackageNotFoundError:
            out[name] = "present"
    return out


WHEELS = os.path.join(REPO, "scripts", "wheels")  # what the script carries (see the module docstring)


def install_wheels(folder: str, target: str) -> dict:
    """pip install the missing packages from a folder of wheels (no index, no network) into `target`, which
    then leads sys.path and the PYTHONPATH of every job this check starts."""
    missing = [DISTRIBUTIONS.get(k, k) for k, v in modules().items() if str(v).startswith("missing")]
    if not missing:
        return {"installed": []}
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", folder, "--target",
                        target, "--no-compile", "--disable-pip-version-check", *missing],
                       capture_output=True, text=True)
    sys.path.insert(0, target)
    os.environ["PYTHONPATH"] = target + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    importlib.invalidate_caches()
    return {"installed": missing, "from": folder, "rc": p.returncode, "tail": (p.stdout + p.stderr)[-1500:]}


def run_smoke(cpu: bool, out_dir: str, timeout: float) -> dict:
    result = os.path.join(out_dir, "gpu_smoke.json")
    args = ["--preset", "tiny", "--device", "cpu", "--steps", "3"] if cpu else \
        ["--preset", "3b", "--precision", "bf16", "--steps", "10", "--warmup", "2"]
    t = time.time()
    p = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "gpu_smoke.py"), *args, "--json-out", result],
                       capture_output=True, text=True, timeout=timeout, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
    doc = {"args": args, "rc": p.returncode, "wall_s": round(time.time() - t, 1)}
    if p.returncode == 0 and os.path.isfile(result):
        res = json.load(open(result))
        doc.update({k: res.get(k) for k in ("device", "device_name", "precision", "params", "params_vision",
                                            "batch_size", "seq_len", "step_s", "train_tokens_per_s", "mfu",
                                            "mfu_split", "gen_tokens_per_s", "peak_mem_gb", "loss_finite",
                                            "build_s", "torch", "transformers")})
    else:
        doc["error"] = (p.stdout + p.stderr)[-3000:]
    return doc


class Jobs:
    """Runs `python -m cwdpo.cli ...` jobs in the rehearsal's working directory, as its rules would."""

    def __init__(self, workdir: str, log_dir: str, deadline: float, threads: int):
        self.workdir, self.log_dir, self.deadline, self.threads = workdir, log_dir, deadline, threads
        cache = os.path.join(workdir, "resources", "huggingface")
        self.env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    "HF_HOME": cache, "HF_HUB_CACHE": os.path.join(cache, "hub"), "HF_HUB_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false"}
        self.done: list = []
        self.failed = False

    def __call__(self, name: str, *argv, offline: bool = True) -> bool:
        if self.failed:
            return False
        left = None if self.deadline is None else self.deadline - time.time()  # None: no budget (test mode)
        if left is not None and left < 10:
            self.done.append({"job": name, "rc": None, "error": "time budget spent"})
            self.failed = True
            return False
        log = os.path.join(self.log_dir, name.replace("/", "_") + ".log")
        env = dict(self.env, HF_HUB_OFFLINE="1" if offline else "0")
        t = time.time()
        with open(log, "w") as f:
            try:
                p = subprocess.run([sys.executable, "-m", "cwdpo.cli", *argv], cwd=self.workdir, env=env, stdout=f,
                                   stderr=subprocess.STDOUT, timeout=left)
                rc = p.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        entry = {"job": name, "rc": rc, "wall_s": round(time.time() - t, 1)}
        if rc != 0:
            entry["error"] = open(log, errors="replace").read()[-3000:]
            self.failed = True
        self.done.append(entry)
        return rc == 0


def run_rehearsal(cpu: bool, workdir: str, deadline: float, threads: int) -> dict:
    """Set up the stand-in and data, then the rehearsal's jobs for seed 0 (see the module docstring)."""
    from cwdpo.config import deep_merge, load_config
    from cwdpo.paths import ModelKey
    from cwdpo.plan import Plan
    from cwdpo.specs import to_json
    import yaml
    t = time.time()
    setup = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "rehearsal_setup.py"), "--workdir", workdir,
                            "--model", "tiny" if cpu else "0.5b"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")},
                           timeout=None if deadline is None else max(10.0, deadline - time.time()))
    doc = {"setup": {"rc": setup.returncode, "wall_s": round(time.time() - t, 1)}}
    if setup.returncode != 0:
        doc["setup"]["error"] = (setup.stdout + setup.stderr)[-3000:]
        return doc
    doc["setup"].update(json.loads(setup.stdout.strip().splitlines()[-1]))
    overlay = yaml.safe_load(open(os.path.join(REPO, "tests", "configs", "rehearsal.yaml")))
    # on the GPU, qwen3b.yaml's own precision (the rehearsal turns it off for CPUs)
    device_overlay = {"experiment": "gpu_check"} if cpu else \
        {"experiment": "gpu_check", "model": {"dtype": "bfloat16"}, "train": {"bf16": True},
         "compute": {"dataloader_workers": 4}}
    cwd = os.getcwd()
    os.chdir(workdir)  # the config's data paths are relative to the working directory
    try:
        config = load_config(os.path.join(REPO, "config", "qwen3b.yaml"), deep_merge(overlay, device_overlay))
    finally:
        os.chdir(cwd)
    P = Plan(config)
    logs = os.path.join(workdir, P.out, "gpu_check_logs")
    os.makedirs(logs, exist_ok=True)
    job = Jobs(workdir, logs, deadline, threads)
    th = ["--threads", str(threads)]
    workers = ["--dataloader-workers", str(P.dataloader_workers())]
    s, key = 0, str(ModelKey("sft_c", 0, "cw_dpo"))
    job("fetch_model", "fetch-model", "--model", config["model"]["source"], "--cache", config["model"]["cache"],
        "--out", P.fetch_marker(), offline=False)
    job("validate_data", "validate-data", "--spec", to_json(P.validate_spec()), "--out", P.path("validated"))
    job("heldout_pairs", "make-pairs", "--spec", to_json(P.heldout_spec()), "--out", P.path("heldout_pairs"),
        "--summary", P.path("heldout_summary"))
    for start in ("base", "sft_c"):
        if start == "sft_c":
            job("stage1/sft_c", "train", "--spec", to_json(P.stage1_spec("sft_c", s)), "--out",
                P.run_dir(ModelKey("sft_c", s)), *th, *workers)
        onpolicy = P.path("onpolicy", stage1=start, seed=s)
        job(f"sample_onpolicy/{start}", "sample-onpolicy", "--spec", to_json(P.sample_spec(start, s)), *th,
            "--out", onpolicy, "--summary", P.path("onpolicy_summary", stage1=start, seed=s))
        job(f"probe_set/{start}", "probe-set", "--spec", to_json(P.probe_set_spec(start, s)), "--onpolicy", onpolicy,
            "--out", P.path("probe_set", stage1=start, seed=s))
    pairs = P.path("pairs", stage1="sft_c", seed=s, negset="mix")
    job("make_pairs", "make-pairs", "--spec", to_json(P.pairs_spec("sft_c", s, "mix")), "--onpolicy",
        P.path("onpolicy", stage1="sft_c", seed=s), "--out", pairs,
        "--summary", P.path("pairs_summary", stage1="sft_c", seed=s, negset="mix"))
    ref = P.path("ref_logps", stage1="sft_c", seed=s, negset="mix")
    job("ref_logps", "ref-logps", "--spec", to_json(P.ref_spec("sft_c", s)), *th, "--pairs", pairs, "--out", ref)
    job("stage2/cw_dpo", "train", "--spec", to_json(P.stage2_spec("sft_c", s, "cw_dpo")), "--out",
        P.run_dir(ModelKey("sft_c", s, "cw_dpo")), *th, *workers)
    job("evaluate", "evaluate", "--spec", to_json(P.eval_spec(key)), *th, "--captions", P.path("captions", key=key),
        "--measures", P.path("measures", key=key))
    doc["jobs"] = job.done
    want = "cpu" if cpu else "cuda"
    devices = {}

    def read(name, path, field="device"):
        full = os.path.join(workdir, path)
        devices[name] = json.load(open(full)).get(field) if os.path.isfile(full) else None

    read("stage1 training", os.path.join(P.run_dir(ModelKey("sft_c", s)), "metrics.json"))
    read("stage2 training", os.path.join(P.run_dir(ModelKey("sft_c", s, "cw_dpo")), "metrics.json"))
    read("on-policy sampling (base)", P.path("onpolicy_summary", stage1="base", seed=s))
    read("on-policy sampling (sft_c)", P.path("onpolicy_summary", stage1="sft_c", seed=s))
    read("reference log-probs", ref)
    read("evaluation", P.path("measures", key=key))
    doc["devices"] = devices
    doc["on_expected_device"] = all(isinstance(v, str) and v.startswith(want) for v in devices.values())
    metrics = os.path.join(workdir, P.run_dir(ModelKey("sft_c", s, "cw_dpo")), "metrics.json")
    if os.path.isfile(metrics):
        m = json.load(open(metrics))
        doc["stage2"] = {k: m.get(k) for k in ("steps", "final_loss", "mean_w_c", "trainable_parameters",
                                               "parameters")}
    measures = os.path.join(workdir, P.path("measures", key=key))
    if os.path.isfile(measures):
        m = json.load(open(measures))
        doc["evaluation"] = {"pref_acc": m["heldout"]["pref_acc"], "ece": m["test"]["ece"], "tv": m["test"].get("tv")}
    doc["ok"] = not job.failed and doc["on_expected_device"]
    return doc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="toy sizes on the CPU (what the test suite runs)")
    p.add_argument("--out", default=None, help="the JSON (default $OUT/gpu_check.json, else results/gpu_check.json)")
    p.add_argument("--workdir", default=None, help="the rehearsal's working directory (default: a temporary one)")
    # a wall-clock budget is the GPU machine's business (its lease is timed): --cpu, the test suite's mode,
    # sets none, so that a busy CPU makes a check slow, never failed
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting jobs after this many seconds (default: 450 on the GPU, none with --cpu)")
    p.add_argument("--smoke-timeout-s", type=float, default=None,
                   help="the smoke test's time limit (default: 180 s on the GPU, none with --cpu)")
    p.add_argument("--skip-smoke", action="store_true")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--wheels", default=WHEELS, help="the folder of wheels missing packages are installed from "
                   "(offline; default: the ones the script carries, scripts/wheels)")
    a = p.parse_args(argv)
    if not a.cpu:
        a.budget_s = 450.0 if a.budget_s is None else a.budget_s
        a.smoke_timeout_s = 180.0 if a.smoke_timeout_s is None else a.smoke_timeout_s
    t0 = time.time()
    out = a.out or os.path.join(os.environ.get("OUT") or os.path.join(REPO, "results"), "gpu_check.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    doc = {"mode": "cpu" if a.cpu else "gpu"}
    scratch = tempfile.mkdtemp(prefix="cwdpo-gpu-check-")
    doc["wheels"] = install_wheels(a.wheels, os.path.join(scratch, "site"))
    doc["modules"] = modules()
    try:
        import torch
        doc["cuda"] = {"available": torch.cuda.is_available(), "device_count": torch.cuda.device_count(),
                       "name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                       "torch_cuda": torch.version.cuda}
    except Exception as e:
        doc["cuda"] = {"error": str(e)}
    workdir = a.workdir or os.path.join(scratch, "work")
    os.makedirs(workdir, exist_ok=True)
    try:
        if not a.skip_smoke:
            try:
                doc["gpu_smoke"] = run_smoke(a.cpu, scratch, a.smoke_timeout_s)
            except subprocess.TimeoutExpired:
                doc["gpu_smoke"] = {"rc": "timeout", "error": f"over {a.smoke_timeout_s} s"}
        missing = [k for k, v in doc["modules"].items() if str(v).startswith("missing")]
        if missing:
            doc["rehearsal"] = {"ok": False, "error": f"missing packages {missing} (not among the wheels of "
                                                      f"{a.wheels}; --wheels DIR names another folder)"}
        else:
            sys.path.insert(0, REPO)
            doc["rehearsal"] = run_rehearsal(a.cpu, workdir, None if a.budget_s is None else t0 + a.budget_s,
                                             a.threads)
    finally:
        doc["total_s"] = round(time.time() - t0, 1)
        with open(out, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        if not a.workdir:
            shutil.rmtree(scratch, ignore_errors=True)
    smoke_ok = a.skip_smoke or (doc.get("gpu_smoke", {}).get("rc") == 0 and doc["gpu_smoke"].get("loss_finite"))
    ok = smoke_ok and doc["rehearsal"].get("ok")
    print(json.dumps({"ok": bool(ok), "out": out, "total_s": doc["total_s"]}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
