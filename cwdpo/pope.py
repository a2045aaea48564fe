"""POPE: object-existence questions ("Is there a {object} in the image?", Li et al. 2023, "Evaluating Object
Hallucination in Large Vision-Language Models"), their three negative-sampling settings, answer parsing and
scores (docs/method.md § POPE).

- Questions per image: every object of the image ("yes") and as many absent objects ("no"), drawn by the
  setting: `random` (uniformly among absent objects), `popular` (the most frequent objects of the training
  images), `adversarial` (the objects that co-occur most often with the image's objects in the training
  images). `shapes`: an object is a (colour, shape) pair of the attribute record; COCO: the files of the POPE
  release, one JSON object per line {question_id, image, text, label} (`load_pope_file`).
- Parsers of a generated answer ("yes" / "no" / None = unparsed): `original` (POPE's own: the first sentence,
  "no" / "not" among its words → no, anything else → yes), `exact` (lmms-eval: the whole answer, lower-cased
  and stripped, is "yes" or "no"), `yes_xor_no` (VLMEvalKit: "yes" xor "no" among the words, else unknown).
- Scores with "yes" the positive class: accuracy, precision, recall, F1, the yes-ratio (share of answers
  parsed "yes") and the number of unparsed answers; an unparsed answer is wrong, and a miss when the truth
  is "yes".
torch is imported only by the answering functions (`answer_questions`, `evaluate_pope`).
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from itertools import combinations

POPE_SETTINGS = ("random", "popular", "adversarial")
POPE_PARSERS = ("original", "exact", "yes_xor_no")


def question(obj: str) -> str:
    """POPE's question for an object name."""
    return f"Is there a {obj} in the image?"


# ---------------------------------------------------------------------------------------------------
# answers

def parse_original(text: str) -> str:
    """POPE's parser: the first sentence, commas dropped; "no" or "not" among its words → no, else yes."""
    first = text.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def parse_exact(text: str) -> str | None:
    """lmms-eval's: the whole answer, lower-cased and stripped, must be "yes" or "no"."""
    t = text.lower().strip()
    return t if t in ("yes", "no") else None


def parse_yes_xor_no(text: str) -> str | None:
    """VLMEvalKit's: the answer's words (lower-cased, punctuation dropped) hold "yes" or "no" but not both."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    if ("yes" in words) == ("no" in words):
        return None
    return "yes" if "yes" in words else "no"


PARSERS = {"original": parse_original, "exact": parse_exact, "yes_xor_no": parse_yes_xor_no}


def parse_answer(text: str, parser: str = "original") -> str | None:
    if parser not in PARSERS:
        raise ValueError(f"POPE parser {parser!r}: one of {', '.join(POPE_PARSERS)}")
    return PARSERS[parser](text)


def pope_scores(labels: list, answers: list, parser: str = "original") -> dict:
    """Accuracy, precision, recall, F1 ("yes" positive), yes-ratio and unparsed count of `answers` (generated
    texts) against `labels` ("yes" / "no")."""
    if len(labels) != len(answers):
        raise ValueError("one answer per label")
    preds = [parse_answer(a, parser) for a in answers]
    n = len(labels)
    tp = sum(p == "yes" and y == "yes" for p, y in zip(preds, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(preds, labels))
    tn = sum(p == "no" and y == "no" for p, y in zip(preds, labels))
    positives = sum(y == "yes" for y in labels)
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / positives if positives else None
    if precision is None or recall is None:
        f1 = None
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"n": n, "accuracy": (tp + tn) / n if n else None, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(p == "yes" for p in preds) / n if n else None,
            "unparsed": sum(p is None for p in preds), "parser": parser,
            "counts": {"tp": tp, "fp": fp, "tn": tn, "fn": positives - tp}}


# ---------------------------------------------------------------------------------------------------
# questions over `shapes` images

def shapes_objects(attributes: dict) -> list:
    """The distinct objects of a scene as POPE names them: "{colour} {shape}", in the record's order."""
    return list(dict.fromkeys(f"{o['colour']} {o['shape']}" for o in attributes["objects"]))


