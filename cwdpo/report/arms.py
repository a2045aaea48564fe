"""The open questions (kinds scale, modality, negsource): claims decided in several arms side by side — its
question above the table, the info rows and one row per claim with a column per arm, and below it the answer,
derived from the verdicts (never written by hand).
No torch import.
"""
from __future__ import annotations

import os

import numpy as np

from ..config import arm_runs, load_claims, stage2_recipe
from ..data import read_json
from ..paths import ModelKey
from .common import QUANTITY_COLUMN, RunData, _fmt_diff, _r, cell_stats, claim_difference, decide, digits_of, fmt
from .render import Document, Table


QUESTIONS = {
    "scale": "Does the squeezing effect, and the cooling weight's benefit over DPO and SFT, depend on the model's "
             "size (the same data and recipes, the control's learning rate calibrated by the same rule at each "
             "size)?",
    "modality": "Is the visual stream a prerequisite for the instability CW-DPO fixes, or does the same language "
                "model, given the scene's attribute record as text instead of the image, show it too?",
    "negsource": "Does the cooling weight stay effective when the Stage-2 negatives change — rule-based, the "
                 "Stage-1 model's own wrong beams, on-policy samples, or their mix?",
}
ARM_NOUN = {"scale": "size", "modality": "input", "negsource": "source"}


def arms_spec(plan, name: str, t: dict) -> dict:
    """The spec of a table across arms: per arm its plan's evaluation files, the model keys of its runs, and
    what its info rows read (parameter counts, the calibration outcome, pairs and reference log-probs)."""
    claims = load_claims()
    spec = {"name": name, "kind": t["kind"], "title": t.get("title") or name, "scale": plan.c["evaluate"]["scale"],
            "experiment": plan.c["experiment"], "extra_columns": {}, "interval": plan.c["claims"]["interval"],
            "question": QUESTIONS[t["kind"]],
            "claims": [{**claims[cid], "column": QUANTITY_COLUMN.get(claims[cid]["quantity"],
                                                                     claims[cid]["quantity"]),
                        "share": plan.c["claims"]["min_effect"].get(cid)} for cid in t["claims"]], "arms": []}
    for arm in t["arms"]:
        ap = plan.arm_plan(arm)
        runs = {run: ap.row_keys({"name": run, **sel}) for run, sel in arm_runs(t, arm).items()}
        stage2 = {run: sel["stage2"] for run, sel in arm_runs(t, arm).items() if sel.get("stage2")}
        keys = [k for ks in runs.values() for k in ks]
        entry = {"name": arm["name"], "variant": arm.get("variant"), "out": ap.out, "runs": runs,
                 "files": {kind: ap.eval_file(kind) for kind in ("scores", "measures")},
                 "probes": {k: ap.run_file(k, "probes") for k in keys if ap.run_file(k)},
                 "metrics": {k: ap.run_file(k, "metrics") for k in keys if ap.run_file(k)},
                 "build_info": f"{ap.path('base_init')}/build_info.json" if ap.tiny else None,
                 "calibration": (ap.calibration_choice_file()
                                 if any(ap.calibrated(r) for r in stage2.values()) else None),
                 "negatives": {}}
        for run, recipe in stage2.items():
            hp = stage2_recipe(ap.c, recipe)
            negset = hp["negatives"]
            entry["negatives"][run] = {
                "set": negset, **{k: ap.c["negatives"]["sets"][negset][k] for k in ("rho", "beams")},
                "method": hp["method"],
                "files": [{**{f: ap.path(template, stage1=mk.stage1, seed=mk.seed, negset=negset)
                              for f, template in (("pairs", "pairs"), ("summary", "pairs_summary"),
                                                  ("ref", "ref_logps"))},
                           "metrics": ap.run_file(key, "metrics")}
                          for key, mk in ((k, ModelKey.parse(k)) for k in runs[run])]}
        spec["arms"].append(entry)
    return spec


def arms_inputs(plan, name: str) -> list:
    """Every file a table across arms reads."""
    spec = arms_spec(plan, name, plan.c["tables"][name])
    files = []
    for arm in spec["arms"]:
        for keys in arm["runs"].values():
            files += [arm["files"][kind].format(key=k) for k in keys for kind in ("scores", "measures")]
        files += list(arm["metrics"].values())
        if arm["build_info"]:
            files.append(os.path.dirname(arm["build_info"]))  # the model folder (a directory output) holds it
        if arm["calibration"]:
            files.append(arm["calibration"])
        if spec["kind"] == "negsource":
            files += [f[x] for n in arm["negatives"].values() for f in n["files"] for x in ("pairs", "summary", "ref")]
    return sorted(set(files))


