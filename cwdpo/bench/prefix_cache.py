"""The two-pass shared-prefix forward over a prefix KV cache, and the shared-prefix benchmark.

Production uses the packed single pass (`cwdpo.prefix`). This variant, kept to compare against it: the
prefixes, left-padded to a common length P so that they all end at column P-1, run once and their
per-layer (post-rope) keys/values are recorded; these are expanded to the rows of each group with
``index_select`` (its backward sums the rows' key/value gradients back into the prefix) and served through
a read-only cache to a second pass over the right-padded completions, which attends to
``[prefix mask | causal completion mask]``. Under gradient checkpointing transformers drops the cache inside
the checkpointed layers, so this variant refuses to run there. Same result as `completion_logps`.
"""
from __future__ import annotations

import inspect
import statistics
import time

import torch

from ..logprobs import completion_logps, image_features
from ..models import unwrap
from ..prefix import _attention_mask, _embed, _pad_id, _packed_hidden, _run_text, completion_logps_shared_prefix


def _cache_kwarg(text_model) -> str:
    """`cache` (transformers ≥ 5.2x) or `past_key_values` (older 5.x), whichever the forward declares."""
    params = inspect.signature(text_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _PrefixKV:
    """A minimal cache for the two-pass method (duck-types `Cache.update`).

    mode "record": `update` stores each layer's keys/values [G, kv_heads, P, d] (with their autograd history)
    and returns them unchanged. mode "extend": `update` returns ``cat(prefix_kv[layer][rows], new)`` along the
    sequence axis without storing anything (read-only), where `rows` [N] maps completion rows to groups.
    """

    def __init__(self):
        self.mode = "record"
        self.keys: dict = {}
        self.values: dict = {}
        self.rows = None
        self.prefix_length = 0
        self.calls = 0

    def extend(self, rows: torch.Tensor) -> "_PrefixKV":
        self.mode, self.rows, self.calls = "extend", rows, 0
        self.prefix_length = next(iter(self.keys.values())).shape[-2] if self.keys else 0
        return self

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.calls += 1
        if self.mode == "record":
            self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
            return key_states, value_states
        k = self.keys[layer_idx].index_select(0, self.rows)
        v = self.values[layer_idx].index_select(0, self.rows)
        return torch.cat([k, key_states], dim=-2), torch.cat([v, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prefix_length if self.mode == "extend" else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0):
        return self.get_seq_length() + query_length, 0

    def __len__(self) -> int:
        return len(self.keys)


def _gradient_checkpointing(text_model) -> bool:
    return text_model.training and torch.is_grad_enabled() and any(
        getattr(layer, "gradient_checkpointing", False) for layer in text_model.layers)


def _cache_hidden(core, text_model, batch, grp, feats, image_token_id, rows, cols):
    """Method "cache": left-padded prefixes once, then the completions over an expanded prefix KV cache."""
    if _gradient_checkpointing(text_model):
        raise RuntimeError("method='cache' does not work under gradient checkpointing (transformers drops the "
                           "cache inside checkpointed layers); use method='packed'")
    device = batch.input_ids.device
    G, N = grp.n_groups, batch.n_rows
    P = max(grp.prefix_len)
    # pass 1: prefixes, left-padded so that every prefix ends at column P-1
    pmask = torch.zeros(G, P, dtype=torch.bool)
    srow = torch.zeros(G, P, dtype=torch.long)
    scol = torch.zeros(G, P, dtype=torch.long)
    for g in range(G):
        p = grp.prefix_len[g]
        pmask[g, P - p:] = True
        srow[g] = grp.prefix_rows[g]
        scol[g, P - p:] = torch.arange(p)
    pmask, srow, scol = pmask.to(device), srow.to(device), scol.to(device)
    ids = torch.where(pmask, batch.input_ids[srow, scol], _pad_id(image_token_id))
    positions = torch.where(pmask.unsqueeze(0), batch.position_ids[:, srow, scol], 0)
    embeds = _embed(core, ids, feats, [int(batch.row_image[grp.prefix_rows[g]]) for g in range(G)], image_token_id)
    ar = torch.arange(P, device=device)
    eye = torch.eye(P, dtype=torch.bool, device=device)
    allowed = ((ar.view(1, P, 1) >= ar.view(1, 1, P)) & pmask.unsqueeze(1)) | eye
    cache = _PrefixKV()
    prefix_hidden = _run_text(text_model, embeds, _attention_mask(allowed, embeds.dtype, text_model), positions,
                              **{_cache_kwarg(text_model): cache})
    if len(cache) != len(text_model.layers):
        raise RuntimeError(f"the prefix pass recorded keys/values of {len(cache)} of {len(text_model.layers)} "
                           "layers (is the cache dropped, e.g. by gradient checkpointing?)")
    g_of = torch.tensor(grp.group, device=device)[rows]
    h_first = prefix_hidden[g_of, P - 1]
    # pass 2: the completions' fed tokens y_1..y_{m-1}, right-padded, over the prefix KV of their group
    fed = [max(m - 1, 0) for m in grp.lengths]
    Lc = max(fed)
    if Lc == 0:
        return h_first
    live = [r for r in range(N) if grp.group[r] >= 0]
    row_pos = {r: i for i, r in enumerate(live)}
    cmask = torch.zeros(len(live), Lc, dtype=torch.bool)
    crow = torch.zeros(len(live), Lc, dtype=torch.long)
    ccol = torch.zeros(len(live), Lc, dtype=torch.long)
    for i, r in enumerate(live):
        cmask[i, :fed[r]] = True
        crow[i] = r
        ccol[i, :fed[r]] = torch.arange(grp.starts[r], grp.starts[r] + fed[r])
    cmask, crow, ccol = cmask.to(device), crow.to(device), ccol.to(device)
    ids = torch.where(cmask, batch.input_ids[crow, ccol], _pad_id(image_token_id))
    positions = torch.where(cmask.unsqueeze(0), batch.position_ids[:, crow, ccol], 0)
    embeds = core.get_input_embeddings()(ids)
    kv_rows = torch.tensor([grp.group[r] for r in live], device=device)
    ac = torch.arange(Lc, device=device)
    own = ((ac.view(1, Lc, 1) >= ac.view(1, 1, Lc)) & cmask.unsqueeze(1)) | torch.eye(
        Lc, dtype=torch.bool, device=device)
    allowed = torch.cat([pmask[kv_rows].unsqueeze(1).expand(-1, Lc, -1), own], dim=2)
    cont_hidden = _run_text(text_model, embeds, _attention_mask(allowed, embeds.dtype, text_model), positions,
                            **{_cache_kwarg(text_model): cache.extend(kv_rows)})
    if cache.calls != len(text_model.layers):
        raise RuntimeError("the completion pass did not read the prefix cache in every layer")
    starts = torch.tensor(grp.starts, device=device)
    lrow = torch.tensor([row_pos.get(r, 0) for r in range(N)], device=device)
    first = (cols < starts[rows]).unsqueeze(-1)
    h_cont = cont_hidden[lrow[rows], (cols - starts[rows]).clamp(min=0, max=Lc - 1)]
    return torch.where(first, h_first, h_cont)




HIDDEN = {"packed": _packed_hidden, "cache": _cache_hidden}


def completion_logps_prefix_cache(model, batch, image_token_id: int, keep_logits: bool = False):
    """`completion_logps_shared_prefix` through the two-pass cache variant."""
    return completion_logps_shared_prefix(model, batch, image_token_id, keep_logits, hidden=_cache_hidden)


BENCH_SPEC = dict(vocab_size=512, min_pixels=448 * 448, max_pixels=448 * 448, hidden_size=256,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=768, num_hidden_layers=4,
                  vision_depth=1, vision_hidden_size=32, vision_intermediate_size=64, vision_num_heads=1,
                  rope_theta=10000)

_BENCH_WORDS = ("a red circle and a blue square on the left of a small green triangle near the top right corner "
                "of a white canvas with two yellow stars below a large purple ellipse").split()


def _bench_captions(n: int, words: int, seed: int) -> list:
    import random
    rng = random.Random(seed)
    return [" ".join(rng.choice(_BENCH_WORDS) for _ in range(words)) for _ in range(n)]


def bench_shared_prefix(model_dir_or_config=None, image_size: int = 448, batch_pairs: int = 4, steps: int = 5,
                        warmup: int = 1, caption_words: int = 12, dtype: str = "float32",
                        threads: int | None = None, methods=("packed", "cache"), prompt: str = "Describe the image.",
                        seed: int = 0, vision_time: bool = True) -> dict:
    """Median fwd+bwd step time of `completion_logps` vs `completion_logps_shared_prefix` on pair batches.

    model_dir_or_config: a model folder (weights + processor), or a `build_tiny` spec dict (None:
    `BENCH_SPEC`, a small random model), built in a temporary folder. The processor is loaded with
    min_pixels = max_pixels = image_size², so an image is (image_size/28)² tokens (448 → 256). Each step runs
    one pair batch [chosen_0..B-1; rejected_0..B-1] of `batch_pairs` random images (rows i and B+i share
    their image) forward, a DPO-like scalar, backward, then drops the gradients; the methods alternate
    within every step. Returns {"concat_s", "shared_prefix_s" (the first of `methods`),
    "shared_prefix_over_concat", "<method>_s" and "<method>_over_concat" for each method, "vision_s"
    (fwd+bwd of the vision tower alone, a cost both paths pay once per image; with `vision_time`),
    "image_tokens", "prompt_tokens", "completion_tokens_mean", "rows", "threads", "device",
    "max_abs_diff_sums"}.
    """
    import os
    import tempfile

    import numpy as np
    from PIL import Image

    from ..logprobs import Encoder
    from ..models import build_tiny, load_model, load_processor

    if threads:
        torch.set_num_threads(int(threads))
    tmp = None
    if model_dir_or_config is None or isinstance(model_dir_or_config, dict):
        spec = dict(BENCH_SPEC, **(model_dir_or_config or {}))
        spec["min_pixels"] = spec["max_pixels"] = image_size * image_size
        tmp = tempfile.TemporaryDirectory(prefix="cwdpo-bench-")
        build_tiny(tmp.name, _bench_captions(200, caption_words, seed) + [prompt], spec, prompt, seed=seed)
        path = tmp.name
    else:
        path = str(model_dir_or_config)
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        processor = load_processor(path, min_pixels=image_size * image_size, max_pixels=image_size * image_size)
        model = load_model(path, dtype=dtype, trainable=True)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device)
        model.train()
        enc = Encoder(processor, prompt, max_response_tokens=64)
        rng = np.random.default_rng(seed)
        images = [Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8))
                  for _ in range(batch_pairs)]
        caps = _bench_captions(2 * batch_pairs, caption_words, seed + 1)
        rows = [(i, caps[i]) for i in range(batch_pairs)] + [(i, caps[batch_pairs + i]) for i in range(batch_pairs)]
        batch = enc.build(images, rows).to(device)
        w = torch.cat([torch.ones(batch_pairs), -torch.ones(batch_pairs)]).to(device)
        params = [p for p in model.parameters() if p.requires_grad]

        core = unwrap(model)

        def dpo_like(fn):
            out = fn()
            return (w.to(out.sums.dtype) * out.sums).sum() + 0.1 * out.means.sum(), out.sums.detach()

        def vision():  # the part both paths share: the vision tower once per unique image
            feats = torch.cat(image_features(core, batch.pixel_values, batch.image_grid_thw))
            return feats.square().mean(), None

        fns = {"concat": lambda: dpo_like(lambda: completion_logps(model, batch, enc.image_token_id))}
        for m in methods:
            fns[m] = (lambda m=m: dpo_like(
                lambda: completion_logps_shared_prefix(model, batch, enc.image_token_id, hidden=HIDDEN[m])))
        if vision_time:
            fns["vision"] = vision

        def step(fn):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss, sums = fn()
            loss.backward()
            if device == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            for p in params:
                p.grad = None
            return dt, sums

        times = {k: [] for k in fns}
        sums = {}
        for i in range(warmup + steps):
            order = list(fns) if i % 2 == 0 else list(reversed(list(fns)))
            for k in order:
                dt, sums[k] = step(fns[k])
                if i >= warmup:
                    times[k].append(dt)
        med = {k: statistics.median(v) for k, v in times.items()}
        n_img = int((batch.input_ids[0] == enc.image_token_id).sum())
        c0 = int(batch.completion_mask[0].nonzero()[0])
        out = {"concat_s": med["concat"], "shared_prefix_s": med[methods[0]],
               "shared_prefix_over_concat": med[methods[0]] / med["concat"]}
        for m in methods:
            out[f"{m}_s"] = med[m]
            out[f"{m}_over_concat"] = med[m] / med["concat"]
        if vision_time:
            out["vision_s"] = med["vision"]
        out.update({
            "method": methods[0], "image_tokens": n_img, "prompt_tokens": c0,
            "completion_tokens_mean": float(batch.completion_mask.sum(1).float().mean()),
            "rows": batch.n_rows, "batch_pairs": batch_pairs, "steps": steps, "dtype": dtype,
            "threads": torch.get_num_threads(), "device": device,
            "max_abs_diff_sums": max(float((sums[m] - sums["concat"]).abs().max()) for m in methods),
        })
        return out
    finally:
        if tmp is not None:
            tmp.cleanup()
