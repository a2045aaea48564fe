"""GPU slots of local runs: each GPU job gets its own device(s) (no torch).

Snakemake's `gpu` resource only counts: without `--resources gpu=N` a training job and a vLLM job start
together on GPU 0 (and vLLM, finding its memory taken, refuses to start); with `gpu=N > 1` every job still
lands on GPU 0, since nothing sets CUDA_VISIBLE_DEVICES. Every GPU rule therefore starts its command through
`cwdpo gpus --n K -- <command>`, which takes K free GPUs of the visible ones — an exclusive `flock` on one
lock file per GPU — sets CUDA_VISIBLE_DEVICES to them and `exec`s the command; the locks are released
when the command exits, however it exits. A job that finds fewer than K free GPUs waits for them, so
jobs never share a GPU even when Snakemake starts more of them than there are GPUs.

Visible GPUs: `$CWDPO_GPUS` (a comma list) if set, else `$CUDA_VISIBLE_DEVICES` if set, else every GPU
`nvidia-smi` lists. Lock files live in `$CWDPO_GPU_LOCK_DIR`, default `/tmp/cwdpo-gpus-<uid>[-<slurm job>]`
(Apptainer binds /tmp, so jobs in containers share them; inside a Slurm allocation the namespace is the
job's own: its GPUs are its own). With no GPU visible the command runs as it is (a CPU machine).
"""
from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import time


def visible_gpus(env=None) -> list:
    env = os.environ if env is None else env
    for key in ("CWDPO_GPUS", "CUDA_VISIBLE_DEVICES"):
        if key in env:
            return [g.strip() for g in env[key].split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def lock_dir(env=None) -> str:
    env = os.environ if env is None else env
    if env.get("CWDPO_GPU_LOCK_DIR"):
        return env["CWDPO_GPU_LOCK_DIR"]
    job = env.get("SLURM_JOB_ID")
    return f"/tmp/cwdpo-gpus-{os.getuid()}" + (f"-{job}" if job else "")


def try_acquire(n: int, gpus: list, folder: str) -> tuple[list, list]:
    """K = n GPUs of `gpus` locked now, or none: ([ids], [open lock files]) or ([], [])."""
    os.makedirs(folder, exist_ok=True)
    ids, files = [], []
    for gpu in gpus:
        f = open(os.path.join(folder, "gpu-" + re.sub(r"[^A-Za-z0-9_.-]", "_", gpu) + ".lock"), "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        ids.append(gpu)
        files.append(f)
        if len(ids) == n:
            return ids, files
    for f in files:  # not enough: give back what we took, so that no two jobs hold part of what each needs
        f.close()
    return [], []


def acquire(n: int, gpus: list, folder: str, poll: float = 2.0) -> tuple[list, list]:
    """Wait until `n` of `gpus` are free; returns their ids and lock files (keep them open)."""
    waited = False
    while True:
        ids, files = try_acquire(n, gpus, folder)
        if ids:
            return ids, files
        if not waited:
            print(f"[cwdpo gpus] waiting for {n} free GPU(s) of {','.join(gpus)} (locks in {folder})",
                  file=sys.stderr, flush=True)
            waited = True
        time.sleep(poll)


def run(n: int, command: list) -> None:
    """`cwdpo gpus --n N -- command...`: exec `command` on N GPUs of its own (never returns)."""
    if not command:
        raise SystemExit("cwdpo gpus: no command after --")
    env = dict(os.environ)
    gpus = visible_gpus(env)
    if n > 0 and gpus:
        if len(gpus) < n:
            raise SystemExit(f"cwdpo gpus: the job needs {n} GPU(s) but {len(gpus)} are visible "
                             f"({','.join(gpus)}); lower compute.gpus_per_*_job")
        ids, files = acquire(n, gpus, lock_dir(env))
        for f in files:
            os.set_inheritable(f.fileno(), True)  # the locks live as long as the command
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
        print(f"[cwdpo gpus] CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}", file=sys.stderr, flush=True)
    elif n > 0:
        print(f"[cwdpo gpus] no GPU visible: running without one ({n} asked)", file=sys.stderr, flush=True)
    sys.stderr.flush()
    os.execvpe(command[0], command, env)
