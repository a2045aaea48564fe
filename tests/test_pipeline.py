"""End to end: the real Snakemake DAG on the micro config, in a temporary folder."""
import csv
import math
import os

import pytest

from conftest import copy_workflow, run


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
    assert [r["method"] for r in rows] == ["trivial (most frequent caption)", "base", "SFT", "SFT-C", "DPO",
                                           "Focal-DPO", "CW-DPO", "DPO (from base)"]
    spice_ok, _ = spice_status()
    for r in rows:
        for m in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
            assert math.isfinite(float(r[m])), (r["method"], m)
        if spice_ok:
            assert math.isfinite(float(r["SPICE"]))
        else:
            assert r["SPICE"] == "n/a"
        if r["method"].startswith("trivial"):
            assert r["w_c"] == r["pref_acc"] == "n/a"
        else:
            assert 0.0 <= float(r["w_c"]) <= 1.0 and 0.0 <= float(r["pref_acc"]) <= 1.0
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
    for method in ("dpo", "focal_dpo", "cw_dpo"):
        assert os.path.isfile(os.path.join(res, "stage2", "sft_c", "s0", method, "model", "model.safetensors"))
        assert os.path.isfile(os.path.join(res, "benchmarks", "stage2", f"sft_c_s0_{method}.tsv"))


@pytest.mark.slow
def test_stage2_consumes_mixed_on_policy_and_dataset_pairs(micro_run):
    import json
    neg = os.path.join(micro_run, "results", "micro", "negatives", "sft_c", "s0")
    summary = json.load(open(os.path.join(neg, "pairs_mix_summary.json")))
    assert summary["rho"] == 0.5 and summary["onpolicy"] > 0 and summary["dataset"] == round(0.5 * summary["pairs"])
    sources = {json.loads(line)["source"] for line in open(os.path.join(neg, "pairs_mix.jsonl"))}
    assert "onpolicy" in sources and sources & {"gentle", "easy"}
    ref = json.load(open(os.path.join(neg, "ref_mix.json")))
    assert ref["n_pairs"] == summary["pairs"]
    m = json.load(open(os.path.join(micro_run, "results", "micro", "stage2", "sft_c", "s0", "cw_dpo", "metrics.json")))
    assert m["data"]["pairs"] == summary["pairs"] and 0 < m["mean_w_c"] <= 1
    # a second run has nothing to do
    out = run(["snakemake", "--cores", "2", "--configfile", "micro.yaml", "-n"], cwd=micro_run)
    assert "Nothing to be done" in out.stdout + out.stderr
