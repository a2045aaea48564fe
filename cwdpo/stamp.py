"""The stamp of a cwdpo install: its version and a hash of its source (every module and resource file).

Snakemake plans every job with the checkout's cwdpo, but a job may run another copy: the GPU image's own,
frozen when it was built, or a non-editable install. The workflow exports the planning copy's stamp to every
job (`CWDPO_PLANNED_WITH`, workflow/rules/common.smk) and `cwdpo` refuses to run a job whose own stamp differs
(a pull without an image rebuild would otherwise run old code on specs it does not know, or silently differently).
Hashing ~0.6 MB of source takes milliseconds; nothing is stored at build time, so an image and a checkout are
compared by what they contain.
"""
from __future__ import annotations

import hashlib
import os

ENV = "CWDPO_PLANNED_WITH"
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def source_stamp(package: str = _PACKAGE) -> str:
    """`<version>+<12 hex of the sha256 of its files>` of the cwdpo package in `package` (this one by default):
    the `.py` files and `resources/` — what an install copies — by relative path and content."""
    from . import __version__
    h = hashlib.sha256()
    files = []
    for root, dirs, names in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        rel_root = os.path.relpath(root, package)
        in_resources = rel_root.split(os.sep)[0] == "resources"
        files += [os.path.normpath(os.path.join(rel_root, n)) for n in names if n.endswith(".py") or in_resources]
    for rel in sorted(files):
        h.update(rel.replace(os.sep, "/").encode() + b"\0")
        with open(os.path.join(package, rel), "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return f"{__version__}+{h.hexdigest()[:12]}"


def mismatch() -> str | None:
    """Why this cwdpo must not run the job (its stamp is not the one the workflow planned with), or None (the
    same source, or no stamp given: a command run by hand)."""
    want = os.environ.get(ENV)
    if not want:
        return None
    have = source_stamp()
    if have == want:
        return None
    return (f"this cwdpo ({have}, {_PACKAGE}) is not the one Snakemake planned the job with ({want}): rebuild the "
            "image (apptainer build containers/cwdpo.sif containers/cwdpo.def) after updating the checkout, or "
            "reinstall cwdpo (pip install -e .)")
