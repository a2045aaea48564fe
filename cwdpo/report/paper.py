"""T-paper and T-regime (kind paper), written as one table: T-regime first (the testbed's preconditions,
measured before any verdict), then T-paper.

T-paper puts the paper's numbers (with their source) next to ours and decides each qualitative claim by
the 95% interval of the difference (`cwdpo.stats.difference_ci`), never by eye. It reads the rows of
tables main and ablation (`tables_read_by`).
No torch import.
"""
from __future__ import annotations

from ..config import PAPER_CLAIM_IDS
from .common import (COLUMNS, QUANTITY_COLUMN, SET_QUANTITIES, RunData, _fmt_diff, base_spec, cell_stats,
                     claim_difference, decide, digits_of, finish_spec, fmt, load_paper, row_inputs, table_rows,
                     tables_read_by)
from .render import Document, Table


def _paper_numbers(spec: dict, data: RunData, paper: dict) -> tuple:
    """Rows [quantity, method, paper, ours, paper source] and their n/a reasons."""
    body, reasons = [], {}
    for item in paper["numbers"]:
        table = "ablation" if item["quantity"].endswith("(ablation)") else "main"
        keys = spec["rows_by_name"].get(table, {}).get(item["method"])
        col = QUANTITY_COLUMN[item["quantity"]]
        if col not in COLUMNS and col not in spec["extra_columns"]:
            ours = "n/a"
            reasons[f"{item['quantity']} / {item['method']}"] = (
                f"no evaluation set configured for it (an MCQ set named {col.split()[0]!r} in mcq_sets)")
        elif keys is None:
            ours = "n/a"
            reasons[f"{item['quantity']} / {item['method']}"] = f"no row named {item['method']!r} in table {table}"
        else:
            vals, pers = zip(*[data.value(k, col)[:2] for k in keys]) if keys else ([], [])
            ours = fmt(cell_stats(list(vals), list(pers)), digits_of(col))
        paper_value = str(item["value"]) + (f" ({item['note']})" if item.get("note") else "")
        body.append([item["quantity"], item["method"], paper_value, ours, paper["sources"][item["source"]]])
    return body, reasons


def _claims(spec: dict, data: RunData, paper: dict) -> list:
    """Rows [claim, whose, paper, ours: A − B [CI], δ, verdict, interval] of the main, our and ablation
    claims."""
    cfg = spec["claims"]
    main = spec["rows_by_name"].get("main", {})
    rows = []
    for c in paper["claims"] + paper["our_claims"]:
        whose = "ours (not the paper's)" if c in paper["our_claims"] else "paper"
        col = spec.get(SET_QUANTITIES[c["quantity"]][0]) if c["quantity"] in SET_QUANTITIES else \
            QUANTITY_COLUMN.get(c["quantity"], c["quantity"])
        a, b = main.get(c["a"]), main.get(c["b"])
        if not a or not b or col is None:
            why = f"rows {c['a']}/{c['b']} not configured" if col else SET_QUANTITIES[c["quantity"]][1]
            rows.append([c["claim"], whose, c["paper"], "n/a", "—", "inconclusive", why])
            continue
        d = claim_difference(data, a, b, col, cfg["interval"])
        b_mean = cell_stats([data.value(k, col)[0] for k in b], [])["mean"]
        result, delta = decide(d, c["direction"], cfg["min_effect"].get(c["id"]), b_mean)
        rows.append([c["claim"], whose, c["paper"], _fmt_diff(d, digits_of(col)),
                     _fmt_delta(delta, cfg["min_effect"].get(c["id"]), c["b"], digits_of(col),
                                margin=c["direction"] in (">=", "<=")), result, d["method"]])
    abl = spec["rows_by_name"].get("ablation", {})
    if "full" in abl:
        cider = {x["method"]: x["value"] for x in paper["numbers"] if x["quantity"] == "CIDEr (ablation)"}
        for name, keys in abl.items():
            if name == "full":
                continue
            d = claim_difference(data, abl["full"], keys, "CIDEr", cfg["interval"])
            share = None if name not in cider else cfg["ablation_share"] * (cider["full"] - cider[name]) / cider[name]
            b_mean = cell_stats([data.value(k, "CIDEr")[0] for k in keys], [])["mean"]
            result, delta = decide(d, ">", share if share and share > 0 else None, b_mean)
            rows.append([f"full > {name} on CIDEr", "paper", f"{cider['full']} vs {cider[name]}" if name in cider
                         else "—", _fmt_diff(d, 1), _fmt_delta(delta, share, name, 1), result, d["method"]])
    return rows


