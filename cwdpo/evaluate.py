"""Evaluation of one model (`cwdpo evaluate`): beam-search captions of the test split and of every
evaluation set, multiple-choice accuracy, and the teacher-forced measures (held-out pairs; entropy,
top-1 mass, ECE, Brier, TV/JS to the reference on the test split) — docs/method.md § Measurements.

Scoring the captions (pycocoevalcap) lives in `cwdpo.metrics`, which needs no torch.
"""
from __future__ import annotations

import torch
from .data import grounding_truth, load_records, read_json, write_json
from .generation import decoding_settings, generate_captions
from .logprobs import Collator, Encoder, SeqBatch, completion_logps, make_encoder
from .losses import cooling_weight


@torch.no_grad()
def pair_measures(model, encoder: Encoder, pairs: list, *, l_floor: float, tau: float, batch_size: int = 32) -> dict:
    """Teacher-forced measures on held-out preference pairs under one model (no reference needed).

    pref_acc = mean 1[log π(y_w|x) > log π(y_l|x)] (summed log-probs: the model ranks the reference caption
    above the negative); w_c = mean σ((ℓ̄(y_l|x) − ℓ_floor)/τ), the cooling weight CW-DPO would give these
    negatives; avg_logp_chosen/rejected = mean token-mean log-probs ℓ̄. Also per-source breakdowns.
    """
    model.eval()
    collate = Collator(encoder, "pair")
    sums_c, sums_r, means_c, means_r, sources = [], [], [], [], []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        items = [{**p, "pair_index": i} for i, p in enumerate(chunk)]
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
    wc = cooling_weight(mr, l_floor=l_floor, tau=tau)
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
    """Teacher-forced measures on the first reference caption of every test image (docs/method.md § Measurements).

    Entropy, top-1 mass, token-level ECE (`n_bins` equal-width bins; confidence = top-1 prob, correct =
    top-1 is the reference token) and Brier; with `ref_model`, TV and JS between the model's and the
    reference's next-token distributions. Streams over batches keeping per-position numbers only.
    Returns corpus means, the reliability bins, per-image means (for paired bootstraps) and the pooled
    per-position confidence/correctness.
    """
    from .dynamics import brier, ece, per_position, reliability_bins
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


def caption_doc(model, encoder: Encoder, records: list, spec, objects: str | None,
                desc: str = "generate") -> dict:
    """Beam-search captions (the spec's beam size) of `records` with their references and what grounds
    them (attribute records, or the COCO objects file `objects`), for `cwdpo score`."""
    caps = generate_captions(model, encoder, [r.path for r in records], num_beams=spec.num_beams,
                             max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size, desc=desc)
    return {"captions": {r.image_id: c[0] for r, c in zip(records, caps)},
            "references": {r.image_id: r.captions for r in records},
            "decoding": {"backend": "hf", **decoding_settings(num_beams=spec.num_beams,
                                                              max_new_tokens=spec.max_new_tokens)},
            **grounding_truth(records, objects)}


def cooling_settings(spec) -> tuple[float, float]:
    """(ℓ_floor, τ) of the held-out pairs' cooling weight w_c = σ((ℓ̄ − ℓ_floor)/τ) (docs/method.md § CW-DPO):
    a Stage-2 run's own, as it trained with them (its metrics.json: a resolved "mean" floor, a recipe's own
    τ, from its "hparams"); the config's for other models. A metrics.json written before runs recorded their
    resolved hyperparameters gives its top-level ℓ_floor and, lacking τ, the config's τ."""
    if not spec.run_metrics:
        return float(spec.l_floor), float(spec.tau)
    m = read_json(spec.run_metrics)
    hp = m.get("hparams") or m
    return float(hp["l_floor"]), float(hp["tau"] if hp.get("tau") is not None else spec.tau)


def run(spec, captions_out: str, measures_out: str, threads: int = 0) -> None:
    """Evaluate `spec.model` (an `EvalSpec`): captions of the test split (and its top-k beams), of every
    evaluation set and the MCQ sets, then the teacher-forced measures; writes `captions_out`, each set's
    `out`, and `measures_out`."""
    from .models import load_for_inference, set_threads
    from .negatives import read_pairs
    set_threads(threads)
    records = load_records(spec.data)
    model, processor = load_for_inference(spec.model, spec.vlm)
    encoder = make_encoder(processor, spec.vlm, pixel_cache_mb=spec.pixel_cache_mb)  # test images: 3 passes
    doc = caption_doc(model, encoder, records, spec, spec.objects)
    if spec.topk_beams > 1:  # the "top-5 beams" of Figure F-stage1: all k beams of a size-k search
        k = spec.topk_beams
        beams = generate_captions(model, encoder, [r.path for r in records], num_beams=k, num_return=k,
                                  max_new_tokens=spec.max_new_tokens, batch_size=max(1, spec.batch_size // k),
                                  desc=f"top-{k} beams")
        doc["beams"] = {r.image_id: b for r, b in zip(records, beams)}
        doc["beams_decoding"] = {"backend": "hf", **decoding_settings(num_beams=k, num_return=k,
                                                                      max_new_tokens=spec.max_new_tokens)}
    write_json(captions_out, doc)
    for es in spec.eval_sets:  # Flickr30k / NoCaps / shapes OOD: captions with the loaded model
        recs = load_records(es.data)
        set_doc = caption_doc(model, encoder, recs, spec, es.objects, desc=f"generate {es.name}")
        if es.domains:
            set_doc["domains"] = {r.image_id: r.domain for r in recs}
        write_json(es.out, set_doc)
    for m in spec.mcq_sets:  # multiple-choice VQA accuracy with the loaded model
        from .mcq import evaluate_set
        write_json(m.out, evaluate_set(model, processor, m, on_bad_input=spec.data.on_bad_input), indent=None)
    for p in spec.pope_sets:  # POPE: object-existence questions, answered greedily
        from .pope import evaluate_pope
        write_json(p.out, evaluate_pope(model, encoder, p), indent=None)
    l_floor, tau = cooling_settings(spec)
    measures = {"heldout": pair_measures(model, encoder, read_pairs(spec.heldout_pairs, spec.vlm.prompt),
                                         l_floor=l_floor, tau=tau,
                                         batch_size=spec.forward_batch_size)}
    ref_model = load_for_inference(spec.reference, spec.vlm, processor=False)[0] if spec.reference else None
    measures["test"] = test_measures(model, encoder, records, ref_model=ref_model, n_bins=spec.n_bins,
                                     batch_size=spec.forward_batch_size)
    measures["test"]["reference"] = spec.reference
    measures["device"] = str(model.device)  # where the evaluated model ran
    write_json(measures_out, measures, indent=None)