def object_statistics(train_attributes: list) -> tuple[Counter, Counter]:
    """(how many training images show each object, how many show each pair of objects together)."""
    freq, pairs = Counter(), Counter()
    for attrs in train_attributes:
        objs = sorted(set(shapes_objects(attrs)))
        freq.update(objs)
        pairs.update(combinations(objs, 2))
    return freq, pairs


def _absent_by_setting(present: list, universe: list, setting: str, freq: Counter, pairs: Counter,
                       rng: random.Random) -> list:
    """Absent objects in the order a setting draws them (`random`: a shuffle; `popular`: by training
    frequency; `adversarial`: by co-occurrence with the present objects; ties broken by name)."""
    absent = [o for o in universe if o not in present]
    if setting == "random":
        rng.shuffle(absent)
        return absent
    if setting == "popular":
        return sorted(absent, key=lambda o: (-freq[o], o))
    if setting == "adversarial":
        def co(o):
            return sum(pairs[tuple(sorted((o, p)))] for p in present)
        return sorted(absent, key=lambda o: (-co(o), -freq[o], o))
    raise ValueError(f"POPE setting {setting!r}: one of {', '.join(POPE_SETTINGS)}")


def shapes_pope(records: list, train_attributes: list, universe: list, setting: str, seed: int = 0) -> list:
    """POPE questions over `shapes` records: per image, one "yes" question per object it shows and as many
    "no" questions about absent objects drawn by `setting` (`universe`: every nameable object). Items
    {question_id, image, image_id, text, label, object}; deterministic in (seed, image id)."""
    freq, pairs = object_statistics(train_attributes)
    out = []
    for rec in records:
        present = shapes_objects(rec.attributes)
        rng = random.Random(f"pope:{seed}:{setting}:{rec.image_id}")
        absent = _absent_by_setting(present, universe, setting, freq, pairs, rng)[:len(present)]
        for label, objs in (("yes", present), ("no", absent)):
            for obj in objs:
                out.append({"question_id": f"{rec.image_id}:{obj.replace(' ', '-')}", "image": rec.path,
                            "image_id": rec.image_id, "text": question(obj), "label": label, "object": obj})
    return out


def setting_overlap(records: list, train_attributes: list, universe: list, seed: int = 0) -> dict:
    """Share of the "no" questions each non-random setting has in common with `random`'s (1.0: the setting
    asks about the same absent objects — what a uniform object prior gives)."""
    sets = {s: {(q["image_id"], q["object"]) for q in shapes_pope(records, train_attributes, universe, s, seed)
                if q["label"] == "no"} for s in POPE_SETTINGS}
    base = sets["random"]
    return {s: (len(sets[s] & base) / len(base) if base else None) for s in POPE_SETTINGS if s != "random"}


# ---------------------------------------------------------------------------------------------------
# the POPE release's files (COCO)

def load_pope_file(path: str, image_root: str, limit: int | None = None) -> list:
    """Items of a POPE file (one JSON object per line: question_id, image, text, label "yes"/"no"), the image
    resolved under `image_root` (a path that leaves it is refused). Bad lines raise ValueError naming them."""
    import os
    from .data import DataError
    root = os.path.realpath(image_root)
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            missing = [k for k in ("question_id", "image", "text", "label") if k not in doc]
            if missing:
                raise DataError(f"{path}:{n}: missing {', '.join(missing)} (a POPE line holds question_id, image, "
                                "text, label)")
            label = str(doc["label"]).lower().strip()
            if label not in ("yes", "no"):
                raise DataError(f"{path}:{n}: label {doc['label']!r} is neither yes nor no")
            image = os.path.realpath(os.path.join(root, str(doc["image"])))
            if os.path.commonpath([root, image]) != root:
                raise DataError(f"{path}:{n}: image {doc['image']!r} lies outside its root {image_root}")
            out.append({"question_id": str(doc["question_id"]), "image": image, "image_id": str(doc["image"]),
                        "text": str(doc["text"]), "label": label, "object": None})
            if limit is not None and len(out) >= limit:
                break
    return out


