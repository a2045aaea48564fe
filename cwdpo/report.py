"""Comparison tables (tabulate: Markdown, CSV, LaTeX) and the paper-vs-reproduced table.

A table spec (built by `table_spec` from the plan) lists rows, each with the model keys of its seeds,
and the columns to show. Each cell is mean ± std over seeds with a 95% interval: a t-interval over
seeds (≥ 2 seeds), else a bootstrap over test images of the one run. A value that cannot be computed
prints `n/a` and its reason goes under the table — never a placeholder number, never a paper value.

T-paper puts the paper's numbers (with their source) next to ours and decides each qualitative claim by
the 95% interval of the difference (`cwdpo.stats.difference_ci`), never by eye.
No torch import.
"""
from __future__ import annotations

import csv
import io
import json
import os

import numpy as np

from .data import read_json, write_text
from .config import ARMS_KINDS, PAPER_CLAIM_IDS, arm_runs, load_claims, stage2_recipe
from .metrics import MEAN_OF_IMAGES, METRIC_NAMES
from .paths import TRIVIAL, ModelKey
from .stats import (convergence_step, difference_ci, ece_difference_ci, paired_bootstrap_ci, seed_ci, verdict,
                    win_rate)

# grounding column -> its key in scores.json["grounding"]
GROUNDING_COLUMNS = {"CHAIR_i": "CHAIR_i", "CHAIR_s": "CHAIR_s", "obj. recall": "recall", "colour acc.": "colour acc.",
                     "shape acc.": "shape acc.", "size acc.": "size acc.", "count acc.": "count acc.",
                     "relation acc.": "relation acc.", "1-obj colour acc.": "1-obj colour acc.",
                     "1-obj shape acc.": "1-obj shape acc.", "broken captions": "broken"}
# column name -> (file, json path, scaled by the caption scale, digits, per-image path or None)
COLUMNS = {
    **{m: ("scores", ["corpus", m], True, 1, ["per_image", m] if m in MEAN_OF_IMAGES else None)
       for m in METRIC_NAMES},
    "top-5 CIDEr": ("scores", ["beams", "corpus", "CIDEr"], True, 1, None),
    "top-5 SPICE": ("scores", ["beams", "corpus", "SPICE"], True, 1, None),
    "ECE": ("measures", ["test", "ece"], False, 3, None),
    "Brier": ("measures", ["test", "brier"], False, 3, None),
    "TV": ("measures", ["test", "tv"], False, 3, ["test", "per_image", "tv"]),
    "JS": ("measures", ["test", "js"], False, 3, ["test", "per_image", "js"]),
    "top-1": ("measures", ["test", "top1"], False, 3, ["test", "per_image", "top1"]),
    "entropy": ("measures", ["test", "entropy"], False, 3, ["test", "per_image", "entropy"]),
    # grounding (cwdpo.grounding), as percentages: what the captions say against the scene
    **{name: ("scores", ["grounding", "corpus", key], True, 1,
              ["grounding", "per_image", key] if key in ("CHAIR_s", "recall", "count acc.", "broken") else None)
       for name, key in GROUNDING_COLUMNS.items()},
    "mean w_c": ("measures", ["heldout", "w_c"], False, 3, None),
    "pref. acc.": ("measures", ["heldout", "pref_acc"], False, 3, None),
    # what a Stage-2 run trained on: its preference set (pairs summary) and how often it went over it (metrics.json)
    "pairs": ("pairs_summary", ["pairs"], False, 0, None),
    "of target": ("pairs_summary", ["fill"], True, 1, None),
    "on-policy pairs": ("pairs_summary", ["onpolicy"], False, 0, None),
    "dataset pairs": ("pairs_summary", ["dataset"], False, 0, None),
    "passes": ("metrics", ["data", "passes"], False, 2, None),
    "filtered share": ("metrics", ["mean_filtered_frac"], True, 1, None),
}
RUN_FILE_KINDS = ("metrics", "pairs_summary")  # files of a training run (per key), not of its evaluation
SPECIAL = ("win-rate vs SFT", "conv. step", "Δ CIDEr vs first row")
NOT_A_MODEL = "not measured for the trivial baseline (it is not a model)"


def non_finite(node, path: str = ""):
    """(key path, value) of the first NaN or ±inf number in a parsed JSON document, or None."""
    import math
    if isinstance(node, float) and not math.isfinite(node):
        return path or "(top level)", node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        found = non_finite(value, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key)
        if found:
            return found
    return None


