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

from .methods import METHODS, REGISTRY, STAGE1_METHODS, STAGE2_METHODS  # noqa: F401 (re-exported: the config's method lists)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a name that becomes part of a path (experiment, recipes, sets, tables, figures): no separators, no leading
# dot, no whitespace; checked with `re.fullmatch` (never `$`, which also accepts a trailing newline)
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
NAME_RULE = "letters, digits, '_', '.' and '-', starting with a letter or digit"
# the claims T-paper decides (cwdpo/resources/paper.json: the paper's, and ours)
PAPER_CLAIM_IDS = ("cider_cw_gt_dpo", "cider_cw_gt_sft", "tv_cw_lt_dpo", "js_cw_lt_dpo", "ece_cw_lt_dpo",
                   "top1_cw_lt_dpo", "mcq_cw_noninferior_sft", "chair_s_cw_lt_dpo", "pope_cw_noninferior_dpo")
# claims only the open-question tables decide (paper.json "open_claims")
CLAIM_IDS = PAPER_CLAIM_IDS + ("chair_s_cw_lt_sft", "top1_dpo_gt_sft")
# tables that decide claims side by side in several arms (the open questions: config/scale.yaml, modality.yaml,
# negsource.yaml); an arm may be a variant of the experiment (config `variants`)
ARMS_KINDS = ("scale", "modality", "negsource")
CALIBRATED = "calibrated"  # a Stage-2 `lr` taken from the calibration rule's outcome (stage2.calibration)


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


def resolve_recipe(config: dict, stage: str, name: str) -> dict:
    """Recipe `name` of `stage` ("stage1" or "stage2") with every hyperparameter set: merged over the recipe it
    `extends` (resolved the same way), or over `<stage>.defaults`. A ConfigError names an unknown or circular
    `extends`."""
    recipes, chain = config[stage]["recipes"], [name]
    while recipes[chain[-1]].get("extends") is not None:
        parent = recipes[chain[-1]]["extends"]
        if parent not in recipes:
            raise ConfigError(f"{stage}.recipes.{chain[-1]}.extends: unknown recipe {parent!r}; known: "
                              f"{', '.join(recipes)}")
        if parent in chain:
            raise ConfigError(f"{stage}.recipes.{name}.extends: circular ({' -> '.join(chain + [parent])})")
        chain.append(parent)
    out = config[stage]["defaults"]
    for r in reversed(chain):
        out = deep_merge(out, {k: v for k, v in recipes[r].items() if k != "extends"})
    if "method" not in out:
        raise ConfigError(f"{stage}.recipes.{name}: no method (give `method`, or `extends` a recipe that has one)")
    return out


def stage2_recipe(config: dict, name: str) -> dict:
    """A Stage-2 recipe with every hyperparameter set (`resolve_recipe`)."""
    return resolve_recipe(config, "stage2", name)


def onpolicy_share(negset: dict) -> float:
    """The share of on-policy samples among a negatives set's pairs: what dataset negatives (`rho`) and the
    model's wrong beams (`beams`) leave."""
    return max(0.0, 1.0 - float(negset["rho"]) - float(negset.get("beams", 0.0)))


def variant_config(config: dict, name: str) -> dict:
    """The (unvalidated) config of variant `name`: the experiment's config with the variant's patch deep-merged
    over it. It has no variants of its own, leaves out the tables that read variants (ARMS_KINDS) and the
    figures drawn from them, and switches the experiment's other tables and figures off (a variant's runs are
    read by the experiment's tables across variants; its patch may switch one on)."""
    base = copy.deepcopy(config)
    base["variants"] = {}
    tables = base.get("tables") or {}
    kept = {k: t for k, t in tables.items() if t.get("kind") not in ARMS_KINDS}
    base["tables"] = {k: {**t, "enabled": False} for k, t in kept.items()}
    base["figures"] = {k: {**f, "enabled": False} for k, f in (base.get("figures") or {}).items()
                       if f.get("table") is None or f["table"] in kept}
    return deep_merge(base, config["variants"][name])


def stage1_recipe(config: dict, name: str) -> dict:
    """A Stage-1 recipe with every hyperparameter set (`resolve_recipe`)."""
    return resolve_recipe(config, "stage1", name)


