"""The workflow on a REAL Slurm cluster, through snakemake-executor-plugin-slurm and profiles/slurm.

CI starts a single-node Slurm (slurmctld + slurmd, slurmdbd + MariaDB for sacct, two count-only fake GPUs)
with .ci/slurm-up.sh. Without it this test skips and says why; it never passes silently.

What runs: a copy of the workflow, config tests/configs/slurm.yaml (13 jobs), target the main table, with
  --profile profiles/slurm            the real profile: executor, apptainer + its args, default-resources
                                      (partition/account read from SLURM_PARTITION / SLURM_ACCOUNT)
  --workflow-profile <tmp>/slurm-ci   overrides only what a 2-core test node needs: the profile's own
                                      set-resources with memory and CPUs cut to fit (GPU counts, tasks
                                      and runtimes kept), set-threads 1, fast status polling
and an `apptainer` shim on PATH (apptainer cannot be installed here): it answers --version and runs
`apptainer exec ... IMAGE CMD` as CMD on the host, logging its arguments, so that the test sees every
Slurm job wrapped in the image with the profile's --nv.
"""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
import yaml

from conftest import REPO, run
from test_containers import write_apptainer_shim

WORKFLOW_ITEMS = ("Snakefile", "workflow", "config", "profiles")
RUN_TIMEOUT_S = 900
GPU_RULES = ("pretrain", "stage1", "stage2", "sample_onpolicy", "beam_negatives", "ref_logps", "evaluate")
# rules the slurm.yaml DAG must contain (others, e.g. data validation, may come and go)
EXPECTED_RULES = ("prepare_data", "build_model", "make_pairs", "trivial_baseline", "stage1", "ref_logps", "stage2",
                  "evaluate", "score", "table")


def _sh(cmd, timeout=20):
    """Run a short Slurm client command; (returncode, stdout + stderr). Never hangs past `timeout`."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        return 124, str(e)


def _slurm_ready():
    """None when sbatch can run jobs on an idle node, else the reason why not."""
    for tool in ("sinfo", "sbatch", "squeue"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found: no Slurm on this machine (CI starts one with .ci/slurm-up.sh)"
    rc, out = _sh(["sinfo", "-h", "-o", "%T"])
    if rc != 0:
        return f"`sinfo` failed (rc {rc}): {out.strip()[:300]} (is slurmctld running? .ci/slurm-up.sh)"
    states = out.split()
    if not any(s.rstrip("*~#") in ("idle", "mixed") for s in states):
        return f"no idle Slurm node (sinfo states: {states}); see /var/log/slurm/"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')"
    return None


def _sacct_works():
    """True when `sacct` answers (slurmdbd accounting); the plugin's default status query needs it."""
    rc, _ = _sh(["sacct", "-n", "-X", "-o", "JobIdRaw", "--starttime", "now-1minutes"]) if shutil.which("sacct") \
        else (1, "")
    return rc == 0


def _scancel_jobs_in(workdir):
    """Cancel the Slurm jobs whose working directory is `workdir` (cleanup after a timeout)."""
    rc, out = _sh(["squeue", "-h", "-o", "%i %Z"])
    ids = [line.split()[0] for line in out.splitlines() if rc == 0 and line.split()[1:] == [workdir]]
    if ids:
        _sh(["scancel"] + ids)


def _ci_profile(work):
    """profiles/slurm-ci/config.yaml in `work`: profiles/slurm's set-resources sized for a 2-core test node."""
    import yte
    with open(os.path.join(REPO, "profiles", "slurm", "config.yaml")) as f:
        prof = yte.process_yaml(f, require_use_yte=True)
    shrunk = {}
    for rule, res in prof["set-resources"].items():
        res = dict(res)
        for key in ("mem_mb", "mem_mb_per_cpu"):
            if key in res:
                res[key] = min(int(res[key]), 1000)
        for key in ("cpus_per_gpu", "cpus_per_task"):
            if key in res:
                res[key] = 1
        shrunk[rule] = res
    ci = {"set-resources": shrunk,
          "set-threads": {rule: 1 for rule in prof.get("set-threads", {})},
          "default-resources": {**prof["default-resources"], "mem_mb": 1000},
          "slurm-init-seconds-before-status-checks": 2,
          "slurm-keep-successful-logs": True,   # the plugin deletes a successful job's log otherwise
          "latency-wait": 5,
          "jobs": 4}
    if not _sacct_works():
        ci["slurm-status-command"] = "squeue"   # accounting_storage/none: sacct fails and the plugin would hang
    d = os.path.join(work, "profiles", "slurm-ci")
    os.makedirs(d)
    with open(os.path.join(d, "config.yaml"), "w") as f:
        yaml.safe_dump(ci, f, sort_keys=False)
    return prof, ci