def _mean_w_c_by_source(neg: dict) -> dict:
    """{source: mean w_c at the start of Stage 2} of a run's pairs: σ((ℓ̄_ref(y_l) − ℓ_floor)/τ) under the
    reference model, the cooling weight CW-DPO gives each negative at its first step (the mean over seeds), with
    the ℓ_floor (a "mean" resolved) and τ the run trained with (its metrics.json).
    (`losses.cooling_weight` in numpy: table jobs do not import torch.)"""
    from ..data import read_jsonl
    per_seed = []
    for f in neg["files"]:
        if not all(os.path.isfile(f[k]) for k in ("pairs", "ref", "metrics")):
            continue
        ref = read_json(f["ref"])["ref_rejected_avg"]
        trained = read_json(f["metrics"])
        floor, tau = float(trained["l_floor"]), float(trained["tau"])
        by: dict = {}
        for row, lp in zip(read_jsonl(f["pairs"]), ref):
            by.setdefault(row["source"], []).append(1.0 / (1.0 + np.exp(-(lp - floor) / tau)))
        per_seed.append({k: float(np.mean(v)) for k, v in by.items()})
    sources = sorted({k for d in per_seed for k in d})
    return {k: float(np.mean([d[k] for d in per_seed if k in d])) for k in sources}


def _pairs_by_source(neg: dict) -> dict:
    """{source: pairs per seed} of a run's pairs files (the mean over seeds)."""
    docs = [read_json(f["summary"]) for f in neg["files"] if os.path.isfile(f["summary"])]
    sources = sorted({k for d in docs for k in d["by_source"]})
    return {k: float(np.mean([d["by_source"].get(k, 0) for d in docs])) for k in sources}


def _set_size(neg: dict, metrics: list) -> dict:
    """A run's preference sets: pairs per seed, the share of the target they fill, and the passes the run made
    over them (the means over seeds; None where a file is missing)."""
    docs = [read_json(f["summary"]) for f in neg["files"] if os.path.isfile(f["summary"])]
    passes = [read_json(p)["data"].get("passes") for p in metrics if os.path.isfile(p)]
    passes = [p for p in passes if p is not None]
    return {"pairs": float(np.mean([d["pairs"] for d in docs])) if docs else None,
            "fill": float(np.mean([d["pairs"] / d["target_pairs"] for d in docs])) if docs else None,
            "passes": float(np.mean(passes)) if passes else None}


def arms_results(spec: dict) -> list:
    """Per arm: its claims decided (A − B with its interval, δ, verdict) and its info values."""
    out = []
    for arm in spec["arms"]:
        data = RunData({**spec, "files": arm["files"], "probes": arm["probes"]})
        claims = []
        for c in spec["claims"]:
            a, b = arm["runs"][c["a"]], arm["runs"][c["b"]]
            d = claim_difference(data, a, b, c["column"], spec["interval"])
            b_mean = cell_stats([data.value(k, c["column"])[0] for k in b], [])["mean"]
            result, delta = decide(d, c["direction"], c["share"], b_mean)
            claims.append({"id": c["id"], "diff": d["diff"], "lo": d["lo"], "hi": d["hi"], "delta": delta,
                           "verdict": result, "method": d["method"], "n": d["n"]})
        info = {"values": {col: {run: cell_stats([data.value(k, col)[0] for k in keys], [])["mean"]
                                 for run, keys in arm["runs"].items()} for col in ("CIDEr", "CHAIR_s", "top-1")}}
        if arm["build_info"] and os.path.isfile(arm["build_info"]):
            b = read_json(arm["build_info"])
            info["parameters"], info["vision_parameters"] = b["parameters"], b["vision_parameters"]
        if arm["calibration"] and os.path.isfile(arm["calibration"]):
            info["calibration"] = read_json(arm["calibration"])
        if spec["kind"] == "negsource":
            info["negatives"] = {}
            for run, neg in arm["negatives"].items():
                w = [read_json(p).get("mean_w_c") for k, p in arm["metrics"].items() if k in arm["runs"][run]
                     and os.path.isfile(p)]
                runs_metrics = [p for k, p in arm["metrics"].items() if k in arm["runs"][run]]
                info["negatives"][run] = {"set": neg["set"], "rho": neg["rho"], "beams": neg["beams"],
                                          "pairs_by_source": _pairs_by_source(neg),
                                          "size": _set_size(neg, runs_metrics),
                                          "w_c_start_by_source": _mean_w_c_by_source(neg) if neg["method"] == "cw_dpo"
                                          else {},
                                          "train_w_c": cell_stats([x for x in w if x is not None], [])
                                          if neg["method"] == "cw_dpo" else None}
        out.append({"name": arm["name"], "claims": claims, "info": info})
    return out