def name_keys(config: dict) -> list:
    """(key, name) of every config value that becomes part of an output path: the experiment and the names
    of recipes, tables, figures, evaluation sets, MCQ sets, POPE sets and negative sets."""
    c = config
    keys = [("experiment", c["experiment"])]
    for section in ("stage1.recipes", "stage2.recipes", "tables", "figures", "eval_sets", "mcq_sets", "pope_sets",
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
        method = stage1_recipe(c, name)["method"]
        if method not in STAGE1_METHODS:
            raise ConfigError(f"stage1.recipes.{name}.method: {method!r} is not one of {', '.join(STAGE1_METHODS)}")
    for name in s2:
        method = stage2_recipe(c, name)["method"]
        if method not in STAGE2_METHODS:
            raise ConfigError(f"stage2.recipes.{name}.method: {method!r} is not one of {', '.join(STAGE2_METHODS)}")
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
    for name, ns in sets.items():
        if ns["rho"] + ns["beams"] > 1 + 1e-9:
            raise ConfigError(f"negatives.sets.{name}: rho {ns['rho']} + beams {ns['beams']} exceed 1 (they are "
                              "shares of the pairs; the rest are on-policy samples)")
        if ns["beams"] > 0 and c["data"]["source"] != "shapes":
            raise ConfigError(f"negatives.sets.{name}.beams: beam negatives need the `shapes` data (a beam is wrong "
                              "when the grammar parse against the image's attribute record finds a hallucinated or "
                              "missing object); data.source is " + repr(c["data"]["source"]))
    for name in s2:
        negset = stage2_recipe(c, name)["negatives"]
        if negset not in sets:
            raise ConfigError(f"stage2.recipes.{name}.negatives: unknown negatives set {negset!r}; known: "
                              f"{', '.join(sets)}")
        if onpolicy_share(sets[negset]) > 0 and not c["negatives"]["onpolicy"]["enabled"]:
            raise ConfigError(f"negatives.sets.{negset}.rho: {sets[negset]['rho']} needs on-policy negatives "
                              "but negatives.onpolicy.enabled is false (use rho: 1)")
    _check_calibrated(c)
    _check_text_input(c)
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
    _check_seeds(c)
    _check_passthrough(c)
    _check_shell_strings(c)
    _check_markdown_names(c)
    _check_variants(c, check_paths)
    _check_arms(c)


# A seed reaches `random.seed`, numpy (below 2**32), `torch.manual_seed` and sums of seeds (an on-policy
# seed plus a run seed): an integer in [0, MAX_SEED] keeps every one of them in range.
MAX_SEED = 2 ** 31 - 1


def seed_keys(node, path: str = "") -> list:
    """(key path, value) of every seed in a config: keys named `seed`, `*_seed`, `seeds` or `*_seeds`
    anywhere (lists item by item)."""
    out = []
    if isinstance(node, dict):
        for key, v in node.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and (key == "seed" or key.endswith("_seed")):
                out.append((where, v))
            elif isinstance(key, str) and (key == "seeds" or key.endswith("_seeds")) and isinstance(v, list):
                out += [(f"{where}[{i}]", x) for i, x in enumerate(v)]
            else:
                out += seed_keys(v, where)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += seed_keys(v, f"{path}[{i}]")
    return out


def _check_seeds(c: dict) -> None:
    """Seeds are integers (1.0 is not: it would name a run `s1.0`) in [0, MAX_SEED]."""
    for where, v in seed_keys(c):
        if v is None and not where.startswith(("seeds", "pretrain_seed")):
            continue  # an optional seed left unset (a table row without seeds of its own)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{where}: {v!r} is not an integer (a seed is a whole number in 0..{MAX_SEED})")
        if not 0 <= v <= MAX_SEED:
            raise ConfigError(f"{where}: {v} is outside 0..{MAX_SEED} (a seed must fit random, numpy and torch)")


def passthrough_keys() -> dict:
    """cwdpo/resources/passthrough_keys.json: {config key: {package, version, keys, ...}} — the keys that
    peft's LoraConfig (model.lora) and vLLM's engine (negatives.onpolicy.vllm) accept in the versions the GPU
    image pins, written down so that the host and the image give the same verdict."""
    import json
    with open(os.path.join(os.path.dirname(__file__), "resources", "passthrough_keys.json"), encoding="utf-8") as f:
        return json.load(f)


def _check_passthrough(c: dict) -> None:
    """The dictionaries handed on as keyword arguments (model.lora, negatives.onpolicy.vllm) hold only keys
    their receiver accepts: a typo is refused now, not when the first LoRA or sampling job starts."""
    import difflib
    values = {"model.lora": c["model"]["lora"], "negatives.onpolicy.vllm": c["negatives"]["onpolicy"]["vllm"]}
    for key, known in passthrough_keys().items():
        given = values.get(key)  # (the file's "_about" note has no value)
        if not isinstance(given, dict):
            continue
        allowed = set(known["keys"])
        for name in given:
            if name in known.get("set_by_cwdpo", []):
                raise ConfigError(f"{key}.{name}: set by cwdpo itself ({known['set_by_cwdpo_note']})")
            if name not in allowed:
                near = difflib.get_close_matches(str(name), sorted(allowed), n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                listed = ", ".join(sorted(allowed)) if len(allowed) <= 50 else \
                    f"the {len(allowed)} keys listed in cwdpo/resources/passthrough_keys.json"
                raise ConfigError(f"{key}: unknown key {name!r} — {hint}{known['accepts']} of {known['package']} "
                                  f"{known['version']} accepts: {listed}")


# config strings that reach a command line outside the rules' quoting: `container` is the image path of
# Snakemake's `apptainer exec` (written into its shell command as it is)
SAFE_SHELL_WORD = r"[A-Za-z0-9_./:@+=,%-]+"


def _check_shell_strings(c: dict) -> None:
    if not re.fullmatch(SAFE_SHELL_WORD, c["container"]):
        raise ConfigError(f"container: {c['container']!r} holds characters a shell would interpret (Snakemake "
                          "puts it into the apptainer command line as it is); allowed: letters, digits and "
                          "_ . / : @ + = , % -")


def markdown_names(c: dict) -> list:
    """(key, text) of every config string printed into a table's Markdown: table titles, row names, arm and
    run names."""
    out = []
    for t, table in c["tables"].items():
        if table.get("title") is not None:
            out.append((f"tables.{t}.title", table["title"]))
        out += [(f"tables.{t}.rows[{i}].name", row.get("name")) for i, row in enumerate(table.get("rows", []))]
        out += [(f"tables.{t}.arms[{i}].name", arm.get("name")) for i, arm in enumerate(table.get("arms") or [])]
        out += [(f"tables.{t}.runs", run) for run in (table.get("runs") or {})]
        for i, arm in enumerate(table.get("arms") or []):
            out += [(f"tables.{t}.arms[{i}].runs", run) for run in (arm.get("runs") or {})]
    return out


def _check_markdown_names(c: dict) -> None:
    """A name printed into a Markdown table is one line: a line break or other control character would cut
    the table (a `|` is escaped when written: cwdpo.report.render.md_cell)."""
    for key, text in markdown_names(c):
        if isinstance(text, str) and re.search(r"[\x00-\x1f\x7f]", text):
            raise ConfigError(f"{key}: {text!r} holds a line break or another control character (it is printed "
                              "into a Markdown table row); write it on one line")


def _check_calibrated(c: dict) -> None:
    """A recipe with `lr: calibrated` needs the calibration table (kind calibrate), whose sweep rows have lrs."""
    calibrated = [n for n in c["stage2"]["recipes"] if stage2_recipe(c, n)["lr"] == CALIBRATED]
    if not calibrated:
        return
    name = c["stage2"]["calibration"]
    table = c["tables"].get(name)
    if table is None or table["kind"] != "calibrate":
        raise ConfigError(f"stage2.recipes.{calibrated[0]}.lr: 'calibrated' needs stage2.calibration ({name!r}) to "
                          "name a table of kind calibrate (config/calibrate.yaml)")
    rows = table.get("rows", [])
    if len(rows) < 2 or any("stage2" not in r for r in rows[1:]):
        raise ConfigError(f"tables.{name}.rows: a calibration sweep is the SFT reference row, then rows of the "
                          "control (each with a stage2 recipe) at the swept learning rates")
    for i, r in enumerate(rows[1:], 1):
        if stage2_recipe(c, r["stage2"])["method"] != "dpo":
            raise ConfigError(f"tables.{name}.rows[{i}].stage2: {r['stage2']!r} is not vanilla DPO; the calibration "
                              "sweeps the control only (CW-DPO and Focal-DPO are never looked at to choose a setting)")
        if stage2_recipe(c, r["stage2"])["lr"] == CALIBRATED:
            raise ConfigError(f"tables.{name}.rows[{i}].stage2: {r['stage2']!r} takes its lr from this very sweep "
                              "(lr: calibrated); the sweep's rows need learning rates of their own")


def _check_text_input(c: dict) -> None:
    """model.input: text writes the attribute record of a `shapes` image as text: other data has none, an MCQ
    set asks about an image, and vLLM sampling takes images."""
    if c["model"]["input"] != "text":
        return
    if c["data"]["source"] != "shapes":
        raise ConfigError("model.input: 'text' writes each image's attribute record as text; only the `shapes` "
                          f"data has one (data.source is {c['data']['source']!r})")
    on = [m for m, x in c["mcq_sets"].items() if x["enabled"]]
    if on:
        raise ConfigError(f"mcq_sets.{on[0]}: multiple-choice sets ask about an image; switch them off "
                          "(enabled: false) with model.input: text")
    if c["negatives"]["onpolicy"]["backend"] == "vllm":
        raise ConfigError("negatives.onpolicy.backend: vllm samples from images; use hf with model.input: text")


def _check_variants(c: dict, check_paths: bool) -> None:
    """Every variant is a valid config of its own (schema and these checks), named by its key."""
    for name, patch in c["variants"].items():
        if "variants" in patch:
            raise ConfigError(f"variants.{name}.variants: a variant has no variants of its own")
        if "experiment" in patch:
            raise ConfigError(f"variants.{name}.experiment: a variant lives under results/<experiment>/variants/"
                              f"{name}/; it has no experiment name of its own")
        try:
            validate_config(variant_config(c, name), check_paths=check_paths)
        except ConfigError as e:
            lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e)]
            raise ConfigError(f"variants.{name}: " + "; ".join(lines)) from None


