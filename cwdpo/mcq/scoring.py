"""Scoring a model on multiple-choice items: option log-likelihoods or a parsed generated letter, plain and
circular accuracy (MMBench's CircularEval: an item counts only when every rotation is answered correctly).

- scoring="loglik": each option is scored by the model's mean token log-probability ℓ̄ of the response
  "<letter>. <option text>" (as the chat template closes the assistant turn, `<|im_end|>\n` for Qwen, as
  everywhere in cwdpo) after the prompt; the
  prediction is the argmax (ties: the earliest letter).
- scoring="generate": greedy decoding; `parse_letter` maps the output to a letter (unparseable = wrong).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from tqdm import tqdm

from ..generation import prompt_batch
from ..logprobs import Encoder, SeqBatch, completion_logps
from .items import ANSWER_INSTRUCTION, LETTERS, item_image, presentations, render_text
from .parse import parse_letter


def _encoder_factory(encoder_factory_or_processor, max_response_tokens: int, cache_size: int = 512):
    """A prompt -> Encoder function (LRU-cached): from a processor, an Encoder (its processor and response
    limit are reused), or a callable returned as is (cached)."""
    x = encoder_factory_or_processor
    if isinstance(x, Encoder):
        proc, limit = x.processor, x.max_response_tokens

        def make(prompt):
            return Encoder(proc, prompt, max_response_tokens=limit)
    elif hasattr(x, "image_processor") and hasattr(x, "tokenizer"):
        def make(prompt):
            return Encoder(x, prompt, max_response_tokens=max_response_tokens)
    elif callable(x):
        make = x
    else:
        raise TypeError("encoder_factory_or_processor must be a processor, an Encoder or a prompt -> Encoder callable")
    cache: OrderedDict = OrderedDict()

    def get(prompt):
        if prompt in cache:
            cache.move_to_end(prompt)
            return cache[prompt]
        enc = make(prompt)
        cache[prompt] = enc
        if len(cache) > cache_size:
            cache.popitem(last=False)
        return enc
    return get


def concat_batches(batches: list, keys: list, pad_id: int):
    """One `SeqBatch` from several (right-padded to the longest); batches with equal `keys` show the same
    images, which are stored once (the first batch's pixels)."""
    length = max(b.input_ids.shape[1] for b in batches)
    ids, att, comp, pos, rimg, pix, grids = [], [], [], [], [], [], []
    offset_of: dict = {}
    n_img = 0
    for b, key in zip(batches, keys):
        n, pad = b.input_ids.shape
        pad = length - pad
        ids.append(torch.cat([b.input_ids, torch.full((n, pad), pad_id, dtype=b.input_ids.dtype)], 1))
        att.append(torch.cat([b.attention_mask, torch.zeros((n, pad), dtype=b.attention_mask.dtype)], 1))
        comp.append(torch.cat([b.completion_mask, torch.zeros((n, pad), dtype=torch.bool)], 1))
        pos.append(torch.cat([b.position_ids, torch.zeros((3, n, pad), dtype=b.position_ids.dtype)], 2))
        if key not in offset_of:
            offset_of[key] = n_img
            pix.append(b.pixel_values)
            grids.append(b.image_grid_thw)
            n_img += b.image_grid_thw.shape[0]
        rimg.append(b.row_image + offset_of[key])
    return SeqBatch(torch.cat(ids), torch.cat(att), torch.cat(comp), torch.cat(pos, 1), torch.cat(rimg),
                    torch.cat(pix), torch.cat(grids))


def _chunks(units: list, sizes: list, batch_size: int):
    """Consecutive runs of units with at most `batch_size` rows in all (at least one unit per run)."""
    run, rows = [], 0
    for u, s in zip(units, sizes):
        if run and rows + s > batch_size:
            yield run
            run, rows = [], 0
        run.append(u)
        rows += s
    if run:
        yield run


def loglik_scores(model, encoder_for, items: list, pres: list, batch_size: int = 16,
                  progress: bool = False) -> list:
    """Mean token log-probs ℓ̄ of every presentation's option responses (a list per presentation, in shown
    order). Units (one presentation = its N option rows) are packed `batch_size` rows per forward; the
    rotations of one item in a forward share one image. Adds `truncated` (responses cut by the Encoder's
    `max_response_tokens`) to each result dict."""
    model.eval()
    out = []
    runs = list(_chunks(pres, [len(p.responses) for p in pres], max(1, int(batch_size))))
    encoded = (None, None)  # (item index, its encoded image): an item's rotations come one after another
    for run in tqdm(runs, desc="mcq loglik", disable=not progress, mininterval=2.0):
        batches, keys, truncated = [], [], []
        enc = None
        for p in run:
            enc = encoder_for(p.prompt)
            if encoded[0] != p.item_index:
                encoded = (p.item_index, enc.encode_images([item_image(items[p.item_index])]))
            batches.append(enc.build_encoded(*encoded[1], [(0, r) for r in p.responses]))
            keys.append(p.item_index)
            truncated.append(sum(enc.truncated(p.responses)))
        batch = concat_batches(batches, keys, enc.pad_id).to(model.device)
        with torch.no_grad():
            means = completion_logps(model, batch, enc.image_token_id).means.double().cpu().tolist()
        k = 0
        for p, t in zip(run, truncated):
            n = len(p.responses)
            out.append({"scores": means[k:k + n], "truncated": t})
            k += n
    return out


def generate_answers(model, encoder_for, items: list, pres: list, batch_size: int = 16,
                     max_new_tokens: int = 16, progress: bool = False) -> list:
    """Greedy outputs (whitespace-normalised, special tokens dropped) of `batch_size` presentations per
    `generate` call; explicit greedy decoding (`decoding_settings`), never the model's generation_config."""
    from ..generation import decoding_settings, neutral_generation_config
    model.eval()
    out = []
    settings = decoding_settings(num_beams=1, max_new_tokens=max_new_tokens)
    starts = range(0, len(pres), max(1, int(batch_size)))
    for s in tqdm(starts, desc="mcq generate", disable=not progress, mininterval=2.0):
        run = pres[s:s + max(1, int(batch_size))]
        encs = [encoder_for(p.prompt) for p in run]
        cache: dict = {}
        images = []
        for p in run:
            if p.item_index not in cache:
                cache[p.item_index] = item_image(items[p.item_index])
            images.append(cache[p.item_index])
        inputs = {k: v.to(model.device) for k, v in prompt_batch(encs, images).items()}
        with torch.no_grad(), neutral_generation_config(model, encs[0]):
            seqs = model.generate(**inputs, **settings, eos_token_id=encs[0].eos_id, pad_token_id=encs[0].pad_id)
        texts = encs[0].tokenizer.batch_decode(seqs[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        out += [{"output": " ".join(t.split())} for t in texts]
    return out


def evaluate_mcq(model, encoder_factory_or_processor, items: list, scoring: str = "loglik",
                 circular: bool = False, batch_size: int = 16, *, max_new_tokens: int = 16,
                 max_response_tokens: int = 256, scorer=None, progress: bool = False) -> dict:
    """Accuracy of `model` on `items` (deterministic: no sampling; same inputs, same batches).

    scoring "loglik": the prediction is the letter whose response "<letter>. <option>" has the highest mean
    token log-prob (ties: the earliest letter); "generate": `parse_letter` of the greedy output (None =
    wrong). `encoder_factory_or_processor`: a processor (Encoders built with `max_response_tokens`), an
    Encoder (its processor and limit reused) or a prompt -> Encoder callable; one Encoder per distinct
    prompt. `scorer(items, presentations) -> [{"pred": letter position or None, ...}]` replaces the model
    (tests; other scorers). `batch_size`: option rows per forward (loglik) or prompts per generate call.

    With `circular`, every N-option item is shown under its N rotations and is correct only when all are;
    otherwise only rotation 0 (the source order) is shown. Returns {accuracy, n, correct, accuracy_plain
    (rotation 0 alone), accuracy_circular (when circular), by_category {cat: {n, accuracy,
    accuracy_plain}}, unparsed, truncated_responses, items: [{id, category, answer, n_options, correct,
    correct_plain, predictions: [{rotation, order, answer_letter, pred_letter, pred_option, correct,
    scores | output}]}], settings}.
    """
    if scoring not in ("loglik", "generate"):
        raise ValueError(f"scoring must be 'loglik' or 'generate', not {scoring!r}")
    pres = presentations(items, circular)
    if scorer is not None:
        results = list(scorer(items, pres))
        if len(results) != len(pres):
            raise ValueError(f"scorer returned {len(results)} results for {len(pres)} presentations")
    else:
        encoder_for = _encoder_factory(encoder_factory_or_processor, max_response_tokens)
        if scoring == "loglik":
            results = loglik_scores(model, encoder_for, items, pres, batch_size, progress)
        else:
            results = generate_answers(model, encoder_for, items, pres, batch_size, max_new_tokens, progress)
    records = [{"id": it.id, "category": it.category, "answer": it.answer, "n_options": len(it.options),
                "predictions": []} for it in items]
    unparsed = truncated = 0
    for p, res in zip(pres, results):
        item = items[p.item_index]
        res = dict(res)
        if "pred" in res:
            pred = res.pop("pred")
        elif "scores" in res:
            scores = res["scores"]
            pred = max(range(len(scores)), key=lambda j: (scores[j], -j))
        else:
            shown = [render_text(item.options[src].strip(), len(item.images)) for src in p.order]
            pred = parse_letter(res.get("output", ""), shown)
        if pred is not None and not 0 <= int(pred) < len(p.order):
            pred = None
        unparsed += pred is None
        truncated += int(res.pop("truncated", 0))
        pos = p.answer_position(item)
        rec = {"rotation": p.rotation, "order": list(p.order), "answer_letter": LETTERS[pos],
               "pred_letter": None if pred is None else LETTERS[int(pred)],
               "pred_option": None if pred is None else p.order[int(pred)],
               "correct": pred is not None and int(pred) == pos, **res}
        records[p.item_index]["predictions"].append(rec)
    for rec in records:
        rec["correct_plain"] = bool(rec["predictions"][0]["correct"])
        rec["correct"] = all(x["correct"] for x in rec["predictions"])

    def acc(rs, key):
        return sum(r[key] for r in rs) / len(rs) if rs else float("nan")

    by_category = {}
    for cat in sorted({r["category"] or "(none)" for r in records}):
        rs = [r for r in records if (r["category"] or "(none)") == cat]
        by_category[cat] = {"n": len(rs), "accuracy": acc(rs, "correct"), "accuracy_plain": acc(rs, "correct_plain")}
    result = {"accuracy": acc(records, "correct"), "n": len(records), "correct": sum(r["correct"] for r in records),
              "accuracy_plain": acc(records, "correct_plain"), "by_category": by_category,
              "unparsed": unparsed, "truncated_responses": truncated, "presentations": len(pres),
              "items": records,
              "settings": {"scoring": scoring, "circular": bool(circular), "batch_size": int(batch_size),
                           "max_new_tokens": int(max_new_tokens) if scoring == "generate" else None,
                           "max_response_tokens": int(max_response_tokens), "custom_scorer": scorer is not None,
                           "response_format": "<letter>. <option>", "letters": LETTERS,
                           "rotation": "letter j shows option (j + r) mod N", "instruction": ANSWER_INSTRUCTION,
                           "multi_image": "side by side, left to right, common height, 8-px white gap"}}
    if circular:
        result["accuracy_circular"] = result["accuracy"]
    return result


def evaluate_set(model, processor, spec, on_bad_input: str) -> dict:
    """Accuracy of `model` on one configured MCQ set (an `McqSpec`): the generated `shapes` set over the
    first `images` images of its split, or the set's files; with the loader's summary."""
    from ..data import load_records
    if spec.format == "shapes":
        from .shapes_set import shapes_mcq
        records = load_records(spec.data)[: spec.images or None]
        items, summary = shapes_mcq(records, seed=spec.seed, per_image=spec.per_image), {}
    else:
        from .loaders import load_mcq
        items, summary = load_mcq(spec.path, spec.format, spec.image_root, on_bad_input=on_bad_input)
    result = evaluate_mcq(model, processor, items, scoring=spec.scoring, circular=spec.circular,
                          batch_size=spec.batch_size, max_new_tokens=spec.max_new_tokens)
    return {**result, "load_summary": summary}