def _fmt_delta(delta, share, b_name: str, digits: int, margin: bool = False) -> str:
    if delta is None:
        return "—"
    return ("margin " if margin else "") + f"{delta:.{digits}f} ({100 * share:.1f}% of {b_name})"


def _regime(spec: dict, data: RunData, claim_rows: list) -> list:
    """T-regime rows [precondition, measured, target, pass]: is the instrument valid before its verdicts?"""
    r = spec["regime"]
    main = spec["rows_by_name"].get("main", {})
    rows = []

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    base = main.get(r["base_row"]) or []
    g = data.doc(base[0], "scores").get("grounding", {}).get("corpus", {}) if base and data.doc(base[0], "scores") \
        else {}
    for attr, target in (("colour", r["colour_accuracy"]), ("shape", r["shape_accuracy"])):
        v = g.get(f"1-obj {attr} acc.")
        rows.append([f"vision: the base model names the {attr} of a one-object image", pct(v), f"≥ {pct(target)}",
                     _pass(v is not None and v >= target)])
    mcq = spec.get("mcq_column")
    base_mcq = data.value(base[0], mcq)[0] if base and mcq else None
    base_mcq = None if base_mcq is None else base_mcq / float(spec["scale"])
    rows.append([f"questions: the base model's accuracy on {mcq or 'an MCQ set'} (chance 25%)", pct(base_mcq),
                 f"≥ {pct(r['mcq_accuracy'])}", _pass(base_mcq is not None and base_mcq >= r["mcq_accuracy"])])
    pope = spec.get("pope_column")  # "<set> F1", read from the set's file
    doc = data.doc(base[0], spec["extra_columns"][pope][0]) if base and pope else None
    ratio = (doc or {}).get("mean", {}).get("yes_ratio")
    lo_y, hi_y = r["pope_yes_ratio"]
    name = pope[: -len(" F1")] if pope else "a POPE set"
    rows.append([f"questions: the base model's POPE yes-ratio on {name} (half the true answers are yes)",
                 pct(ratio), f"{pct(lo_y)}–{pct(hi_y)}", _pass(ratio is not None and lo_y <= ratio <= hi_y)])
    s1 = main.get(r["stage1_row"]) or []
    chair = cell_stats([data.value(k, "CHAIR_s")[0] for k in s1], [])
    lo_h, hi_h = r["headroom"]
    v = None if chair["mean"] is None else chair["mean"] / float(spec["scale"])
    rows.append([f"headroom: {r['stage1_row']} captions naming an object not in the image (CHAIR_s)",
                 fmt(chair, 1) + "%" if v is not None else "n/a", f"{pct(lo_h)}–{pct(hi_h)}",
                 _pass(v is not None and lo_h <= v <= hi_h)])
    rows += _feeding_rows(spec, data)
    ctrl, sft = main.get(r["control_row"]) or [], main.get(r["sft_row"]) or []
    if ctrl and sft:
        d = claim_difference(data, ctrl, sft, "top-1", spec["claims"]["interval"])
        ok = d["diff"] is not None and d["lo"] is not None and d["diff"] >= r["top1_gain"] and d["lo"] > 0
        rows.append([f"squeezing in the control: top-1 mass of {r['control_row']} − {r['sft_row']}",
                     _fmt_diff(d, 3), f"≥ +{r['top1_gain']}, interval above 0", _pass(ok)])
    else:
        rows.append([f"squeezing in the control: top-1 mass of {r['control_row']} − {r['sft_row']}", "n/a",
                     f"≥ +{r['top1_gain']}", "fail"])
    dl = [data.last_probe(k, "dlogp_positive") for k in ctrl]
    dls = cell_stats([x for x in dl if x is not None], [])
    rows.append([f"squeezing in the control: Δlog p of the positives under {r['control_row']} (probe set, last step)",
                 fmt(dls, 3), "< 0", _pass(dls["mean"] is not None and dls["mean"] < 0)])
    rows += _control_quality_rows(spec, data, ctrl, s1)
    rows.append(_calibration_row(r))
    seeds = [data.stability(p) for p in spec["stability"]]  # each seed's file, read once for both rows
    shape = [g.get("1-obj shape acc.")] + [s["corpus"].get("1-obj shape acc.") for s in seeds if s]
    shape = [x for x in shape if x is not None]
    spread = max(shape) - min(shape) if len(shape) > 1 else None
    rows.append([f"stability: spread of one-object shape accuracy over {len(shape)} pretraining seeds",
                 "n/a" if spread is None else f"{100 * spread:.1f} pts ({', '.join(pct(x) for x in shape)})",
                 f"≤ {100 * r['stability_spread']:.1f} pts",
                 _pass(spread is not None and spread <= r["stability_spread"] + 1e-12)])
    # the MCQ precondition over the same seeds: a testbed that answers questions only on a lucky seed fails
    mcq_set = mcq[: -len(" acc.")] if mcq else None
    known = [x for x in [base_mcq] + [s.get("mcq", {}).get(mcq_set, {}).get("accuracy") for s in seeds if mcq_set]
             if x is not None]
    low = min(known) if len(known) > 1 else None
    rows.append([f"stability: the lowest accuracy on {mcq_set or 'an MCQ set'} over {len(known)} pretraining seeds",
                 "n/a" if low is None else f"{pct(low)} ({', '.join(pct(x) for x in known)})",
                 f"≥ {pct(r['mcq_accuracy'])}", _pass(low is not None and low >= r["mcq_accuracy"])])
    main_claims = [c for c in claim_rows if c[1] == "paper" and not c[0].startswith("full > ")]
    decided = sum(c[5] != "inconclusive" for c in main_claims)
    rows.append(["decidedness: the paper's main claims decided", f"{decided} of {len(main_claims)}",
                 f"≥ {r['min_decided']}", _pass(decided >= r["min_decided"])])
    return rows


