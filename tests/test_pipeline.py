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
            assert r["mean w_c"] == r["pref. acc."] == "n/a"
        else:
            assert 0.0 <= float(r["mean w_c"]) <= 1.0 and 0.0 <= float(r["pref. acc."]) <= 1.0
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


TABLES = ("main", "focal", "ablation", "floor", "mix", "paper")
FIGURES = ("stage1", "squeeze", "floor", "calibration")


@pytest.mark.slow
def test_every_table_and_figure_file_exists(micro_run):
    res = os.path.join(micro_run, "results", "micro")
    for t in TABLES:
        for ext in ("md", "csv", "tex"):
            path = os.path.join(res, "tables", f"{t}.{ext}")
            assert os.path.getsize(path) > 0, path
    from PIL import Image
    for f in FIGURES:
        assert os.path.getsize(os.path.join(res, "figures", f"{f}.pdf")) > 1000
        with Image.open(os.path.join(res, "figures", f"{f}.png")) as im:
            im.load()  # a real, decodable PNG
            assert im.format == "PNG" and im.width >= 1200 and im.height >= 400, (f, im.size)
            # not blank: many distinct colours (curves, text, bars)
            assert len(im.convert("RGB").getcolors(1 << 24)) > 50


@pytest.mark.slow
def test_paper_table_has_the_papers_numbers_and_a_verdict_per_claim(micro_run):
    import json
    res = os.path.join(micro_run, "results", "micro")
    rows = list(csv.DictReader(open(os.path.join(res, "tables", "paper.csv"))))
    numbers = [r for r in rows if r["section"] == "number"]
    cw = [r for r in numbers if r["quantity_or_claim"] == "CIDEr" and r["method"] == "CW-DPO"]
    assert cw and cw[0]["paper"] == "142.6"
    # the "ours" column never holds a paper number: it is our value (or n/a)
    assert cw[0]["ours"] != "142.6"
    claims = [r for r in rows if r["section"] == "claim"]
    paper = json.load(open(os.path.join(os.path.dirname(__file__), "..", "cwdpo", "resources", "paper.json")))
    assert len(claims) >= len(paper["claims"])
    for r in claims:
        assert r["verdict"] in ("holds", "does not hold", "inconclusive"), r
        assert r["source_or_interval"], r  # says how the interval was computed
    main = list(csv.DictReader(open(os.path.join(res, "tables", "main.csv"))))
    for col in ("ECE", "TV", "JS", "top-1", "win-rate vs SFT", "conv. step"):
        assert col in main[0]
    cw_row = next(r for r in main if r["method"] == "CW-DPO")
    for col in ("ECE", "TV", "JS", "top-1", "win-rate vs SFT", "mean w_c", "pref. acc."):
        assert math.isfinite(float(cw_row[col])), col


@pytest.mark.slow
def test_probes_csv_per_run_and_report_html(micro_run):
    res = os.path.join(micro_run, "results", "micro")
    probes = list(csv.DictReader(open(os.path.join(res, "stage2", "sft_c", "s0", "cw_dpo", "probes.csv"))))
    assert len(probes) >= 3 and probes[0]["step"] == "0"
    for col in ("tv", "js", "top1", "ece", "brier", "entropy", "dlogp_positive", "dlogp_gentle", "dlogp_easy",
                "dlogp_onpolicy", "train_w_c", "train_filtered_frac", "train_loss"):
        assert math.isfinite(float(probes[-1][col])), col
    run(["snakemake", "--cores", "1", "--configfile", "micro.yaml", "--report", "report.html"], cwd=micro_run)
    html = open(os.path.join(micro_run, "report.html"), encoding="utf-8", errors="replace").read()
    assert len(html) > 10000
    for name in TABLES + FIGURES:
        assert name in html
