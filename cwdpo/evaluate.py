"""Caption generation (batched HF `generate`, beam search) and the evaluation summaries of a run.

Scoring itself (pycocoevalcap) lives in `cwdpo.metrics`, which needs no torch.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from .logprobs import Encoder


def prompt_batch(encoder: Encoder, images: list) -> dict:
    """Left-padded generation inputs (input_ids, attention_mask, mm_token_type_ids, pixel_values, grid)."""
    pixel_values, grids = encoder.encode_images(images)
    prompts = [encoder.prompt_ids(g)[0] for g in grids]
    length = max(len(p) for p in prompts)
    n = len(prompts)
    input_ids = torch.full((n, length), encoder.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, length - len(p):] = torch.tensor(p)
        attention_mask[i, length - len(p):] = 1
    mm = (input_ids == encoder.image_token_id).to(torch.int32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm,
            "pixel_values": pixel_values, "image_grid_thw": grids}


def decode(encoder: Encoder, sequences: torch.Tensor, prompt_len: int) -> list:
    texts = encoder.tokenizer.batch_decode(sequences[:, prompt_len:], skip_special_tokens=True)
    return [" ".join(t.split()) for t in texts]


@torch.no_grad()
def generate_captions(model, encoder: Encoder, image_paths: list, *, num_beams: int = 3, num_return: int = 1,
                      max_new_tokens: int = 40, batch_size: int = 64, do_sample: bool = False,
                      temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                      desc: str = "generate") -> list:
    """Captions for `image_paths`: a list (one per image) of `num_return` strings, best first.

    Beam search (`num_beams`, no sampling) by default; with `do_sample` the `num_return` samples use
    temperature/top-p and the generator is seeded per batch from `seed` (reproducible on CPU).
    """
    model.eval()
    out = []
    for s in tqdm(range(0, len(image_paths), batch_size), desc=desc, mininterval=2.0):
        chunk = image_paths[s:s + batch_size]
        inputs = prompt_batch(encoder, chunk)
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        kwargs = dict(max_new_tokens=max_new_tokens, num_return_sequences=num_return,
                      eos_token_id=encoder.eos_id, pad_token_id=encoder.pad_id)
        if do_sample:
            if seed is not None:
                torch.manual_seed(int(seed) * 100_003 + s)
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, num_beams=1)
        else:
            kwargs.update(do_sample=False, num_beams=max(num_beams, num_return))
        seqs = model.generate(**inputs, **kwargs)
        texts = decode(encoder, seqs, inputs["input_ids"].shape[1])
        for i in range(len(chunk)):
            out.append(texts[i * num_return:(i + 1) * num_return])
    return out


@torch.no_grad()
def pair_measures(model, encoder: Encoder, pairs: list, *, l_floor: float, tau: float, batch_size: int = 32) -> dict:
    """Teacher-forced measures on held-out preference pairs under one model (no reference needed).

    pref_acc = mean 1[log π(y_w|x) > log π(y_l|x)] (summed log-probs: the model ranks the reference caption
    above the negative); w_c = mean σ((ℓ̄(y_l|x) − ℓ_floor)/τ), the cooling weight CW-DPO would give these
    negatives; avg_logp_chosen/rejected = mean token-mean log-probs ℓ̄. Also per-source breakdowns.
    """
    from .logprobs import completion_logps
    from .logprobs import Collator
    model.eval()
    collate = Collator(encoder, "pair")
    sums_c, sums_r, means_c, means_r, sources = [], [], [], [], []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        items = [{**p, "pair_index": i} for i, p in enumerate(chunk)]
        from .logprobs import SeqBatch
        b = SeqBatch.from_dict(collate(items)["batch"]).to(model.device)
        out = completion_logps(model, b, encoder.image_token_id)
        n = len(chunk)
        sums_c += out.sums[:n].tolist()
        sums_r += out.sums[n:].tolist()
        means_c += out.means[:n].tolist()
        means_r += out.means[n:].tolist()
        sources += [p.get("source") or "unknown" for p in chunk]
    sc, sr = torch.tensor(sums_c, dtype=torch.float64), torch.tensor(sums_r, dtype=torch.float64)
    mc, mr = torch.tensor(means_c, dtype=torch.float64), torch.tensor(means_r, dtype=torch.float64)
    wc = torch.sigmoid((mr - float(l_floor)) / float(tau))
    acc = (sc > sr).double()
    result = {"pairs": len(pairs), "pref_acc": float(acc.mean()), "w_c": float(wc.mean()),
              "avg_logp_chosen": float(mc.mean()), "avg_logp_rejected": float(mr.mean()),
              "l_floor": float(l_floor), "tau": float(tau), "by_source": {}}
    for src in sorted(set(sources)):
        idx = torch.tensor([i for i, x in enumerate(sources) if x == src])
        result["by_source"][src] = {"pairs": len(idx), "pref_acc": float(acc[idx].mean()), "w_c": float(wc[idx].mean()),
                                    "avg_logp_rejected": float(mr[idx].mean())}
    return result


@torch.no_grad()
def test_measures(model, encoder: Encoder, records: list, *, ref_model=None, n_bins: int = 15,
                  batch_size: int = 32) -> dict:
    """Teacher-forced measures on the first reference caption of every test image (PAPER.md § Measurements).

    Entropy, top-1 mass, token-level ECE (`n_bins` equal-width bins; confidence = top-1 prob, correct =
    top-1 is the reference token) and Brier; with `ref_model`, TV and JS between the model's and the
    reference's next-token distributions. Streams over batches keeping per-position numbers only.
    Returns corpus means, the reliability bins, per-image means (for paired bootstraps) and the pooled
    per-position confidence/correctness.
    """
    from .dynamics import brier, ece, per_position, reliability_bins
    from .logprobs import completion_logps
    model.eval()
    keys = ["entropy", "top1", "conf", "correct"] + (["tv", "js"] if ref_model is not None else [])
    pooled = {k: [] for k in keys}
    per_image = {k: [] for k in keys if k not in ("conf", "correct")}
    position_image = []
    for s in range(0, len(records), batch_size):
        chunk = records[s:s + batch_size]
        batch = encoder.build([r.path for r in chunk], [(i, r.captions[0]) for i, r in enumerate(chunk)])
        batch = batch.to(model.device)
        out = completion_logps(model, batch, encoder.image_token_id, keep_logits=True)
        ref_logits = None
        if ref_model is not None:
            ref_logits = completion_logps(ref_model, batch.to(ref_model.device), encoder.image_token_id,
                                          keep_logits=True).logits.to(out.logits.device)
        pp = per_position(out.logits, out.targets, ref_logits)
        for k in keys:
            pooled[k].append(pp[k].double().cpu())
        rows = out.row.cpu()
        position_image += (rows + s).tolist()
        for i in range(len(chunk)):
            m = rows == i
            per_image.setdefault("positions", []).append(int(m.sum()))
            for k in keys:
                if k not in ("conf", "correct"):
                    per_image[k].append(float(pp[k].cpu()[m].mean()))
    cat = {k: torch.cat(v) for k, v in pooled.items()}
    result = {"images": len(records), "positions": int(cat["conf"].numel()),
              "entropy": float(cat["entropy"].mean()), "top1": float(cat["top1"].mean()),
              "accuracy": float(cat["correct"].mean()), "ece": ece(cat["conf"], cat["correct"], n_bins),
              "brier": brier(cat["conf"], cat["correct"]), "n_bins": n_bins,
              "reliability": reliability_bins(cat["conf"], cat["correct"], n_bins),
              "per_image": {"image_id": [r.image_id for r in records], **per_image},
              "conf": cat["conf"].tolist(), "correct": [int(x) for x in cat["correct"].tolist()],
              "position_image": position_image}
    if ref_model is not None:
        result["tv"] = float(cat["tv"].mean())
        result["js"] = float(cat["js"].mean())
    return result
