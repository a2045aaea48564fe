"""The pipeline's own costs: `snakemake -n`, the no-op rerun, and the totals of a finished run's
Snakemake `benchmark:` files."""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import time

from ..paths import BENCHMARKS, LOGS


def dag_timings(workdir: str, experiment_dir: str) -> dict:
    """`snakemake -n` seconds and, after a finished run, the no-op `snakemake --cores all` seconds."""
    out = {}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n"], cwd=workdir, capture_output=True, text=True)
    out["dry_run_s"] = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "--version"], cwd=workdir, capture_output=True, text=True)
    out["snakemake_startup_s"] = time.perf_counter() - t
    if proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "snakemake", "--cores", "all"], cwd=workdir, capture_output=True,
                       text=True)
        out["noop_rerun_s"] = time.perf_counter() - t
    else:
        out["noop_rerun_s"] = None
        out["noop_rerun_na"] = f"the default pipeline in {experiment_dir} is not complete (run `snakemake --cores all`)"
    return out


def pipeline_costs(experiment_dir: str) -> dict:
    """Totals of the Snakemake `benchmark:` files of a finished run, and its wall time from file times:
    from the earliest job start (a benchmark file's mtime minus its `s`, or the earliest log) to the
    newest benchmark, log, table or figure file. Snakemake records no run-level timing itself."""
    rows, starts, ends = [], [], []
    for path in glob.glob(os.path.join(experiment_dir, BENCHMARKS, "**", "*.tsv"), recursive=True):
        with open(path) as f:
            lines = f.read().strip().splitlines()
        if len(lines) >= 2:
            head, vals = lines[0].split("\t"), lines[-1].split("\t")
            row = dict(zip(head, vals))
            rows.append(row)
            end = os.path.getmtime(path)
            starts.append(end - float(row["s"]))
            ends.append(end)
    if not rows:
        return {"na": f"no benchmark files under {experiment_dir}/{BENCHMARKS}"}
    for sub in (LOGS, "tables", "figures"):
        for path in glob.glob(os.path.join(experiment_dir, sub, "**", "*"), recursive=True):
            if os.path.isfile(path):
                t = os.path.getmtime(path)
                ends.append(t)
                if sub == LOGS:
                    starts.append(t)
    seconds = sum(float(r["s"]) for r in rows)
    peak = max(float(r["max_rss"]) for r in rows if r.get("max_rss") not in (None, "", "NA"))
    return {"jobs_with_benchmarks": len(rows), "sum_job_seconds": seconds, "max_job_rss_mb": peak,
            "wall_s": max(ends) - min(starts), **startup_costs(experiment_dir)}


STARTUP_LINE = re.compile(r"^\[cwdpo\] (\S+): start-up ([0-9.]+) s, work ([0-9.]+) s$", re.M)


def startup_costs(experiment_dir: str) -> dict:
    """Start-up of the run's `cwdpo` jobs, from the line each writes to its log: start-up seconds (process
    start to the end of its imports), work seconds, and the start-up share of all job-seconds, by command."""
    by_command: dict = {}
    for path in glob.glob(os.path.join(experiment_dir, LOGS, "**", "*.log"), recursive=True):
        with open(path, errors="replace") as f:
            for command, startup, work in STARTUP_LINE.findall(f.read()):
                c = by_command.setdefault(command, {"jobs": 0, "startup_s": 0.0, "work_s": 0.0})
                c["jobs"] += 1
                c["startup_s"] += float(startup)
                c["work_s"] += float(work)
    startup = sum(c["startup_s"] for c in by_command.values())
    total = startup + sum(c["work_s"] for c in by_command.values())
    return {"startup_s": startup, "job_seconds_from_logs": total, "startup_share": startup / total if total else None,
            "startup_by_command": by_command}
