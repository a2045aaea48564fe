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
before a row's first completion-mask position; nothing about the collator's row order is assumed. The
decoder runs once over one packed row per group,
``[prefix_g | y^(r1)_1..m1-1 | y^(r2)_1..m2-1 | ... | pad]``, with a 4-D mask in which the prefix is causal,
every completion segment sees the whole prefix and itself causally (not the other completions), and
padding sees only itself. It is one autograd graph, so gradients reach the prefix (and the vision tower)
through every completion; the prefix keys/values are reused by all completions inside the same attention
call; no cache object is involved, so it also works under gradient checkpointing, and every module is
called once per step, exactly as `completion_logps` does (so DeepSpeed ZeRO-3 gathers each layer once).
A two-pass variant over a prefix KV cache, kept for comparison, lives in `cwdpo.bench.prefix_cache`.

Positions: a token keeps the Qwen2.5-VL mRoPE position (t, h, w) it has in `batch.position_ids`, i.e. a
completion token ``y_i`` of a row whose prompt has positions ``p`` sits at ``max(p) + i`` on all three
axes; rope is relative, so the same rotations as in the full sequence give the same attention scores.
The first response token ``y_1`` is predicted by the prefix's last hidden state, ``y_{i+1}`` by the hidden
state at ``y_i``; the last token ``y_m`` (the newline after ``<|im_end|>`` for Qwen) is scored but never fed.

A ready 4-D mask dict goes to the text model (which then skips its own mask builder): a boolean mask for
"sdpa" (the default), an additive one for "eager"; flash-attention / flex are refused.
"""
from __future__ import annotations

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
    """Token embeddings of `ids` [B, S] with the image tokens of row b replaced by feats[images[b]] (no
    features: a batch without images, the text input)."""
    embeds = core.get_input_embeddings()(ids)
    if not feats:
        if bool((ids == image_token_id).any()):
            raise ValueError("image tokens in a batch without images")
        return embeds
    per_row = torch.cat([feats[i] for i in images]).to(embeds.dtype)
    mask = (ids == image_token_id).unsqueeze(-1).expand_as(embeds)
    if int(mask[..., 0].sum()) != per_row.shape[0]:
        raise ValueError(f"image tokens ({int(mask[..., 0].sum())}) and image features ({per_row.shape[0]}) "
                         "do not match")
    return embeds.masked_scatter(mask, per_row)


def _pad_id(image_token_id: int) -> int:
    return 1 if image_token_id == 0 else 0


def _run_text(text_model, embeds, mask4d, positions, **cache):
    """The text model over ready embeddings with a 4-D mask; `cache` is a cache keyword (the benchmark's
    two-pass variant passes one)."""
    out = text_model(inputs_embeds=embeds, attention_mask={"full_attention": mask4d}, position_ids=positions,
                     use_cache=False, **cache)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


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


def completion_logps_shared_prefix(model, batch: SeqBatch, image_token_id: int, keep_logits: bool = False,
                                   hidden=_packed_hidden) -> CompletionLogps:
    """`completion_logps` with each shared image + prompt prefix evaluated once.

    model: a Qwen2.5-VL `...ForConditionalGeneration`, possibly under peft / DeepSpeed / DDP wrappers.
    batch: a right-padded `SeqBatch` (input_ids, attention_mask, completion_mask [N, L]; position_ids
    [3, N, L]; row_image [N]; pixel_values [P, D] and image_grid_thw [M, 3] of the M unique images); rows
    that share (row_image, prompt ids) form a group, e.g. chosen_i / rejected_i of a pair collator.
    Returns the same `CompletionLogps` as `completion_logps(model, batch, image_token_id, keep_logits)`:
    token_logps [T] (and logits [T, V] / targets [T] when `keep_logits`) over the scored positions in
    row-major order, row [T], and per-row sums / means / counts [N]. The vision tower runs once per unique
    image; the decoder once over one packed row per group (`hidden` computes the hidden states that predict
    the scored tokens; the benchmark swaps in a two-pass variant, `cwdpo.bench.prefix_cache`).
    """
    core = unwrap(model)
    text_model = core.model.language_model
    _check_model(text_model)
    grp = prefix_groups(batch)
    target_mask = batch.completion_mask.bool()[:, 1:]
    rows, cols = target_mask.nonzero(as_tuple=True)
    targets = batch.input_ids[rows, cols + 1]
    if rows.numel() == 0:
        return completion_logps(model, batch, image_token_id, keep_logits)
    feats = image_features(core, batch.pixel_values, batch.image_grid_thw) if batch.image_grid_thw.shape[0] else []
    h = hidden(core, text_model, batch, grp, feats, image_token_id, rows, cols)
    return logps_from_hidden(core, h, targets, rows, batch.n_rows, keep_logits)