def _run_config(work):
    """tests/configs/slurm.yaml as the copy's config/config.yaml (and slurm.yaml): keys it leaves out take
    their schema defaults, so tables, eval sets and recipes added to the default config do not leak in."""
    src = os.path.join(REPO, "tests", "configs", "slurm.yaml")
    shutil.copy(src, os.path.join(work, "config", "config.yaml"))
    shutil.copy(src, os.path.join(work, "slurm.yaml"))


@pytest.fixture(scope="module")
def slurm_run():
    reason = _slurm_ready()
    if reason:
        pytest.skip(reason)
    # Slurm jobs run as root here, on this one node: a folder under the system temp dir is shared. Not
    # pytest's tmp_path: concurrent pytest sessions prune each other's numbered folders.
    work = tempfile.mkdtemp(prefix="cwdpo-slurm-")
    try:
        yield _run_on_slurm(work)
    finally:
        if not os.environ.get("CWDPO_KEEP_SLURM_DIR"):
            shutil.rmtree(work, ignore_errors=True)


def _run_on_slurm(work):
    """Copy the workflow to `work` and run the slurm.yaml DAG on Slurm; the facts the tests check."""
    for name in WORKFLOW_ITEMS:
        src = os.path.join(REPO, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(work, name))
    _run_config(work)
    bindir = os.path.join(work, "bin")
    write_apptainer_shim(bindir)
    shim_log = os.path.join(work, "apptainer-shim.log")
    # the profile's environment variables: partition and account of every job
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"], "APPTAINER_SHIM_LOG": shim_log,
           "HF_HUB_OFFLINE": "1", "SLURM_PARTITION": os.environ.get("CWDPO_TEST_SLURM_PARTITION", "debug"),
           "SLURM_ACCOUNT": os.environ.get("CWDPO_TEST_SLURM_ACCOUNT", "root")}
    env.pop("CWDPO_GPU_MODEL", None)   # the test cluster's fake GPUs have no type
    env.pop("SNAKEMAKE_PROFILE", None)
    prof, ci = _ci_profile(work)
    cmd = ["snakemake", "results/slurm/tables/main.md", "--profile", "profiles/slurm",
           "--workflow-profile", "profiles/slurm-ci", "--configfile", "slurm.yaml"]
    t0 = time.time()
    # own session: on a timeout the plugin's whole process group gets SIGKILL (it ignores SIGTERM while
    # it waits for a status that never comes)
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        _scancel_jobs_in(work)
        raise AssertionError(f"snakemake --executor slurm did not finish in {RUN_TIMEOUT_S} s:\n{out[-6000:]}")
    wall = time.time() - t0
    assert proc.returncode == 0, f"snakemake on Slurm failed ({proc.returncode}):\n{out[-8000:]}"
    jobs = _slurm_jobs(work)
    return {"jobs": jobs, "work": work, "out": out, "wall": wall, "profile": prof, "ci": ci, "shim_log": shim_log,
            "sacct": "slurm-status-command" not in ci}


def _slurm_jobs(work):
    """{rule: {Slurm job id: log path}} from the plugin's per-job logs
    .snakemake/slurm_logs/rule_<rule>[/<wildcards>]/<jobid>.log."""
    jobs = {}
    root = os.path.join(work, ".snakemake", "slurm_logs")
    for path in glob.glob(os.path.join(root, "rule_*", "**", "*.log"), recursive=True):
        rule = os.path.relpath(path, root).split(os.sep)[0][len("rule_"):]
        m = re.fullmatch(r"(\d+)\.log", os.path.basename(path))
        assert m, path
        jobs.setdefault(rule, {})[m.group(1)] = path
    return jobs


@pytest.mark.slow
def test_slurm_run_makes_the_main_table(slurm_run):
    md = os.path.join(slurm_run["work"], "results", "slurm", "tables", "main.md")
    text = open(md).read()
    assert "| method" in text and "| SFT" in text and "| CW-DPO" in text
    assert re.search(r"has been submitted with SLURM jobid \d+", slurm_run["out"])
    print(f"Slurm run: {slurm_run['wall']:.0f} s")


