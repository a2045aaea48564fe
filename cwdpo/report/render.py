"""The one renderer of every table kind: a `Document` (what a kind's `document(spec)` returns) as Markdown, CSV
and LaTeX.

- Markdown: the document's blocks (headings and paragraphs as text, `Table`s as GitHub tables whose every cell
  is `md_cell`-escaped), separated by a blank line;
- LaTeX: the document's tables (booktabs, by tabulate), with its `tex_before` / `tex_after` comment lines;
- CSV: the document's own long format (`csv_header`, `csv_rows`: numbers in separate columns, not the
  formatted cells).

No torch import.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

from ..data import write_text


@dataclass
class Table:
    """A table as shown: its header and rows of formatted cells; `tex_rows` / `tex_headers` when the LaTeX
    table shows them differently (e.g. without the intervals)."""
    headers: list
    rows: list
    tex_rows: list | None = None
    tex_headers: list | None = None


@dataclass
class Document:
    """A table kind's output: Markdown blocks (str or `Table`), its CSV, and LaTeX comment lines around the
    tables."""
    blocks: list
    csv_header: list
    csv_rows: list
    tex_before: list = field(default_factory=list)
    tex_after: list = field(default_factory=list)


def md_cell(text) -> str:
    """A cell of a Markdown table: a `|` escaped (it would start a new cell); the config refuses line
    breaks in the names it prints (cwdpo.config.markdown_names)."""
    return str(text).replace("|", "\\|")


def md_table(rows: list, headers: list) -> str:
    """A GitHub-Markdown table whose every cell and header is `md_cell`-escaped."""
    from tabulate import tabulate
    return tabulate([[md_cell(c) for c in row] for row in rows], headers=[md_cell(h) for h in headers],
                    tablefmt="github", disable_numparse=True)


def tex_table(table: Table) -> str:
    from tabulate import tabulate
    rows = table.rows if table.tex_rows is None else table.tex_rows
    headers = table.headers if table.tex_headers is None else table.tex_headers
    return tabulate(rows, headers=headers, tablefmt="latex_booktabs", disable_numparse=True)


def render(doc: Document) -> dict:
    """{"md", "csv", "tex"}: the texts of a document."""
    tables = [b for b in doc.blocks if isinstance(b, Table)]
    md = "\n\n".join(md_table(b.rows, b.headers) if isinstance(b, Table) else b for b in doc.blocks) + "\n"
    tex = "\n".join(doc.tex_before + [tex_table(t) for t in tables] + doc.tex_after) + "\n"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(doc.csv_header)
    w.writerows(doc.csv_rows)
    return {"md": md, "csv": buf.getvalue(), "tex": tex}


def write_document(doc: Document, out_stem: str):
    """A document's texts as <out_stem>.md, .csv and .tex."""
    for ext, text in render(doc).items():
        write_text(f"{out_stem}.{ext}", text)