def arm_config(c: dict, arm: dict) -> dict:
    """The (validated) config an arm of a scale / modality / negsource table reads: the experiment's, or its
    variant's."""
    if not arm.get("variant"):
        return c
    return validate_config(variant_config(c, arm["variant"]), check_paths=False)


def arm_runs(table: dict, arm: dict) -> dict:
    """The runs (name -> selection) of one arm: its own `runs`, else the table's; the table's `seeds` apply to a
    run without seeds of its own."""
    runs = arm.get("runs") or table["runs"]
    if table.get("seeds"):
        return {name: {"seeds": table["seeds"], **sel} for name, sel in runs.items()}
    return runs


def load_claims() -> dict:
    """{claim id: claim} of cwdpo/resources/paper.json: the paper's, ours and the open-question tables'."""
    import json
    with open(os.path.join(os.path.dirname(__file__), "resources", "paper.json"), encoding="utf-8") as f:
        paper = json.load(f)
    return {x["id"]: x for x in paper["claims"] + paper["our_claims"] + paper["open_claims"]}


def _check_arms(c: dict) -> None:
    """Tables across arms: known variants, runs naming recipes of the arm's config, claims naming runs."""
    claims = load_claims()
    for t, table in c["tables"].items():
        if table["kind"] not in ARMS_KINDS:
            continue
        if not table.get("arms"):
            raise ConfigError(f"tables.{t}.arms: a table of kind {table['kind']} needs its arms (the compared "
                              "settings: a variant each, or the experiment itself)")
        names = [a["name"] for a in table["arms"]]
        if len(set(names)) < len(names):
            raise ConfigError(f"tables.{t}.arms: two arms are named alike ({', '.join(names)})")
        for i, arm in enumerate(table["arms"]):
            where = f"tables.{t}.arms[{i}]"
            if arm.get("variant") and arm["variant"] not in c["variants"]:
                raise ConfigError(f"{where}.variant: unknown variant {arm['variant']!r}; known: "
                                  f"{', '.join(c['variants']) or 'none (config variants)'}")
            ac = arm_config(c, arm)
            runs = arm_runs(table, arm)
            s1, s2 = ac["stage1"]["recipes"], ac["stage2"]["recipes"]
            for run, sel in runs.items():
                st1, st2 = sel.get("stage1", "base"), sel.get("stage2")
                if st1 != "base" and st1 not in s1:
                    raise ConfigError(f"{where}: run {run!r}: unknown Stage-1 recipe {st1!r}; known: base, "
                                      f"{', '.join(s1)}")
                if st2 is not None and st2 not in s2:
                    raise ConfigError(f"{where}: run {run!r}: unknown Stage-2 recipe {st2!r}; known: {', '.join(s2)}")
            for cid in table["claims"]:
                missing = [x for x in (claims[cid]["a"], claims[cid]["b"]) if x not in runs]
                if missing:
                    raise ConfigError(f"tables.{t}.claims: {cid} compares {claims[cid]['a']} with {claims[cid]['b']}, "
                                      f"but arm {arm['name']!r} has no run named {missing[0]!r} (its runs: "
                                      f"{', '.join(runs)})")
    scale = c["figures"].get("scale")
    if scale and scale["enabled"] and (scale["table"] not in c["tables"] or
                                      c["tables"][scale["table"]]["kind"] != "scale"):
        raise ConfigError(f"figures.scale.table: {scale['table']!r} is not a table of kind scale")


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
    for name, p in c["pope_sets"].items():
        if p["enabled"] and p["format"] == "pope":
            missing = [s for s in p["settings"] if s not in (p.get("files") or {})]
            if missing or not p.get("image_root"):
                raise ConfigError(f"pope_sets.{name}: format pope needs `files` for every setting (missing: "
                                  f"{', '.join(missing) or 'none'}) and `image_root`")
            paths += [(f"pope_sets.{name}.files.{s}", p["files"][s]) for s in p["settings"]]
            paths.append((f"pope_sets.{name}.image_root", p["image_root"]))
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
    elif src != "tiny":
        from .hub import is_hub_id
        if not is_hub_id(src):
            raise ConfigError(f"model.source: {src!r} is neither tiny, a hub id (org/name) nor an existing model "
                              "folder")
    for key, path in paths:
        if path and not os.path.exists(path):
            raise ConfigError(f"{key}: {path!r} does not exist")


