"""End to end: the real Snakemake DAG on the micro config, in a temporary folder."""
import csv
import functools
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
        assert float(r["caption words"]) >= 0, r["method"]  # mean words per caption, beside CHAIR
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
def test_every_interval_is_of_the_statistic_in_its_cell(micro_run):
    """Each cell's 95% interval (t over seeds, or a bootstrap of per-image values for one run) contains the
    cell's value: a bootstrap of per-image BLEU-4/METEOR (corpus-level metrics) would not."""
    import glob
    checked = 0
    for path in glob.glob(os.path.join(micro_run, "results", "micro", "tables", "*.csv")):
        rows = list(csv.DictReader(open(path)))
        for r in rows:
            for col in r:
                if col + "_ci_lo" not in r or r[col + "_ci_lo"] in ("", None) or r[col] == "n/a":
                    continue
                lo, hi, v = float(r[col + "_ci_lo"]), float(r[col + "_ci_hi"]), float(r[col])
                assert lo - 1e-9 <= v <= hi + 1e-9, (os.path.basename(path), next(iter(r.values())), col, lo, v, hi)
                checked += 1
    assert checked > 50
    main = list(csv.DictReader(open(os.path.join(micro_run, "results", "micro", "tables", "main.csv"))))
    base = next(r for r in main if r["method"] == "base")
    for col in base:  # one run: corpus-level metrics, of the test split or of an evaluation set, get no interval
        if col.endswith(("BLEU-4", "METEOR")):
            assert base[col + "_ci_lo"] == "", col


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
    # every cwdpo job logged its start-up and work seconds; `cwdpo bench` sums them into the start-up share
    from cwdpo.bench.pipeline import startup_costs
    import glob
    logs = glob.glob(os.path.join(res, "logs", "**", "*.log"), recursive=True)
    silent = [p for p in logs if "[cwdpo] " not in open(p).read()]
    assert logs and not silent, silent
    costs = startup_costs(res)
    assert costs["startup_by_command"]["train"]["jobs"] >= 9 and 0 < costs["startup_share"] < 1
    # the tiny scale: training jobs evaluate their own models, the evaluate rule only the base model
    assert [os.path.relpath(p, os.path.join(res, "logs", "eval")) for p in
            glob.glob(os.path.join(res, "logs", "eval", "**", "evaluate.log"), recursive=True)] == ["base/evaluate.log"]


