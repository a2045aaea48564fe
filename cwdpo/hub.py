"""Hub models in the workflow's own Hugging Face cache (no torch).

A config whose `model.source` is a hub id (`Qwen/Qwen2.5-VL-3B-Instruct`) gets one `fetch_model` job
(a Snakemake localrule: Slurm compute nodes often have no internet) that downloads the model into
`model.cache` (default `resources/huggingface`, inside the working directory, so that
`apptainer exec --home <workdir>` sees it) and writes a small marker file naming the snapshot. Every other
job runs with `HF_HOME` / `HF_HUB_CACHE` pointing there and `HF_HUB_OFFLINE=1`: it reads the snapshot and
never touches the network. See README.md ("Three scales") and containers/README.md.
"""
from __future__ import annotations

import os
import re

# what a model job reads: weights, configs, tokenizer, chat template (no *.bin / *.pth duplicates, no
# README or example media)
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_id(source: str) -> bool:
    """True for `org/name` that is not a local folder (and not the embedded `tiny` model)."""
    if source == "tiny" or os.path.isdir(source) or source.startswith(("/", "./", "../", "~")):
        return False
    return bool(HUB_ID.fullmatch(source))


def marker_name(repo_id: str) -> str:
    """The marker file name of a hub id (one per model in the cache folder)."""
    return repo_id.replace("/", "--") + ".json"


def snapshot_path(repo_id: str, cache_dir: str | None = None) -> str:
    """The local snapshot folder of `repo_id` in the Hugging Face cache (HF_HUB_CACHE, or `cache_dir`),
    without the network; a clear error when the model was never fetched."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
        from huggingface_hub import constants
        where = cache_dir or constants.HF_HUB_CACHE
        raise FileNotFoundError(f"{repo_id}: not in the Hugging Face cache {where} (the workflow's fetch_model "
                                f"job downloads it; offline jobs read only this cache): {e}") from None


def snapshot_commit(path: str) -> str:
    """The commit hash of a snapshot folder (`.../snapshots/<commit>`)."""
    return os.path.basename(os.path.normpath(path))


def fetch(repo_id: str, cache_dir: str) -> dict:
    """`cwdpo fetch-model`: make sure `repo_id` is in `cache_dir` (a hub cache folder). A snapshot already
    there is used as is (no network); otherwise the model's weights, configs, tokenizer and chat template
    are downloaded. Returns {repo_id, commit, snapshot (relative to the cache), files, downloaded}."""
    from huggingface_hub import snapshot_download
    downloaded = False
    try:
        path = snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True)
    except Exception:  # not cached (huggingface_hub raises several types): download it
        path = snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS)
        downloaded = True
    files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
    if not any(f.endswith(".safetensors") for f in files) or "config.json" not in files:
        raise FileNotFoundError(f"{repo_id}: the snapshot {path} has no config.json / *.safetensors weights")
    return {"repo_id": repo_id, "commit": snapshot_commit(path), "snapshot": os.path.relpath(path, cache_dir),
            "files": files, "downloaded": downloaded}


def publish_to_cache(folder: str, repo_id: str, cache_dir: str) -> str:
    """Lay a local model folder into a Hugging Face hub cache (`cache_dir` = HF_HUB_CACHE) as if
    `repo_id` had been downloaded: blobs, a snapshot of links to them and `refs/main`. The commit is a
    hash of the files, so the same folder always gives the same snapshot. For machines without the hub
    (the CPU rehearsal of config/qwen3b.yaml, scripts/gpu_check.sh, an air-gapped cluster that has the
    weights): `fetch_model` then finds the model cached and downloads nothing. Returns the snapshot path."""
    import hashlib
    import shutil
    names = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
    digests = {}
    commit = hashlib.sha1(repo_id.encode())
    for name in names:
        h = hashlib.sha256()
        with open(os.path.join(folder, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digests[name] = h.hexdigest()
        commit.update(f"{name}\0{digests[name]}\0".encode())
    commit = commit.hexdigest()
    repo = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    for name in names:
        blob = os.path.join(repo, "blobs", digests[name])
        if not os.path.exists(blob):
            os.makedirs(os.path.dirname(blob), exist_ok=True)
            shutil.copyfile(os.path.join(folder, name), blob)
        link = os.path.join(snapshot, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot
