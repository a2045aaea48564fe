"""Comparison tables (kind comparison: T-main, T-ablation, ...), as Markdown, CSV and LaTeX (tabulate).

A table spec (built by `spec` from the plan) lists rows, each with the model keys of its seeds, and the
columns to show. Each cell is mean ± std over seeds with a 95% interval: a t-interval over seeds (≥ 2 seeds),
else a bootstrap over test images of the one run. A value that cannot be computed prints `n/a` and its reason
goes under the table — never a placeholder number, never a paper value.
No torch import.
"""
from __future__ import annotations

from ..paths import TRIVIAL
from ..stats import difference_ci, win_rate
from .common import (NOT_A_MODEL, RunData, _carries_eval_sets, _r, base_spec, cell_stats, digits_of, finish_spec, fmt,
                     row_inputs, table_rows)
from .render import Document, Table


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


def spec(plan, name: str, t: dict) -> dict:
    """The spec of comparison table `name`: its rows and columns (SPICE only when scored; T-main and
    T-ablation add the evaluation sets' columns)."""
    spec = base_spec(plan, name, t)
    spec["rows"] = table_rows(plan, t)
    spec["columns"] = [c for c in t["columns"] if c not in ("SPICE", "top-5 SPICE")
                       or "SPICE" in plan.c["evaluate"]["metrics"]]
    if _carries_eval_sets(name, t):
        spec["columns"] += list(spec["extra_columns"])
    keys = [k for r in spec["rows"] for k in r["keys"] + [x for x in r.get("sft_keys", []) if x]]
    return finish_spec(plan, spec, keys)


def inputs(plan, name: str) -> list:
    """Every file a comparison table reads."""
    return sorted(set(row_inputs(plan, name)))


def comparison_document(cols: list, rows: list, reasons: dict, title: str) -> Document:
    """Cells "mean ± std [95% CI]" (LaTeX: without the interval), the n/a reasons under the table; the CSV holds
    each cell's numbers in separate columns."""
    headers = ["method"] + cols
    body = [[name] + [fmt(cells[c], digits_of(c)) for c in cols] for name, cells in rows]
    tex_body = [[name] + [fmt(cells[c], digits_of(c), with_ci=False) for c in cols] for name, cells in rows]
    blocks = [f"### {title}", Table(headers, body, tex_rows=tex_body),
              "Cells: mean ± std over seeds [95% CI: t over seeds; one seed: bootstrap over test images]."]
    notes = [f"- {c}: n/a — {'; '.join(r)}" for c, r in sorted(reasons.items()) if r]
    if notes:
        blocks.append("\n".join(notes))
    csv_rows = []
    for name, cells in rows:
        vals = []
        for c in cols:
            s = cells[c]
            vals += ["n/a" if s["mean"] is None else repr(s["mean"]), _r(s["std"]), s["n"], _r(s["lo"]), _r(s["hi"])]
        csv_rows.append([name] + vals)
    csv_header = ["method"] + [h for c in cols for h in (c, f"{c}_std", f"{c}_n", f"{c}_ci_lo", f"{c}_ci_hi")]
    return Document(blocks, csv_header, csv_rows)


def document(spec: dict) -> Document:
    return comparison_document(*compute_table(spec), spec["title"])