@pytest.mark.slow
def test_stage2_consumes_mixed_on_policy_and_dataset_pairs(micro_run):
    import json
    neg = os.path.join(micro_run, "results", "micro", "negatives", "sft_c", "s0")
    summary = json.load(open(os.path.join(neg, "pairs_mix_summary.json")))
    assert summary["rho"] == 0.5 and summary["onpolicy"] > 0
    assert summary["dataset"] == round(0.5 * summary["target_pairs"])
    # fed: the set holds its target (the micro model's samples are wrong by the grounding rule), and the
    # sampler says which rule selected them
    assert summary["fill"] >= 0.9 and summary["pairs"] == summary["target_pairs"]
    sampled = json.load(open(os.path.join(neg, "onpolicy_summary.json")))
    assert sampled["select"] == "grounding" and sampled["kept"] >= summary["onpolicy"]
    sources = {json.loads(line)["source"] for line in open(os.path.join(neg, "pairs_mix.jsonl"))}
    assert "onpolicy" in sources and sources & {"gentle", "easy"}
    ref = json.load(open(os.path.join(neg, "ref_mix.json")))
    assert ref["n_pairs"] == summary["pairs"]
    m = json.load(open(os.path.join(micro_run, "results", "micro", "stage2", "sft_c", "s0", "cw_dpo", "metrics.json")))
    assert m["data"]["pairs"] == summary["pairs"] and 0 < m["mean_w_c"] <= 1
    assert m["data"]["passes"] == pytest.approx(m["steps"] * 4 / summary["pairs"])  # micro: batch 4
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
    cw = [r for r in numbers if r["quantity_or_claim"] == "CIDEr" and r["method_or_whose"] == "CW-DPO"]
    assert cw and cw[0]["paper_or_target"] == "142.6"
    # the "ours" column never holds a paper number: it is our value (or n/a)
    assert cw[0]["ours"] != "142.6"
    claims = [r for r in rows if r["section"] == "claim"]
    paper = json.load(open(os.path.join(os.path.dirname(__file__), "..", "cwdpo", "resources", "paper.json")))
    assert len(claims) >= len(paper["claims"]) + len(paper["our_claims"])
    for r in claims:
        assert r["verdict"] in ("holds", "does not hold", "inconclusive"), r
        assert r["source_or_interval"], r  # says how the interval was computed
    ours = [r for r in claims if r["method_or_whose"].startswith("ours")]
    assert [r["quantity_or_claim"] for r in ours] == [c["claim"] for c in paper["our_claims"]]
    # a non-inferiority claim prints its margin δ, fixed in the config before the run
    assert all(r["delta"] for r in ours if "non-inferiority" in r["quantity_or_claim"])
    # δ is printed beside each main claim, as a value and a share of the comparison arm
    assert all("% of " in r["delta"] for r in claims if r["quantity_or_claim"].startswith("CW-DPO > DPO"))
    # T-regime: every precondition with its measured value, target and a pass/fail (whatever they are here)
    regime = [r for r in rows if r["section"] == "regime"]
    names = " ".join(r["quantity_or_claim"] for r in regime)
    for word in ("vision", "colour", "shape", "headroom", "Stage 2 is fed", "passes", "squeezing", "top-1",
                 "Δlog p", "keeps its task", "stays fluent", "the control's setting", "stability", "decidedness"):
        assert word in names, word
    assert all(r["verdict"] in ("pass", "fail") and r["ours"] and r["paper_or_target"] for r in regime)
    stability = [r for r in regime if r["quantity_or_claim"].startswith("stability")]
    assert "over 3 pretraining seeds" in stability[0]["quantity_or_claim"]
    # the MCQ precondition over the same seeds: every seed's job answered the MCQ set (its file holds it)
    assert stability[1]["quantity_or_claim"] == "stability: the lowest accuracy on shapes_mcq over 3 pretraining seeds"
    for seed in (1, 2):
        seed_file = os.path.join(res, "base", "stability", f"s{seed}", "grounding.json")
        seed_mcq = json.load(open(seed_file))["mcq"]["shapes_mcq"]
        assert seed_mcq["n"] == 12 and 0 <= seed_mcq["accuracy"] <= 1
        assert f"{100 * seed_mcq['accuracy']:.1f}%" in stability[1]["ours"]
    main = list(csv.DictReader(open(os.path.join(res, "tables", "main.csv"))))
    for col in ("ECE", "TV", "JS", "top-1", "win-rate vs SFT", "conv. step", "broken captions"):
        assert col in main[0]
    mix = {r["method"]: r for r in csv.DictReader(open(os.path.join(res, "tables", "mix.csv")))}
    assert float(mix["ρ = 0.5"]["of target"]) >= 90 and float(mix["ρ = 1 (dataset only)"]["on-policy pairs"]) == 0
    cw_row = next(r for r in main if r["method"] == "CW-DPO")
    for col in ("ECE", "TV", "JS", "top-1", "win-rate vs SFT", "mean w_c", "pref. acc.", "conv. step",
                # the extra evaluation sets: the shapes OOD split per domain, and the MCQ set
                "shapes_ood CIDEr", "shapes_ood CIDEr (in-domain)", "shapes_ood CIDEr (near-domain)",
                "shapes_ood CIDEr (out-of-domain)", "shapes_mcq acc.", "shapes_mcq acc. (plain)"):
        assert math.isfinite(float(cw_row[col])), col
    ablation = list(csv.DictReader(open(os.path.join(res, "tables", "ablation.csv"))))
    assert "shapes_mcq acc." in ablation[0] and "shapes_ood CIDEr (out-of-domain)" in ablation[0]
    mmmu = [r for r in numbers if r["quantity_or_claim"] == "MMMU acc."]
    assert mmmu and mmmu[0]["paper_or_target"] == "74.6 (accuracy, %)" and mmmu[0]["ours"] == "n/a"
    # grounding: CHAIR, recall and per-attribute accuracy of every model (the trivial baseline's too)
    for r in main:
        for col in ("CHAIR_i", "CHAIR_s", "obj. recall", "colour acc.", "shape acc.", "count acc."):
            assert 0.0 <= float(r[col]) <= 100.0, (r["method"], col)


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


