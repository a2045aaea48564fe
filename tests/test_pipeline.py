"""End to end: the real Snakemake DAG on the micro config, in a temporary folder."""
import csv
import math
import os
import shutil

import pytest

from conftest import REPO, run


def copy_workflow(dest):
    for name in ("Snakefile", "workflow", "config", "profiles"):
        src = os.path.join(REPO, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name))
        else:
            shutil.copy(src, os.path.join(dest, name))
    shutil.copy(os.path.join(REPO, "tests", "configs", "micro.yaml"), os.path.join(dest, "micro.yaml"))


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("micro")
    copy_workflow(str(work))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run(["snakemake", "--cores", "2", "--configfile", "micro.yaml"], cwd=str(work), env=env)
    return str(work)


@pytest.mark.slow
def test_main_table_has_finite_numbers_for_every_computable_metric(micro_run):
    from cwdpo.metrics import spice_status
    path = os.path.join(micro_run, "results", "micro", "tables", "main.csv")
    rows = list(csv.DictReader(open(path)))
    assert [r["method"] for r in rows][:3] == ["trivial (most frequent caption)", "base", "SFT"]
    spice_ok, _ = spice_status()
    for r in rows:
        for m in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
            assert math.isfinite(float(r[m])), (r["method"], m)
        if spice_ok:
            assert math.isfinite(float(r["SPICE"]))
        else:
            assert r["SPICE"] == "n/a"
    md = open(os.path.join(micro_run, "results", "micro", "tables", "main.md")).read()
    assert "| method" in md and "CIDEr" in md
    if not spice_ok:
        assert "SPICE: n/a" in md


@pytest.mark.slow
def test_every_rule_wrote_its_log_and_training_its_benchmark(micro_run):
    res = os.path.join(micro_run, "results", "micro")
    assert os.path.getsize(os.path.join(res, "logs", "pretrain.log")) > 0
    assert os.path.isfile(os.path.join(res, "benchmarks", "pretrain.tsv"))
    assert os.path.isfile(os.path.join(res, "benchmarks", "stage1", "sft_s0.tsv"))
    assert os.path.isfile(os.path.join(res, "stage1", "sft", "s0", "model", "model.safetensors"))
    # a second run has nothing to do
    out = run(["snakemake", "--cores", "2", "--configfile", "micro.yaml", "-n"], cwd=micro_run)
    assert "Nothing to be done" in out.stdout + out.stderr