def _join(names: list) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def claim_pattern(verdicts: list) -> str:
    """How one claim's verdicts across the arms fall: 'holds' / 'does not hold' (the same decided verdict in
    every arm), 'differs' (holds in one arm and does not hold in another), 'undecided' (otherwise)."""
    if all(v == "holds" for v in verdicts):
        return "holds"
    if all(v == "does not hold" for v in verdicts):
        return "does not hold"
    if "holds" in verdicts and "does not hold" in verdicts:
        return "differs"
    return "undecided"


def _claim_phrase(claim: dict, names: list, verdicts: list, noun: str) -> str:
    pattern = claim_pattern(verdicts)
    if pattern == "holds":
        return f"“{claim['claim']}” holds at every {noun}"
    if pattern == "does not hold":
        return f"“{claim['claim']}” holds at no {noun}"
    groups = [(v, [n for n, x in zip(names, verdicts) if x == v]) for v in ("holds", "does not hold", "inconclusive")]
    return f"“{claim['claim']}” " + ", ".join(f"{'is ' if v == 'inconclusive' else ''}{v} for {_join(ns)}"
                                              for v, ns in groups if ns)


def arms_answer(spec: dict, results: list) -> str:
    """The table's answer in one sentence, derived from the verdicts only (never written by hand)."""
    names = [r["name"] for r in results]
    noun = ARM_NOUN[spec["kind"]]
    verdicts = {c["id"]: [r["claims"][i]["verdict"] for r in results] for i, c in enumerate(spec["claims"])}
    patterns = {cid: claim_pattern(v) for cid, v in verdicts.items()}
    n = len(spec["claims"])
    if spec["kind"] == "scale":
        differ = [c["claim"] for c in spec["claims"] if patterns[c["id"]] == "differs"]
        same = sum(p in ("holds", "does not hold") for p in patterns.values())
        head = (f"the verdict changes with size for {len(differ)} of {n} claims ({'; '.join(differ)})" if differ else
                f"no claim holds at one size and fails at another ({same} of {n} have the same decided verdict at "
                f"every size, {n - same} are inconclusive at some size)")
        lead = "size dependence: " + head
    elif spec["kind"] == "modality":
        lead = _modality_lead(spec, results, verdicts, patterns)
    else:
        effective, not_eff, undecided = [], [], []
        for r in results:
            vs = [c["verdict"] for c in r["claims"]]
            if "holds" in vs and "does not hold" not in vs:
                effective.append(r["name"])
            elif "does not hold" in vs and "holds" not in vs:
                not_eff.append(r["name"])
            else:
                undecided.append(r["name"])
        parts = [f"effective (a claim holds, none fails) under {_join(effective)}" if effective else "",
                 f"not effective (a claim fails, none holds) under {_join(not_eff)}" if not_eff else "",
                 f"undecided under {_join(undecided)}" if undecided else ""]
        lead = "the cooling weight is " + "; ".join(p for p in parts if p)
    details = "; ".join(_claim_phrase(c, names, verdicts[c["id"]], noun) for c in spec["claims"])
    return f"{lead[0].upper()}{lead[1:]} — {details}."


def _modality_lead(spec: dict, results: list, verdicts: dict, patterns: dict) -> str:
    names = [r["name"] for r in results]
    same = sum(len(set(v)) == 1 for v in verdicts.values())
    tail = f"{same} of {len(verdicts)} claims get the same verdict for every input"
    if "top1_dpo_gt_sft" not in verdicts or len(results) < 2:
        return tail
    sq = verdicts["top1_dpo_gt_sft"]
    image, others = sq[0], sq[1:]
    if all(v == "holds" for v in others):
        lead = (f"the control's squeezing shows without the image ({_join(names[1:])}: holds), so the visual "
                "stream is not a prerequisite for it")
    elif image == "does not hold":
        lead = (f"the control shows no squeezing even with the image ({names[0]}: does not hold), so this testbed "
                "cannot say whether the visual stream is a prerequisite for it")
    elif image == "holds" and all(v == "does not hold" for v in others):
        lead = (f"the control's squeezing shows with the image ({names[0]}) and not without it, so in this testbed the "
                "visual stream is a prerequisite for it")
    else:
        lead = ("whether the visual stream is a prerequisite stays undecided (the control's squeezing: "
                + ", ".join(f"{v} for {n}" for n, v in zip(names, sq)) + ")")
    return f"{lead}; {tail}"