DETERMINISM_FILES = [
    "data/dataset_shapes.json", "data/validated.json",
    "base/pretrain/metrics.json", "base/pretrain/train_log.csv",
    "stage1/sft_c/s0/metrics.json", "stage1/sft_c/s0/train_log.csv", "stage1/sft_c/s0/probes.csv",
    "negatives/sft_c/s0/onpolicy.jsonl", "negatives/sft_c/s0/pairs_mix.jsonl", "negatives/sft_c/s0/ref_mix.json",
    "negatives/sft_c/s0/probe.jsonl",
    "stage2/sft_c/s0/cw_dpo/metrics.json", "stage2/sft_c/s0/cw_dpo/train_log.csv",
    "stage2/sft_c/s0/cw_dpo/probes.csv",
    "eval/stage2/sft_c/s0/cw_dpo/captions.json", "eval/stage2/sft_c/s0/cw_dpo/measures.json",
]


@pytest.mark.slow
def test_two_fresh_runs_give_byte_identical_metrics_and_tables(micro_run, tmp_path):
    """A second run of the same config in another folder: every metric JSON/CSV on the CW-DPO path, its
    scores and the tables are byte-identical (timestamps and durations live in timing.json/benchmarks)."""
    import sys
    other = copy_workflow(tmp_path / "again")
    key = "stage2/sft_c/s0/cw_dpo"
    # ...with every model evaluated by a job of its own (the GPU scales' layout): the same bytes as the
    # training jobs that evaluate their own model at the tiny scale
    with open(os.path.join(other, "apart.yaml"), "w") as f:
        f.write("compute: {evaluate_in_training_job: false}\n")
    run([sys.executable, "-m", "snakemake", f"results/micro/eval/{key}/captions.json", "--cores", "2",
         "--configfile", "micro.yaml", "apart.yaml"], cwd=other)
    assert os.path.isfile(os.path.join(other, "results", "micro", "logs", "eval", key, "evaluate.log"))
    assert not os.path.exists(os.path.join(micro_run, "results", "micro", "logs", "eval", key))  # fused there
    for rel in DETERMINISM_FILES:
        a = open(os.path.join(micro_run, "results", "micro", rel), "rb").read()
        b = open(os.path.join(other, "results", "micro", rel), "rb").read()
        assert a == b, rel
    # scoring alone gives the bytes the one scoring job of the full run gave
    out = os.path.join(other, "scores.json")
    run(["cwdpo", "score", "--captions", os.path.join(other, "results", "micro", "eval", key, "captions.json"),
         "--out", out, "--metrics", "BLEU-4,METEOR,ROUGE-L,CIDEr,SPICE"])
    assert open(out, "rb").read() == open(os.path.join(micro_run, "results", "micro", "eval", key, "scores.json"),
                                          "rb").read()
    # tables are a pure function of those files: written again, they are the same bytes
    from cwdpo.config import load_config
    from cwdpo.plan import Plan
    from cwdpo.report import table_spec, write_table
    plan = Plan(load_config(os.path.join(micro_run, "micro.yaml")))
    cwd = os.getcwd()
    os.chdir(micro_run)
    try:
        for name in ("main", "paper"):
            stem = os.path.join(str(tmp_path), name)
            write_table(table_spec(plan, name), stem)
            for ext in ("md", "csv", "tex"):
                assert open(f"{stem}.{ext}", "rb").read() == \
                    open(os.path.join("results", "micro", "tables", f"{name}.{ext}"), "rb").read(), (name, ext)
    finally:
        os.chdir(cwd)


