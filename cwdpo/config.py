"""The config: loading, the JSON schema (which holds every default) and the checks across keys.

Snakemake validates with `snakemake.utils.validate` and then `check_config` (workflow/rules/common.smk);
`load_config` does the same outside Snakemake (CLI commands, tests): the same schema, the same default
filling, the same cross-key checks. Every problem is one `ConfigError` line "key: problem (allowed: ...)".
No torch import.
"""
from __future__ import annotations

import copy
import math
import os
import re

import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a name that becomes part of a path (experiment, recipes, sets, tables, figures): no separators, no leading
# dot, no whitespace; checked with `re.fullmatch` (never `$`, which also accepts a trailing newline)
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
NAME_RULE = "letters, digits, '_', '.' and '-', starting with a letter or digit"
STAGE1_METHODS = ("sft", "sft_c")
STAGE2_METHODS = ("dpo", "focal_dpo", "cw_dpo")
METHODS = STAGE1_METHODS + STAGE2_METHODS
# the claims T-paper decides (cwdpo/resources/paper.json: the paper's, and ours)
CLAIM_IDS = ("cider_cw_gt_dpo", "cider_cw_gt_sft", "tv_cw_lt_dpo", "js_cw_lt_dpo", "ece_cw_lt_dpo", "top1_cw_lt_dpo",
             "chair_s_cw_lt_dpo")


class ConfigError(ValueError):
    """A config that cannot run; each line of the message names a key."""


def schema_path() -> str:
    """The config schema: $CWDPO_SCHEMA, else workflow/schemas/ of this checkout, else of the cwd."""
    candidates = [os.environ.get("CWDPO_SCHEMA"),
                  os.path.join(REPO_ROOT, "workflow", "schemas", "config.schema.yaml"),
                  os.path.join(os.getcwd(), "workflow", "schemas", "config.schema.yaml")]
    for path in candidates:
        if path and os.path.isfile(path):
            return path
    raise FileNotFoundError("workflow/schemas/config.schema.yaml not found (run from the cwdpo checkout or "
                            "set CWDPO_SCHEMA)")


def deep_merge(base: dict, override: dict | None) -> dict:
    """`base` updated recursively with `override` (a new dict; inputs untouched)."""
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _validator(schema: dict):
    from jsonschema import Draft202012Validator, validators

    base = Draft202012Validator.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, sub):
        if isinstance(instance, dict):
            for prop, subschema in properties.items():
                if "default" in subschema:
                    instance.setdefault(prop, copy.deepcopy(subschema["default"]))
        yield from base(validator, properties, instance, sub)

    return validators.extend(Draft202012Validator, {"properties": set_defaults})(schema)


def format_error(err) -> str:
    """'data.source: 'shape' is not one of ['shapes', 'karpathy']' — the key path first, then the problem."""
    path = ".".join(str(p) for p in err.absolute_path) or "(top level)"
    msg = err.message
    if err.validator == "additionalProperties":
        allowed = ", ".join(sorted(err.schema.get("properties", {})))
        return f"{path}: unknown key(s) — {msg}; check for a typo (allowed: {allowed})"
    if err.validator == "oneOf" and err.context:
        alts = "; ".join(sorted({c.message for c in err.context}))
        return f"{path}: {msg!s} — allowed: {alts}"
    return f"{path}: {msg}"


def schema_errors(config: dict, schema_file: str | None = None) -> list:
    """Every schema violation of `config` as 'key: problem' lines (defaults are filled in place)."""
    with open(schema_file or schema_path()) as f:
        schema = yaml.safe_load(f)
    validator = _validator(schema)
    return [format_error(e) for e in sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))]


def stage2_recipe(config: dict, name: str) -> dict:
    """A Stage-2 recipe merged over `stage2.defaults` (every hyperparameter set)."""
    return deep_merge(config["stage2"]["defaults"], config["stage2"]["recipes"][name])


def stage1_recipe(config: dict, name: str) -> dict:
    """A Stage-1 recipe merged over `stage1.defaults` (every hyperparameter set)."""
    return deep_merge(config["stage1"]["defaults"], config["stage1"]["recipes"][name])


def name_keys(config: dict) -> list:
    """(key, name) of every config value that becomes part of an output path: the experiment and the names
    of recipes, tables, figures, evaluation sets, MCQ sets and negative sets."""
    c = config
    keys = [("experiment", c["experiment"])]
    for section in ("stage1.recipes", "stage2.recipes", "tables", "figures", "eval_sets", "mcq_sets",
                    "negatives.sets"):
        node = c
        for part in section.split("."):
            node = node[part]
        keys += [(section, name) for name in node]
    return keys


