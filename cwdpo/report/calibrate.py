"""The control arm's calibration (kind calibrate, config/calibrate.yaml): the sweep table — the SFT reference
row, then the control at increasing learning rates — and the two-sided calibration rule that picks its setting
(`calibration_choice`). The rule's outcome (`write_calibration_choice`, `cwdpo calibration-choice`) is a
Stage-2 input: recipes with `lr: calibrated` train at its learning rate.
No torch import.
"""
from __future__ import annotations

from ..config import stage2_recipe
from .common import (RunData, _fmt_diff, _r, base_spec, cell_stats, claim_difference, finish_spec, fmt, row_inputs,
                     table_rows)
from .render import Document, Table


def calibration_rows(spec: dict) -> list:
    """Per swept row of a `calibrate` table (after the SFT reference row), both sides of the rule:

    - the squeezing signature: the top-1 gain over SFT with its interval and the positives' Δlog p at the last
      probe (mean over seeds) — it shows when the gain is ≥ regime.top1_gain with its interval above 0 and
      Δlog p < 0;
    - the task and fluency kept: CIDEr as a share of the control's own Stage-1 model's (≥ regime.task_share)
      and the share of broken test captions (≤ regime.max_broken);

    plus CHAIR_s and the control's TV to its reference (the fallback's measure)."""
    from ..metrics import caption_quality
    data = RunData(spec)
    rows = spec["rows"]
    sft = rows[0]["keys"]
    scale = float(spec["scale"])
    quality = {}

    def q(keys, name, factor=1.0):  # mean ± interval over seeds of one caption_quality value
        for k in keys:
            if k not in quality:
                doc = data.doc(k, "captions")
                quality[k] = caption_quality(doc, spec.get("chair", "reference")) if doc else {}
        vals = [quality[k].get(name) for k in keys]
        return cell_stats([None if v is None else v * factor for v in vals], [])

    out = []
    for row in rows[1:]:
        d = claim_difference(data, row["keys"], sft, "top-1", spec["interval"])
        dl = cell_stats([x for x in (data.last_probe(k, "dlogp_positive") for k in row["keys"]) if x is not None], [])
        cider, init_cider = q(row["keys"], "CIDEr", scale), q(row["init_keys"], "CIDEr", scale)
        broken, chair = q(row["keys"], "broken"), q(row["keys"], "CHAIR_s", scale)
        tv = cell_stats([data.value(k, "TV")[0] for k in row["keys"]], [])
        shows = (d["diff"] is not None and d["lo"] is not None and d["diff"] >= spec["top1_gain"] and d["lo"] > 0
                 and dl["mean"] is not None and dl["mean"] < 0)
        task = cider["mean"] / init_cider["mean"] if cider["mean"] is not None and init_cider["mean"] else None
        broken_share = broken["mean"]
        kept = (task is not None and task >= spec["task_share"] and broken_share is not None
                and broken_share <= spec["max_broken"])
        out.append({"name": row["name"], "lr": row["lr"], "beta": row.get("beta"), "gain": d, "dlogp": dl,
                    "cider": cider, "chair_s": chair,
                    "tv": tv, "task": task, "broken": broken_share, "signature": shows, "kept": kept,
                    "meets": shows and kept})
    return out


