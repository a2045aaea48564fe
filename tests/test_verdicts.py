"""Verdicts with a smallest effect of interest, the hierarchical interval, T-regime and the calibration rule,
on synthetic evaluation files whose answers are known."""
import csv
import io
import json
import os
import zlib

import numpy as np
import pytest

from cwdpo import stats
from cwdpo.report import arms, calibrate, paper, render


def paper_table(spec: dict) -> dict:
    return render(paper.document(spec))


def calibrate_table(spec: dict) -> dict:
    return render(calibrate.document(spec))


def arms_table(spec: dict) -> dict:
    return render(arms.document(spec))


N_IMAGES = 60


def test_verdict_uses_the_smallest_effect_of_interest():
    # "A > B": holds above 0, does not hold below δ, inconclusive when the interval spans [0, δ]
    assert stats.verdict(0.5, 2.0, ">", delta=1.0) == "holds"
    assert stats.verdict(-0.5, 0.8, ">", delta=1.0) == "does not hold"
    assert stats.verdict(-0.5, 1.5, ">", delta=1.0) == "inconclusive"
    # "A < B": the effect is B − A
    assert stats.verdict(-2.0, -0.5, "<", delta=1.0) == "holds"
    assert stats.verdict(-0.8, 0.5, "<", delta=1.0) == "does not hold"
    assert stats.verdict(-1.5, 0.5, "<", delta=1.0) == "inconclusive"
    # without δ: the old rule (the opposite direction must be significant)
    assert stats.verdict(-0.5, 0.8, ">") == "inconclusive" and stats.verdict(-0.8, -0.1, ">") == "does not hold"


def test_hierarchical_interval_carries_the_seed_variance():
    rng = np.random.default_rng(0)
    images = rng.normal(0, 1, (5, N_IMAGES))
    # the same per-image noise; the seeds differ by a large offset in one case and not in the other
    calm_a, calm_b = images + 1.0, images
    shifts = np.array([[-3.0], [2.0], [0.5], [3.0], [-2.5]])
    noisy_a = calm_a + shifts
    m1, lo1, hi1 = stats.hierarchical_bootstrap_ci(calm_a, calm_b, n_resamples=400)
    m2, lo2, hi2 = stats.hierarchical_bootstrap_ci(noisy_a, calm_b, n_resamples=400)
    assert m1 == pytest.approx(1.0) and lo1 == pytest.approx(1.0) and hi1 == pytest.approx(1.0)  # paired: exact
    assert m2 == pytest.approx(1.0) and hi2 - lo2 > 2.0  # seed-to-seed spread widens the interval
    # a paired design removes the images' shared variance: A = B + 0.1 for every image of every seed
    base = rng.normal(0, 5, (4, N_IMAGES))
    d, lo, hi = stats.hierarchical_bootstrap_ci(base + 0.1, base, n_resamples=200)
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)