def read_evaluation_file(path: str):
    """An evaluation file a table reads (scores, measures, MCQ results), refused when a number in it is
    not finite: a NaN would print as an unexplained n/a, a `nan [nan, nan]` cell or a Δ of 0.0."""
    from .data import DataError
    doc = read_json(path)
    found = non_finite(doc)
    if found:
        raise DataError(f"{path}: {found[0]} is {found[1]!r} (a non-finite number in an evaluation file); rerun "
                        "the job that wrote it")
    return doc


def _lookup(doc, path):
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


class RunData:
    """Lazily loaded files of the evaluated runs: their evaluation files (the spec's `files`: a template per
    kind, `{key}` left in) and probes.csv."""

    def __init__(self, spec: dict):
        self.spec, self._cache = spec, {}

    def doc(self, key: str, kind: str):
        if kind in RUN_FILE_KINDS:
            path = self.spec.get("run_files", {}).get(kind, {}).get(key)
            if path is None:
                return None
        else:
            path = self.spec["files"][kind].format(key=key)
        if path not in self._cache:
            self._cache[path] = read_evaluation_file(path) if os.path.isfile(path) else None
        return self._cache[path]

    def value(self, key: str, col: str):
        """(value, per-image values or None, n/a reason or None) of one run for one column."""
        file, path, scaled, _, per_path = COLUMNS.get(col) or self.spec["extra_columns"][col]
        if key == TRIVIAL and file != "scores":
            why = NOT_A_MODEL if file == "measures" else "the trivial baseline is scored on the test split only"
            return None, None, why
        doc = self.doc(key, file)
        if doc is None and file in RUN_FILE_KINDS and not self.spec.get("run_files", {}).get(file, {}).get(key):
            return None, None, ("not a Stage-2 run (no preference set)" if file == "pairs_summary"
                                else "no training run (the base model)")
        if doc is None:
            return None, None, f"{file}.json missing for {key}"
        v = _lookup(doc, path)
        scale = float(self.spec["scale"]) if scaled else 1.0
        per = _lookup(doc, per_path) if per_path else None
        if isinstance(per, dict):
            per = [per[k] for k in sorted(per, key=str)]
        if per is not None and file == "measures":
            # corpus TV/JS/top-1/entropy pool positions: weight each image by its number of positions, so the
            # bootstrapped statistic (a mean over images) is the corpus value itself
            counts = _lookup(doc, ["test", "per_image", "positions"])
            if counts:
                scale_w = len(counts) / sum(counts)
                per = [p * c * scale_w for p, c in zip(per, counts)]
        if v is None and file in RUN_FILE_KINDS:
            return None, None, {"mean_filtered_frac": "not a run with CW-DPO's negative filter"}.get(
                path[-1], f"{col} not recorded")
        if v is None:
            reason = _lookup(doc, ["na_reasons", path[-1]]) or _lookup(doc, ["beams", "na_reasons", path[-1]])
            if path[0] == "grounding":
                reason = (_lookup(doc, ["grounding", "na"]) or _lookup(doc, ["grounding", "na_reasons", path[-1]])
                          or "no caption states it")
            if reason is None and col in ("TV", "JS"):
                reason = "the base model is its own reference (TV/JS are measured against a run's reference)"
            return None, None, reason or f"{col} not measured"
        return v * scale, ([x * scale for x in per] if per is not None else None), None

    def per_image_cider(self, key: str):
        doc = self.doc(key, "scores")
        per = _lookup(doc, ["per_image", "CIDEr"]) if doc else None
        return [per[k] for k in sorted(per, key=str)] if per else None

    def last_probe(self, key: str, column: str):
        """The value of a probes.csv column at the run's last probe (None without one)."""
        path = self.spec["probes"].get(key)
        if not path or not os.path.isfile(path):
            return None
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if r.get(column) not in (None, "", "nan")]
        return float(rows[-1][column]) if rows else None

    def stability(self, path: str):
        """One-object shape accuracy of another pretraining seed's base model (its stability file)."""
        if not os.path.isfile(path):
            return None
        return read_json(path)["corpus"].get("1-obj shape acc.")

    def convergence(self, key: str):
        probes = self.spec["probes"].get(key)
        if not probes or not os.path.isfile(probes):
            return None, "no probes.csv with validation CIDEr-D for this run"
        with open(probes) as f:
            rows = [r for r in csv.DictReader(f) if r.get("val_cider") not in (None, "", "nan")]
        if not rows:
            return None, "probes.csv has no validation CIDEr-D (probes.val_interval = 0)"
        step = convergence_step([int(r["step"]) for r in rows], [float(r["val_cider"]) for r in rows])
        return (None, "validation CIDEr-D never positive") if step is None else (float(step), None)


