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


def schema_errors(config: dict, schema_file: str | None = None) -> list:
    """Every schema violation of `config` as 'key: problem' lines (defaults are filled in place)."""
    with open(schema_file or schema_path()) as f:
        schema = yaml.safe_load(f)
    validator = _validator(schema)
    return [format_error(e) for e in sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))]


def validate_config(config: dict, schema_file: str | None = None, check_paths: bool = True) -> dict:
    """Validate `config` in place (filling defaults); raise ConfigValidationError naming the key."""
    errors = schema_errors(config, schema_file)
    if errors:
        raise ConfigValidationError("invalid config:\n  " + "\n  ".join(errors))
    from .plan import ConfigError, Plan
    try:
        Plan(config, check_paths=check_paths)  # cross-key checks (recipe names, required paths)
    except ConfigError as e:
        raise ConfigValidationError(f"invalid config:\n  {e}") from None
    return config


def load_config(path: str, overrides: dict | None = None, check_paths: bool = True) -> dict:
    """Read a YAML config the way `snakemake --configfile path` does — merged over the workflow's default
    config/config.yaml — apply `overrides` (nested dict), validate and fill defaults."""
    from .plan import deep_merge
    default = os.path.join(os.path.dirname(os.path.dirname(schema_path())), "..", "config", "config.yaml")
    default = os.path.normpath(default)
    config = {}
    if os.path.isfile(default) and os.path.abspath(default) != os.path.abspath(path):
        with open(default) as f:
            config = yaml.safe_load(f) or {}
    with open(path) as f:
        config = deep_merge(config, yaml.safe_load(f) or {})
    if overrides:
        config = deep_merge(config, overrides)
    return validate_config(config, check_paths=check_paths)
