"""Under torchrun, only rank 0 prepares (checks, deletes, stamps) a run's checkpoint folder; the other ranks
wait for it and resume from the same checkpoint. Two real processes with a gloo process group, as torchrun
starts them (RANK, WORLD_SIZE), each calling what `cwdpo train` calls."""
import json
import os
import subprocess
import sys

import pytest

import micro_specs as specs
from conftest import REPO
from cwdpo.specs import to_json

CHILD = r"""
import json, os, shutil, sys, time
import torch.distributed as dist
from cwdpo import train
from cwdpo.specs import TrainSpec, from_json
spec = from_json(TrainSpec, sys.argv[1])
ckpt, log = sys.argv[2], sys.argv[3]
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method="file://" + sys.argv[4], rank=rank, world_size=2)
events = []
real_rmtree, real_prepare = shutil.rmtree, train.prepare_checkpoints
def rmtree(path, *a, **k):
    events.append(["rmtree", os.path.basename(path), time.time()])
    return real_rmtree(path, *a, **k)
def prepare(*a, **k):
    events.append(["prepare", "", time.time()])
    time.sleep(1.5)  # a slow shared file system: the other rank must still wait
    out = real_prepare(*a, **k)
    events.append(["prepared", "", time.time()])
    return out
shutil.rmtree, train.prepare_checkpoints = rmtree, prepare
resume = train.resume_point(ckpt, spec, fresh=sys.argv[5] == "fresh")
events.append(["returned", os.path.basename(resume or ""), time.time()])
json.dump(events, open(f"{log}.{rank}", "w"))
"""


def _run_ranks(tmp_path, spec, ckpt, fresh=False):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    store = tmp_path / f"store{len(list(tmp_path.glob('store*')))}"
    outs = [open(tmp_path / f"out{r}.txt", "w") for r in (0, 1)]  # (a full pipe would block a rank)
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, to_json(spec), str(ckpt), str(tmp_path / "log"),
                               str(store), "fresh" if fresh else "resume"],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=outs[r],
                              stderr=subprocess.STDOUT) for r in (0, 1)]
    try:
        for r, p in enumerate(procs):
            p.wait(timeout=600)
            assert p.returncode == 0, (tmp_path / f"out{r}.txt").read_text()[-3000:]
    finally:
        for p in procs:
            p.kill()
    return [json.load(open(f"{tmp_path / 'log'}.{r}")) for r in (0, 1)]


def _checkpoint(ckpt, step):
    d = ckpt / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))


@pytest.mark.slow
def test_only_rank_0_prepares_checkpoints_the_others_wait_and_resume_alike(tmp_path, monkeypatch):
    from cwdpo.train import spec_fingerprint
    monkeypatch.setenv("WORLD_SIZE", "2")  # (the fingerprint counts the processes: the ranks' own)
    spec = specs.train("sft", str(tmp_path / "no-init"), str(tmp_path / "no-data.json"))
    ckpt = tmp_path / "checkpoints"
    # a run of this spec left checkpoint 4 and an unreadable checkpoint 6 (killed while saving)
    ckpt.mkdir()
    (ckpt / "spec.sha256").write_text(spec_fingerprint(spec) + "\n")
    _checkpoint(ckpt, 4)
    (ckpt / "checkpoint-6").mkdir()
    rank0, rank1 = _run_ranks(tmp_path, spec, ckpt)
    assert [e[0] for e in rank0] == ["prepare", "rmtree", "prepared", "returned"] and rank0[1][1] == "checkpoint-6"
    assert [e[0] for e in rank1] == ["returned"]  # rank 1 neither prepared nor deleted anything...
    assert rank1[0][2] >= rank0[2][2]  # ...and went on only once rank 0 had finished
    assert rank0[-1][1] == rank1[0][1] == "checkpoint-4"


@pytest.mark.slow
def test_a_fresh_start_under_torchrun_deletes_the_checkpoints_on_rank_0_only(tmp_path, monkeypatch):
    """The probe-rows fallback (the final checkpoint's probe rows are lost: train again) under torchrun: rank 0
    deletes the folder and starts it again, the other rank waits and also starts from step 0."""
    from cwdpo.train import spec_fingerprint
    monkeypatch.setenv("WORLD_SIZE", "2")
    spec = specs.train("sft", str(tmp_path / "no-init"), str(tmp_path / "no-data.json"))
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "spec.sha256").write_text(spec_fingerprint(spec) + "\n")
    _checkpoint(ckpt, 8)
    rank0, rank1 = _run_ranks(tmp_path, spec, ckpt, fresh=True)
    assert [e[0] for e in rank0] == ["rmtree", "prepare", "prepared", "returned"] and rank0[0][1] == "checkpoints"
    assert [e[0] for e in rank1] == ["returned"] and rank1[0][2] >= rank0[2][2]
    assert rank0[-1][1] == rank1[0][1] == ""  # no checkpoint to resume: both start from step 0
    assert not list(ckpt.glob("checkpoint-*")) and (ckpt / "spec.sha256").read_text().strip() == spec_fingerprint(spec)
