# Config validation (schema + cross-key checks) and the experiment plan every rule reads. Each artifact
# path is a template of cwdpo.paths, taken with P.pattern(...) (wildcards left in); specs come from P.
import dataclasses
import os
from shlex import quote as shlex_quote

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from cwdpo.config import (
    ConfigError,
    NAME_PATTERN,
    check_config,
    check_config_files,
    expand_sweeps,
    schema_errors,
)
from cwdpo.figures import figure_inputs, figure_spec
from cwdpo.paths import TRIVIAL, ModelKey
from cwdpo.plan import Plan, settings_for_variants
from cwdpo.report import calibration_inputs, table_inputs, table_spec
from cwdpo.specs import to_json
from cwdpo.stamp import ENV as STAMP_ENV, source_stamp

try:
    # duplicate keys and alias bombs, in the raw files Snakemake merged (before anything walks the config)
    check_config_files(workflow.configfiles)
except ConfigError as e:
    raise WorkflowError(f"invalid config:\n  {e}") from None
try:
    validate(config, "../schemas/config.schema.yaml")
except WorkflowError:
    # say every problem as "key: problem (allowed: ...)" instead of jsonschema's schema dump
    errors = schema_errors(
        config, workflow.source_path("../schemas/config.schema.yaml")
    )
    raise WorkflowError("invalid config:\n  " + "\n  ".join(errors)) from None
try:
    # tables' `sweep` -> Stage-2 recipes and rows (validated again: the new entries' defaults)
    if expand_sweeps(config):
        validate(config, "../schemas/config.schema.yaml")
    check_config(config)
except ConfigError as e:
    raise WorkflowError(f"invalid config:\n  {e}") from None
P = Plan(config)
OUT = P.out
# Every job: the stamp of the cwdpo that planned it (a job run by another one, e.g. an image built before
# the last pull, refuses to start: cwdpo.stamp); with a hub-model config, the workflow's Hugging Face cache,
# offline (fetch_model fills it).
shell.prefix(f"set -euo pipefail; export {STAMP_ENV}={source_stamp()}; {P.hf_env()}")
# The experiment's plan and one per variant (config `variants`): every rule below is defined once per plan,
# named <rule> for the experiment (its DAG, rule names and paths are those of a config without variants) and
# <rule>__<variant> for a variant, whose tree lives under results/<experiment>/variants/<variant>/. Input
# functions bind their plan as a default argument (`Q=Q`), so each keeps its own.
try:
    PLANS = P.all_plans()
except ConfigError as e:
    raise WorkflowError(f"invalid config:\n  {e}") from None
if len(PLANS) > 1:
    # a profile's set-resources / set-threads name the experiment's rules; its variants' copies get the same
    # (here, before the rules are defined, since Snakemake applies them when it defines each)
    _suffixes = [sfx for sfx, _ in PLANS[1:]]
    workflow.resource_settings = dataclasses.replace(
        workflow.resource_settings,
        overwrite_resources=settings_for_variants(
            workflow.resource_settings.overwrite_resources, _suffixes
        ),
        overwrite_threads=settings_for_variants(
            workflow.resource_settings.overwrite_threads, _suffixes
        ),
    )


def logged(command):
    """A rule's shell command with its stdout and stderr in the job's log. When the job fails, its one-line
    error (cwdpo's last line "cwdpo <command>: <message>", printed after the traceback that stays in the
    log; else the log's last line) is repeated on stderr, where Snakemake's failure summary shows it."""
    return (
        command + " > {log:q} 2>&1 || {{ rc=$?; "
        "{{ grep -E '^cwdpo [a-z-]+: ' {log:q} || tail -n 1 {log:q}; }} | tail -n 1 >&2; exit $rc; }}"
    )


def optional_flag(*names):
    """`--<name> <path>` for each of `names` the input function gave as an input, else nothing."""
    return lambda wc, input: " ".join(
        f"--{name} {shlex_quote(input[name])}" for name in names if name in input.keys()
    )


wildcard_constraints:
    stage1=NAME_PATTERN,
    stage2=NAME_PATTERN,
    seed=r"\d+",
    key=ModelKey.PATTERN,
    negset=NAME_PATTERN,
    evalset=NAME_PATTERN,
    source=NAME_PATTERN,
