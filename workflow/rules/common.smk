# Config validation (schema + cross-key checks) and the experiment plan every rule reads. Each artifact
# path is a template of cwdpo.paths, taken with P.pattern(...) (wildcards left in); specs come from P.
import os
from shlex import quote as shlex_quote

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from cwdpo.config import ConfigError, NAME_PATTERN, check_config, schema_errors
from cwdpo.figures import figure_inputs, figure_spec
from cwdpo.paths import TRIVIAL, ModelKey
from cwdpo.plan import Plan
from cwdpo.report import calibration_inputs, table_inputs, table_spec
from cwdpo.specs import to_json

try:
    validate(config, "../schemas/config.schema.yaml")
except WorkflowError:
    # say every problem as "key: problem (allowed: ...)" instead of jsonschema's schema dump
    errors = schema_errors(
        config, workflow.source_path("../schemas/config.schema.yaml")
    )
    raise WorkflowError("invalid config:\n  " + "\n  ".join(errors)) from None
try:
    check_config(config)
except ConfigError as e:
    raise WorkflowError(f"invalid config:\n  {e}") from None
P = Plan(config)
OUT = P.out
if P.hub:
    # every job of a hub-model config reads the workflow's Hugging Face cache, offline (fetch_model fills it)
    shell.prefix(f"set -euo pipefail; {P.hf_env()}")
# The experiment's plan and one per variant (config `variants`): every rule below is defined once per plan,
# named <rule> for the experiment (its DAG, rule names and paths are those of a config without variants) and
# <rule>__<variant> for a variant, whose tree lives under results/<experiment>/variants/<variant>/. Input
# functions bind their plan as a default argument (`Q=Q`), so each keeps its own.
try:
    PLANS = P.all_plans()
except ConfigError as e:
    raise WorkflowError(f"invalid config:\n  {e}") from None


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