def check_name(key: str, name) -> None:
    """The one check of a name that becomes part of a path (a full match of NAME_PATTERN)."""
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise ConfigError(f"{key}: invalid name {name!r} (it becomes part of a path under results/: {NAME_RULE})")


def non_finite_keys(node, path: str = "") -> list:
    """(key path, value) of every NaN or ±inf number in a config (JSON-schema range checks let NaN through)."""
    if isinstance(node, float):
        return [] if math.isfinite(node) else [(path or "(top level)", node)]
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in non_finite_keys(v, f"{path}.{key}" if path else str(key))]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in non_finite_keys(v, f"{path}[{i}]")]
    return []


def check_config(config: dict, check_paths: bool = True) -> None:
    """Checks the schema cannot express: finite numbers, names that become paths, recipe names and
    methods, table rows and figure series naming known recipes, negative sets, required paths. Raises
    `ConfigError` naming the key."""
    c = config
    bad = non_finite_keys(c)
    if bad:
        raise ConfigError(f"{bad[0][0]}: {bad[0][1]!r} is not a finite number (NaN and infinity are not allowed)")
    for key, name in name_keys(c):
        check_name(key, name)
    s1, s2 = c["stage1"]["recipes"], c["stage2"]["recipes"]
    for name, r in s1.items():
        if name == "base":
            raise ConfigError("stage1.recipes: 'base' is reserved (the base model); rename the recipe")
        if r["method"] not in STAGE1_METHODS:
            raise ConfigError(f"stage1.recipes.{name}.method: {r['method']!r} is not one of "
                              f"{', '.join(STAGE1_METHODS)}")
    for name, r in s2.items():
        if r["method"] not in STAGE2_METHODS:
            raise ConfigError(f"stage2.recipes.{name}.method: {r['method']!r} is not one of "
                              f"{', '.join(STAGE2_METHODS)}")
    selections = [(f"tables.{t}.rows[{i}]", row) for t, table in c["tables"].items()
                  for i, row in enumerate(table.get("rows", []))]
    selections += [(f"figures.{f}.series.{label}", sel) for f, fig in c["figures"].items()
                   for label, sel in (fig.get("series") or {}).items()]
    for where, row in selections:
        if row.get("trivial"):
            continue
        st1 = row.get("stage1", "base")
        if st1 != "base" and st1 not in s1:
            raise ConfigError(f"{where}.stage1: unknown Stage-1 recipe {st1!r}; known: base, {', '.join(s1)}")
        st2 = row.get("stage2")
        if st2 is not None and st2 not in s2:
            raise ConfigError(f"{where}.stage2: unknown Stage-2 recipe {st2!r}; known: {', '.join(s2)}")
    floor = c["figures"].get("floor")
    if floor and floor["enabled"] and floor["table"] not in c["tables"]:
        raise ConfigError(f"figures.floor.table: unknown table {floor['table']!r}; known: {', '.join(c['tables'])}")
    sets = c["negatives"]["sets"]
    for name in s2:
        negset = stage2_recipe(c, name)["negatives"]
        if negset not in sets:
            raise ConfigError(f"stage2.recipes.{name}.negatives: unknown negatives set {negset!r}; known: "
                              f"{', '.join(sets)}")
        if sets[negset]["rho"] < 1 and not c["negatives"]["onpolicy"]["enabled"]:
            raise ConfigError(f"negatives.sets.{negset}.rho: {sets[negset]['rho']} needs on-policy negatives "
                              "but negatives.onpolicy.enabled is false (use rho: 1)")
    shapes = c["data"]["shapes"]
    for key, probs in [("object_counts", shapes["object_counts"])] + [
            (f"object_counts_by_split.{k}", v) for k, v in shapes["object_counts_by_split"].items()]:
        if sum(probs) <= 0:
            raise ConfigError(f"data.shapes.{key}: {probs} gives no image any objects (the weights must not all be 0)")
    unknown_splits = sorted(set(shapes["object_counts_by_split"]) - set(shapes["splits"]))
    if unknown_splits:
        raise ConfigError(f"data.shapes.object_counts_by_split: unknown split(s) {', '.join(unknown_splits)}; "
                          f"known: {', '.join(shapes['splits'])}")
    if c["data"]["source"] == "karpathy" and not c["data"]["karpathy"].get("json"):
        raise ConfigError("data.karpathy.json: required when data.source is 'karpathy'")
    if check_paths:
        _check_paths(c)
    if c["pretrain_seed"] in c["pretrain"]["stability_seeds"]:
        raise ConfigError(f"pretrain.stability_seeds: {c['pretrain_seed']} is pretrain_seed itself (the base model); "
                          "give other seeds")
    unknown = sorted(set(c["claims"]["min_effect"]) - set(CLAIM_IDS))
    if unknown:
        raise ConfigError(f"claims.min_effect: unknown claim id(s) {', '.join(unknown)}; known: {', '.join(CLAIM_IDS)}")
    if c["model"]["source"] != "tiny" and c["pretrain"]["enabled"]:
        raise ConfigError("pretrain.enabled: only the tiny model is pretrained by the pipeline; set it to "
                          "false for a hub or local model")