def calibration_choice(rows: list, control_tv: float):
    """(row, how) of the two-sided rule: the first swept row (rows run from the gentlest setting to the
    strongest) at which the squeezing signature shows *and* the task and fluency are kept. When no row meets
    both, the fallback written beside it: among the rows that keep task and fluency (all rows when none does),
    the one whose control TV to its reference (mean over seeds) is nearest `control_tv`, the paper's drift of
    vanilla DPO. (None, reason) when no row has a TV either."""
    hits = [r for r in rows if r["meets"]]
    if hits:
        return hits[0], "the squeezing signature with task and fluency kept"
    kept = [r for r in rows if r["kept"] and r["tv"]["mean"] is not None]
    measured = kept or [r for r in rows if r["tv"]["mean"] is not None]
    if not measured:
        return None, "no swept setting meets the rule or has a TV"
    among = "the settings that keep task and fluency" if kept else "all settings (none keeps task and fluency)"
    return (min(measured, key=lambda r: (abs(r["tv"]["mean"] - control_tv), r["lr"])),
            f"fallback (no swept setting shows the signature with task and fluency kept): among {among}, the "
            f"control's TV nearest {control_tv}")


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def document(spec: dict) -> Document:
    """The sweep of the control arm, one row per setting, with the calibration rule and its outcome above."""
    rows = calibration_rows(spec)
    choice, how = calibration_choice(rows, spec["control_tv"])
    body = [[r["name"], f"{r['lr']:g}", f"{r['beta']:g}", _fmt_diff(r["gain"], 3), fmt(r["dlogp"], 3),
             "yes" if r["signature"] else "no",
             "n/a" if r["task"] is None else f"{r['task']:.3f}", _pct(r["broken"]), "yes" if r["kept"] else "no",
             fmt(r["tv"], 3), fmt(r["cider"], 1), fmt(r["chair_s"], 1), "yes" if r["meets"] else "no"] for r in rows]
    ref = spec["rows"][0]["name"]
    headers = ["control", "lr", "β", f"top-1 − {ref} [95% CI]", "Δlog p positives (last probe)", "squeezing signature",
               "CIDEr / Stage-1 model's", "broken captions", "task and fluency kept", "TV to reference",
               "CIDEr-D (Java-free)", "CHAIR_s", "meets the rule"]
    rule = (f"Rule (written before the sweep, applied to the control arm only): the first row, from the gentlest "
            f"setting to the strongest, at which the squeezing signature shows — the control's top-1 mass exceeds "
            f"{ref}'s by ≥ {spec['top1_gain']} with the interval above 0 and the positives' Δlog p is below 0 — and "
            f"the control keeps its task and stays fluent — its CIDEr is ≥ {spec['task_share']:g} × its Stage-1 "
            f"model's and ≤ {100 * spec['max_broken']:g}% of its test captions are empty or use a word or character "
            f"outside the caption grammar. If no row meets both, the row whose TV to the reference is nearest "
            f"{spec['control_tv']} (the paper's vanilla DPO) among those that keep task and fluency. Outcome: "
            + (f"lr = {choice['lr']:g}, β = {choice['beta']:g} ({choice['name']}), by {how}." if choice else how + "."))
    csv_rows = [[r["name"], repr(r["lr"]), repr(r["beta"]), _r(r["gain"]["diff"]), _r(r["gain"]["lo"]),
                 _r(r["gain"]["hi"]), _r(r["dlogp"]["mean"]), r["signature"], _r(r["task"]), _r(r["broken"]),
                 r["kept"], _r(r["tv"]["mean"]), _r(r["cider"]["mean"]), _r(r["chair_s"]["mean"]), r["meets"],
                 choice is r, how if choice is r else ""] for r in rows]
    return Document([f"### {spec['title']}", rule, Table(headers, body)],
                    ["control", "lr", "beta", "top1_gain", "top1_gain_lo", "top1_gain_hi", "dlogp_positive",
                     "signature", "task", "broken", "kept", "tv", "cider", "chair_s", "meets", "chosen", "chosen_by"],
                    csv_rows)


def calibration_outcome(rows: list, control_tv: float) -> dict:
    """The rule's outcome as recipes with `lr: calibrated` take it (`calibration_choice`): the lr at which the
    squeezing signature first shows or — when it shows at none — the fallback's, with that said (a finding,
    never hidden)."""
    choice, how = calibration_choice(rows, control_tv)
    if choice is None:
        return {"lr": None, "beta": None, "row": None, "signature": False, "outcome": how}
    return {"lr": choice["lr"], "beta": choice["beta"], "row": choice["name"], "signature": choice["signature"],
            "meets": choice["meets"],
            "outcome": f"lr = {choice['lr']:g}, β = {choice['beta']:g} ({choice['name']}), by {how}"}