def _session_processes(sid):
    """(pid, argv) of every process in session `sid`, argv read whole from /proc (`ps` cuts its `args` column
    to $COLUMNS when that is set, as on CI: a long venv path then hides the subcommand)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            argv = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace").split("\0")
        except OSError:  # ended meanwhile
            continue
        # the fields after ") " (the command name may hold spaces): state, ppid, pgrp, session
        if int(stat.rsplit(") ", 1)[1].split()[3]) == sid:
            found.append((int(entry), argv))
    return found


def _is_subcommand(argv, name):
    """Whether argv runs `cwdpo <name> --spec ...` (through any interpreter or launcher)."""
    return any(a == name and argv[i + 1:i + 2] == ["--spec"] for i, a in enumerate(argv))


@pytest.mark.slow
def test_killed_training_job_completes_with_rerun_incomplete_resuming_the_checkpoint(tmp_path):
    """SIGKILL the training process mid-pretraining (a node preemption): snakemake reports the job failed
    and marks its outputs incomplete; `--rerun-incomplete` then finishes the job from its latest checkpoint
    instead of starting over."""
    import glob
    import json
    import signal
    import subprocess
    import sys
    import time
    wf = copy_workflow(tmp_path / "wf")
    with open(os.path.join(wf, "slow.yaml"), "w") as f:
        f.write("pretrain: {steps: 400}\ntrain: {save_steps: 20}\n")
    target = "results/micro/base/pretrain/metrics.json"
    cmd = [sys.executable, "-m", "snakemake", target, "--cores", "2", "--configfile", "micro.yaml", "slow.yaml"]
    proc = subprocess.Popen(cmd, cwd=wf, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # a checkpoint at step 40 or later (save_total_limit rotates checkpoint-40 away once two newer ones exist,
    # so on a fast machine the poll may never see it by name)
    pattern = os.path.join(wf, "results", "micro", "base", "pretrain", "checkpoints", "checkpoint-*",
                           "trainer_state.json")

    def saved():
        return [p for p in glob.glob(pattern) if int(p.split("checkpoint-")[1].split(os.sep)[0]) >= 40]
    while proc.poll() is None and not saved():  # (no deadline: a busy machine is only slower)
        time.sleep(0.05)
    assert proc.poll() is None, f"snakemake ended (exit {proc.returncode}) before a checkpoint of step ≥ 40"
    victims = [pid for pid, argv in _session_processes(proc.pid) if _is_subcommand(argv, "train")]
    assert victims, "no training process found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    assert proc.wait() != 0  # snakemake saw the job die
    assert saved() and not os.path.exists(os.path.join(wf, target))
    run(cmd + ["--rerun-incomplete"], cwd=wf)
    metrics = json.load(open(os.path.join(wf, target)))
    assert metrics["steps"] == 400 and metrics["resumed_from"].startswith("checkpoint-")
    assert int(metrics["resumed_from"].split("-")[1]) >= 40


@pytest.mark.slow
def test_calibration_overlay_sweeps_the_control_and_writes_f_calibrate(micro_run):
    """config/calibrate.yaml over the micro config, rows cut by tests/configs/micro_calibrate.yaml: the control's
    lr × β sweep, its table with the rule's outcome and figure F-calibrate (the micro run's Stage-1 models are
    reused)."""
    import sys
    import shutil
    here = os.path.dirname(__file__)
    shutil.copy(os.path.join(here, "..", "config", "calibrate.yaml"), os.path.join(micro_run, "calibrate.yaml"))
    shutil.copy(os.path.join(here, "configs", "micro_calibrate.yaml"), os.path.join(micro_run, "micro_calibrate.yaml"))
    res = os.path.join(micro_run, "results", "micro")
    # (the figure reads the sweep's evaluations, not the table: both are targets)
    run([sys.executable, "-m", "snakemake", "results/micro/figures/calibrate.png", "results/micro/tables/calibrate.md",
         "--cores", "2", "--configfile", "micro.yaml", "calibrate.yaml", "micro_calibrate.yaml"], cwd=micro_run)
    rows = list(csv.DictReader(open(os.path.join(res, "tables", "calibrate.csv"))))
    from cwdpo.config import deep_merge, default_config_path, read_config_file, stage2_recipe, validate_config
    config = validate_config(functools.reduce(deep_merge, (read_config_file(f) for f in (
        default_config_path(), *(os.path.join(micro_run, f) for f in ("micro.yaml", "calibrate.yaml",
                                                                       "micro_calibrate.yaml"))))),
        check_paths=False)  # (the defaults filled: stage2.defaults lives in the schema)
    swept = [stage2_recipe(config, r["stage2"]) for r in config["tables"]["calibrate"]["rows"] if "stage2" in r]
    assert len({s["beta"] for s in swept}) == 3 and [(float(r["lr"]), float(r["beta"])) for r in rows] == [
        (float(s["lr"]), float(s["beta"])) for s in swept]
    assert sum(r["chosen"] == "True" for r in rows) <= 1
    for r in rows:
        assert math.isfinite(float(r["top1_gain"])) and math.isfinite(float(r["dlogp_positive"]))
    assert "Outcome:" in open(os.path.join(res, "tables", "calibrate.md")).read()
    assert os.path.getsize(os.path.join(res, "figures", "calibrate.png")) > 10000


# ---------------------------------------------------------------------------------------------------
# the open questions (config/negsource.yaml, modality.yaml, scale.yaml), each in its micro version
# (tests/configs/micro_<name>.yaml: one seed for the table's runs, the micro run's steps and splits), over
# the micro run above (its seed-0 runs are reused)

def _overlay(micro_run, name, *targets):
    """Run the micro version of config/<name>.yaml to `targets` and read its table (every claim checked by
    `_check_claims`): (the table's config, its arm names, {(claim, arm): verdict}, {(info row, arm): value},
    the answer below it)."""
    import shutil
    import sys
    here = os.path.dirname(__file__)
    shutil.copy(os.path.join(here, "..", "config", f"{name}.yaml"), os.path.join(micro_run, f"{name}.yaml"))
    shutil.copy(os.path.join(here, "configs", f"micro_{name}.yaml"), os.path.join(micro_run, f"micro_{name}.yaml"))
    run([sys.executable, "-m", "snakemake", *targets, "--cores", "2", "--configfile", "micro.yaml", f"{name}.yaml",
         f"micro_{name}.yaml"], cwd=micro_run)
    stem = os.path.join(micro_run, "results", "micro", "tables", name)
    for ext in ("md", "csv", "tex"):
        assert os.path.getsize(f"{stem}.{ext}") > 0
    rows, md = list(csv.DictReader(open(f"{stem}.csv"))), open(f"{stem}.md").read()
    from cwdpo.config import deep_merge, read_config_file
    overlay = deep_merge(*(read_config_file(os.path.join(micro_run, f))
                           for f in (f"{name}.yaml", f"micro_{name}.yaml")))
    table = overlay["tables"][name]  # the micro version may change the arms
    arms = [a["name"] for a in table["arms"]]
    verdicts = _check_claims(rows, arms, table["claims"])
    info = {(r["row"], r["arm"]): r["value"] for r in rows if r["section"] == "info"}
    return table, arms, verdicts, info, _question_and_answer(md, rows)


def _check_claims(rows, arms, claim_ids):
    """Every claim is decided in every arm, and its verdict is `verdict` of the interval and δ the table prints
    (no verdict word is written by hand); returns {(claim id, arm): verdict}."""
    from cwdpo.config import load_claims
    from cwdpo.stats import verdict
    claims = [r for r in rows if r["section"] == "claim"]
    assert [(r["row"], r["arm"]) for r in claims] == [(c, a) for c in claim_ids for a in arms]
    known = load_claims()
    for r in claims:
        assert r["verdict"] in ("holds", "does not hold", "inconclusive") and r["method"], r
        lo, hi = (float(r["lo"]), float(r["hi"])) if r["lo"] else (None, None)
        assert r["verdict"] == verdict(lo, hi, known[r["row"]]["direction"], float(r["delta"]) if r["delta"] else None)
        if lo is not None:
            assert lo - 1e-9 <= float(r["value"]) <= hi + 1e-9
    return {(r["row"], r["arm"]): r["verdict"] for r in claims}


def _question_and_answer(md, rows):
    assert md.index("**Question.**") < md.index("| ") < md.index("**Answer.**")
    answer = md.split("**Answer.** ", 1)[1].split("\n", 1)[0]
    assert [r["value"] for r in rows if r["section"] == "answer"] == [answer]
    return answer


@pytest.mark.slow
def test_negsource_overlay_decides_dpo_vs_cw_dpo_under_each_source_of_negatives(micro_run):
    import json
    from cwdpo.config import read_config_file
    table, arms, verdicts, info, answer = _overlay(micro_run, "negsource", "results/micro/tables/negsource.md")
    sources = {arm: info[("pairs per seed by source (CW-DPO)", arm)] for arm in arms}
    # (a) rule-based only, (b) wrong beams only, (c) on-policy only, (d) all three
    assert "beam" not in sources[arms[0]] and "onpolicy" not in sources[arms[0]] and "gentle" in sources[arms[0]]
    assert sources[arms[1]].startswith("beam ") and "·" not in sources[arms[1]]
    assert sources[arms[2]].startswith("onpolicy ") and "·" not in sources[arms[2]]
    assert all(s in sources[arms[3]] for s in ("beam", "onpolicy")) and ("gentle" in sources[arms[3]]
                                                                        or "easy" in sources[arms[3]])
    # the mean cooling weight per source, at the start (reference model) and during training
    for arm in arms:
        start = info[("mean w_c at the start, by source (CW-DPO, reference model)", arm)]
        assert all(0.0 < float(x.split()[-1]) < 1.0 for x in start.split(" · ")), start
        assert 0.0 < float(info[("mean w_c during training (CW-DPO)", arm)].split()[0]) <= 1.0
    # the beams job logged its counts; a kept beam is a wrong one
    for seed in (0,):
        s = json.load(open(os.path.join(micro_run, "results", "micro", "negatives", "sft_c", f"s{seed}",
                                        "beams_summary.json")))
        k = read_config_file(os.path.join(micro_run, "micro_negsource.yaml"))["negatives"]["beams"]["k"]
        assert s["beams"] == s["images"] * k and s["kept"] <= s["wrong"] <= s["beams"] and s["kept"] > 0
    log = open(os.path.join(micro_run, "results", "micro", "logs", "negatives", "sft_c_s0_beams.log")).read()
    assert "[cwdpo beam-negatives]" in log and "kept as negatives" in log
    # the answer: the cooling weight is effective / not effective / undecided per source, from the verdicts
    for arm in arms:
        vs = [verdicts[(c, arm)] for c in table["claims"]]
        word = ("effective" if "holds" in vs and "does not hold" not in vs else
                "not effective" if "does not hold" in vs and "holds" not in vs else "undecided")
        group = answer.split(" — ")[0].split(arm)[0].rsplit(";", 1)[-1]  # the lead's group naming this arm
        said = "not effective" if "not effective" in group else "effective" if "effective" in group else "undecided"
        assert said == word, (arm, word, answer)


@pytest.mark.slow
def test_modality_overlay_decides_the_claims_for_image_and_text_input_side_by_side(micro_run):
    table, arms, verdicts, info, answer = _overlay(micro_run, "modality", "results/micro/tables/modality.md")
    text = os.path.join(micro_run, "results", "micro", "variants", "text")
    # the text variant: its own tree, pretrained in that input mode, the same recipes
    assert os.path.isfile(os.path.join(text, "base", "pretrain", "model", "model.safetensors"))
    for run_dir in ("stage1/sft/s0", "stage2/sft_c/s0/dpo", "stage2/sft_c/s0/cw_dpo"):
        assert os.path.isfile(os.path.join(text, run_dir, "metrics.json")), run_dir
    from cwdpo.config import deep_merge, load_config, read_config_file, validate_config
    from cwdpo.plan import Plan
    cfg = load_config(os.path.join(micro_run, "micro.yaml"), check_paths=False)
    for name in ("modality.yaml", "micro_modality.yaml"):
        cfg = deep_merge(cfg, read_config_file(os.path.join(micro_run, name)))
    assert Plan(validate_config(cfg, check_paths=False)).variant_plans()["text"].vlm().input == "text"
    image, txt = verdicts[("top1_dpo_gt_sft", arms[0])], verdicts[("top1_dpo_gt_sft", arms[1])]
    lead = ("is not a prerequisite" if txt == "holds" else
            "cannot say whether" if image == "does not hold" else
            "is a prerequisite for it" if image == "holds" and txt == "does not hold" else "stays undecided")
    assert lead in answer.split(";")[0], (image, txt, answer)
    same = sum(verdicts[(c, arms[0])] == verdicts[(c, arms[1])] for c in table["claims"])
    assert f"{same} of {len(table['claims'])} claims get the same verdict for every input" in answer


@pytest.mark.slow
def test_scale_overlay_calibrates_each_size_and_writes_t_scale_and_f_scale(micro_run):
    import json
    from PIL import Image
    table, arms, verdicts, info, answer = _overlay(micro_run, "scale", "results/micro/tables/scale.md",
                                                   "results/micro/figures/scale.png")
    params = [int(info[("parameters (vision tower)", a)].split()[0].replace(",", "")) for a in arms]
    assert params == sorted(params) and params[-1] >= 10 * params[0], params
    res = os.path.join(micro_run, "results", "micro")
    for arm in table["arms"]:
        root = os.path.join(res, "variants", arm["variant"]) if arm.get("variant") else res
        choice = json.load(open(os.path.join(root, "calibration", "calibrate.json")))
        lr = info[("control lr (calibration rule)", arm["name"])]
        assert lr.split()[0] == f"{choice['lr']:g}" and ("no signature" in lr) == (not choice["signature"])
        for seed in (0,):  # DPO and CW-DPO trained at the rule's lr of their own size
            for recipe in ("dpo_cal", "cw_dpo_cal"):
                m = json.load(open(os.path.join(root, "stage2", "sft_c", f"s{seed}", recipe, "metrics.json")))
                assert m["lr_calibrated"]["lr"] == choice["lr"]
    assert answer.startswith("Size dependence: ")
    differ = [c for c in table["claims"] if {"holds", "does not hold"} <= {verdicts[(c, a)] for a in arms}]
    assert (f"changes with size for {len(differ)} of" in answer) if differ else \
        answer.startswith("Size dependence: no claim holds at one size and fails at another")
    with Image.open(os.path.join(res, "figures", "scale.png")) as im:
        im.load()
        assert im.format == "PNG" and im.width >= 1200 and len(im.convert("RGB").getcolors(1 << 24)) > 50
    assert os.path.getsize(os.path.join(res, "figures", "scale.pdf")) > 1000