@pytest.mark.slow
def test_every_job_went_through_sbatch_with_a_slurm_log(slurm_run):
    jobs = slurm_run["jobs"]
    assert set(EXPECTED_RULES) <= set(jobs), (sorted(jobs), slurm_run["out"][-3000:])
    assert len(jobs["evaluate"]) == 2
    ids = [i for v in jobs.values() for i in v]
    assert len(set(ids)) == len(ids)
    # one Slurm job per Snakemake job (the target is a file: there is no local `all` job)
    m = re.findall(r"(\d+) of (\d+) steps \(100%\) done", slurm_run["out"])
    assert m and int(m[-1][1]) == len(ids), (m, len(ids))
    # each Slurm job ran its rule through the jobstep executor (a second snakemake inside the allocation)
    for rule, logs in jobs.items():
        for jid, path in logs.items():
            log = open(path).read()
            assert f"rule {rule}:" in log and "1 of 1 steps (100%) done" in log, (rule, jid, log[-1500:])


@pytest.mark.slow
def test_slurm_accounting_saw_completed_jobs_with_the_profiles_resources(slurm_run):
    """sacct (slurmdbd) or, without accounting, scontrol: every job COMPLETED; GPU rules got the profile's
    --gpus=1 (fake count-only GPUs of the test node), CPU rules none, partition from SLURM_PARTITION."""
    jobs = slurm_run["jobs"]
    ids = [i for v in jobs.values() for i in v]
    info = {}
    if slurm_run["sacct"]:
        rc, out = _sh(["sacct", "-X", "--parsable2", "--noheader", "-j", ",".join(ids),
                       "--format=JobIdRaw,JobName,State,Partition,AllocTRES"])
        assert rc == 0, out
        for line in out.splitlines():
            jid, name, state, part, tres = line.split("|")
            info[jid] = {"name": name, "state": state, "partition": part, "gpu": "gres/gpu=" in tres}
    else:
        for jid in ids:
            rc, out = _sh(["scontrol", "show", "job", jid])
            assert rc == 0, out
            f = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
            info[jid] = {"name": f.get("JobName"), "state": f.get("JobState"), "partition": f.get("Partition"),
                         "gpu": "gpu" in f.get("TresPerJob", "") + f.get("TresPerNode", "")}
    assert set(info) == set(ids), (sorted(info), sorted(ids))
    # one run, one job name (the plugin names every job after the run's UUID)
    assert len({v["name"] for v in info.values()}) == 1
    for rule, jids in jobs.items():
        for jid in jids:
            assert info[jid]["state"] == "COMPLETED", (rule, info[jid])
            assert info[jid]["partition"] == "debug" or "CWDPO_TEST_SLURM_PARTITION" in os.environ
            assert info[jid]["gpu"] == (rule in GPU_RULES), (rule, info[jid])


@pytest.mark.slow
def test_every_slurm_job_ran_in_the_image_with_nv(slurm_run):
    """The real profile's software-deployment-method and apptainer-args reach every job on the node."""
    lines = open(slurm_run["shim_log"]).read().splitlines()
    n_jobs = sum(len(v) for v in slurm_run["jobs"].values())
    assert len(lines) == n_jobs, lines
    args = slurm_run["profile"]["apptainer-args"]
    for line in lines:
        assert line.startswith("exec ") and f" {args} " in line and " containers/cwdpo.sif " in line, line
    assert any("cwdpo train" in line for line in lines)


def test_profile_sets_every_named_rule():
    """profiles/slurm names resources for every GPU and CPU rule of the design."""
    import yte
    env = {k: os.environ.get(k) for k in ("SLURM_PARTITION", "SLURM_ACCOUNT", "CWDPO_GPU_MODEL")}
    try:
        os.environ.update(SLURM_PARTITION="gpu", SLURM_ACCOUNT="proj1", CWDPO_GPU_MODEL="h100")
        with open(os.path.join(REPO, "profiles", "slurm", "config.yaml")) as f:
            prof = yte.process_yaml(f, require_use_yte=True)
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert prof["executor"] == "slurm" and prof["software-deployment-method"] == ["apptainer"]
    assert prof["apptainer-args"].startswith("--nv")
    # strings stay strings when the plugin evaluates resource values as Python
    assert prof["default-resources"]["slurm_partition"] == "'gpu'"
    assert prof["default-resources"]["slurm_account"] == "'proj1'"
    res = prof["set-resources"]
    for rule in GPU_RULES:
        # the GPU count is the rule's own (config compute.*): the profile must not override it
        assert "gpu" not in res[rule] and "gres" not in res[rule] and "tasks" not in res[rule]
        assert res[rule]["cpus_per_gpu"] >= 1 and res[rule]["gpu_model"] == "'h100'"
        assert res[rule]["mem_mb_per_cpu"] > 0 and res[rule]["runtime"] > 0
        assert prof["set-threads"][rule] == res[rule]["cpus_per_gpu"]
    for rule in ("prepare_data", "build_model", "make_pairs", "trivial_baseline", "score", "table", "figure",
                 "report"):
        assert "gpu" not in res[rule] and res[rule]["cpus_per_task"] >= 1 and res[rule]["tasks"] == 1
        assert res[rule]["mem_mb"] > 0 and res[rule]["runtime"] > 0
    json.dumps(prof)  # plain data