def write_calibration_choice(spec: dict, out: str) -> dict:
    """`cwdpo calibration-choice` (the spec of a `calibrate` table): the rule's outcome, for the Stage-2 jobs
    of recipes with `lr: calibrated` and for the tables that report it."""
    from ..data import write_json
    rows = calibration_rows(spec)
    doc = {"table": spec["name"], **calibration_outcome(rows, spec["control_tv"]), "top1_gain": spec["top1_gain"],
           "control_tv": spec["control_tv"],
           "task_share": spec["task_share"], "max_broken": spec["max_broken"],
           "rows": [{"name": r["name"], "lr": r["lr"], "beta": r["beta"], "signature": r["signature"],
                     "top1_gain": r["gain"]["diff"],
                     "top1_gain_lo": r["gain"]["lo"], "top1_gain_hi": r["gain"]["hi"],
                     "dlogp_positive": r["dlogp"]["mean"], "tv": r["tv"]["mean"], "task": r["task"],
                     "broken": r["broken"], "kept": r["kept"], "meets": r["meets"]} for r in rows]}
    if doc["lr"] is None:
        from ..data import DataError
        raise DataError(f"calibration table {spec['name']!r}: no swept rows to choose a learning rate from")
    write_json(out, doc)
    return doc


# ---------------------------------------------------------------------------------------------------
# the table spec and inputs (built from the plan at workflow parse time)

def calibration_inputs(plan, name: str) -> list:
    """What the calibration rule reads (`write_calibration_choice`): the measures (top-1 mass, TV) and captions
    (CIDEr-D, broken captions: `metrics.caption_quality`, no scoring job) of the sweep table's rows and of the
    controls' Stage-1 models, and the probes (Δlog p of the positives) of its runs."""
    from . import table_spec  # (the package's dispatcher: the spec of the table, whatever its kind)
    files = []
    for row in table_spec(plan, name)["rows"]:
        for k in row["keys"] + row.get("init_keys", []):
            files += [plan.path("measures", key=k), plan.path("captions", key=k)]
            if plan.run_file(k):
                files.append(plan.run_file(k, "probes"))
    return sorted(set(files))


def spec(plan, name: str, t: dict) -> dict:
    """The spec of a calibrate table (and of its rule's outcome): its rows — each swept row with its lr, β and
    the keys of the control's own Stage-1 model — and the rule's targets (config `regime`)."""
    spec = base_spec(plan, name, t)
    spec["rows"] = table_rows(plan, t)
    for row, cfg_row in zip(spec["rows"][1:], t["rows"][1:]):
        recipe = stage2_recipe(plan.c, cfg_row["stage2"])
        row["lr"], row["beta"] = recipe["lr"], recipe["beta"]
        row["init_keys"] = plan.row_keys({k: v for k, v in cfg_row.items() if k in ("stage1", "seeds")})
    r = plan.c["regime"]
    spec["interval"], spec["top1_gain"] = plan.c["claims"]["interval"], r["top1_gain"]
    spec["control_tv"], spec["task_share"], spec["max_broken"] = r["control_tv"], r["task_share"], r["max_broken"]
    spec["chair"] = plan.c["evaluate"]["chair"]  # CHAIR_s of COCO-style captions (caption_quality)
    keys = [k for r in spec["rows"] for k in r["keys"] + r.get("init_keys", [])]
    return finish_spec(plan, spec, keys)


def inputs(plan, name: str) -> list:
    """Every file a calibrate table reads: its rows' evaluation files and probes, and what its rule reads (the
    controls' Stage-1 models: `calibration_inputs`)."""
    return sorted(set(row_inputs(plan, name) + calibration_inputs(plan, name)))
