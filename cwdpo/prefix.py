"""Shared-prefix forward: the image + prompt prefix once per example, every response on top of it.

In DPO / CW-DPO the chosen and rejected rows of a pair (and SFT-C's positive and negative rows) show the
same image under the same chat prompt. At paper scale the prefix is ~390 image tokens + the prompt while a
caption is ~15 tokens, so `completion_logps`, which runs every row in full, spends about half of a pair
step recomputing the same prefix. `completion_logps_shared_prefix` returns exactly what `completion_logps`
returns (same fields, same row-major order of the scored positions, the same gradients up to the order
of floating-point sums: a shared prefix receives its rows' gradients summed before, not after, its
backward) but evaluates the
decoder on each distinct prefix only once, so a group of k rows costs one prefix + k short completions.

Rows are grouped by (row_image, prompt token ids, prompt mRoPE positions), the prompt being the tokens
before a row's first completion-mask position; nothing about the collator's row order is assumed. Two
strategies, both one autograd graph, so gradients reach the prefix (and the vision tower) through every
completion:

- ``method="packed"`` (default): one decoder pass over one packed row per group,
  ``[prefix_g | y^(r1)_1..m1-1 | y^(r2)_1..m2-1 | ... | pad]``, with a 4-D mask in which the prefix
  is causal, every completion segment sees the whole prefix and itself causally (not the other
  completions), and padding sees only itself. The prefix keys/values are reused by all completions inside
  the same attention call; no cache object is involved, so it also works under gradient checkpointing.
- ``method="cache"``: two passes. The prefixes, left-padded to a common length P so that they all end at
  column P-1, run once and their per-layer (post-rope) keys/values are recorded; these are expanded to the
  rows of each group with ``index_select`` (its backward sums the rows' key/value gradients back into the
  prefix) and served through a read-only cache to a second pass over the right-padded completions, which
  attends to ``[prefix mask | causal completion mask]``. Under gradient checkpointing transformers drops
  the cache inside the checkpointed layers, so this method refuses to run there.

Positions: a token keeps the Qwen2.5-VL mRoPE position (t, h, w) it has in `batch.position_ids`, i.e. a
completion token ``y_i`` of a row whose prompt has positions ``p`` sits at ``max(p) + i`` on all three
axes; rope is relative, so the same rotations as in the full sequence give the same attention scores.
The first response token ``y_1`` is predicted by the prefix's last hidden state, ``y_{i+1}`` by the hidden
state at ``y_i``; the last token ``y_m`` (``<|im_end|>``) is scored but never fed.

Both strategies pass a ready 4-D mask dict to the text model (which then skips its own mask builder): a
boolean mask for "sdpa" (the default), an additive one for "eager"; flash-attention / flex are refused.
"packed" calls every module once per step, exactly as `completion_logps` does (so DeepSpeed ZeRO-3 gathers
each layer once); "cache" runs the decoder twice.
"""
from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass

import torch

from .logprobs import CompletionLogps, SeqBatch, completion_logps, image_features, logps_from_hidden
from .models import unwrap

_MASK_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass
class PrefixGroups:
    """Rows of a `SeqBatch` grouped by shared prefix.

    starts [N]: column of each row's first completion token (= its prompt length c0); lengths [N]: number of
    completion tokens m (0 for a row without any); group [N]: group of each row (-1 for rows without a
    completion); members: the rows of each group in batch order; prefix_rows [G]: one representative row per
    group (its prompt is the group's prefix); prefix_len [G]: the prefix length of each group.
    """

    starts: list
    lengths: list
    group: list
    members: list
    prefix_rows: list
    prefix_len: list

    @property
    def n_groups(self) -> int:
        return len(self.members)


def prefix_groups(batch: SeqBatch) -> PrefixGroups:
    """Group the rows of `batch` by (row_image, prompt token ids, prompt positions).

    A row's completion must be one contiguous run of `completion_mask` that starts after at least one prompt
    token, with `attention_mask` 1 on the whole prompt and completion (the right-padded layout that
    `Encoder.build` produces); anything else raises ValueError.
    """
    cm = batch.completion_mask.bool().cpu()
    am = batch.attention_mask.bool().cpu()
    ids = batch.input_ids.cpu()
    pos = batch.position_ids.cpu()
    row_image = batch.row_image.cpu().tolist()
    starts, lengths, group = [], [], []
    members, prefix_rows, prefix_len = [], [], []
    index: dict = {}
    for r in range(batch.n_rows):
        nz = cm[r].nonzero().flatten()
        m = int(nz.numel())
        if m == 0:
            starts.append(0)
            lengths.append(0)
            group.append(-1)
            continue
        c0 = int(nz[0])
        if int(nz[-1]) != c0 + m - 1:
            raise ValueError(f"row {r}: the completion mask is not one contiguous run")
        if c0 == 0:
            raise ValueError(f"row {r}: the completion starts at column 0 (no prompt to predict its first token)")
        if not bool(am[r, : c0 + m].all()):
            raise ValueError(f"row {r}: attention_mask is 0 inside the prompt or the completion "
                             "(expected right padding only)")
        key = (int(row_image[r]), tuple(ids[r, :c0].tolist()), tuple(pos[:, r, :c0].flatten().tolist()))
        g = index.get(key)
        if g is None:
            g = index[key] = len(members)
            members.append([])
            prefix_rows.append(r)
            prefix_len.append(c0)
        members[g].append(r)
        starts.append(c0)
        lengths.append(m)
        group.append(g)
    return PrefixGroups(starts, lengths, group, members, prefix_rows, prefix_len)