def test_profile_without_environment_leaves_partition_and_account_to_slurm():
    import yte
    saved = {k: os.environ.pop(k, None) for k in ("SLURM_PARTITION", "SLURM_ACCOUNT", "CWDPO_GPU_MODEL")}
    try:
        with open(os.path.join(REPO, "profiles", "slurm", "config.yaml")) as f:
            prof = yte.process_yaml(f, require_use_yte=True)
    finally:
        os.environ.update({k: v for k, v in saved.items() if v is not None})
    assert "slurm_partition" not in prof["default-resources"] and "slurm_account" not in prof["default-resources"]
    assert all("gpu_model" not in r for r in prof["set-resources"].values())


@pytest.mark.slow
def test_profile_dry_run_applies_the_resources_and_ignores_unknown_rules(tmp_path):
    """`--workflow-profile profiles/slurm` on the micro config with 2 GPUs per training job: every rule
    gets its resources (the GPU count from the config, the rest from the profile); `report`, named in the
    profile but not a rule of this workflow, is ignored. No Slurm needed (a dry run never calls sbatch)."""
    for name in WORKFLOW_ITEMS:
        src = os.path.join(REPO, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, tmp_path / name)
    shutil.copy(os.path.join(REPO, "tests", "configs", "micro.yaml"), tmp_path / "micro.yaml")
    (tmp_path / "gpus.yaml").write_text("compute: {gpus_per_train_job: 2, gpus_per_infer_job: 1}\n")
    write_apptainer_shim(str(tmp_path / "bin"))
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "SLURM_ACCOUNT": "proj1",
           "SLURM_PARTITION": "gpu", "HF_HUB_OFFLINE": "1"}
    env.pop("CWDPO_GPU_MODEL", None)
    p = run(["snakemake", "-n", "--workflow-profile", "profiles/slurm", "--configfile", "micro.yaml", "gpus.yaml"],
            cwd=str(tmp_path), env=env, timeout=300)
    out = p.stdout + p.stderr
    assert "rule report:" not in out and "report" not in re.findall(r"^(\w+)\s+\d+$", out, re.M)
    res = {}
    for block in re.split(r"\n(?=rule \w+:)", out):
        m = re.match(r"rule (\w+):", block)
        r = re.search(r"^\s+resources: (.+)$", block, re.M)
        if m and r:
            res.setdefault(m.group(1), dict(kv.split("=", 1) for kv in r.group(1).split(", ")))
    for rule in ("stage1", "stage2"):
        assert res[rule]["gpu"] == "2" and res[rule]["cpus_per_gpu"] == "8" and res[rule]["mem_mb_per_cpu"] == "8000"
        assert res[rule]["slurm_partition"] == "gpu" and res[rule]["slurm_account"] == "proj1"
    for rule in ("evaluate", "sample_onpolicy", "ref_logps"):
        assert res[rule]["gpu"] == "1" and res[rule]["cpus_per_gpu"] == "8", (rule, res[rule])
    for rule in ("prepare_data", "make_pairs", "score", "table"):
        assert "gpu" not in res[rule] and res[rule]["tasks"] == "1" and int(res[rule]["cpus_per_task"]) >= 1
    assert res["score"]["mem_mb"] == "16000" and res["stage1"]["runtime"] == "1440"
    # multi-GPU training starts through torchrun with one process per GPU of the Slurm job
    assert re.search(r"torchrun --standalone --nproc_per_node 2 --no-python cwdpo train", out)