def _info_rows(spec: dict, results: list) -> list:
    """[label, cell per arm] rows above the claims: what each arm is."""
    rows = []
    if spec["kind"] == "scale":
        rows.append(["parameters (vision tower)"] + [
            f"{r['info']['parameters']:,} ({r['info']['vision_parameters']:,})" if "parameters" in r["info"] else "n/a"
            for r in results])
    if any("calibration" in r["info"] for r in results) or any(a["calibration"] for a in spec["arms"]):
        cells = []
        for r in results:
            cal = r["info"].get("calibration")
            cells.append("n/a" if cal is None else f"{cal['lr']:g}" + (
                "" if cal["signature"] else " (no signature at any swept lr: the TV fallback)"))
        rows.append(["control lr (calibration rule)"] + cells)
    runs = list(spec["arms"][0]["runs"])
    for col in ("CIDEr", "CHAIR_s", "top-1"):
        digits = digits_of(col)
        rows.append([f"{col}: {' / '.join(runs)}"] + [
            " / ".join("n/a" if r["info"]["values"][col].get(run) is None
                       else f"{r['info']['values'][col][run]:.{digits}f}" for run in runs) for r in results])
    if spec["kind"] == "negsource":
        cw = [run for run, n in spec["arms"][0]["negatives"].items() if n["method"] == "cw_dpo"]
        for run in cw:
            rows.append([f"pairs per seed (of the target), passes over them ({run})"] + [
                _size_cell(r["info"]["negatives"][run]["size"]) for r in results])
            rows.append([f"pairs per seed by source ({run})"] + [
                " · ".join(f"{k} {round(v, 1):g}" for k, v in r["info"]["negatives"][run]["pairs_by_source"].items())
                or "n/a" for r in results])
            rows.append([f"mean w_c at the start, by source ({run}, reference model)"] + [
                " · ".join(f"{k} {v:.3f}" for k, v in r["info"]["negatives"][run]["w_c_start_by_source"].items())
                or "n/a" for r in results])
            rows.append([f"mean w_c during training ({run})"] + [
                fmt(r["info"]["negatives"][run]["train_w_c"], 3) for r in results])
    return rows


def _size_cell(size: dict) -> str:
    if size["pairs"] is None:
        return "n/a"
    text = f"{size['pairs']:.0f} ({100 * size['fill']:.0f}%)"
    return text + (f", {size['passes']:.2f} passes" if size["passes"] is not None else "")


def _claim_cell(c: dict, digits: int) -> str:
    d = _fmt_diff(c, digits)
    delta = "" if c["delta"] is None else f"; δ {c['delta']:.{digits}f}"
    return f"{d}{delta}: {c['verdict']}"


def document(spec: dict) -> Document:
    """A table across arms: its question above, the info rows and one row per claim (A − B [95% CI]; δ:
    verdict) with a column per arm, and below it the answer derived from the verdicts."""
    results = arms_results(spec)
    names = [r["name"] for r in results]
    info = _info_rows(spec, results)
    claim_rows = [[f"{c['claim']}: {c['a']} − {c['b']}"] + [_claim_cell(r["claims"][i], digits_of(c["column"]))
                                                            for r in results]
                  for i, c in enumerate(spec["claims"])]
    answer = arms_answer(spec, results)
    how = {"hierarchical": "a bootstrap over seeds and, within each seed, over the same test images for A and B "
                           "(2000 resamples)", "t": "a t-interval over seeds"}[spec["interval"]]
    methods = sorted({c["method"] for r in results for c in r["claims"]})
    blocks = [f"### {spec['title']}", f"**Question.** {spec['question']}", Table([""] + names, info + claim_rows),
              f"**Answer.** {answer}",
              "A claim holds when the 95% interval of its effect (A − B, or B − A for a claim that A is lower) lies "
              "above 0, does not hold when it lies below δ, its smallest effect of interest (config "
              "`claims.min_effect`, a share of B's value), and is inconclusive otherwise. Interval: "
              f"{how}. Intervals computed: " + "; ".join(methods) + "."]
    csv_rows = [["info", row[0], name, cell, "", "", "", "", ""] for row in info for name, cell in zip(names, row[1:])]
    for i, c in enumerate(spec["claims"]):
        for r in results:
            x = r["claims"][i]
            csv_rows.append(["claim", c["id"], r["name"], _r(x["diff"]), _r(x["lo"]), _r(x["hi"]), _r(x["delta"]),
                             x["verdict"], x["method"]])
    csv_rows.append(["answer", "", "", answer, "", "", "", "", ""])
    return Document(blocks, ["section", "row", "arm", "value", "lo", "hi", "delta", "verdict", "method"], csv_rows,
                    tex_before=[f"% Question: {spec['question']}"], tex_after=[f"% Answer: {answer}"])


# ---------------------------------------------------------------------------------------------------
# the kind's interface (cwdpo.report.KINDS)

spec = arms_spec
inputs = arms_inputs
