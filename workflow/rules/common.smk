# Config validation (schema + cross-key checks) and the experiment plan every rule reads.
import os
from shlex import quote as shlex_quote

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from cwdpo.plan import Plan, dumps

try:
    validate(config, "../schemas/config.schema.yaml")
except WorkflowError:
    # say every problem as "key: problem (allowed: ...)" instead of jsonschema's schema dump
    from cwdpo.config import schema_errors

    errors = schema_errors(
        config, workflow.source_path("../schemas/config.schema.yaml")
    )
    raise WorkflowError("invalid config:\n  " + "\n  ".join(errors)) from None
P = Plan(config)
OUT = P.out


wildcard_constraints:
    stage1=r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    stage2=r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    seed=r"\d+",
    key=r"base|stage1/[^/]+/s\d+|stage2/[^/]+/s\d+/[^/]+",
    negset=r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    evalset=r"[A-Za-z0-9][A-Za-z0-9_.-]*",
