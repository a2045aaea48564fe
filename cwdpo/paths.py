"""Where every artifact of an experiment lives: one path template per artifact, and the model keys.

The rules take a template with its wildcards left in (`Layout.pattern("pairs")` →
`results/tiny/negatives/{stage1}/s{seed}/pairs_{negset}.jsonl`); the plan fills the same template for the
specs and input functions (`Layout.path("pairs", stage1="sft_c", seed=0, negset="mix")`). Each path is
spelled here and nowhere else. No torch import.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# the model keys of trained models (ModelKey); a training run's folder is {out}/<its key>
KEY_TEMPLATES = {"stage1": "stage1/{stage1}/s{seed}", "stage2": "stage2/{stage1}/s{seed}/{stage2}"}
RUN_STAGE1 = "{out}/" + KEY_TEMPLATES["stage1"]
RUN_STAGE2 = "{out}/" + KEY_TEMPLATES["stage2"]
NEGATIVES = "{out}/negatives/{stage1}/s{seed}"
EVAL = "{out}/eval/{key}"

TEMPLATES = {
    # data
    "shapes_json": "{out}/data/dataset_shapes.json",
    "data_summary": "{out}/data/summary.json",
    "validated": "{out}/data/validated.json",
    "objects": "{out}/data/objects_{source}.json",  # COCO categories per image of a data source (CHAIR)
    # the base model (tiny: built, then pretrained)
    "base_init": "{out}/base/init",
    "pretrain_dir": "{out}/base/pretrain",
    "stability": "{out}/base/stability/s{seed}/grounding.json",  # another pretraining seed, measured
    # training runs: a folder each, holding model/, metrics.json, train_log.csv, probes.csv
    "stage1_dir": RUN_STAGE1,
    "stage2_dir": RUN_STAGE2,
    # Stage-2 inputs of the runs that start from one model (a Stage-1 run, or base) with one seed
    "onpolicy": NEGATIVES + "/onpolicy.jsonl",
    "onpolicy_summary": NEGATIVES + "/onpolicy_summary.json",
    "beams": NEGATIVES + "/beams.jsonl",  # the model's own beams, grounded: the wrong ones are negatives
    "beams_summary": NEGATIVES + "/beams_summary.json",
    "pairs": NEGATIVES + "/pairs_{negset}.jsonl",
    "pairs_summary": NEGATIVES + "/pairs_{negset}_summary.json",
    "ref_logps": NEGATIVES + "/ref_{negset}.json",
    "probe_set": NEGATIVES + "/probe.jsonl",
    # evaluation of one model key
    "captions": EVAL + "/captions.json",
    "measures": EVAL + "/measures.json",
    "scores": EVAL + "/scores.json",
    "set_captions": EVAL + "/captions_{evalset}.json",
    "set_scores": EVAL + "/scores_{evalset}.json",
    "mcq": EVAL + "/mcq_{mcqset}.json",
    "pope": EVAL + "/pope_{popeset}.json",
    "heldout_pairs": "{out}/eval/heldout_pairs.jsonl",
    "heldout_summary": "{out}/eval/heldout_pairs_summary.json",
    # the calibration rule's outcome of a sweep table (the lr of recipes with `lr: calibrated`)
    "calibration_choice": "{out}/calibration/{table}.json",
    # tables and figures
    "table": "{out}/tables/{table}",
    "figure": "{out}/figures/{figure}",
}
# each job kind's log file {out}/logs/<name>.log and benchmark file {out}/benchmarks/<name>.tsv (a rule's `log:`
# and `benchmark:`, wildcards left in)
LOGS, BENCHMARKS = "logs", "benchmarks"
JOB_FILES = {
    "fetch_model": "fetch_model",
    "prepare_data": "prepare_data",
    "validate_data": "validate_data",
    "build_model": "build_model",
    "pretrain": "pretrain",
    "stability": "stability_s{seed}",
    "stage1": "stage1/{stage1}_s{seed}",
    "stage2": "stage2/{stage1}_s{seed}_{stage2}",
    "onpolicy": "negatives/{stage1}_s{seed}_onpolicy",
    "beams": "negatives/{stage1}_s{seed}_beams",
    "pairs": "negatives/{stage1}_s{seed}_pairs_{negset}",
    "ref_logps": "negatives/{stage1}_s{seed}_ref_{negset}",
    "probe_set": "negatives/{stage1}_s{seed}_probe",
    "heldout_pairs": "eval/heldout_pairs",
    "evaluate": "eval/{key}/evaluate",
    "trivial": "eval/trivial",
    "coco_objects": "coco_objects_{source}",
    "score": "score",
    "calibration": "calibration_{table}",
    "table": "tables/{table}",
    "figure": "figures/{figure}",
}
# the files of a training run's folder
RUN_FILES = {"model": "model", "metrics": "metrics.json", "train_log": "train_log.csv", "probes": "probes.csv"}
TRIVIAL = "trivial"  # the eval key of the trivial baseline (most frequent caption; not a model)


class Layout:
    """The artifact paths of one experiment (`out` = results/<experiment>, or results/<experiment>/variants/<name>
    for a variant of it: config `variants`)."""

    def __init__(self, out: str):
        if "{" in out or "}" in out:
            raise ValueError(f"output folder {out!r} must not contain braces")
        self.out = out

    def pattern(self, name: str, file: str | None = None) -> str:
        """The template of `name` with its wildcards left in (for a rule's input/output); `file` names a
        file of a run folder (RUN_FILES)."""
        text = TEMPLATES[name].replace("{out}", self.out)
        return f"{text}/{RUN_FILES[file]}" if file else text

    def path(self, name: str, file: str | None = None, **wildcards) -> str:
        """The path of `name` with every wildcard filled."""
        return self.pattern(name, file).format(**wildcards)

    def log_file(self, job: str) -> str:
        """The log file of job kind `job` (JOB_FILES), wildcards left in."""
        return f"{self.out}/{LOGS}/{JOB_FILES[job]}.log"

    def benchmark_file(self, job: str) -> str:
        """The benchmark file of job kind `job` (JOB_FILES), wildcards left in."""
        return f"{self.out}/{BENCHMARKS}/{JOB_FILES[job]}.tsv"


@dataclass(frozen=True)
class ModelKey:
    """A model a table row can evaluate: "base", "stage1/{stage1}/s{seed}" (a Stage-1 recipe from the
    base model) or "stage2/{stage1}/s{seed}/{stage2}" (a Stage-2 recipe from that Stage-1 model;
    stage1 = "base": Stage 2 straight from the base model)."""

    stage1: str
    seed: int | None = None
    stage2: str | None = None

    PATTERN = "|".join(["base"] + [re.escape(t).replace(r"\{seed\}", r"\d+").replace(r"\{stage1\}", "[^/]+")
                                   .replace(r"\{stage2\}", "[^/]+") for t in KEY_TEMPLATES.values()])

    @classmethod
    def parse(cls, text: str) -> "ModelKey":
        if not re.fullmatch(cls.PATTERN, text):
            raise ValueError(f"unknown model key {text!r} (base, stage1/<recipe>/s<seed> or "
                             "stage2/<stage1>/s<seed>/<recipe>)")
        parts = text.split("/")
        if parts[0] == "base":
            return cls("base")
        return cls(parts[1], int(parts[2][1:]), parts[3] if parts[0] == "stage2" else None)

    @property
    def kind(self) -> str:
        if self.stage2 is not None:
            return "stage2"
        return "base" if self.seed is None else "stage1"

    @classmethod
    def of_wildcards(cls, wildcards) -> "ModelKey":
        """The key of a training rule's job from its wildcards (stage1, seed and, for Stage 2, stage2)."""
        return cls(wildcards.stage1, int(wildcards.seed), getattr(wildcards, "stage2", None))

    def __str__(self) -> str:
        if self.kind == "base":
            return "base"
        return KEY_TEMPLATES[self.kind].format(stage1=self.stage1, seed=self.seed, stage2=self.stage2)
