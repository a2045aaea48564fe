"""Comparison tables (tabulate: Markdown, CSV, LaTeX) from per-run score files.

A table spec (built by `cwdpo.plan.Plan.table_spec`) lists rows, each with the model keys of its seeds;
cells are mean ± std over seeds (× `scale`, 100 by default as in the papers). A metric that could not be
computed prints `n/a` and its reason goes under the table — never a placeholder number.
No torch import.
"""
from __future__ import annotations

import csv
import io
import math
import os

from .data import read_json, write_text


def mean_std(values: list) -> tuple:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None, 0
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None, len(vals)
    var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1)
    return m, math.sqrt(var), len(vals)


def fmt_cell(mean, std, digits: int = 1) -> str:
    if mean is None:
        return "n/a"
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def collect_rows(spec: dict) -> tuple[list, dict]:
    """[(row name, {metric: (mean, std, n)})], {metric: n/a reason} from the score files of each row."""
    scale = float(spec.get("scale", 100))
    rows, reasons = [], {}
    for row in spec["rows"]:
        paths = [spec["trivial_scores"]] if row.get("trivial") else \
            [os.path.join(spec["eval_root"], k, "scores.json") for k in row["keys"]]
        per_metric: dict = {m: [] for m in spec["metrics"]}
        for path in paths:
            doc = read_json(path)
            for m in spec["metrics"]:
                v = doc["corpus"].get(m)
                per_metric[m].append(None if v is None else v * scale)
                if v is None and m in doc.get("na_reasons", {}):
                    reasons[m] = doc["na_reasons"][m]
        rows.append((row["name"], {m: mean_std(v) for m, v in per_metric.items()}))
    return rows, reasons


def render(rows: list, metrics: list, reasons: dict, title: str, extra_cols: list | None = None) -> dict:
    """{"md", "csv", "tex"} texts of a rows × metrics table."""
    from tabulate import tabulate
    extra_cols = extra_cols or []
    headers = ["method"] + list(metrics) + [c for c, _ in extra_cols]
    body = []
    for name, cells in rows:
        body.append([name] + [fmt_cell(*cells[m][:2]) for m in metrics] +
                    [fn(name) for _, fn in extra_cols])
    notes = [f"- {m}: n/a — {r}" for m, r in sorted(reasons.items())]
    md = f"### {title}\n\n" + tabulate(body, headers=headers, tablefmt="github", disable_numparse=True) + "\n"
    if notes:
        md += "\n" + "\n".join(notes) + "\n"
    tex = tabulate(body, headers=headers, tablefmt="latex_booktabs", disable_numparse=True) + "\n"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method"] + [h for m in metrics for h in (m, f"{m}_std", f"{m}_n")] + [c for c, _ in extra_cols])
    for name, cells in rows:
        vals = []
        for m in metrics:
            mean, std, n = cells[m]
            vals += ["n/a" if mean is None else repr(mean), "" if std is None else repr(std), n]
        w.writerow([name] + vals + [fn(name) for _, fn in extra_cols])
    return {"md": md, "csv": buf.getvalue(), "tex": tex}


def write_table(spec: dict, out_stem: str):
    rows, reasons = collect_rows(spec)
    texts = render(rows, spec["metrics"], reasons, spec.get("title", spec["name"]))
    for ext, text in texts.items():
        write_text(f"{out_stem}.{ext}", text)
