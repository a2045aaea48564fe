"""Config loading and validation outside Snakemake (CLI commands, tests), with the workflow's own schema.

Snakemake validates with `snakemake.utils.validate` (workflow/rules/common.smk); this module applies the
same JSON schema and the same default filling, and formats errors as "key: problem (allowed: ...)".
No torch import.
"""
from __future__ import annotations

import os

import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def _validator(schema: dict):
    from jsonschema import Draft202012Validator, validators

    base = Draft202012Validator.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, sub):
        if isinstance(instance, dict):
            for prop, subschema in properties.items():
                if "default" in subschema:
                    instance.setdefault(prop, _copy(subschema["default"]))
        yield from base(validator, properties, instance, sub)

    return validators.extend(Draft202012Validator, {"properties": set_defaults})(schema)


def _copy(obj):
    import copy
    return copy.deepcopy(obj)


def format_error(err) -> str:
    """'data.source: 'shape' is not one of ['shapes', 'karpathy']' — the key path first, then the problem."""
    path = ".".join(str(p) for p in err.absolute_path) or "(top level)"
    msg = err.message
    if err.validator == "additionalProperties":
        return f"{path}: unknown key(s) — {msg}; check for a typo (allowed: {', '.join(sorted(err.schema.get('properties', {})))})"
    if err.validator == "oneOf" and err.context:
        alts = "; ".join(sorted({c.message for c in err.context}))
        return f"{path}: {msg!s} — allowed: {alts}"
    return f"{path}: {msg}"


class ConfigValidationError(ValueError):
    pass


def validate_config(config: dict, schema_file: str | None = None) -> dict:
    """Validate `config` in place (filling defaults); raise ConfigValidationError naming the key."""
    with open(schema_file or schema_path()) as f:
        schema = yaml.safe_load(f)
    validator = _validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigValidationError("invalid config:\n  " + "\n  ".join(format_error(e) for e in errors))
    from .plan import Plan
    Plan(config)  # cross-key checks (recipe names, required paths)
    return config


def load_config(path: str, overrides: dict | None = None) -> dict:
    """Read a YAML config, apply `overrides` (nested dict), validate and fill defaults."""
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if overrides:
        from .plan import deep_merge
        config = deep_merge(config, overrides)
    return validate_config(config)