def _check_model(text_model) -> None:
    impl = getattr(text_model.config, "_attn_implementation", None) or "eager"
    if impl not in _MASK_IMPLEMENTATIONS:
        raise NotImplementedError(f"completion_logps_shared_prefix needs an attention implementation that takes a "
                                  f"4-D mask ({', '.join(_MASK_IMPLEMENTATIONS)}), not {impl!r}")
    types = set(getattr(text_model.config, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"}:
        raise NotImplementedError(f"sliding-window layers are not supported (layer types {sorted(types)})")


def _attention_mask(allowed: torch.Tensor, dtype, text_model) -> torch.Tensor:
    """[B, Q, K] bool (True: query attends key) → the [B, 1, Q, K] mask the attention implementation takes:
    boolean for sdpa (as transformers' own `sdpa_mask`), additive (0 / the dtype's minimum) for eager."""
    if getattr(text_model.config, "_attn_implementation", None) == "sdpa":
        return allowed.unsqueeze(1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def _embed(core, ids: torch.Tensor, feats: list, images: list, image_token_id: int) -> torch.Tensor:
    """Token embeddings of `ids` [B, S] with the image tokens of row b replaced by feats[images[b]]."""
    embeds = core.get_input_embeddings()(ids)
    per_row = torch.cat([feats[i] for i in images]).to(embeds.dtype)
    mask = (ids == image_token_id).unsqueeze(-1).expand_as(embeds)
    if int(mask[..., 0].sum()) != per_row.shape[0]:
        raise ValueError(f"image tokens ({int(mask[..., 0].sum())}) and image features ({per_row.shape[0]}) "
                         "do not match")
    return embeds.masked_scatter(mask, per_row)


def _pad_id(image_token_id: int) -> int:
    return 1 if image_token_id == 0 else 0


def _run_text(text_model, embeds, mask4d, positions, cache=None):
    kwargs = dict(inputs_embeds=embeds, attention_mask={"full_attention": mask4d}, position_ids=positions,
                  use_cache=False)
    if cache is not None:
        kwargs[_cache_kwarg(text_model)] = cache
    out = text_model(**kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


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


def _packed_hidden(core, text_model, batch, grp, feats, image_token_id, rows, cols):
    """Method "packed": hidden states [T, H] predicting each scored token (rows/cols of completion_mask[:, 1:])."""
    device = batch.input_ids.device
    G = grp.n_groups
    src_row, src_col, seg, offsets, lens = [], [], [], {}, []
    for g, rs in enumerate(grp.members):
        p, pr = grp.prefix_len[g], grp.prefix_rows[g]
        sr, sc, sg = [pr] * p, list(range(p)), [0] * p
        for j, r in enumerate(rs):
            offsets[r] = len(sc)
            n_feed = grp.lengths[r] - 1  # y_1..y_{m-1}; y_m is scored, never fed
            c0 = grp.starts[r]
            sr += [r] * n_feed
            sc += list(range(c0, c0 + n_feed))
            sg += [j + 1] * n_feed
        src_row.append(sr)
        src_col.append(sc)
        seg.append(sg)
        lens.append(len(sc))
    S = max(lens)
    valid = torch.zeros(G, S, dtype=torch.bool)
    srow = torch.zeros(G, S, dtype=torch.long)
    scol = torch.zeros(G, S, dtype=torch.long)
    segt = torch.full((G, S), -1, dtype=torch.long)
    for g in range(G):
        n = lens[g]
        valid[g, :n] = True
        srow[g, :n] = torch.tensor(src_row[g])
        scol[g, :n] = torch.tensor(src_col[g])
        segt[g, :n] = torch.tensor(seg[g])
    valid, srow, scol, segt = valid.to(device), srow.to(device), scol.to(device), segt.to(device)
    ids = torch.where(valid, batch.input_ids[srow, scol], _pad_id(image_token_id))
    positions = torch.where(valid.unsqueeze(0), batch.position_ids[:, srow, scol], 0)
    embeds = _embed(core, ids, feats, [int(batch.row_image[grp.prefix_rows[g]]) for g in range(G)], image_token_id)
    ar = torch.arange(S, device=device)
    causal = ar.view(1, S, 1) >= ar.view(1, 1, S)                           # key k <= query q
    seg_q, seg_k = segt.unsqueeze(2), segt.unsqueeze(1)
    allowed = causal & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    allowed = allowed | torch.eye(S, dtype=torch.bool, device=device)      # padding attends to itself only
    hidden = _run_text(text_model, embeds, _attention_mask(allowed, embeds.dtype, text_model), positions)
    # map each scored (row, col) to its packed (group, column)
    starts = torch.tensor(grp.starts, device=device)
    groups = torch.tensor(grp.group, device=device)
    plen = torch.tensor(grp.prefix_len, device=device)
    off = torch.tensor([offsets.get(r, 0) for r in range(batch.n_rows)], device=device)
    g_of = groups[rows]
    pcol = torch.where(cols < starts[rows], plen[g_of] - 1, off[rows] + cols - starts[rows])
    return hidden[g_of, pcol]


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
    prefix_hidden = _run_text(text_model, embeds, _attention_mask(allowed, embeds.dtype, text_model), positions, cache)
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
                            cache.extend(kv_rows))
    if cache.calls != len(text_model.layers):
        raise RuntimeError("the completion pass did not read the prefix cache in every layer")
    starts = torch.tensor(grp.starts, device=device)
    lrow = torch.tensor([row_pos.get(r, 0) for r in range(N)], device=device)
    first = (cols < starts[rows]).unsqueeze(-1)
    h_cont = cont_hidden[lrow[rows], (cols - starts[rows]).clamp(min=0, max=Lc - 1)]
    return torch.where(first, h_first, h_cont)


def completion_logps_shared_prefix(model, batch: SeqBatch, image_token_id: int, keep_logits: bool = False,
                                   method: str = "packed") -> CompletionLogps:
    """`completion_logps` with each shared image + prompt prefix evaluated once.

    model: a Qwen2.5-VL `...ForConditionalGeneration`, possibly under peft / DeepSpeed / DDP wrappers.
    batch: a right-padded `SeqBatch` (input_ids, attention_mask, completion_mask [N, L]; position_ids
    [3, N, L]; row_image [N]; pixel_values [P, D] and image_grid_thw [M, 3] of the M unique images); rows
    that share (row_image, prompt ids) form a group, e.g. chosen_i / rejected_i of a pair collator.
    Returns the same `CompletionLogps` as `completion_logps(model, batch, image_token_id, keep_logits)`:
    token_logps [T] (and logits [T, V] / targets [T] when `keep_logits`) over the scored positions in
    row-major order, row [T], and per-row sums / means / counts [N]. The vision tower runs once per unique
    image; the decoder runs once per distinct prefix plus once per completion token (see the module
    docstring for `method` "packed" and "cache").
    """
    core = unwrap(model)
    text_model = core.model.language_model
    _check_model(text_model)
    grp = prefix_groups(batch)
    target_mask = batch.completion_mask.bool()[:, 1:]
    rows, cols = target_mask.nonzero(as_tuple=True)
    targets = batch.input_ids[rows, cols + 1]
    n = batch.n_rows
    if rows.numel() == 0:
        return completion_logps(model, batch, image_token_id, keep_logits)
    feats = image_features(core, batch.pixel_values, batch.image_grid_thw)
    if method == "packed":
        h = _packed_hidden(core, text_model, batch, grp, feats, image_token_id, rows, cols)
    elif method == "cache":
        h = _cache_hidden(core, text_model, batch, grp, feats, image_token_id, rows, cols)
    else:
        raise ValueError(f"method must be 'packed' or 'cache', not {method!r}")
    return logps_from_hidden(core, h, targets, rows, n, keep_logits)


# ---------------------------------------------------------------------------------------------------------
# benchmark

BENCH_SPEC = dict(vocab_size=512, min_pixels=448 * 448, max_pixels=448 * 448, hidden_size=256,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=768, num_hidden_layers=4,
                  vision_depth=1, vision_hidden_size=32, vision_intermediate_size=64, vision_num_heads=1)

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

    from .logprobs import Encoder
    from .models import build_tiny, load_model, load_processor

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
                lambda: completion_logps_shared_prefix(model, batch, enc.image_token_id, method=m)))
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
