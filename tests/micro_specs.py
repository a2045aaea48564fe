"""Job specs for the tests, built the way the workflow builds them: the micro config through
`cwdpo.plan.Plan` (so every default comes from the schema), with paths replaced by the test's own files."""
import dataclasses
import functools
import os

from cwdpo.config import load_config
from cwdpo.plan import Plan
from cwdpo.specs import DataSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO_CONFIG = os.path.join(REPO, "tests", "configs", "micro.yaml")


@functools.cache
def micro_plan() -> Plan:
    return Plan(load_config(MICRO_CONFIG, check_paths=False))


def config() -> dict:
    return micro_plan().c


PROMPT = "Describe the image."


def tiny_model_spec() -> dict:
    """The `build_tiny` sizes of the configured tiny model (with its image bounds)."""
    m = config()["model"]
    return {**m["tiny"], "min_pixels": m["min_pixels"], "max_pixels": m["max_pixels"]}


def vlm(**changes):
    return dataclasses.replace(micro_plan().vlm(), **changes)


def negatives(**changes):
    """The configured dataset-negative settings, without held-out combinations or an external file."""
    return dataclasses.replace(micro_plan().negatives_spec(external=False), **{"heldout": [], **changes})


def data(json_path: str, splits, stage: str | None = None, **changes) -> DataSpec:
    spec = DataSpec(json=json_path, image_root=None, splits=list(splits), on_bad_input="error", validated=None,
                    stage=stage, stage1_fraction=0.75 if stage else None)
    return dataclasses.replace(spec, **changes)


# the configured recipe each method's spec starts from
RECIPES = {"sft": ("stage1", "sft"), "sft_c": ("stage1", "sft_c"), "dpo": ("stage2", "dpo"),
           "focal_dpo": ("stage2", "focal_dpo"), "cw_dpo": ("stage2", "cw_dpo")}


def train(method: str, init: str, data_json: str, *, hparams: dict | None = None, train: dict | None = None,
          splits=("finetune",), stage: str | None = "stage1", **changes):
    """A `TrainSpec` of `method` (its configured recipe) on the test's model and data, without probes;
    `hparams` / `train` override single settings. Captions only (`qa_share` 0): the tests' shapes data has
    no question–answer turns (tests/test_instruction_data.py trains on them)."""
    plan = micro_plan()
    which, recipe = RECIPES[method]
    spec = plan.stage1_spec(recipe, 0) if which == "stage1" else plan.stage2_spec("sft_c", 0, recipe)
    settings = {**spec.train, "progress": False, **(train or {})}
    fields = dict(init=init, data=data(data_json, splits, stage), hparams={**spec.hparams, **(hparams or {})},
                  train=settings, probes=None, pairs=None, ref_logps=None, pairs_summary=None, qa_share=0.0)
    if method == "sft_c":
        fields.update(negatives=negatives(), data_seed=0)
    fields.update(changes)
    return dataclasses.replace(spec, **fields)