def _short(x: float) -> str:
    """A learning rate or β as config names spell it: 5e-5, 1e-2, 0.3, 1."""
    if x < 0.1:
        mantissa, exponent = f"{x:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{x:g}"


def expand_sweeps(config: dict) -> bool:
    """Expand every table's `sweep` (config tables.<name>.sweep, validated) into Stage-2 recipes and rows, in
    place, and drop the key (so expanding again adds nothing). A recipe of the same name must say the same.
    Returns whether anything was added (the config is then validated again to fill the new entries' defaults)."""
    added = False
    recipes = config.setdefault("stage2", {}).setdefault("recipes", {})
    for tname, table in (config.get("tables") or {}).items():
        sweep = table.pop("sweep", None) if isinstance(table, dict) else None
        if not sweep:
            continue
        if sweep["method"] not in STAGE2_METHODS:
            raise ConfigError(f"tables.{tname}.sweep.method: {sweep['method']!r} is not one of "
                              f"{', '.join(STAGE2_METHODS)}")
        stage1 = (config.get("stage1") or {}).get("recipes") or {}
        if sweep["stage1"] not in stage1:
            raise ConfigError(f"tables.{tname}.sweep.stage1: unknown Stage-1 recipe {sweep['stage1']!r}; known: "
                              f"{', '.join(stage1)}")
        label = REGISTRY[sweep["method"]].label
        pinned = {} if sweep.get("beta") is None else {"beta": sweep["beta"]}  # of a grid without βs
        for grid in sweep["grids"]:
            for beta in grid.get("beta", [None]):
                for lr in grid["lr"]:
                    name = f"{sweep['method']}_lr{_short(lr)}" + ("" if beta is None else f"_b{_short(beta)}")
                    recipe = {"method": sweep["method"], "lr": lr, **(pinned if beta is None else {"beta": beta})}
                    have = recipes.get(name)
                    if have is not None and {k: have.get(k) for k in recipe} != recipe:
                        raise ConfigError(f"tables.{tname}.sweep: it makes Stage-2 recipe {name!r} ({recipe}), "
                                          f"but stage2.recipes.{name} says otherwise ({have}); rename or drop it")
                    recipes.setdefault(name, recipe)
                    row_name = f"{label}, lr {_short(lr)}" + ("" if beta is None else f", β {_short(beta)}")
                    row = {"name": row_name, "stage1": sweep["stage1"], "stage2": name}
                    if "seeds" in sweep:
                        row["seeds"] = sweep["seeds"]
                    table.setdefault("rows", []).append(row)
                    added = True
    return added