def _captions(n_broken: int) -> dict:
    """A captions file of N_IMAGES one-object images (one big shape in the top left, its colour and shape by
    the image): the first `n_broken` captions empty, the others the image's first reference — so CIDEr-D is
    (N_IMAGES − n_broken) / N_IMAGES of the all-fluent file's."""
    from cwdpo.shapes import COLOURS, SHAPES
    caps, refs, attrs = {}, {}, {}
    for n in range(N_IMAGES):
        c, sh, i = COLOURS[n % 7], SHAPES[(n // 7) % 5], str(n)
        attrs[i] = {"objects": [{"shape": sh, "colour": c, "size": "big", "cell": [0, 0]}], "relation": None}
        refs[i] = [f"a big {c} {sh}", f"a large {c} {sh} in the top left", f"there is a big {c} {sh}",
                   f"a {c} {sh} on a white background", f"one big {c} {sh}"]
        caps[i] = "" if n < n_broken else refs[i][0]
    return {"captions": caps, "references": refs, "attributes": attrs}


SEEDS = range(3)
# the rows of the main table T-regime reads, each run as "<recipe>/<seed>"
MAIN_ROWS = {"base": ["base"], **{name: [f"{run}/{s}" for s in SEEDS] for name, run in (
    ("SFT", "sft"), ("SFT-C", "sftc"), ("DPO", "dpo"), ("CW-DPO", "cw"))}}


def _write(root, key, cider, top1, tv, chair_s, ece_conf=0.8, dlogp=None, shape_acc=0.95, colour_acc=0.99,
           broken=0.0, n_broken=0, fill=None, passes=None):
    """Evaluation files of one model key: per-image CIDEr/top-1/TV/CHAIR_s centred on the given values, a
    broken-caption share, and captions whose first `n_broken` are empty; with `fill`, the run's pairs summary
    and metrics (share of its target pairs, passes)."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))  # the same draws in every process
    ids = [str(i) for i in range(N_IMAGES)]
    per_cider = cider / 100 + rng.normal(0, 0.01, N_IMAGES)
    per_chair = (rng.random(N_IMAGES) < chair_s).astype(float)
    scores = {"corpus": {"CIDEr": float(per_cider.mean())}, "per_image": {"CIDEr": dict(zip(ids, per_cider.tolist()))},
              "na_reasons": {},
              "grounding": {"corpus": {"CHAIR_s": float(per_chair.mean()), "1-obj shape acc.": shape_acc,
                                       "1-obj colour acc.": colour_acc, "broken": broken},
                            "per_image": {"CHAIR_s": dict(zip(ids, per_chair.tolist()))}}}
    per_top1 = top1 + rng.normal(0, 0.002, N_IMAGES)
    per_tv = tv + rng.normal(0, 0.002, N_IMAGES)
    conf = np.full(N_IMAGES * 4, ece_conf)
    measures = {"test": {"top1": float(per_top1.mean()), "tv": float(per_tv.mean()), "ece": 0.05, "n_bins": 15,
                         "per_image": {"top1": per_top1.tolist(), "tv": per_tv.tolist(), "positions": [4] * N_IMAGES},
                         "conf": conf.tolist(), "correct": [1] * (N_IMAGES * 4),
                         "position_image": [i // 4 for i in range(N_IMAGES * 4)]},
                "heldout": {"w_c": 0.5, "pref_acc": 0.9}}
    d = os.path.join(root, "eval", key)
    os.makedirs(d, exist_ok=True)
    json.dump(scores, open(os.path.join(d, "scores.json"), "w"))
    json.dump(measures, open(os.path.join(d, "measures.json"), "w"))
    json.dump(_captions(n_broken), open(os.path.join(d, "captions.json"), "w"))
    if fill is not None:
        run = os.path.join(root, "runs", key)
        os.makedirs(run, exist_ok=True)
        json.dump({"pairs": int(1000 * fill), "target_pairs": 1000, "fill": fill, "onpolicy": 500, "dataset": 500},
                  open(os.path.join(run, "pairs_summary.json"), "w"))
        json.dump({"data": {"pairs": int(1000 * fill), "passes": passes}, "mean_filtered_frac": 0.0},
                  open(os.path.join(run, "metrics.json"), "w"))
    if dlogp is not None:
        run = os.path.join(root, "runs", key)
        os.makedirs(run, exist_ok=True)
        with open(os.path.join(run, "probes.csv"), "w") as f:
            f.write(f"step,dlogp_positive\n0,0.0\n200,{dlogp}\n")


def _run_files(root, keys):
    """{kind: {key: path}} of the synthetic run files (pairs summary, metrics) that `_write(fill=...)` wrote."""
    out = {"metrics": {}, "pairs_summary": {}}
    for k in keys:
        for kind in out:
            path = os.path.join(root, "runs", k, f"{kind}.json")
            if os.path.isfile(path):
                out[kind][k] = path
    return out


def _spec(root, rows_by_name, probes, stability, interval="hierarchical"):
    from cwdpo.config import load_config, default_config_path
    cfg = load_config(default_config_path(), {"claims": {"interval": interval}}, check_paths=False)
    files = {"scores": os.path.join(root, "eval", "{key}", "scores.json"),
             "measures": os.path.join(root, "eval", "{key}", "measures.json")}
    keys = [k for rows in rows_by_name.values() for ks in rows.values() for k in ks]
    return {"name": "paper", "kind": "paper", "title": "paper", "scale": 100, "experiment": "synthetic",
            "scale_note": "synthetic", "extra_columns": {}, "files": files, "rows_by_name": rows_by_name,
            "probes": probes, "stability": stability, "claims": cfg["claims"], "regime": cfg["regime"],
            "run_files": _run_files(root, keys)}


def _claims(md):
    out = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[5] in ("holds", "does not hold", "inconclusive"):
            out[cells[0]] = cells[5]
    return out


@pytest.mark.slow
def test_t_paper_decides_claims_with_delta_and_t_regime_shows_the_preconditions(tmp_path):
    root, seeds, rows = str(tmp_path), SEEDS, MAIN_ROWS
    _write(root, "base", 200, 0.70, 0.0, 0.3)
    probes = {}
    for s in seeds:
        _write(root, f"sft/{s}", 250, 0.70, 0.05, 0.20)
        _write(root, f"sftc/{s}", 248, 0.71, 0.06, 0.20)
        # DPO: peaked (top-1 + 0.05 over SFT), far from its reference, positives pushed down; keeps its task
        # (230 / 248 ≥ 0.9) and its fluency (1% broken); fed (95% of its pairs, 3.4 passes)
        _write(root, f"dpo/{s}", 230, 0.75, 0.30, 0.30, dlogp=-0.4, broken=0.01, fill=0.95, passes=3.4)
        probes[f"dpo/{s}"] = os.path.join(root, "runs", f"dpo/{s}", "probes.csv")
        # CW-DPO: CIDEr clearly above DPO and SFT; TV far lower; top-1 a hair above DPO's (+0.005: not lower
        # whatever the noise draws, and far inside δ); CHAIR_s equal
        _write(root, f"cw/{s}", 260, 0.755, 0.10, 0.30, fill=1.0, passes=3.2)
    stability = []
    for seed, acc, mcq in ((1, 0.94, 0.82), (2, 0.96, 0.88)):  # each seed's file: grounding and MCQ accuracy
        p = tmp_path / f"stab{seed}.json"
        p.write_text(json.dumps({"corpus": {"1-obj shape acc.": acc}, "mcq": {"shapes_mcq": {"accuracy": mcq}}}))
        stability.append(str(p))
    spec = _with_questions(root, _spec(root, {"main": rows}, probes, stability), {"base": 0.85}, {"base": 0.52})
    spec["regime"] = {**spec["regime"], "control_calibration": {"met_both": True, "swept": "lr 1e-4 … 1e-3",
                                                                 "setting": "lr 1e-3, the rule's choice"}}
    out = paper_table(spec)
    v = _claims(out["md"])
    assert v["CW-DPO > DPO on CIDEr"] == "holds" and v["CW-DPO > SFT on CIDEr"] == "holds"
    assert v["TV(π, π_ref) lower for CW-DPO than DPO"] == "holds"
    # top-1 mass not lower: the interval lies below δ, so the paper's effect is absent ("does not hold")
    assert v["top-1 mass lower for CW-DPO than DPO"] == "does not hold"
    assert v["CW-DPO hallucinates less than DPO (CHAIR_s)"] in ("does not hold", "inconclusive")
    assert "ours (not the paper's)" in out["md"]
    regime = [r for r in csv.reader(io.StringIO(out["csv"])) if r[0] == "regime"]
    verdicts = {r[1].split(":")[0] + ":" + r[1].split(":")[1][:20]: r[6] for r in regime}
    assert all(x == "pass" for x in verdicts.values()), regime
    assert _row(_regime_rows(out), "stability: the lowest accuracy on shapes_mcq over 3 pretraining seeds") == (
        "82.0% (85.0%, 82.0%, 88.0%)", "pass")
    assert out["md"].index("T-regime") < out["md"].index("T-paper")
    # a base model that cannot see fails the vision row (and says so, it is not hidden)
    _write(root, "base", 200, 0.70, 0.0, 0.3, shape_acc=0.5)
    out = paper_table(_spec(root, {"main": rows}, probes, stability))
    vision = [r for r in csv.reader(io.StringIO(out["csv"])) if r[0] == "regime" and "shape of" in r[1]]
    assert vision[0][6] == "fail" and vision[0][4] == "50.0%"
    # a base model that cannot answer questions — chance on the MCQ, "yes" to every POPE question — fails both
    # rows; without the sets the rows say n/a
    out = paper_table(_with_questions(root, _spec(root, {"main": rows}, probes, stability), {"base": 0.31},
                                      {"base": 1.0}))
    assert _row(_regime_rows(out), "questions: the base model's accuracy") == ("31.0%", "fail")
    assert _row(_regime_rows(out), "questions: the base model's POPE") == ("100.0%", "fail")
    bare = _regime_rows(paper_table(_spec(root, {"main": rows}, probes, stability)))
    assert _row(bare, "questions: the base model's accuracy") == _row(bare, "questions: the base model's POPE") == (
        "n/a", "fail")
    assert _row(bare, "stability: the lowest accuracy") == ("n/a", "fail")
    # one pretraining seed that does not answer questions fails the MCQ stability row, though the base passes
    (tmp_path / "stab2.json").write_text(json.dumps({"corpus": {"1-obj shape acc.": 0.96},
                                                     "mcq": {"shapes_mcq": {"accuracy": 0.4}}}))
    out = _regime_rows(paper_table(_with_questions(root, _spec(root, {"main": rows}, probes, stability),
                                                   {"base": 0.85}, {"base": 0.52})))
    assert _row(out, "questions: the base model's accuracy")[1] == "pass"
    assert _row(out, "stability: the lowest accuracy on shapes_mcq") == ("40.0% (85.0%, 82.0%, 40.0%)", "fail")


def _with_questions(root: str, spec: dict, accuracy: dict, yes_ratio: dict) -> dict:
    """`spec` reading MCQ set shapes_mcq and POPE set shapes_pope, whose accuracy and mean yes-ratio per model
    key are `accuracy` and `yes_ratio`."""
    for name, kind, values in (("mcq_shapes_mcq", "accuracy", accuracy), ("pope_shapes_pope", "yes", yes_ratio)):
        for key, v in values.items():
            d = os.path.join(root, "eval", key)
            os.makedirs(d, exist_ok=True)
            doc = {"accuracy": v} if kind == "accuracy" else {"mean": {"yes_ratio": v, "f1": 0.7}}
            json.dump(doc, open(os.path.join(d, f"{name}.json"), "w"))
        spec["files"][name] = os.path.join(root, "eval", "{key}", f"{name}.json")
    spec["extra_columns"] = {"shapes_mcq acc.": ["mcq_shapes_mcq", ["accuracy"], True, 1, None],
                             "shapes_pope F1": ["pope_shapes_pope", ["mean", "f1"], True, 1, None]}
    spec["mcq_column"], spec["pope_column"] = "shapes_mcq acc.", "shapes_pope F1"
    return spec


def _regime_rows(out) -> dict:
    return {r[1]: (r[4], r[6]) for r in csv.reader(io.StringIO(out["csv"])) if r[0] == "regime"}


def _row(rows: dict, start: str):
    (hit,) = [v for k, v in rows.items() if k.startswith(start)]
    return hit


@pytest.mark.slow
def test_t_regime_checks_that_stage2_is_fed_and_the_control_keeps_task_and_fluency(tmp_path):
    """The rows of a fed Stage 2 (smallest set fill, most passes) and of a control in the paper's regime (its
    CIDEr ≥ 0.9 × the Stage-1 model's, ≤ 2% broken captions): pass on a healthy run, fail — and say so — on a
    starved one whose control collapsed."""
    root, seeds, rows = str(tmp_path), SEEDS, MAIN_ROWS
    _write(root, "base", 200, 0.70, 0.0, 0.3)
    probes = {}
    for s in seeds:
        _write(root, f"sft/{s}", 250, 0.70, 0.05, 0.20)
        _write(root, f"sftc/{s}", 250, 0.71, 0.06, 0.20)
        _write(root, f"dpo/{s}", 240, 0.75, 0.30, 0.30, dlogp=-0.4, broken=0.01, fill=0.93 + 0.01 * s, passes=3.4)
        probes[f"dpo/{s}"] = os.path.join(root, "runs", f"dpo/{s}", "probes.csv")
        _write(root, f"cw/{s}", 260, 0.755, 0.10, 0.30, fill=1.0, passes=3.2)
    spec = _spec(root, {"main": rows}, probes, [])
    r = _regime_rows(paper_table(spec))
    assert _row(r, "Stage 2 is fed: the smallest share") == ("93.0% (dpo/0)", "pass")
    assert _row(r, "Stage 2 is fed: the most passes") == ("3.40 (dpo/0)", "pass")
    assert _row(r, "the control keeps its task") == ("0.960 (240.0 / 250.0)", "pass")
    assert _row(r, "the control stays fluent") == ("1.0%", "pass")
    # starved: one set at 8% of its pairs and 40 passes over it; the control collapsed (CIDEr 112, 29% broken)
    for s in seeds:
        _write(root, f"dpo/{s}", 112, 0.75, 0.30, 0.30, dlogp=-0.4, broken=0.29, fill=0.08 if s else 0.5,
               passes=40.0 if s == 2 else 3.0)
    r = _regime_rows(paper_table(spec))
    assert _row(r, "Stage 2 is fed: the smallest share") == ("8.0% (dpo/1)", "fail")
    assert _row(r, "Stage 2 is fed: the most passes") == ("40.00 (dpo/2)", "fail")
    assert _row(r, "the control keeps its task") == ("0.448 (112.0 / 250.0)", "fail")
    assert _row(r, "the control stays fluent") == ("29.0%", "fail")
    # without a Stage-2 set or fluency measure (e.g. COCO data) the rows fail with n/a, never pass unseen
    for s in seeds:
        for run in ("dpo", "cw"):
            for f in ("pairs_summary.json", "metrics.json"):
                os.remove(os.path.join(root, "runs", f"{run}/{s}", f))
    spec = _spec(root, {"main": rows}, probes, [])
    r = _regime_rows(paper_table(spec))
    assert _row(r, "Stage 2 is fed: the smallest share") == ("n/a", "fail")


def test_t_regime_says_whether_a_swept_setting_met_both_sides_of_the_calibration_rule(tmp_path):
    """The control's calibration outcome, as the experiment's config records it: a row that passes when a swept
    setting met both sides, fails and says so when none did (the default's finding), and fails with n/a when no
    sweep is recorded (the GPU scales)."""
    from cwdpo.config import default_config_path, read_config_file
    root = str(tmp_path)
    rows = {"base": ["base"], "SFT": ["sft/0"], "SFT-C": ["sftc/0"], "DPO": ["dpo/0"], "CW-DPO": ["cw/0"]}
    for key in ("base", "sft/0", "sftc/0", "dpo/0", "cw/0"):
        _write(root, key, 250, 0.70, 0.05, 0.20)
    spec = _spec(root, {"main": rows}, {}, [])
    recorded = read_config_file(default_config_path())["regime"]["control_calibration"]
    assert spec["regime"]["control_calibration"] == recorded and recorded["met_both"] is False
    ours, verdict = _row(_regime_rows(paper_table(spec)), "the control's setting")
    assert verdict == "fail" and ours == f"no: {recorded['swept']}; the control: {recorded['setting']}"
    spec["regime"] = {**spec["regime"], "control_calibration": {"met_both": True, "swept": "s", "setting": "x"}}
    assert _row(_regime_rows(paper_table(spec)), "the control's setting") == ("yes: s; the control: x", "pass")
    spec["regime"] = {**spec["regime"], "control_calibration": None}
    assert _row(_regime_rows(paper_table(spec)), "the control's setting") == (
        "n/a (no sweep recorded: regime.control_calibration)", "fail")


def _calibration_spec(root, sweep):
    """A calibrate-table spec over SFT and DPO (from SFT-C) at each (lr, top-1 gain, positives' Δlog p, TV[,
    broken captions of N_IMAGES]) of `sweep`; SFT-C's captions are all fluent references."""
    seeds = range(3)
    rows = [{"name": "SFT", "keys": [f"sft/{s}" for s in seeds]}]
    probes = {}
    for s in seeds:
        _write(root, f"sft/{s}", 250, 0.70, 0.05, 0.2)
        _write(root, f"sftc/{s}", 250, 0.70, 0.05, 0.2)
    for lr, gain, dlogp, tv, *broken in sweep:
        keys = [f"dpo{lr}/{s}" for s in seeds]
        for k in keys:
            _write(root, k, 240, 0.70 + gain, tv, 0.3, dlogp=dlogp, n_broken=broken[0] if broken else 0)
            probes[k] = os.path.join(root, "runs", k, "probes.csv")
        rows.append({"name": f"DPO, lr {lr:g}", "keys": keys, "lr": lr, "beta": 0.1,
                     "init_keys": [f"sftc/{s}" for s in seeds]})
    return {"name": "calibrate", "kind": "calibrate", "title": "calibrate", "scale": 100, "extra_columns": {},
            "files": {"scores": os.path.join(root, "eval", "{key}", "scores.json"),
                      "measures": os.path.join(root, "eval", "{key}", "measures.json"),
                      "captions": os.path.join(root, "eval", "{key}", "captions.json")},
            "rows": rows, "probes": probes, "interval": "hierarchical", "top1_gain": 0.03, "control_tv": 0.45,
            "task_share": 0.9, "max_broken": 0.02}


def _chosen(out):
    return [(r["control"], r["chosen_by"].split(" ")[0]) for r in csv.DictReader(io.StringIO(out["csv"]))
            if r["chosen"] == "True"]


def test_calibration_rule_picks_the_smallest_lr_with_the_signature(tmp_path):
    spec = _calibration_spec(str(tmp_path), [(1e-4, 0.0, 0.1, 0.2), (5e-4, 0.05, 0.2, 0.3), (1e-3, 0.05, -0.3, 0.4),
                                             (2e-3, 0.1, -0.9, 0.45)])
    out = calibrate_table(spec)
    assert "Outcome: lr = 0.001" in out["md"]  # 5e-4 is peaked but its positives did not fall
    assert _chosen(out) == [("DPO, lr 0.001", "the")]  # by the squeezing signature, not the TV fallback


def test_calibration_falls_back_to_the_papers_drift_when_no_lr_shows_the_signature(tmp_path):
    """No swept lr raises top-1 mass: the rule's fallback takes the lr whose control TV is nearest 0.45."""
    spec = _calibration_spec(str(tmp_path), [(1e-4, -0.01, -0.5, 0.10), (1e-3, -0.08, -4.0, 0.42),
                                             (2e-3, -0.01, -5.5, 0.49)])
    out = calibrate_table(spec)
    assert "Outcome: lr = 0.001" in out["md"] and "fallback" in out["md"]
    assert _chosen(out) == [("DPO, lr 0.001", "fallback")]
    assert all(r["signature"] == "False" for r in csv.DictReader(io.StringIO(out["csv"])))


def test_calibration_rule_is_two_sided_the_signature_with_task_and_fluency_kept(tmp_path):
    """A setting that squeezes only by breaking the captions is not chosen: the first (gentlest) row whose
    control shows the signature *and* keeps CIDEr ≥ 0.9 × SFT-C's with ≤ 2% broken captions is. Broken
    captions are counted from the captions themselves (empty ones here: 1 of 60 is 1.7%, 3 of 60 is 5%)."""
    spec = _calibration_spec(str(tmp_path), [(1e-4, 0.0, 0.1, 0.2, 0), (5e-4, 0.05, -0.3, 0.3, 3),
                                             (1e-3, 0.05, -0.3, 0.4, 1), (2e-3, 0.1, -0.9, 0.45, 30)])
    out = calibrate_table(spec)
    assert "Outcome: lr = 0.001" in out["md"] and _chosen(out) == [("DPO, lr 0.001", "the")]
    got = {r["control"]: r for r in csv.DictReader(io.StringIO(out["csv"]))}
    assert got["DPO, lr 0.0005"]["signature"] == "True" and got["DPO, lr 0.0005"]["kept"] == "False"
    assert float(got["DPO, lr 0.0005"]["broken"]) == pytest.approx(3 / 60)
    assert float(got["DPO, lr 0.001"]["task"]) == pytest.approx(59 / 60, rel=0.01)  # one empty caption of 60
    assert float(got["DPO, lr 0.002"]["task"]) == pytest.approx(0.5, rel=0.02)
    assert got["DPO, lr 0.002"]["meets"] == "False"
    # no row meets both sides: the fallback takes, among the rows that keep task and fluency, the TV nearest 0.45
    spec = _calibration_spec(str(tmp_path), [(1e-4, 0.0, 0.1, 0.2, 0), (1e-3, 0.0, -0.3, 0.35, 0),
                                             (2e-3, 0.1, -0.9, 0.45, 30)])
    out = calibrate_table(spec)
    assert _chosen(out) == [("DPO, lr 0.001", "fallback")] and "among the settings that keep" in out["md"]


def test_calibration_outcome_feeds_calibrated_recipes_the_rule_or_its_fallback(tmp_path):
    """What recipes with `lr: calibrated` train at (`calibration/<table>.json`): the rule's lr when the signature
    shows, else the fallback's (TV nearest regime.control_tv), said in the outcome (a finding, not hidden)."""
    from cwdpo.report import write_calibration_choice
    spec = _calibration_spec(str(tmp_path), [(1e-4, 0.0, -0.5, 0.15), (1e-3, 0.0, -0.5, 0.40)])
    doc = write_calibration_choice(spec, str(tmp_path / "choice.json"))
    assert doc["lr"] == 1e-3 and doc["signature"] is False and "fallback" in doc["outcome"]
    assert json.load(open(tmp_path / "choice.json"))["row"] == "DPO, lr 0.001"
    for k in spec["rows"][1]["keys"]:  # the smaller lr now squeezes: the rule itself picks it
        _write(str(tmp_path), k, 240, 0.76, 0.15, 0.3, dlogp=-0.5)
    doc = write_calibration_choice(spec, str(tmp_path / "choice.json"))
    assert doc["lr"] == 1e-4 and doc["signature"] is True and "squeezing signature" in doc["outcome"]


def _arms_spec(root, arms, claims, kind="scale"):
    from cwdpo.config import load_claims
    from cwdpo.report import QUANTITY_COLUMN, QUESTIONS
    known = load_claims()
    files = {"scores": os.path.join(root, "{arm}", "eval", "{key}", "scores.json"),
             "measures": os.path.join(root, "{arm}", "eval", "{key}", "measures.json")}
    shares = {"cider_cw_gt_dpo": 0.0137, "tv_cw_lt_dpo": 0.333, "top1_dpo_gt_sft": 0.05}
    return {"name": kind, "kind": kind, "title": kind, "scale": 100, "experiment": "synthetic",
            "extra_columns": {}, "interval": "hierarchical", "question": QUESTIONS[kind],
            "claims": [{**known[c], "column": QUANTITY_COLUMN.get(known[c]["quantity"], known[c]["quantity"]),
                        "share": shares[c]} for c in claims],
            "arms": [{"name": name, "variant": name, "out": os.path.join(root, name),
                      "runs": {run: [f"{run.lower()}/{s}" for s in range(3)] for run in ("SFT", "DPO", "CW-DPO")},
                      "files": {k: v.replace("{arm}", name) for k, v in files.items()}, "probes": {}, "metrics": {},
                      "build_info": os.path.join(root, name, "build_info.json"), "calibration": None,
                      "negatives": {}} for name in arms]}


def test_arms_table_decides_each_arm_and_derives_its_answer_from_the_verdicts(tmp_path):
    """T-scale on synthetic runs whose answers are known: CW-DPO beats DPO clearly at one size and falls behind it
    at the other; each verdict is the one `verdict` gives for the interval and δ the CSV prints, the question
    stands above the table and the answer below it follows the verdicts."""
    from cwdpo.report import claim_pattern
    root = str(tmp_path)
    for arm, cw_cider, cw_tv in (("small", 260, 0.10), ("large", 220, 0.35)):
        os.makedirs(os.path.join(root, arm), exist_ok=True)
        json.dump({"parameters": 1000 if arm == "small" else 20000, "vision_parameters": 10},
                  open(os.path.join(root, arm, "build_info.json"), "w"))
        for s in range(3):
            _write(os.path.join(root, arm), f"sft/{s}", 250, 0.70, 0.05, 0.2)
            _write(os.path.join(root, arm), f"dpo/{s}", 230, 0.76, 0.30, 0.3)
            _write(os.path.join(root, arm), f"cw-dpo/{s}", cw_cider, 0.76, cw_tv, 0.3)
    spec = _arms_spec(root, ["small", "large"], ["cider_cw_gt_dpo", "tv_cw_lt_dpo", "top1_dpo_gt_sft"])
    out = arms_table(spec)
    rows = list(csv.DictReader(io.StringIO(out["csv"])))
    claims = [r for r in rows if r["section"] == "claim"]
    assert len(claims) == 6
    for r in claims:  # the verdict word is the function of the printed interval and δ, never written by hand
        direction = {"cider_cw_gt_dpo": ">", "tv_cw_lt_dpo": "<", "top1_dpo_gt_sft": ">"}[r["row"]]
        assert r["verdict"] == stats.verdict(float(r["lo"]), float(r["hi"]), direction, float(r["delta"]))
    v = {(r["row"], r["arm"]): r["verdict"] for r in claims}
    assert v[("cider_cw_gt_dpo", "small")] == "holds" and v[("tv_cw_lt_dpo", "small")] == "holds"
    assert v[("cider_cw_gt_dpo", "large")] == "does not hold"
    assert v[("top1_dpo_gt_sft", "small")] == v[("top1_dpo_gt_sft", "large")] == "holds"
    assert claim_pattern([v[("cider_cw_gt_dpo", a)] for a in ("small", "large")]) == "differs"
    md = out["md"]
    assert md.index("**Question.**") < md.index("| parameters") < md.index("**Answer.**")
    answer = md.split("**Answer.** ", 1)[1].split("\n", 1)[0]
    assert answer.startswith("Size dependence: the verdict changes with size for 2 of 3 claims")
    assert "“CW-DPO > DPO on CIDEr” holds for small, does not hold for large" in answer
    assert "“squeezing in the control: top-1 mass of DPO above SFT's” holds at every size" in answer
    assert [r for r in rows if r["section"] == "answer"][0]["value"] == answer
    params = [r for r in rows if r["section"] == "info" and r["row"].startswith("parameters")]
    assert [p["value"] for p in params] == ["1,000 (10)", "20,000 (10)"]
    assert out["tex"].startswith("% Question:") and "% Answer: " + answer in out["tex"]


def test_non_inferiority_holds_above_minus_the_margin_and_fails_below_it():
    # A ≥ B − δ ('>='): the interval of A − B against −δ
    assert stats.verdict(-0.5, 1.0, ">=", delta=1.0) == "holds"
    assert stats.verdict(-2.0, -1.5, ">=", delta=1.0) == "does not hold"
    assert stats.verdict(-1.5, 0.5, ">=", delta=1.0) == "inconclusive"
    # A ≤ B + δ ('<='): the interval of B − A against −δ
    assert stats.verdict(-1.0, 0.5, "<=", delta=1.0) == "holds"
    assert stats.verdict(1.5, 2.0, "<=", delta=1.0) == "does not hold"
    # a superiority claim on the same interval would not hold: non-inferiority asks less
    assert stats.verdict(-0.5, 1.0, ">", delta=1.0) == "inconclusive"
    with pytest.raises(ValueError, match="margin"):
        stats.verdict(0.0, 1.0, ">=")


@pytest.mark.parametrize("cw_mcq,expected", [(80.0, "holds"), (60.0, "does not hold")])
def test_t_paper_decides_the_mcq_claim_as_non_inferiority_on_the_first_mcq_set(tmp_path, cw_mcq, expected):
    """CW-DPO's MCQ accuracy against SFT's (81%) with the config's margin (5% of SFT's = 4.05 points): one point
    below SFT is non-inferior, twenty-one below is not; the row prints the margin."""
    from cwdpo.report import RunData, load_paper
    from cwdpo.report.paper import _claims
    root = str(tmp_path)
    rows = {"SFT": [f"sft/{s}" for s in SEEDS], "CW-DPO": [f"cw/{s}" for s in SEEDS]}
    for name, acc in (("sft", 81.0), ("cw", cw_mcq)):
        for s in SEEDS:
            d = os.path.join(root, "eval", f"{name}/{s}")
            os.makedirs(d)
            json.dump({"accuracy": (acc + (s - 1) * 0.2) / 100}, open(os.path.join(d, "mcq_shapes_mcq.json"), "w"))
    spec = _spec(root, {"main": rows}, {}, [])
    spec["files"]["mcq_shapes_mcq"] = os.path.join(root, "eval", "{key}", "mcq_shapes_mcq.json")
    spec["extra_columns"] = {"shapes_mcq acc.": ["mcq_shapes_mcq", ["accuracy"], True, 1, None]}
    spec["mcq_column"] = "shapes_mcq acc."
    claims = {r[0]: r for r in _claims(spec, RunData(spec), load_paper())}
    row = claims["CW-DPO keeps general ability: MCQ accuracy ≥ SFT's − δ (non-inferiority)"]
    assert row[5] == expected and row[4] == "margin 4.0 (5.0% of SFT)", row
    spec["mcq_column"] = None  # no MCQ set configured: n/a with the reason
    row = {r[0]: r for r in _claims(spec, RunData(spec), load_paper())}[row[0]]
    assert (row[3], row[5], row[6]) == ("n/a", "inconclusive", "no MCQ set configured (config mcq_sets)")


def test_convergence_is_the_step_from_which_validation_cider_stays_near_its_final_value_or_na_with_why(tmp_path):
    """RunData.convergence reads probes.csv's val_cider rows (within 5% of the final value from step 150 on,
    not at 100); without such rows (no validation interval or images) it is n/a, and the reason names both."""
    from cwdpo.report import RunData
    with_val, without = tmp_path / "with.csv", tmp_path / "without.csv"
    with_val.write_text("step,val_cider,top1\n25,,0.5\n50,0.2,0.5\n100,0.9,0.6\n150,1.0,0.6\n")
    without.write_text("step,val_cider,top1\n25,,0.5\n50,nan,0.5\n")
    data = RunData({"probes": {"a": str(with_val), "b": str(without)}})
    step, why = data.convergence("a")
    assert why is None and step == 150.0
    assert data.convergence("b") == (
        None, "probes.csv has no validation CIDEr-D (probes.val_interval or val_images is 0)")
    assert data.convergence("missing")[0] is None
