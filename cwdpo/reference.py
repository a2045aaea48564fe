"""The cached reference pass of Stage 2: log-probs of every pair under the frozen Stage-1 model, once."""
from __future__ import annotations

import os

import torch

from .data import file_sha256, read_json, write_json
from .logprobs import Collator, SeqBatch, completion_logps, make_encoder
from .models import load_for_inference, model_fingerprint, set_threads


def reference_logps(model_dir: str, pairs_path: str, out_path: str, vlm, batch_size: int = 32) -> dict:
    """Summed and token-mean log-probs of every pair's chosen and rejected response under the frozen
    reference (the Stage-1 model), computed once and cached in `out_path` (JSON, keyed by the reference
    model's weights hash and the pairs file hash). An existing cache with the same key is reused."""
    key = {"model": model_fingerprint(model_dir), "pairs": file_sha256(pairs_path), "dtype": vlm.dtype,
           "max_response_tokens": int(vlm.max_response_tokens), "completion": "chat template turn"}
    if os.path.exists(out_path):
        cached = read_json(out_path)
        if cached.get("key") == key:
            return cached
    from .negatives import read_pairs
    pairs = read_pairs(pairs_path, vlm.prompt)
    model, processor = load_for_inference(model_dir, vlm)
    encoder = make_encoder(processor, vlm)
    result = {k: [] for k in ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_avg", "ref_rejected_avg")}
    collate = Collator(encoder, "pair")
    from tqdm import tqdm
    with torch.no_grad():
        for s in tqdm(range(0, len(pairs), batch_size), desc="reference log-probs", mininterval=2.0):
            chunk = pairs[s:s + batch_size]
            b = SeqBatch.from_dict(collate(chunk)["batch"]).to(model.device)
            out = completion_logps(model, b, encoder.image_token_id)
            n = len(chunk)
            result["ref_chosen_logps"] += out.sums[:n].double().tolist()
            result["ref_rejected_logps"] += out.sums[n:].double().tolist()
            result["ref_chosen_avg"] += out.means[:n].double().tolist()
            result["ref_rejected_avg"] += out.means[n:].double().tolist()
    doc = {"key": key, "n_pairs": len(pairs), "device": str(model.device), **result}
    write_json(out_path, doc, indent=None)
    return doc


def run(spec, pairs: str, out: str, threads: int = 0) -> dict:
    """`cwdpo ref-logps` (a `RefSpec`): the cached reference pass of one pairs file."""
    set_threads(threads)
    return reference_logps(spec.model, pairs, out, spec.vlm, batch_size=spec.batch_size)