def _dry_run_jobs(workdir, *args, env=None):
    """{rule: (resources, threads)} of a `snakemake -n --cores 16` in `workdir` (a copy of the workflow with the
    micro configs), one entry per rule."""
    for name in WORKFLOW_ITEMS:
        src = os.path.join(REPO, name)
        if not os.path.exists(workdir / name):
            (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, workdir / name)
    for name in ("micro.yaml", "micro_modality.yaml", "micro_negsource.yaml"):
        shutil.copy(os.path.join(REPO, "tests", "configs", name), workdir / name)
    p = run(["snakemake", "-n", "--cores", "16", *args], cwd=str(workdir), env={**os.environ, **(env or {})},
            timeout=300)
    jobs = {}
    for block in re.split(r"\n(?=rule \w+:)", p.stdout + p.stderr):
        m = re.match(r"rule (\w+):", block)
        r = re.search(r"^\s+resources: (.+)$", block, re.M)
        t = re.search(r"^\s+threads: (\d+)$", block, re.M)
        if m and r:
            jobs.setdefault(m.group(1), (dict(kv.split("=", 1) for kv in r.group(1).split(", ")),
                                         int(t.group(1)) if t else 1))
    return jobs, p.stdout + p.stderr


@pytest.mark.slow
def test_profile_resources_and_threads_reach_variant_rules_and_beam_negatives(tmp_path):
    """Snakemake keys set-resources / set-threads by exact rule name: the variants' copies of the rules
    (`<rule>__<variant>`, here the modality overlay's `text`) and `beam_negatives` (the negsource overlay) get
    the profile's entries, not the defaults (60 minutes, 4 GB, 1 thread)."""
    write_apptainer_shim(str(tmp_path / "bin"))
    env = {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "SLURM_PARTITION": "gpu",
           "HF_HUB_OFFLINE": "1"}
    jobs, out = _dry_run_jobs(tmp_path, "--workflow-profile", "profiles/slurm", "--configfile", "micro.yaml",
                              "config/modality.yaml", "micro_modality.yaml", "config/negsource.yaml",
                              "micro_negsource.yaml", env=env)
    assert "stage1__text" in jobs and "beam_negatives" in jobs, sorted(jobs)
    for rule, runtime in (("stage1", "1440"), ("stage2", "1440"), ("sample_onpolicy", "240"), ("ref_logps", "120"),
                          ("beam_negatives", "240")):
        for name in (rule, f"{rule}__text") if rule != "beam_negatives" else (rule,):
            res, threads = jobs[name]
            assert res["runtime"] == runtime and res["cpus_per_gpu"] == "8" and threads == 8, (name, res, threads)
            assert res["mem_mb_per_cpu"] == "8000" and res["slurm_partition"] == "gpu"
    for name in ("score__text", "make_pairs__text"):
        res, threads = jobs[name]
        assert res["tasks"] == "1" and int(res["cpus_per_task"]) >= 1 and res["runtime"] != "60", (name, res)
    assert jobs["score__text"][0]["mem_mb"] == "16000"


@pytest.mark.slow
def test_gpu_rules_take_threads_and_data_loader_workers_from_the_config(tmp_path):
    """Without a profile (one GPU box): the GPU rules' threads and the training jobs' data-loader workers come
    from config `compute` (threads capped at --cores by Snakemake); CPU rules keep one thread."""
    (tmp_path / "compute.yaml").write_text("compute: {threads: 6, dataloader_workers: 3}\n")
    jobs, out = _dry_run_jobs(tmp_path, "-p", "--configfile", "micro.yaml", "compute.yaml",
                              env={"HF_HUB_OFFLINE": "1"})
    for rule in ("pretrain", "stability", "stage1", "stage2", "sample_onpolicy", "ref_logps"):
        assert jobs[rule][1] == 6, (rule, jobs[rule])
    assert jobs["make_pairs"][1] == jobs["score"][1] == 1
    trains = re.findall(r"cwdpo train --spec .*? --threads (\d+) --dataloader-workers (\d+)", out)
    assert trains and {w for _, w in trains} == {"3"} and {t for t, _ in trains} == {"6"}, trains
    assert re.search(r"cwdpo sample-onpolicy --spec .*? --threads 6 ", out)
    # the shipped GPU configs set them (8 threads, 4 workers); the tiny default keeps 1 thread, 0 workers
    from cwdpo.config import load_config
    for name, threads, workers in (("qwen3b", 8, 4), ("paper", 8, 4), ("config", 1, 0)):
        c = load_config(os.path.join(REPO, "config", f"{name}.yaml"), check_paths=False)["compute"]
        assert (c["threads"], c["dataloader_workers"]) == (threads, workers), name
