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


def metric_columns(spec: dict) -> list:
    """Columns of a table: caption metrics from scores.json (× scale) then measures from measures.json."""
    scale = float(spec.get("scale", 100))
    cols = [{"name": m, "file": "scores.json", "path": ["corpus", m], "scale": scale, "digits": 1}
            for m in spec["metrics"]]
    return cols + list(spec.get("measure_columns", []))


def _lookup(doc: dict, path: list):
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


def collect_rows(spec: dict) -> tuple[list, dict]:
    """[(row name, {column: (mean, std, n)})], {column: n/a reason} from the files of each row's runs."""
    cols = metric_columns(spec)
    rows, reasons = [], {}
    for row in spec["rows"]:
        cells: dict = {}
        for col in cols:
            values = []
            if row.get("trivial"):
                if col["file"] != "scores.json":
                    reasons[col["name"]] = "not measured for the trivial baseline (it is not a model)"
                    cells[col["name"]] = (None, None, 0)
                    continue
                paths = [spec["trivial_scores"]]
            else:
                paths = [os.path.join(spec["eval_root"], k, col["file"]) for k in row["keys"]]
            for path in paths:
                doc = read_json(path)
                v = _lookup(doc, col["path"])
                values.append(None if v is None else v * col.get("scale", 1.0))
                if v is None and col["file"] == "scores.json" and col["name"] in doc.get("na_reasons", {}):
                    reasons[col["name"]] = doc["na_reasons"][col["name"]]
            cells[col["name"]] = mean_std(values)
        rows.append((row["name"], cells))
    return rows, reasons


def render(rows: list, cols: list, reasons: dict, title: str) -> dict:
    """{"md", "csv", "tex"} texts of a rows × columns table (cells mean ± std over seeds)."""
    from tabulate import tabulate
    names = [c["name"] for c in cols]
    headers = ["method"] + [c.get("label", c["name"]) for c in cols]
    body = [[name] + [fmt_cell(*cells[c["name"]][:2], digits=c.get("digits", 1)) for c in cols]
            for name, cells in rows]
    notes = [f"- {m}: n/a — {r}" for m, r in sorted(reasons.items())]
    md = f"### {title}\n\n" + tabulate(body, headers=headers, tablefmt="github", disable_numparse=True) + "\n"
    if notes:
        md += "\n" + "\n".join(notes) + "\n"
    tex = tabulate(body, headers=headers, tablefmt="latex_booktabs", disable_numparse=True) + "\n"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method"] + [h for n in names for h in (n, f"{n}_std", f"{n}_n")])
    for name, cells in rows:
        vals = []
        for n in names:
            mean, std, count = cells[n]
            vals += ["n/a" if mean is None else repr(mean), "" if std is None else repr(std), count]
        w.writerow([name] + vals)
    return {"md": md, "csv": buf.getvalue(), "tex": tex}


def write_table(spec: dict, out_stem: str):
    rows, reasons = collect_rows(spec)
    texts = render(rows, metric_columns(spec), reasons, spec.get("title", spec["name"]))
    for ext, text in texts.items():
        write_text(f"{out_stem}.{ext}", text)