def cell_stats(values: list, per_images: list) -> dict:
    """mean, std, n and a 95% interval: t over seeds, or a bootstrap over images for a single run."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "lo": None, "hi": None}
    m, lo, hi = seed_ci(vals)
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    if len(vals) == 1 and per_images and per_images[0] is not None:
        _, lo, hi = paired_bootstrap_ci(per_images[0], [0.0] * len(per_images[0]))
    return {"mean": m, "std": std, "n": len(vals), "lo": lo, "hi": hi}


def fmt(stats: dict, digits: int, with_ci: bool = True) -> str:
    if stats["mean"] is None:
        return "n/a"
    text = f"{stats['mean']:.{digits}f}"
    if stats["std"] is not None:
        text += f" ± {stats['std']:.{digits}f}"
    if with_ci and stats["lo"] is not None:
        text += f" [{stats['lo']:.{digits}f}, {stats['hi']:.{digits}f}]"
    return text


def compute_table(spec: dict, data: RunData | None = None) -> tuple[list, list, dict]:
    """(columns, [(row name, {column: stats})], {column: n/a reason}) of a comparison table."""
    data = data or RunData(spec)
    cols = spec["columns"]
    rows, reasons = [], {}
    first_cider = None
    for r_i, row in enumerate(spec["rows"]):
        keys = [TRIVIAL] if row.get("trivial") else row["keys"]
        cells = {}
        for col in cols:
            vals, pers = [], []
            if col == "win-rate vs SFT":
                if row.get("trivial"):
                    _add(reasons, col, NOT_A_MODEL)
                for k, sft in zip(keys, row.get("sft_keys", [])):
                    a, b = data.per_image_cider(k), data.per_image_cider(sft) if sft else None
                    if a is None or b is None or row.get("trivial"):
                        if not row.get("trivial"):
                            _add(reasons, col, "needs the SFT run of the same seed (a `stage1: sft` recipe)")
                        continue
                    vals.append(win_rate(a, b))
                cells[col] = cell_stats(vals, [])
                continue
            if col == "conv. step":
                for k in keys:
                    v, why = (None, NOT_A_MODEL) if k == TRIVIAL else data.convergence(k)
                    if k == "base":
                        why = "the base model has no training run to converge in this experiment"
                    if v is None:
                        _add(reasons, col, why)
                    vals.append(v)
                cells[col] = cell_stats(vals, [])
                continue
            if col == "Δ CIDEr vs first row":
                cider = [data.value(k, "CIDEr")[0] for k in keys]
                if r_i == 0:
                    first_cider = (keys, cider)
                    cells[col] = cell_stats([0.0] * len(keys), [])
                    continue
                runs_a = [{"value": v, "per_image": [x * spec["scale"] for x in (data.per_image_cider(k) or [])]
                           or None} for k, v in zip(keys, cider)]
                runs_b = [{"value": v, "per_image": [x * spec["scale"] for x in (data.per_image_cider(k) or [])]
                           or None} for k, v in zip(*first_cider)]
                d = difference_ci(runs_a, runs_b)
                cells[col] = {"mean": d["diff"], "std": None, "n": d["n"], "lo": d["lo"], "hi": d["hi"]}
                continue
            for k in keys:
                v, per, why = data.value(k, col)
                if v is None and why:
                    _add(reasons, col, why)
                vals.append(v)
                pers.append(per)
            cells[col] = cell_stats(vals, pers)
        rows.append((row["name"], cells))
    return cols, rows, reasons


def _add(reasons: dict, col: str, why):
    """Collect the distinct n/a reasons of a column (several rows can have different ones)."""
    if why and why not in reasons.setdefault(col, []):
        reasons[col].append(why)


def digits_of(col: str) -> int:
    if col in COLUMNS:
        return COLUMNS[col][3]
    if " " in col and any(m in col for m in METRIC_NAMES):  # an evaluation-set column
        return 1
    return 0 if col == "conv. step" else (3 if col == "win-rate vs SFT" else 1)


def render(cols: list, rows: list, reasons: dict, title: str, note: str = "") -> dict:
    """{"md", "csv", "tex"} texts: cells "mean ± std [95% CI]"; CSV holds the numbers in separate columns."""
    from tabulate import tabulate
    headers = ["method"] + cols
    body = [[name] + [fmt(cells[c], digits_of(c)) for c in cols] for name, cells in rows]
    notes = [f"- {c}: n/a — {'; '.join(r)}" for c, r in sorted(reasons.items()) if r]
    md = f"### {title}\n\n"
    if note:
        md += note + "\n\n"
    md += md_table(body, headers) + "\n"
    md += "\nCells: mean ± std over seeds [95% CI: t over seeds; one seed: bootstrap over test images].\n"
    if notes:
        md += "\n" + "\n".join(notes) + "\n"
    tex = tabulate([[name] + [fmt(cells[c], digits_of(c), with_ci=False) for c in cols] for name, cells in rows],
                   headers=headers, tablefmt="latex_booktabs", disable_numparse=True) + "\n"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method"] + [h for c in cols for h in (c, f"{c}_std", f"{c}_n", f"{c}_ci_lo", f"{c}_ci_hi")])
    for name, cells in rows:
        vals = []
        for c in cols:
            s = cells[c]
            vals += ["n/a" if s["mean"] is None else repr(s["mean"]), _r(s["std"]), s["n"], _r(s["lo"]), _r(s["hi"])]
        w.writerow([name] + vals)
    return {"md": md, "csv": buf.getvalue(), "tex": tex}


def md_cell(text) -> str:
    """A cell of a Markdown table: a `|` escaped (it would start a new cell); the config refuses line
    breaks in the names it prints (cwdpo.config.markdown_names)."""
    return str(text).replace("|", "\\|")


def md_table(rows: list, headers: list) -> str:
    """A GitHub-Markdown table whose every cell and header is `md_cell`-escaped."""
    from tabulate import tabulate
    return tabulate([[md_cell(c) for c in row] for row in rows], headers=[md_cell(h) for h in headers],
                    tablefmt="github", disable_numparse=True)


def _r(x) -> str:
    return "" if x is None else repr(float(x))


def write_table(spec: dict, out_stem: str):
    if spec["kind"] == "paper":
        texts = paper_table(spec)
    elif spec["kind"] == "calibrate":
        texts = calibrate_table(spec)
    elif spec["kind"] in ARMS_KINDS:
        texts = arms_table(spec)
    else:
        cols, rows, reasons = compute_table(spec)
        texts = render(cols, rows, reasons, spec["title"])
    for ext, text in texts.items():
        write_text(f"{out_stem}.{ext}", text)


# ---------------------------------------------------------------------------------------------------
# T-paper

def load_paper() -> dict:
    with open(os.path.join(os.path.dirname(__file__), "resources", "paper.json")) as f:
        return json.load(f)


def _runs(data: RunData, keys: list, col: str, scale: float) -> list:
    """[{value, per_image}] of one column for the seeds of a row (per-image for bootstraps)."""
    out = []
    for k in keys:
        v, per, _ = data.value(k, col)
        if v is None:
            continue
        out.append({"value": v, "per_image": per})
    return out


QUANTITY_COLUMN = {"CIDEr": "CIDEr", "BLEU-4": "BLEU-4", "METEOR": "METEOR", "SPICE": "SPICE", "TV": "TV", "JS": "JS",
                   "ECE": "ECE", "top-1 mass": "top-1", "CIDEr (ablation)": "CIDEr", "top-1": "top-1",
                   "MMMU acc.": "mmmu acc.", "MMBench1.1 acc.": "mmbench acc.", "CHAIR_s": "CHAIR_s"}


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


def claim_difference(data: RunData, a: list, b: list, col: str, interval: str) -> dict:
    """The 95% interval of ours(A) − ours(B) on a column (runs paired by seed): `interval` over seeds and
    test images; ECE, a dataset-level statistic, by resampling images with their positions."""
    scale = float(data.spec["scale"])
    d = difference_ci(_runs(data, a, col, scale), _runs(data, b, col, scale), interval=interval)
    if col == "ECE" and (interval == "hierarchical" or d["n"] < 3):
        docs_a = [data.doc(k, "measures")["test"] for k in a if data.doc(k, "measures")]
        docs_b = [data.doc(k, "measures")["test"] for k in b if data.doc(k, "measures")]
        if docs_a and docs_b and all("position_image" in x for x in docs_a + docs_b):
            d = ece_difference_ci(docs_a, docs_b, n_bins=int(docs_a[0]["n_bins"]), by_seed=interval == "hierarchical")
    return d


def decide(d: dict, direction: str, delta_share: float | None, b_mean) -> tuple:
    """(verdict, δ) of a claim whose difference interval is `d`: δ = `delta_share` × |mean of B|."""
    delta = None if delta_share is None or b_mean is None else float(delta_share) * abs(b_mean)
    return verdict(d["lo"], d["hi"], direction, delta), delta


def _claims(spec: dict, data: RunData, paper: dict) -> list:
    """Rows [claim, whose, paper, ours: A − B [CI], δ, verdict, interval] of the main, our and ablation
    claims."""
    cfg = spec["claims"]
    main = spec["rows_by_name"].get("main", {})
    rows = []
    for c in paper["claims"] + paper["our_claims"]:
        whose = "ours (not the paper's)" if c in paper["our_claims"] else "paper"
        col = QUANTITY_COLUMN.get(c["quantity"], c["quantity"])
        a, b = main.get(c["a"]), main.get(c["b"])
        if not a or not b:
            rows.append([c["claim"], whose, c["paper"], "n/a", "—", "inconclusive",
                         f"rows {c['a']}/{c['b']} not configured"])
            continue
        d = claim_difference(data, a, b, col, cfg["interval"])
        b_mean = cell_stats([data.value(k, col)[0] for k in b], [])["mean"]
        result, delta = decide(d, c["direction"], cfg["min_effect"].get(c["id"]), b_mean)
        rows.append([c["claim"], whose, c["paper"], _fmt_diff(d, digits_of(col)),
                     _fmt_delta(delta, cfg["min_effect"].get(c["id"]), c["b"], digits_of(col)), result, d["method"]])
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


def _fmt_delta(delta, share, b_name: str, digits: int) -> str:
    if delta is None:
        return "—"
    return f"{delta:.{digits}f} ({100 * share:.1f}% of {b_name})"


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
    shape = [g.get("1-obj shape acc.")] + [data.stability(p) for p in spec["stability"]]
    shape = [x for x in shape if x is not None]
    spread = max(shape) - min(shape) if len(shape) > 1 else None
    rows.append([f"stability: spread of one-object shape accuracy over {len(shape)} pretraining seeds",
                 "n/a" if spread is None else f"{100 * spread:.1f} pts ({', '.join(pct(x) for x in shape)})",
                 f"≤ {100 * r['stability_spread']:.1f} pts",
                 _pass(spread is not None and spread <= r["stability_spread"] + 1e-12)])
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


def paper_table(spec: dict) -> dict:
    """T-regime (the testbed's preconditions), then T-paper: the paper's numbers next to ours, and a verdict
    per claim decided by its interval and smallest effect of interest."""
    from tabulate import tabulate
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
                    "(fixed in the config before any run: config `claims`), and is inconclusive otherwise. "
                    "Interval: " + {"hierarchical": "a bootstrap over seeds and, within each seed, over the same "
                                                    "test images for A and B (2000 resamples)",
                                    "t": "a t-interval over seeds"}[spec["claims"]["interval"]] +
                    "; ablation rows: one seed, a paired bootstrap over test images.")
    md = "### T-regime: the testbed's preconditions (measured before any verdict)\n\n"
    md += md_table(regime, ["precondition", "measured", "target", "pass"]) + "\n\n"
    md += "### T-paper: paper vs reproduced\n\n" + note + "\n\n"
    md += md_table(body, ["quantity", "method", "paper", "ours", "paper source"]) + "\n\n"
    md += "#### Claims\n\n" + verdict_note + "\n\n"
    headers = ["claim", "whose", "paper", "ours: A − B [95% CI]", "δ", "verdict", "interval"]
    md += md_table(claim_rows, headers) + "\n"
    if reasons:
        md += "\n" + "\n".join(f"- {k}: n/a — {v}" for k, v in sorted(reasons.items())) + "\n"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["section", "quantity_or_claim", "method_or_whose", "paper_or_target", "ours", "delta", "verdict",
                "source_or_interval"])
    for r in regime:
        w.writerow(["regime", r[0], "", r[2], r[1], "", r[3], ""])
    for r in body:
        w.writerow(["number", r[0], r[1], r[2], r[3], "", "", r[4]])
    for r in claim_rows:
        w.writerow(["claim", r[0], r[1], r[2], r[3], r[4], r[5], r[6]])
    tex = "\n".join(tabulate(rows, headers=h, tablefmt="latex_booktabs", disable_numparse=True) for rows, h in (
        (regime, ["precondition", "measured", "target", "pass"]),
        (body, ["quantity", "method", "paper", "ours", "source"]), (claim_rows, headers))) + "\n"
    return {"md": md, "csv": buf.getvalue(), "tex": tex}


def _fmt_diff(d: dict, digits: int) -> str:
    if d["diff"] is None:
        return "n/a"
    if d["lo"] is None:
        return f"{d['diff']:+.{digits}f}"
    return f"{d['diff']:+.{digits}f} [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]"


# ---------------------------------------------------------------------------------------------------
# the control arm's calibration (config/calibrate.yaml)

def calibration_rows(spec: dict) -> list:
    """Per swept row of a `calibrate` table (after the SFT reference row), both sides of the rule:

    - the squeezing signature: the top-1 gain over SFT with its interval and the positives' Δlog p at the last
      probe (mean over seeds) — it shows when the gain is ≥ regime.top1_gain with its interval above 0 and
      Δlog p < 0;
    - the task and fluency kept: CIDEr as a share of the control's own Stage-1 model's (≥ regime.task_share)
      and the share of broken test captions (≤ regime.max_broken);

    plus CHAIR_s and the control's TV to its reference (the fallback's measure)."""
    from .metrics import caption_quality
    data = RunData(spec)
    rows = spec["rows"]
    sft = rows[0]["keys"]
    scale = float(spec["scale"])
    quality = {}

    def q(keys, name, factor=1.0):  # mean ± interval over seeds of one caption_quality value
        for k in keys:
            if k not in quality:
                doc = data.doc(k, "captions")
                quality[k] = caption_quality(doc) if doc else {}
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


def calibrate_table(spec: dict) -> dict:
    from tabulate import tabulate
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
    md = f"### {spec['title']}\n\n{rule}\n\n" + md_table(body, headers) + "\n"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["control", "lr", "beta", "top1_gain", "top1_gain_lo", "top1_gain_hi", "dlogp_positive", "signature",
                "task", "broken", "kept", "tv", "cider", "chair_s", "meets", "chosen", "chosen_by"])
    for r in rows:
        w.writerow([r["name"], repr(r["lr"]), repr(r["beta"]), _r(r["gain"]["diff"]), _r(r["gain"]["lo"]),
                    _r(r["gain"]["hi"]),
                    _r(r["dlogp"]["mean"]), r["signature"], _r(r["task"]), _r(r["broken"]), r["kept"],
                    _r(r["tv"]["mean"]), _r(r["cider"]["mean"]), _r(r["chair_s"]["mean"]), r["meets"],
                    choice is r, how if choice is r else ""])
    tex = tabulate(body, headers=headers, tablefmt="latex_booktabs", disable_numparse=True) + "\n"
    return {"md": md, "csv": buf.getvalue(), "tex": tex}


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
    from .data import write_json
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
        from .data import DataError
        raise DataError(f"calibration table {spec['name']!r}: no swept rows to choose a learning rate from")
    write_json(out, doc)
    return doc


# ---------------------------------------------------------------------------------------------------
# the open questions: claims decided in several arms side by side (kinds scale, modality, negsource)

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
    from .data import read_jsonl
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


def arms_table(spec: dict) -> dict:
    """A table across arms: its question above, the info rows and one row per claim (A − B [95% CI]; δ:
    verdict) with a column per arm, and below it the answer derived from the verdicts."""
    from tabulate import tabulate
    results = arms_results(spec)
    names = [r["name"] for r in results]
    info = _info_rows(spec, results)
    claim_rows = [[f"{c['claim']}: {c['a']} − {c['b']}"] + [_claim_cell(r["claims"][i], digits_of(c["column"]))
                                                            for r in results]
                  for i, c in enumerate(spec["claims"])]
    headers = [""] + names
    answer = arms_answer(spec, results)
    how = {"hierarchical": "a bootstrap over seeds and, within each seed, over the same test images for A and B "
                           "(2000 resamples)", "t": "a t-interval over seeds"}[spec["interval"]]
    methods = sorted({c["method"] for r in results for c in r["claims"]})
    md = f"### {spec['title']}\n\n**Question.** {spec['question']}\n\n"
    md += md_table(info + claim_rows, headers) + "\n\n"
    md += f"**Answer.** {answer}\n\n"
    md += ("A claim holds when the 95% interval of its effect (A − B, or B − A for a claim that A is lower) lies above "
           "0, does not hold when it lies below δ, its smallest effect of interest (config `claims.min_effect`, a "
           f"share of B's value), and is inconclusive otherwise. Interval: {how}. Intervals computed: "
           + "; ".join(methods) + ".\n")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["section", "row", "arm", "value", "lo", "hi", "delta", "verdict", "method"])
    for row in info:
        for name, cell in zip(names, row[1:]):
            w.writerow(["info", row[0], name, cell, "", "", "", "", ""])
    for i, c in enumerate(spec["claims"]):
        for r in results:
            x = r["claims"][i]
            w.writerow(["claim", c["id"], r["name"], _r(x["diff"]), _r(x["lo"]), _r(x["hi"]), _r(x["delta"]),
                        x["verdict"], x["method"]])
    w.writerow(["answer", "", "", answer, "", "", "", "", ""])
    tex = (f"% Question: {spec['question']}\n"
           + tabulate(info + claim_rows, headers=headers, tablefmt="latex_booktabs", disable_numparse=True)
           + f"\n% Answer: {answer}\n")
    return {"md": md, "csv": buf.getvalue(), "tex": tex}


# ---------------------------------------------------------------------------------------------------
# table specs (built from the plan at workflow parse time; no torch)

def eval_set_columns(plan) -> dict:
    """Columns of the evaluation sets: '<set> <metric>' (and '<set> CIDEr (<domain>)' per domain), and
    '<mcq set> acc.' (circular when configured) / '<mcq set> acc. (plain)'."""
    from .shapes import DOMAINS
    cols = {}
    for name, m in plan.mcq_sets().items():
        cols[f"{name} acc."] = [f"mcq_{name}", ["accuracy"], True, 1, None]  # percent (× evaluate.scale)
        if m["circular"]:
            cols[f"{name} acc. (plain)"] = [f"mcq_{name}", ["accuracy_plain"], True, 1, None]
    for name, es in plan.eval_sets().items():
        for m in es["metrics"]:
            if m == "SPICE" and "SPICE" not in plan.c["evaluate"]["metrics"]:
                continue
            # corpus-level metrics (BLEU-4, METEOR) get no per-image bootstrap, as in the main columns
            cols[f"{name} {m}"] = [f"scores_{name}", ["corpus", m], True, 1,
                                   ["per_image", m] if m in MEAN_OF_IMAGES else None]
        if es["domains"]:
            for d in DOMAINS:
                cols[f"{name} CIDEr ({d})"] = [f"scores_{name}", ["domains", d, "corpus", "CIDEr"], True, 1,
                                               ["domains", d, "per_image", "CIDEr"]]
    return cols


def table_rows(plan, table: dict) -> list:
    """[{name, keys (one per seed), sft_keys | trivial}] of a table's rows."""
    rows = []
    for row in table.get("rows", []):
        entry = {"name": row["name"], "keys": plan.row_keys(row)}
        if row.get("trivial"):
            entry["trivial"] = True
        else:
            entry["sft_keys"] = [plan.sft_key(k) for k in entry["keys"]]
        rows.append(entry)
    return rows