def _feeding_rows(spec: dict, data: RunData) -> list:
    """T-regime: is Stage 2 fed? The smallest share of its target pairs a Stage-2 set of the main and ablation
    tables holds, and the most passes a run makes over its set (before CW-DPO's filter)."""
    r = spec["regime"]
    has_set = spec.get("run_files", {}).get("pairs_summary", {})
    keys = sorted({k for rows in spec["rows_by_name"].values() for ks in rows.values() for k in ks if k in has_set})
    fills = {k: data.value(k, "of target")[0] for k in keys}
    passes = {k: data.value(k, "passes")[0] for k in keys}
    fills = {k: v / float(spec["scale"]) for k, v in fills.items() if v is not None}
    passes = {k: v for k, v in passes.items() if v is not None}
    out = []
    if fills:
        k = min(fills, key=fills.get)
        out.append([f"Stage 2 is fed: the smallest share of its target pairs a Stage-2 set holds ({len(fills)} runs)",
                    f"{100 * fills[k]:.1f}% ({k})", f"≥ {100 * r['set_fill']:.0f}%", _pass(fills[k] >= r["set_fill"])])
    else:
        out.append(["Stage 2 is fed: the smallest share of its target pairs a Stage-2 set holds", "n/a",
                    f"≥ {100 * r['set_fill']:.0f}%", "fail"])
    if passes:
        k = max(passes, key=passes.get)
        out.append([f"Stage 2 is fed: the most passes a Stage-2 run makes over its set ({len(passes)} runs)",
                    f"{passes[k]:.2f} ({k})", f"≤ {r['max_passes']:g}", _pass(passes[k] <= r["max_passes"])])
    else:
        out.append(["Stage 2 is fed: the most passes a Stage-2 run makes over its set", "n/a",
                    f"≤ {r['max_passes']:g}", "fail"])
    return out