# ---------------------------------------------------------------------------------------------------
# answering (imports torch)

def answer_questions(model, encoder, items: list, batch_size: int = 64, max_new_tokens: int = 8) -> list:
    """The model's greedy answer to each item's question (its own prompt: the question text, through
    `encoder.for_prompt`: the image, or its scene text under text input), whitespace normalised; explicit
    greedy decoding, never the model's generation_config."""
    import torch
    from .generation import decoding_settings, neutral_generation_config, prompt_batch
    model.eval()
    base = encoder
    settings = decoding_settings(num_beams=1, max_new_tokens=max_new_tokens)
    out = []
    for s in range(0, len(items), max(1, int(batch_size))):
        run = items[s:s + max(1, int(batch_size))]
        encs = [base.for_prompt(q["text"]) for q in run]
        inputs = {k: v.to(model.device) for k, v in prompt_batch(encs, [q["image"] for q in run]).items()}
        with torch.no_grad(), neutral_generation_config(model, encs[0]):
            seqs = model.generate(**inputs, **settings, eos_token_id=encs[0].eos_id, pad_token_id=encs[0].pad_id)
        texts = encs[0].tokenizer.batch_decode(seqs[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        out += [" ".join(t.split()) for t in texts]
    return out


def pope_questions(spec) -> tuple[dict, dict]:
    """({setting: items}, notes) of a `PopeSpec`: generated over `shapes` records, or read from the release's
    files; notes say how far the popular / adversarial settings differ from random (shapes)."""
    from .data import load_records
    if spec.format == "shapes":
        from .shapes import COLOURS, SHAPES
        records = load_records(spec.data)[: spec.images or None]
        train = [r.attributes for r in load_records(spec.train)]
        universe = [f"{c} {s}" for c in COLOURS for s in SHAPES]
        by = {s: shapes_pope(records, train, universe, s, seed=spec.seed) for s in spec.settings}
        return by, {"no_questions_shared_with_random": setting_overlap(records, train, universe, seed=spec.seed)}
    files = spec.files or {}
    missing = [s for s in spec.settings if s not in files]
    if missing:
        from .data import DataError
        raise DataError(f"pope set {spec.name}: no file for setting(s) {', '.join(missing)} (pope_sets.{spec.name}"
                        ".files)")
    return {s: load_pope_file(files[s], spec.image_root, limit=spec.images) for s in spec.settings}, {}


def evaluate_pope(model, encoder, spec) -> dict:
    """`spec` (a `PopeSpec`) answered by `model` (`encoder`: the evaluation's, whose processor and input mode
    the questions use): per setting its scores (`pope_scores`) and every answer; the mean over settings of
    accuracy, F1 and yes-ratio."""
    by, notes = pope_questions(spec)
    doc = {"parser": spec.parser, "settings": {}, **notes}
    for setting, items in by.items():
        answers = answer_questions(model, encoder, items, batch_size=spec.batch_size,
                                   max_new_tokens=spec.max_new_tokens)
        doc["settings"][setting] = {**pope_scores([q["label"] for q in items], answers, spec.parser),
                                    "answers": [{"question_id": q["question_id"], "label": q["label"], "answer": a}
                                                for q, a in zip(items, answers)]}
    mean = {}
    for key in ("accuracy", "f1", "yes_ratio"):
        vals = [d[key] for d in doc["settings"].values()]
        mean[key] = None if any(v is None for v in vals) or not vals else sum(vals) / len(vals)
    doc["mean"] = mean
    return doc
