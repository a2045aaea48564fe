"""The job specs: what a Snakemake rule hands to one `cwdpo` command, as dataclasses.

`cwdpo.plan.Plan` builds them from the validated config (whose schema holds every default) and
serialises each once (`to_json`); the command rebuilds it with `from_json`, which requires every field
and refuses unknown ones. So no command re-applies a default: a key is either in the spec or the job
stops. A spec's JSON is a `params` value of its rule, so Snakemake reruns a job when its spec changes.

A field declared with `optional(value)` (a setting added after the spec's first release, e.g. the text
input mode) is left out of the JSON while it holds `value`, and `from_json` takes `value` when the key is
absent: the jobs of a config that does not use the setting keep their spec text, so adding the setting
reruns nothing. The plan still sets every such field explicitly from the validated config.
No torch import.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass


OMIT_DEFAULT = "omit_default"


def optional(default):
    """A spec field left out of the JSON while it holds `default` (immutable: None, a number, a string)."""
    return dataclasses.field(default=default, metadata={OMIT_DEFAULT: True})


def _omit_defaults(spec, d: dict) -> dict:
    """`d` (asdict of `spec`) without the `optional` fields that hold their default, recursively."""
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if f.metadata.get(OMIT_DEFAULT) and value == f.default:
            d.pop(f.name, None)
        elif dataclasses.is_dataclass(value):
            _omit_defaults(value, d[f.name])
        elif isinstance(value, (list, tuple)):
            for item, sub in zip(value, d[f.name]):
                if dataclasses.is_dataclass(item):
                    _omit_defaults(item, sub)
    return d


def to_dict(spec) -> dict:
    return _omit_defaults(spec, dataclasses.asdict(spec))


def to_json(spec) -> str:
    """Canonical JSON (sorted keys, no spaces): the same spec always gives the same text."""
    return json.dumps(to_dict(spec) if dataclasses.is_dataclass(spec) else spec, sort_keys=True,
                      separators=(",", ":"))


def _build(tp, value, where: str):
    """`value` (parsed JSON) as type `tp`: dataclasses field by field, lists/tuples item by item."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], value, where) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object for {tp.__name__}, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp) if f.init]
        unknown = sorted(set(value) - set(names))
        missing = [n for n in names if n not in value and _required(tp, n)]
        if unknown or missing:
            raise ValueError(f"{where}: {tp.__name__} spec " + "; ".join(
                ([f"unknown key(s) {', '.join(unknown)}"] if unknown else []) +
                ([f"missing key(s) {', '.join(missing)}"] if missing else [])))
        return tp(**{n: _build(hints[n], value[n], f"{where}.{n}") for n in names if n in value})
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        args = typing.get_args(tp)
        item = args[0] if args else typing.Any
        items = [_build(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    return value


def _required(cls, name: str) -> bool:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def from_dict(cls, obj: dict):
    return _build(cls, obj, cls.__name__)


def from_json(cls, text: str):
    """`cls` from its JSON text, or from a file when the text is `@path`."""
    if text.startswith("@"):
        with open(text[1:]) as f:
            text = f.read()
    return from_dict(cls, json.loads(text))


# ---------------------------------------------------------------------------------------------------
# parts shared by several specs

@dataclass(frozen=True)
class Vlm:
    """How every job loads and prompts the VLM: `base` is the hub id / folder that adapter folders sit on
    (None for the self-contained tiny folders); images are resized into [min_pixels, max_pixels].
    `input` "text" (config model.input): the user turn holds the image's attribute record written as text
    (`cwdpo.shapes.scene_text`, read from the caption file `scenes`) instead of the image."""
    base: str | None
    prompt: str
    min_pixels: int
    max_pixels: int
    dtype: str
    max_response_tokens: int
    trust_remote_code: bool
    input: str = optional("image")
    scenes: str | None = optional(None)


@dataclass(frozen=True)
class DataSpec:
    """The images of some Karpathy-format splits; `validated` is the validate_data report (None: the
    files are checked while loading); `stage` ("stage1" / "stage2") takes that share of the images."""
    json: str
    image_root: str | None
    splits: list
    on_bad_input: str
    validated: str | None
    stage: str | None
    stage1_fraction: float | None


@dataclass(frozen=True)
class NegativesSpec:
    """Dataset negatives (config `negatives`, without on-policy and sets); `heldout`: (colour, shape)
    combinations a `shapes` negative never introduces (empty for other data)."""
    p_easy: float
    gentle_kinds: list
    easy_kinds: list
    pairs_per_image: int
    external: str | None
    external_max_chars: int
    sft_c_kind: str
    heldout: list


@dataclass(frozen=True)
class ProbesSpec:
    """The learning-dynamics probe of a training run (config `probes`); `rows` is its probe set."""
    rows: str
    interval: int
    batch_size: int
    n_bins: int
    images: int
    val: DataSpec
    val_images: int
    val_interval: int
    top5: bool
    max_new_tokens: int


# ---------------------------------------------------------------------------------------------------
# one spec per command

@dataclass(frozen=True)
class ValidateSpec:
    json: str
    image_root: str | None
    on_bad_input: str


@dataclass(frozen=True)
class BuildModelSpec:
    data: DataSpec
    tiny: dict
    prompt: str
    min_pixels: int
    max_pixels: int
    seed: int


@dataclass(frozen=True)
class TrainSpec:
    """One training run: `hparams` is the recipe merged over its stage's defaults (every key set);
    `train` the config's `train` settings. Stage 2 reads `pairs` and their cached `ref_logps`; SFT-C
    builds its gentle negatives from `negatives` with `data_seed`. `lr_choice`: the calibration-choice file
    a recipe with `lr: calibrated` takes its learning rate from (`cwdpo.report.calibrate.write_calibration_choice`).
    `pairs_summary`: the summary make_pairs wrote beside `pairs`, whose count the pairs file must match.
    `qa_share`: the share of the examples that are the records' question–answer turns (SFT / SFT-C)."""
    method: str
    init: str
    seed: int
    vlm: Vlm
    data: DataSpec
    hparams: dict
    train: dict
    lora: dict | None
    probes: ProbesSpec | None
    negatives: NegativesSpec | None
    data_seed: int | None
    pairs: str | None
    ref_logps: str | None
    lr_choice: str | None = optional(None)
    pairs_summary: str | None = optional(None)
    qa_share: float = optional(0.0)


@dataclass(frozen=True)
class StabilitySpec:
    """One more pretraining seed of the tiny base model, measured by its test captions' grounding and its
    accuracy on the configured MCQ sets (`mcq_sets`, their `out` unused: the results go into the seed's file)."""
    seed: int
    build: BuildModelSpec
    train: TrainSpec
    test: DataSpec
    num_beams: int
    max_new_tokens: int
    batch_size: int
    mcq_sets: tuple[McqSpec, ...] = optional(())


@dataclass(frozen=True)
class EvalSetSpec:
    """An extra caption set; `objects`: its images' COCO categories (`cwdpo coco-objects`) for CHAIR."""
    name: str
    data: DataSpec
    domains: bool
    out: str
    objects: str | None


@dataclass(frozen=True)
class McqSpec:
    """One multiple-choice set (config `mcq_sets.<name>`); `data` is the split of a `shapes` set."""
    name: str
    out: str
    enabled: bool
    format: str
    path: str | None
    image_root: str | None
    splits: list
    images: int | None
    per_image: int | None
    scoring: str
    circular: bool
    batch_size: int
    max_new_tokens: int
    seed: int
    data: DataSpec | None


@dataclass(frozen=True)
class PopeSpec:
    """One POPE set (config `pope_sets.<name>`): `shapes` questions over the test split `data`, their popular /
    adversarial objects counted on the training split `train`; or the POPE release's `files` ({setting: path})
    over `image_root` (COCO)."""
    name: str
    out: str
    format: str
    settings: list
    files: dict | None
    image_root: str | None
    images: int | None
    parser: str
    batch_size: int
    max_new_tokens: int
    seed: int
    data: DataSpec | None
    train: DataSpec | None


@dataclass(frozen=True)
class EvalSpec:
    """Evaluation of one model: captions of the test split and the evaluation sets, MCQ accuracy, and the
    teacher-forced measures, POPE. `l_floor`/`tau` give the held-out pairs' w_c; a Stage-2 run's own (a resolved
    ℓ_floor, a recipe's τ) are read from `run_metrics` instead. `objects`: the test images' COCO categories,
    for CHAIR."""
    vlm: Vlm
    model: str
    data: DataSpec
    num_beams: int
    max_new_tokens: int
    batch_size: int
    forward_batch_size: int
    topk_beams: int
    heldout_pairs: str
    l_floor: float
    run_metrics: str | None
    tau: float
    reference: str | None
    n_bins: int
    pixel_cache_mb: float
    eval_sets: list[EvalSetSpec]
    mcq_sets: list[McqSpec]
    objects: str | None
    pope_sets: tuple[PopeSpec, ...] = optional(())


@dataclass(frozen=True)
class SampleSpec:
    """On-policy samples of the Stage-2 images (and the probe images) from `model`."""
    vlm: Vlm
    model: str
    onpolicy: dict
    seed: int
    data: DataSpec
    probe_data: DataSpec | None
    probe_images: int


@dataclass(frozen=True)
class PairsSpec:
    """Preference pairs: a share `rho` of dataset negatives (easy with probability `p_easy`, or the
    negatives' own share when None) and a share `beams` of the model's own wrong beams among on-policy ones.
    The summary counts the responses whose assistant turn is longer than `max_response_tokens` under the
    tokenizer and chat template of `tokenizer` (a model folder or hub id): those are cut when scored."""
    prompt: str
    data: DataSpec
    negatives: NegativesSpec
    rho: float
    p_easy: float | None
    seed: int
    tokenizer: str
    max_response_tokens: int
    beams: float = optional(0.0)
    # a Stage-2 set: its name, the least share of its target it must hold, and how its pools were drawn (for the
    # message of a set that falls short: config negatives.onpolicy select / k, negatives.beams.k)
    name: str = optional("")
    min_fill: float = optional(0.0)
    pools: str = optional("")


@dataclass(frozen=True)
class BeamSpec:
    """Beam negatives: the `k` beams of a size-`k` beam search of `model` on the Stage-2 images, each grounded
    in the image's attribute record; a beam naming an object not in the image, or leaving one out, is kept."""
    vlm: Vlm
    model: str
    data: DataSpec
    k: int
    max_new_tokens: int
    batch_size: int


@dataclass(frozen=True)
class RefSpec:
    vlm: Vlm
    model: str
    batch_size: int


@dataclass(frozen=True)
class ProbeSetSpec:
    probe_data: DataSpec
    probe_images: int
    negatives: NegativesSpec
    seed: int


@dataclass(frozen=True)
class TrivialSpec:
    train: DataSpec
    test: DataSpec
    objects: str | None


@dataclass(frozen=True)
class CocoObjectsSpec:
    """The COCO categories of a data source's images, from COCO instance annotation files."""
    instances: list
    data: DataSpec