def _control_quality_rows(spec: dict, data: RunData, ctrl: list, stage1: list) -> list:
    """T-regime: the control keeps its task (its CIDEr at least `task_share` of the Stage-1 model's) and stays
    fluent (at most `max_broken` of its test captions empty or outside the caption grammar's words)."""
    r = spec["regime"]
    c = cell_stats([data.value(k, "CIDEr")[0] for k in ctrl], [])["mean"]
    s = cell_stats([data.value(k, "CIDEr")[0] for k in stage1], [])["mean"]
    ratio = c / s if c is not None and s else None
    out = [[f"the control keeps its task: CIDEr of {r['control_row']} / {r['stage1_row']}",
            "n/a" if ratio is None else f"{ratio:.3f} ({c:.1f} / {s:.1f})", f"≥ {r['task_share']:g}",
            _pass(ratio is not None and ratio >= r["task_share"])]]
    vals = [data.value(k, "broken captions") for k in ctrl]
    broken = cell_stats([v[0] for v in vals], [])["mean"]
    why = next((v[2] for v in vals if v[2]), None)
    share = None if broken is None else broken / float(spec["scale"])
    out.append([f"the control stays fluent: {r['control_row']}'s test captions empty or with a word or character "
                "outside the caption grammar", f"n/a ({why})" if share is None else f"{100 * share:.1f}%",
                f"≤ {100 * r['max_broken']:g}%", _pass(share is not None and share <= r["max_broken"])])
    return out


def _calibration_row(r: dict) -> list:
    """T-regime: the control's setting against the two-sided calibration rule — the sweep's outcome as the
    experiment's config records it (`regime.control_calibration`), so a run says whether its control was set
    by the rule or by the rule's fallback (no swept setting met both sides)."""
    c = r.get("control_calibration")
    what = ("the control's setting: a swept setting squeezes with task and fluency kept (the two-sided rule, "
            "config/calibrate.yaml)")
    if c is None:
        return [what, "n/a (no sweep recorded: regime.control_calibration)", "a swept setting meets both", "fail"]
    return [what, f"{'yes' if c['met_both'] else 'no'}: {c['swept']}; the control: {c['setting']}",
            "a swept setting meets both", _pass(c["met_both"])]


def _pass(ok: bool) -> str:
    return "pass" if ok else "fail"


