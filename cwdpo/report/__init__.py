"""The experiment's tables (tabulate: Markdown, CSV, LaTeX), one module per table kind (config
`tables.<name>.kind`):

- `comparison`: comparison tables — each cell mean ± std over seeds with a 95% interval, a value that cannot be
  computed `n/a` with its reason under the table (never a placeholder number, never a paper value);
- `paper`: T-paper — the paper's numbers (with their source) next to ours, each qualitative claim decided by the
  95% interval of the difference (`cwdpo.stats.difference_ci`), never by eye — and T-regime, the testbed's
  preconditions, above it;
- `calibrate`: the control arm's sweep and the calibration rule, whose outcome (`write_calibration_choice`) is
  the learning rate of the Stage-2 recipes with `lr: calibrated`;
- `arms`: the open questions (kinds scale, modality, negsource), claims decided in several arms side by side;
- `common`: what they share (the evaluation files a table reads, cell statistics and formatting, the claims'
  difference and verdict, the parts of a spec built from the plan).

Each kind module has `spec(plan, name, table)` (the spec of `cwdpo table`, built from the plan at workflow
parse time), `inputs(plan, name)` (every file the table reads: its rule's inputs) and `document(spec)` (its
headings, prose, rows and CSV records: a `render.Document`); `render` writes every kind's .md, .csv and .tex.
`KINDS` maps each kind to its module, so a new kind is one module and one line here.
No torch import.
"""
from __future__ import annotations

from . import arms, calibrate, comparison, paper
from .arms import (ARM_NOUN, QUESTIONS, _info_rows, _mean_w_c_by_source, arms_answer, arms_inputs, arms_results,
                   arms_spec, claim_pattern)
from .calibrate import (calibration_choice, calibration_inputs, calibration_outcome, calibration_rows,
                        write_calibration_choice)
from .common import (COLUMNS, GROUNDING_COLUMNS, NOT_A_MODEL, QUANTITY_COLUMN, RUN_FILE_KINDS, SPECIAL, RunData,
                     cell_stats, claim_difference, decide, digits_of, eval_set_columns, fmt, load_paper, non_finite,
                     read_evaluation_file, run_files, table_rows, tables_read_by)
from .comparison import comparison_document, compute_table
from .render import Document, Table, md_cell, md_table, render, write_document

__all__ = [
    "KINDS", "table_spec", "table_inputs", "table_document", "write_table",
    "ARM_NOUN", "QUESTIONS", "_info_rows", "_mean_w_c_by_source", "arms_answer", "arms_inputs", "arms_results",
    "arms_spec", "claim_pattern",
    "calibration_choice", "calibration_inputs", "calibration_outcome", "calibration_rows", "write_calibration_choice",
    "COLUMNS", "GROUNDING_COLUMNS", "NOT_A_MODEL", "QUANTITY_COLUMN", "RUN_FILE_KINDS", "SPECIAL", "RunData",
    "cell_stats", "claim_difference", "decide", "digits_of", "eval_set_columns", "fmt", "load_paper", "non_finite",
    "read_evaluation_file", "run_files", "table_rows", "tables_read_by",
    "comparison_document", "compute_table", "Document", "Table", "md_cell", "md_table", "render", "write_document",
]

# table kind (config `tables.<name>.kind`) -> its module: spec(plan, name, table), inputs(plan, name),
# document(spec)
KINDS = {"comparison": comparison, "paper": paper, "calibrate": calibrate,
         "scale": arms, "modality": arms, "negsource": arms}


def table_spec(plan, name: str) -> dict:
    """The spec of `cwdpo table` for table `name` of the config."""
    t = plan.c["tables"][name]  # (the calibration rule's outcome also reads a sweep table that is not written)
    return KINDS[t["kind"]].spec(plan, name, t)


def table_inputs(plan, name: str) -> list:
    """Every file the table reads (its rule's inputs)."""
    return KINDS[plan.c["tables"][name]["kind"]].inputs(plan, name)


def table_document(spec: dict) -> Document:
    """The document of a table spec, by its kind."""
    return KINDS[spec["kind"]].document(spec)


def write_table(spec: dict, out_stem: str):
    """`cwdpo table`: the .md, .csv and .tex of a table spec."""
    write_document(table_document(spec), out_stem)