def tables_read_by(plan, name: str) -> list:
    """The comparison tables a table reads (T-paper reads main and ablation)."""
    if plan.c["tables"][name].get("kind") == "paper":
        return [n for n in ("main", "ablation") if n in plan.c["tables"]]
    return [name]


def _carries_eval_sets(name: str, table: dict) -> bool:
    """T-main, T-ablation (and T-paper, which reads them) carry the evaluation sets' columns."""
    return name in ("main", "ablation") or table.get("kind") == "paper"


def calibration_inputs(plan, name: str) -> list:
    """What the calibration rule reads (`write_calibration_choice`): the measures (top-1 mass, TV) and captions
    (CIDEr-D, broken captions: `metrics.caption_quality`, no scoring job) of the sweep table's rows and of the
    controls' Stage-1 models, and the probes (Δlog p of the positives) of its runs."""
    files = []
    for row in table_spec(plan, name)["rows"]:
        for k in row["keys"] + row.get("init_keys", []):
            files += [plan.path("measures", key=k), plan.path("captions", key=k)]
            if plan.run_file(k):
                files.append(plan.run_file(k, "probes"))
    return sorted(set(files))


def run_files(plan, keys: list) -> dict:
    """{kind: {key: path}} of the training-run files (RUN_FILE_KINDS) of the keys that have them."""
    out = {"metrics": {}, "pairs_summary": {}}
    for k in keys:
        if k != TRIVIAL and plan.run_file(k):
            out["metrics"][k] = plan.run_file(k, "metrics")
        if k != TRIVIAL and plan.pairs_summary_of(k):
            out["pairs_summary"][k] = plan.pairs_summary_of(k)
    return out


