"""What the table kinds share: the evaluation files a table reads (`RunData`), the cell statistics and their
formatting, the claims' difference interval and verdict, and the
pieces of a table spec built from the plan (rows, evaluation-set columns, run files, row inputs).

A table spec lists rows, each with the model keys of its seeds, and the columns to show. Each cell is mean ±
std over seeds with a 95% interval: a t-interval over seeds (≥ 2 seeds), else a bootstrap over test images of
the one run. A value that cannot be computed prints `n/a` and its reason goes under the table — never a
placeholder number, never a paper value.
No torch import.
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np

from ..data import read_json
from ..metrics import MEAN_OF_IMAGES, METRIC_NAMES
from ..paths import TRIVIAL
from ..stats import convergence_step, difference_ci, ece_difference_ci, paired_bootstrap_ci, seed_ci, verdict


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
    "caption words": ("scores", ["words", "mean"], False, 1, ["words", "per_image"]),  # beside CHAIR
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
    from ..data import DataError
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

    def stability(self, path: str) -> dict:
        """What another pretraining seed's base model measured (its stability file: grounding under "corpus",
        MCQ accuracy under "mcq"); {} when the file is missing."""
        return read_json(path) if os.path.isfile(path) else {}

    def convergence(self, key: str):
        probes = self.spec["probes"].get(key)
        if not probes or not os.path.isfile(probes):
            return None, "no probes.csv with validation CIDEr-D for this run"
        with open(probes) as f:
            rows = [r for r in csv.DictReader(f) if r.get("val_cider") not in (None, "", "nan")]
        if not rows:
            # a probe takes it every val_interval steps and at the last step: none with no interval or no image
            return None, "probes.csv has no validation CIDEr-D (probes.val_interval or val_images is 0)"
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


def digits_of(col: str) -> int:
    if col in COLUMNS:
        return COLUMNS[col][3]
    if " " in col and any(m in col for m in METRIC_NAMES):  # an evaluation-set column
        return 1
    return 0 if col == "conv. step" else (3 if col == "win-rate vs SFT" else 1)


def _r(x) -> str:
    return "" if x is None else repr(float(x))


# ---------------------------------------------------------------------------------------------------
# the claims: the difference of two rows and its verdict (T-paper and the tables across arms)

def load_paper() -> dict:
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "resources", "paper.json")) as f:
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
# a claim's quantity read on the experiment's first set of a kind: (the key of its column in T-paper's spec, why
# the claim is n/a without one)
SET_QUANTITIES = {"MCQ acc.": ("mcq_column", "no MCQ set configured (config mcq_sets)"),
                  "POPE F1": ("pope_column", "no POPE set configured (config pope_sets)")}


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
    """(verdict, δ) of a claim whose difference interval is `d`: δ = `delta_share` × |mean of B| (a
    non-inferiority claim, '>=' / '<=', whose margin cannot be computed is inconclusive)."""
    delta = None if delta_share is None or b_mean is None else float(delta_share) * abs(b_mean)
    if direction in (">=", "<=") and not delta:
        return "inconclusive", None
    return verdict(d["lo"], d["hi"], direction, delta), delta


def _fmt_diff(d: dict, digits: int) -> str:
    if d["diff"] is None:
        return "n/a"
    if d["lo"] is None:
        return f"{d['diff']:+.{digits}f}"
    return f"{d['diff']:+.{digits}f} [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]"


# ---------------------------------------------------------------------------------------------------
# table specs (built from the plan at workflow parse time; no torch)

def eval_set_columns(plan) -> dict:
    """Columns of the evaluation sets: '<set> <metric>' (and '<set> CIDEr (<domain>)' per domain),
    '<mcq set> acc.' (circular when configured) / '<mcq set> acc. (plain)', and per POPE set '<set> F1' (the mean
    over its settings) with '<set> F1 (<setting>)' and '<set> yes-ratio (<setting>)'."""
    from ..shapes import DOMAINS
    cols = {}
    for name, m in plan.mcq_sets().items():
        cols[f"{name} acc."] = [f"mcq_{name}", ["accuracy"], True, 1, None]  # percent (× evaluate.scale)
        if m["circular"]:
            cols[f"{name} acc. (plain)"] = [f"mcq_{name}", ["accuracy_plain"], True, 1, None]
    for name, p in plan.pope_sets().items():
        cols[f"{name} F1"] = [f"pope_{name}", ["mean", "f1"], True, 1, None]
        for s in p["settings"]:
            cols[f"{name} F1 ({s})"] = [f"pope_{name}", ["settings", s, "f1"], True, 1, None]
            cols[f"{name} yes-ratio ({s})"] = [f"pope_{name}", ["settings", s, "yes_ratio"], True, 1, None]
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


def base_spec(plan, name: str, t: dict) -> dict:
    """The start of the spec of a table that reads evaluation files by model key (kinds comparison, paper,
    calibrate): its name, kind, title, caption scale, the evaluation sets' columns and the file templates. The
    kind adds its rows; `finish_spec` then adds the probes and training-run files of the keys they read."""
    extra = eval_set_columns(plan)
    kinds = ["scores", "measures", "captions"] + [spec[0] for spec in extra.values()]  # (pope_<set> included)
    return {"name": name, "kind": t["kind"], "title": t.get("title") or name,
            "scale": plan.c["evaluate"]["scale"], "experiment": plan.c["experiment"], "extra_columns": extra,
            "files": {kind: plan.eval_file(kind) for kind in dict.fromkeys(kinds)}}


def finish_spec(plan, spec: dict, keys: list) -> dict:
    """`spec` with the probes.csv and the training-run files (`run_files`) of the model keys it reads."""
    spec["probes"] = {k: plan.run_file(k, "probes") for k in keys if plan.run_file(k)}
    spec["run_files"] = run_files(plan, keys)
    return spec


def row_inputs(plan, name: str, with_run_files: bool = False) -> list:
    """The files the rows of the tables that table `name` reads (`tables_read_by`) need: their evaluation
    files (and those of their SFT runs for a win-rate column), their probes (a convergence column, a sweep
    table) and, for a column of a training run's files or `with_run_files`, their training-run files."""
    files = []
    for tname in tables_read_by(plan, name):
        table = plan.c["tables"][tname]
        columns = table.get("columns") or []
        kinds = ["scores", "measures"]
        if _carries_eval_sets(tname, table):
            kinds += [f"scores_{n}" for n in plan.eval_sets()] + [f"mcq_{n}" for n in plan.mcq_sets()] + \
                [f"pope_{n}" for n in plan.pope_sets()]
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
            if any(COLUMNS.get(c, ("",))[0] in RUN_FILE_KINDS for c in columns) or with_run_files:
                files += _run_file_inputs(plan, keys)
    return files