def _check_paths(c: dict) -> None:
    """Paths the config names must exist before any job runs (the error names the key)."""
    paths = []
    if c["data"]["source"] == "karpathy":
        paths += [("data.karpathy.json", c["data"]["karpathy"]["json"]),
                  ("data.karpathy.image_root", c["data"]["karpathy"].get("image_root"))]
        paths += [("data.karpathy.instances", p) for p in c["data"]["karpathy"]["instances"] or []]
    paths.append(("negatives.external", c["negatives"].get("external")))
    for name, m in c["mcq_sets"].items():
        if m["enabled"] and m["format"] != "shapes":
            if not m.get("path"):
                raise ConfigError(f"mcq_sets.{name}.path: required for format {m['format']}")
            if "*" not in m["path"]:
                paths.append((f"mcq_sets.{name}.path", m["path"]))
    for name, es in c["eval_sets"].items():
        if es["enabled"] and es["source"] == "karpathy":
            if not es.get("json"):
                raise ConfigError(f"eval_sets.{name}.json: required for a Karpathy-format evaluation set")
            paths += [(f"eval_sets.{name}.json", es["json"]), (f"eval_sets.{name}.image_root", es.get("image_root"))]
            paths += [(f"eval_sets.{name}.instances", p) for p in es["instances"] or []]
    paths.append(("train.deepspeed", c["train"].get("deepspeed")))
    src = c["model"]["source"]
    if src != "tiny" and (src.startswith(("/", "./", "../", "~")) or os.path.isdir(src)):
        paths.append(("model.source", os.path.expanduser(src)))
    for key, path in paths:
        if path and not os.path.exists(path):
            raise ConfigError(f"{key}: {path!r} does not exist")


def validate_config(config: dict, schema_file: str | None = None, check_paths: bool = True) -> dict:
    """Validate `config` in place (filling defaults) and check it across keys; raise `ConfigError`."""
    errors = schema_errors(config, schema_file)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    try:
        check_config(config, check_paths=check_paths)
    except ConfigError as e:
        raise ConfigError(f"invalid config:\n  {e}") from None
    return config


def default_config_path() -> str:
    """The workflow's default config (config/config.yaml beside the schema's workflow/ folder)."""
    return os.path.normpath(os.path.join(os.path.dirname(schema_path()), "..", "..", "config", "config.yaml"))


def read_config_file(path: str) -> dict:
    """A YAML (or JSON) config file as a dict, with the verdicts of `snakemake --configfile`: a missing
    file, a file that is not UTF-8 or not YAML (a `!!python/...` tag included: safe loading only), and a
    file whose top level is not a mapping (an empty file too) each raise one `ConfigError` line."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    if not isinstance(doc, dict):
        what = "the file is empty" if doc is None else f"its top level is a {type(doc).__name__}"
        raise ConfigError(f"{path}: a config must be a YAML mapping with keys at top level ({what})")
    return doc


def load_config(path: str, overrides: dict | None = None, check_paths: bool = True) -> dict:
    """Read a YAML config the way `snakemake --configfile path` does — merged over the workflow's default
    config/config.yaml — apply `overrides` (nested dict), validate and fill defaults."""
    default = default_config_path()
    config = {}
    if os.path.isfile(default) and os.path.abspath(default) != os.path.abspath(path):
        config = read_config_file(default)
    config = deep_merge(config, read_config_file(path))
    if overrides:
        config = deep_merge(config, overrides)
    return validate_config(config, check_paths=check_paths)