def _run_file_inputs(plan, keys: list) -> list:
    return [p for paths in run_files(plan, keys).values() for p in paths.values()]


def table_inputs(plan, name: str) -> list:
    """Every file the table reads (its rule's inputs)."""
    if plan.c["tables"][name]["kind"] in ARMS_KINDS:
        return arms_inputs(plan, name)
    files = []
    for tname in tables_read_by(plan, name):
        table = plan.c["tables"][tname]
        columns = table.get("columns") or []
        kinds = ["scores", "measures"]
        if _carries_eval_sets(tname, table):
            kinds += [f"scores_{n}" for n in plan.eval_sets()] + [f"mcq_{n}" for n in plan.mcq_sets()]
        for row in table_rows(plan, table):
            if row.get("trivial"):
                files.append(plan.path("scores", key=TRIVIAL))
                continue
            keys = list(row["keys"])
            if "win-rate vs SFT" in columns:
                keys += [k for k in row["sft_keys"] if k]
            for k in keys:
                files += [plan.eval_file(kind).format(key=k) for kind in kinds]
                if ("conv. step" in columns or table.get("kind") == "calibrate") and plan.run_file(k):
                    files.append(plan.run_file(k, "probes"))
            if any(COLUMNS.get(c, ("",))[0] in RUN_FILE_KINDS for c in columns) or \
                    plan.c["tables"][name].get("kind") == "paper":  # (T-regime: set sizes and passes)
                files += _run_file_inputs(plan, keys)
    if plan.c["tables"][name].get("kind") == "calibrate":  # the rule's task side: the controls' Stage-1 models
        files += calibration_inputs(plan, name)
    if plan.c["tables"][name].get("kind") == "paper":  # T-regime: the control's probes, the stability seeds
        control = next((r for r in table_rows(plan, plan.c["tables"].get("main", {}))
                        if r["name"] == plan.c["regime"]["control_row"]), {"keys": []})
        files += [plan.run_file(k, "probes") for k in control["keys"] if plan.run_file(k)]
        files += [plan.path("stability", seed=s) for s in plan.stability_seeds()]
    return sorted(set(files))