def document(spec: dict) -> Document:
    """T-regime (the testbed's preconditions), then T-paper: the paper's numbers next to ours, and a verdict
    per claim decided by its interval and smallest effect of interest."""
    paper = load_paper()
    data = RunData(spec)
    body, reasons = _paper_numbers(spec, data, paper)
    claim_rows = _claims(spec, data, paper)
    regime = _regime(spec, data, claim_rows)
    note = (f"Reproduced on `{spec['experiment']}` ({spec['scale_note']}). Absolute values are not comparable "
            "with the paper's COCO / Qwen2.5-VL-72B numbers; the claims (directions) are. Ours: mean ± std over "
            "seeds [95% CI].")
    verdict_note = ("A claim holds when the 95% interval of its effect (A − B, or B − A for a claim that A is "
                    "lower) lies above 0, does not hold when it lies below δ, its smallest effect of interest "
                    "(fixed in the config before any run: config `claims`), and is inconclusive otherwise; a "
                    "non-inferiority claim (A ≥ B − δ) holds when the interval of A − B lies above −δ, its margin, "
                    "and does not hold when it lies below −δ. "
                    "Interval: " + {"hierarchical": "a bootstrap over seeds and, within each seed, over the same "
                                                    "test images for A and B (2000 resamples)",
                                    "t": "a t-interval over seeds"}[spec["claims"]["interval"]] +
                    "; ablation rows: one seed, a paired bootstrap over test images.")
    blocks = ["### T-regime: the testbed's preconditions (measured before any verdict)",
              Table(["precondition", "measured", "target", "pass"], regime),
              "### T-paper: paper vs reproduced", note,
              Table(["quantity", "method", "paper", "ours", "paper source"], body,
                    tex_headers=["quantity", "method", "paper", "ours", "source"]),
              "#### Claims", verdict_note,
              Table(["claim", "whose", "paper", "ours: A − B [95% CI]", "δ", "verdict", "interval"], claim_rows)]
    if reasons:
        blocks.append("\n".join(f"- {k}: n/a — {v}" for k, v in sorted(reasons.items())))
    csv_rows = ([["regime", r[0], "", r[2], r[1], "", r[3], ""] for r in regime]
                + [["number", r[0], r[1], r[2], r[3], "", "", r[4]] for r in body]
                + [["claim", r[0], r[1], r[2], r[3], r[4], r[5], r[6]] for r in claim_rows])
    return Document(blocks, ["section", "quantity_or_claim", "method_or_whose", "paper_or_target", "ours", "delta",
                             "verdict", "source_or_interval"], csv_rows)


# ---------------------------------------------------------------------------------------------------
# the table spec and inputs (built from the plan at workflow parse time)

def spec(plan, name: str, t: dict) -> dict:
    """The spec of T-paper (and T-regime): the rows of the tables it reads by name, its claims and the
    regime's targets (config `claims`, `regime`) and the stability seeds' files."""
    spec = base_spec(plan, name, t)
    spec["rows_by_name"] = {n: {r["name"]: r["keys"] for r in table_rows(plan, plan.c["tables"][n])
                                if not r.get("trivial")} for n in tables_read_by(plan, name)}
    keys = [k for rows in spec["rows_by_name"].values() for ks in rows.values() for k in ks]
    spec["scale_note"] = (f"model {plan.c['model']['source']}, data {plan.c['data']['source']}, "
                          f"{len(plan.c['seeds'])} seed(s)")
    # (T-paper's own claims only: its spec, and so its job, do not change with the open questions' δs)
    spec["claims"] = {**plan.c["claims"], "min_effect": {k: v for k, v in plan.c["claims"]["min_effect"].items()
                                                        if k in PAPER_CLAIM_IDS}}
    spec["regime"] = plan.c["regime"]
    # the paper's general-ability claim (MMMU / MMBench) on the first MCQ set configured; ours on the first POPE set
    spec["mcq_column"] = next((f"{n} acc." for n in plan.mcq_sets()), None)
    spec["pope_column"] = next((f"{n} F1" for n in plan.pope_sets()), None)
    spec["stability"] = [plan.path("stability", seed=s) for s in plan.stability_seeds()]
    return finish_spec(plan, spec, keys)


def inputs(plan, name: str) -> list:
    """Every file T-paper reads: the rows of tables main and ablation with their training-run files (T-regime:
    set sizes and passes), the control's probes and the stability seeds."""
    files = row_inputs(plan, name, with_run_files=True)
    control = next((r for r in table_rows(plan, plan.c["tables"].get("main", {}))
                    if r["name"] == plan.c["regime"]["control_row"]), {"keys": []})
    files += [plan.run_file(k, "probes") for k in control["keys"] if plan.run_file(k)]
    files += [plan.path("stability", seed=s) for s in plan.stability_seeds()]
    return sorted(set(files))