def validate_config(config: dict, schema_file: str | None = None, check_paths: bool = True) -> dict:
    """Validate `config` in place (filling defaults; tables' `sweep` expanded: `expand_sweeps`) and check it
    across keys; raise `ConfigError`."""
    errors = schema_errors(config, schema_file)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    try:
        if expand_sweeps(config):
            errors = schema_errors(config, schema_file)
            if errors:
                raise ConfigError("\n  ".join(errors))
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
            doc = _load_yaml(path, f)
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


# YAML anchors and aliases may reuse a value, but the aliases of a config may add at most this many nodes to
# what is written out (a 400-byte "billion laughs" file of nested aliases stands for 10^9 values, and every
# walk over the config — validation, merging, Snakemake's — would take them one by one)
MAX_ALIAS_NODES = 10_000


def _load_yaml(path: str, stream):
    """The document of a YAML stream (safe loading only), refused before it is built when a mapping holds a
    key twice (YAML would keep the last one silently) or its aliases expand beyond MAX_ALIAS_NODES."""
    loader = yaml.SafeLoader(stream)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_node(path, node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_yaml_node(path: str, root) -> None:
    from yaml.nodes import MappingNode, ScalarNode, SequenceNode
    seen, stack = set(), [root]
    while stack:  # every key of every mapping once (a node an alias repeats is the same object)
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, MappingNode):
            first: dict = {}
            for key, value in node.value:
                if isinstance(key, ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in first:
                        raise ConfigError(f"{path}:{key.start_mark.line + 1}: duplicate key {key.value!r} (first at "
                                          f"line {first[key.value]}); a mapping holds each key once")
                    first[key.value] = key.start_mark.line + 1
                stack += [key, value]
        elif isinstance(node, SequenceNode):
            stack += node.value
    sizes: dict = {}

    def expanded(node, active=()) -> int:
        """The nodes of `node` with every alias written out (memoised per node; a cycle is refused)."""
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in active:
            raise ConfigError(f"{path}:{node.start_mark.line + 1}: a YAML alias refers to the value it is part of "
                              "(a recursive structure); write the values out")
        children = [x for kv in node.value for x in kv] if isinstance(node, MappingNode) else \
            node.value if isinstance(node, SequenceNode) else []
        sizes[id(node)] = 1 + sum(expanded(c, active + (id(node),)) for c in children)
        return sizes[id(node)]

    extra = expanded(root) - len(seen)
    if extra > MAX_ALIAS_NODES:
        where = root.start_mark.line + 1
        if isinstance(root, MappingNode):  # name the top-level key whose value expands the most
            key, _ = max(root.value, key=lambda kv: sizes[id(kv[1])])
            where = f"{key.start_mark.line + 1}: key {key.value!r}"
        raise ConfigError(f"{path}:{where}: YAML aliases expand the file by {extra} values, over the limit of "
                          f"{MAX_ALIAS_NODES} (an alias bomb?); write the values out instead")


def check_config_files(paths) -> None:
    """The checks `read_config_file` makes while reading (duplicate keys, alias expansion), of config files
    another reader has loaded already: the Snakefile re-reads the files Snakemake merged before it walks
    the config. A file that cannot be read is left to Snakemake's own verdict."""
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                _load_yaml(path, f)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue


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