def table_spec(plan, name: str) -> dict:
    """The spec of `cwdpo table` for table `name` of the config."""
    t = plan.c["tables"][name]  # (the calibration rule's outcome also reads a sweep table that is not written)
    if t["kind"] in ARMS_KINDS:
        return arms_spec(plan, name, t)
    extra = eval_set_columns(plan)
    kinds = ["scores", "measures", "captions"] + [spec[0] for spec in extra.values()]
    spec = {"name": name, "kind": t["kind"], "title": t.get("title") or name,
            "scale": plan.c["evaluate"]["scale"], "experiment": plan.c["experiment"], "extra_columns": extra,
            "files": {kind: plan.eval_file(kind) for kind in dict.fromkeys(kinds)}}
    if spec["kind"] == "calibrate":
        spec["rows"] = table_rows(plan, t)
        for row, cfg_row in zip(spec["rows"][1:], t["rows"][1:]):
            recipe = stage2_recipe(plan.c, cfg_row["stage2"])
            row["lr"], row["beta"] = recipe["lr"], recipe["beta"]
            row["init_keys"] = plan.row_keys({k: v for k, v in cfg_row.items() if k in ("stage1", "seeds")})
        r = plan.c["regime"]
        spec["interval"], spec["top1_gain"] = plan.c["claims"]["interval"], r["top1_gain"]
        spec["control_tv"], spec["task_share"], spec["max_broken"] = r["control_tv"], r["task_share"], r["max_broken"]
        keys = [k for r in spec["rows"] for k in r["keys"] + r.get("init_keys", [])]
    elif spec["kind"] == "paper":
        spec["rows_by_name"] = {n: {r["name"]: r["keys"] for r in table_rows(plan, plan.c["tables"][n])
                                    if not r.get("trivial")} for n in tables_read_by(plan, name)}
        keys = [k for rows in spec["rows_by_name"].values() for ks in rows.values() for k in ks]
        spec["scale_note"] = (f"model {plan.c['model']['source']}, data {plan.c['data']['source']}, "
                              f"{len(plan.c['seeds'])} seed(s)")
        # (T-paper's own claims only: its spec, and so its job, do not change with the open questions' δs)
        spec["claims"] = {**plan.c["claims"], "min_effect": {k: v for k, v in plan.c["claims"]["min_effect"].items()
                                                            if k in PAPER_CLAIM_IDS}}
        spec["regime"] = plan.c["regime"]
        spec["stability"] = [plan.path("stability", seed=s) for s in plan.stability_seeds()]
    else:
        spec["rows"] = table_rows(plan, t)
        spec["columns"] = [c for c in t["columns"] if c not in ("SPICE", "top-5 SPICE")
                           or "SPICE" in plan.c["evaluate"]["metrics"]]
        if _carries_eval_sets(name, t):
            spec["columns"] += list(extra)
        keys = [k for r in spec["rows"] for k in r["keys"] + [x for x in r.get("sft_keys", []) if x]]
    spec["probes"] = {k: plan.run_file(k, "probes") for k in keys if plan.run_file(k)}
    spec["run_files"] = run_files(plan, keys)
    return spec
