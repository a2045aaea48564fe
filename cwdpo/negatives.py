"""Negatives (docs/method.md § Negatives) and the preference-pairs file of Stage 2.

- gentle: a minimally perturbed positive. `shapes`: exactly one attribute of the image's attribute
  record changed (an object's colour, shape or size, the object count, or the relation/location) and the
  caption re-rendered with the positive's own template and word choices. Real captions (COCO/Flickr30k):
  one colour, number, spatial preposition or noun swapped from a small lexicon shipped with the package.
- easy: off-distribution or unrelated text — another image's caption, the positive's words shuffled, or
  an off-topic sentence.
- external: a JSONL file of negatives keyed by image id (e.g. GPT-4o minimal perturbations, as the paper
  used); see `read_external`.
- on-policy: K samples per image from the Stage-1 model (`cwdpo.sampling`), kept when they are wrong:
  on `shapes` when the image's attribute record contradicts them, on real captions when their CIDEr-D is
  below the median of the image's own samples (config `negatives.onpolicy.select`).
- beam: the Stage-1 model's own k beams per image (`cwdpo.sampling.run_beams`), kept when the grammar parse
  against the image's attribute record finds something the image contradicts (`shapes` only).
- mixed: a fraction ρ of dataset negatives and a fraction `beams` of wrong beams among on-policy ones
  (`build_pairs`).

Pairs are written in TRL's vision preference format (`images`, `prompt`, `chosen`, `rejected`,
conversational) plus `image_id`, `source` (gentle|easy|external|onpolicy|beam), `kind` and the negative's
`score` (its CIDEr-D against the image's references). No torch import.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import re

from . import shapes as S
from .data import DataError

SOURCES = ("gentle", "easy", "external", "onpolicy", "beam")
SHAPES_KINDS = ("colour", "shape", "size", "count", "relation")  # gentle changes of an attribute record
LEXICON_KINDS = ("colour", "number", "preposition", "noun")  # gentle changes of a real caption
_LEXICON = None


def lexicon() -> dict:
    global _LEXICON
    if _LEXICON is None:
        with open(os.path.join(os.path.dirname(__file__), "resources", "lexicon.json")) as f:
            _LEXICON = json.load(f)
    return _LEXICON


# ---------------------------------------------------------------------------------------------------
# gentle negatives

def _object_order(attrs: dict) -> dict:
    """Re-sort objects into caption order (left-to-right, or top-to-bottom for a vertical pair)."""
    objs = attrs["objects"]
    if attrs["relation"] == "v":
        objs.sort(key=lambda o: (o["cell"][0], o["cell"][1]))
    else:
        objs.sort(key=lambda o: (o["cell"][1], o["cell"][0]))
    return attrs


def perturb_attributes(attrs: dict, kind: str, rng: random.Random, slots: dict, template: int, heldout=()):
    """One-attribute change of a scene. Returns (new_attrs, new_slots, new_template, changed) or None when
    this kind cannot change what the caption states (e.g. a size the caption does not mention). A new
    (colour, shape) combination is never one of `heldout` (kept out of training for the OOD split)."""
    heldout = {tuple(x) for x in heldout}
    new = copy.deepcopy(attrs)
    objs = new["objects"]
    forms = list(slots["size_forms"])
    i = rng.randrange(len(objs))
    if kind == "colour":
        old = objs[i]["colour"]
        objs[i]["colour"] = rng.choice([c for c in S.COLOURS if c != old and (c, objs[i]["shape"]) not in heldout])
        return new, slots, template, {"object": i, "colour": [old, objs[i]["colour"]]}
    if kind == "shape":
        old = objs[i]["shape"]
        objs[i]["shape"] = rng.choice([s for s in S.SHAPES if s != old and (objs[i]["colour"], s) not in heldout])
        return new, slots, template, {"object": i, "shape": [old, objs[i]["shape"]]}
    if kind == "size":
        named = [j for j, f in enumerate(forms) if f is not None]
        if not named:
            return None
        i = rng.choice(named)
        old = objs[i]["size"]
        objs[i]["size"] = "small" if old == "big" else "big"
        return new, slots, template, {"object": i, "size": [old, objs[i]["size"]]}
    if kind == "relation":
        if len(objs) == 1:
            if "{loc}" not in S.TEMPLATES[1][template]:
                return None
            old = list(objs[0]["cell"])
            cells = [[r, c] for r in range(3) for c in range(3)
                     if S.location_phrase(r, c) != S.location_phrase(*old)]
            objs[0]["cell"] = rng.choice(cells)
            return new, slots, template, {"location": [old, objs[0]["cell"]]}
        a, b = rng.sample(range(len(objs)), 2)
        if objs[a]["colour"] == objs[b]["colour"] and objs[a]["shape"] == objs[b]["shape"] and \
                objs[a]["size"] == objs[b]["size"]:
            return None  # swapping identical objects changes nothing
        objs[a]["cell"], objs[b]["cell"] = objs[b]["cell"], objs[a]["cell"]
        # objects keep their caption slots by identity: reorder objects and forms together
        paired = sorted(zip(objs, forms), key=lambda p: (p[0]["cell"][0], p[0]["cell"][1]) if new["relation"] == "v"
                        else (p[0]["cell"][1], p[0]["cell"][0]))
        new["objects"] = [o for o, _ in paired]
        return new, {**slots, "size_forms": [f for _, f in paired]}, template, {"swap": [a, b]}
    if kind == "count":
        n = len(objs)
        if n == 1 or (n == 2 and rng.random() < 0.5):  # add an object
            rel = rng.choice(("h", "v")) if n == 1 else "row3"
            if n == 1:
                r, c = objs[0]["cell"]
                free = [cc for cc in range(3) if cc != c] if rel == "h" else [rr for rr in range(3) if rr != r]
                k = rng.choice(free)
                cell = [r, k] if rel == "h" else [k, c]
            else:
                used = {o["cell"][1] for o in objs} if new["relation"] == "h" else set()
                if new["relation"] != "h":
                    return None  # a vertical pair has no free column layout for three objects
                cell = [rng.randrange(3), next(cc for cc in range(3) if cc not in used)]
            combos = [(c, sh) for c in S.COLOURS for sh in S.SHAPES if (c, sh) not in heldout]
            colour, shape = rng.choice(combos)
            objs.append({"shape": shape, "colour": colour, "size": rng.choice(S.SIZES), "cell": cell})
            new["relation"] = rel
            forms.append(forms[0])
        else:  # remove an object
            del objs[i]
            del forms[i]
            new["relation"] = None if len(objs) == 1 else ("h" if objs[0]["cell"][0] == objs[1]["cell"][0] else "v")
        _object_order(new)
        family = S.layout_family(new)
        template = rng.randrange(len(S.TEMPLATES[family]))
        return new, {**slots, "size_forms": forms[:len(new["objects"])]}, template, {"count": [n, len(new["objects"])]}
    raise ValueError(f"unknown gentle kind {kind!r}")


def gentle_shapes(rec, caption_index: int, rng: random.Random, kinds, heldout=()) -> dict | None:
    """A gentle negative of caption `caption_index` of a `shapes` image: one attribute changed, same
    template and word choices. None when no allowed kind changes the caption."""
    meta = rec.extra.get("sentence_meta", [None] * len(rec.captions))[caption_index]
    if meta is None or rec.attributes is None:
        return None
    order = list(kinds)
    rng.shuffle(order)
    refs = {c.lower() for c in rec.captions}
    for kind in order:
        for _ in range(4):
            out = perturb_attributes(rec.attributes, kind, rng, meta["slots"], meta["template"], heldout)
            if out is None:
                continue
            new_attrs, new_slots, template, changed = out
            text = S.render_caption(new_attrs, template, new_slots)
            if text.lower() in refs or S.describes(text, rec.attributes):
                continue
            return {"text": text, "source": "gentle", "kind": kind, "changed": changed, "attributes": new_attrs}
    return None


def gentle_lexicon(caption: str, rng: random.Random, kinds) -> dict | None:
    """A gentle negative of a real caption: one word/phrase of a lexicon group (colour, number, spatial
    preposition, noun) replaced by another of its group, case of the first letter kept."""
    lex = lexicon()
    candidates = []
    for kind in kinds:
        for group in lex.get(kind, []):
            for phrase in group:
                for m in re.finditer(r"(?<![A-Za-z])" + re.escape(phrase) + r"(?![A-Za-z])", caption, re.IGNORECASE):
                    candidates.append((kind, group, phrase, m.start(), m.end()))
    if not candidates:
        return None
    kind, group, phrase, a, b = rng.choice(candidates)
    repl = rng.choice([p for p in group if p != phrase])
    if caption[a:b][:1].isupper():
        repl = repl[:1].upper() + repl[1:]
    text = caption[:a] + repl + caption[b:]
    return {"text": text, "source": "gentle", "kind": kind, "changed": {kind: [caption[a:b], repl]}}


def gentle_negative(rec, caption_index: int, rng: random.Random, kinds, heldout=()) -> dict | None:
    """Attribute-based for `shapes` images (they carry an attribute record), lexicon-based otherwise."""
    if rec.attributes is not None:
        neg = gentle_shapes(rec, caption_index, rng, [k for k in kinds if k in SHAPES_KINDS], heldout)
        if neg is not None:
            return neg
    neg = gentle_lexicon(rec.captions[caption_index], rng, [k for k in kinds if k in LEXICON_KINDS]
                         or list(LEXICON_KINDS))
    if neg is not None and neg["text"].lower() in {c.lower() for c in rec.captions}:
        return None
    return neg


# ---------------------------------------------------------------------------------------------------
# easy negatives

def easy_negative(rec, caption_index: int, rng: random.Random, kinds, others: list) -> dict:
    """Another image's caption (`others`: records of other images), the positive's words shuffled, or an
    off-topic sentence."""
    kind = rng.choice(list(kinds))
    positive = rec.captions[caption_index]
    if kind == "other_image":
        pool = [o for o in others if o.image_id != rec.image_id]
        if pool:
            other = rng.choice(pool)
            text = rng.choice(other.captions)
            if text.lower() not in {c.lower() for c in rec.captions}:
                return {"text": text, "source": "easy", "kind": kind, "other_image": other.image_id}
        kind = "shuffled"
    if kind == "shuffled":
        words = positive.split()
        if len(set(words)) > 1:
            for _ in range(10):
                rng.shuffle(words)
                text = " ".join(words)
                if text != positive:
                    return {"text": text, "source": "easy", "kind": kind}
        kind = "off_topic"
    return {"text": rng.choice(lexicon()["off_topic"]), "source": "easy", "kind": "off_topic"}


# ---------------------------------------------------------------------------------------------------
# the probe set of the learning-dynamics callback (cwdpo.probes)

def build_probe_set(records: list, samples: dict, cfg, seed: int = 0) -> list:
    """Rows {image, image_id, positive, gentle, easy, onpolicy} for the probe images.

    gentle/easy come from `gentle_negative` / `easy_negative` with a fixed seed per image; onpolicy is the
    lowest-scoring sample of the image in `samples` ({image_id: [sample dicts with text/score]}), or None
    without samples. No torch: the probe-set rule runs in a job of its own.
    """
    rows = []
    for rec in records:
        rng = random.Random(f"probe:{seed}:{rec.image_id}")
        gentle = gentle_negative(rec, 0, rng, cfg.gentle_kinds, cfg.heldout)
        easy = easy_negative(rec, 0, rng, cfg.easy_kinds, records)
        cands = [s for s in samples.get(rec.image_id, []) if s["text"].strip() and not s.get("is_reference")]
        onpolicy = min(cands, key=lambda s: (s["score"], s["text"]))["text"] if cands else None
        rows.append({"image": rec.path, "image_id": rec.image_id, "positive": rec.captions[0],
                     "gentle": gentle["text"] if gentle else None, "easy": easy["text"], "onpolicy": onpolicy})
    return rows


# ---------------------------------------------------------------------------------------------------
# external negatives

def read_external(path: str, known_ids=None, on_bad_input: str = "error", bad_log=None,
                  max_chars: int | None = None) -> dict:
    """Read an external negatives JSONL: one object per line,
    {"image_id": str|int, "negative": non-empty str[, "kind": str][, "score": number][, "positive": str]}.

    Returns {image_id (str): [negative dicts]}. A malformed line (not UTF-8, not JSON, a negative longer
    than `max_chars` characters) raises `DataError` naming file:line (or is skipped and logged with
    `on_bad_input='skip'`); an unknown image id is an error when `known_ids` is given.
    """
    from .data import JsonlLineError, iter_jsonl
    out: dict = {}
    for _, where, obj in iter_jsonl(path):
        try:
            if isinstance(obj, JsonlLineError):
                raise ValueError(obj.reason)
            if not isinstance(obj, dict):
                raise ValueError("line is not a JSON object")
            ident = obj.get("image_id")
            if not isinstance(ident, (str, int)) or isinstance(ident, bool):
                raise ValueError("missing or non-string/int 'image_id'")
            neg = obj.get("negative")
            if not isinstance(neg, str) or not neg.strip():
                raise ValueError("missing or empty 'negative'")
            if max_chars is not None and len(neg.strip()) > max_chars:
                raise ValueError(f"'negative' is {len(neg.strip())} characters, over the limit of {max_chars} "
                                 "(negatives.external_max_chars)")
            if "score" in obj and not isinstance(obj["score"], (int, float)):
                raise ValueError("'score' must be a number")
            if "kind" in obj and not isinstance(obj["kind"], str):
                raise ValueError("'kind' must be a string")
            image_id = str(obj["image_id"])
            if known_ids is not None and image_id not in known_ids:
                raise ValueError(f"unknown image_id {image_id!r}")
        except ValueError as e:
            if on_bad_input == "skip":
                if bad_log is not None:
                    bad_log.add(where, str(e))
                continue
            raise DataError(f"{where}: {e}") from None
        out.setdefault(image_id, []).append({"text": neg.strip(), "source": "external",
                                             "kind": obj.get("kind", "external")})
    return out


# ---------------------------------------------------------------------------------------------------
# Stage 1 (SFT-C) items

def sft_c_items(records: list, cfg, seed: int = 0, external: dict | None = None) -> list:
    """(image, positive, negative) items for SFT-C: every reference caption with one gentle negative
    derived from it (or an external negative of the image when `external` has one). Captions without a
    possible negative are left out."""
    kind = cfg.sft_c_kind
    items = []
    for rec in records:
        ext = (external or {}).get(rec.image_id, [])
        for i, positive in enumerate(rec.captions):
            rng = random.Random(f"sft_c:{seed}:{rec.image_id}:{i}")
            if ext:
                neg = ext[i % len(ext)]
            elif kind == "easy" or (kind == "mixed" and rng.random() < 0.5):
                neg = easy_negative(rec, i, rng, cfg.easy_kinds, records)
            else:
                neg = gentle_negative(rec, i, rng, cfg.gentle_kinds, cfg.heldout)
            if neg is not None:
                items.append({"image": rec.path, "positive": positive, "negative": neg["text"],
                              "image_id": rec.image_id, "source": neg["source"], "kind": neg["kind"]})
    return items


# ---------------------------------------------------------------------------------------------------
# Stage 2 pairs: mixing dataset and on-policy negatives

def dataset_negatives(rec, caption_index: int, rng: random.Random, cfg, others: list,
                      external: dict | None) -> dict | None:
    """One dataset negative for a positive: external (when the image has one), else easy with probability
    p_easy, else gentle (falling back to easy when no gentle change is possible)."""
    ext = (external or {}).get(rec.image_id)
    if ext:
        return dict(rng.choice(ext))
    if rng.random() < float(cfg.p_easy):
        return easy_negative(rec, caption_index, rng, cfg.easy_kinds, others)
    neg = gentle_negative(rec, caption_index, rng, cfg.gentle_kinds, cfg.heldout)
    if neg is None:
        neg = easy_negative(rec, caption_index, rng, cfg.easy_kinds, others)
    return neg


def build_pairs(records: list, cfg, rho: float, seed: int, onpolicy: dict | None = None,
                external: dict | None = None, scorer=None, p_easy: float | None = None, beams: dict | None = None,
                beam_share: float = 0.0) -> tuple[list, dict]:
    """Stage-2 preference pairs for `records` with a fraction `rho` of dataset negatives and a fraction
    `beam_share` of the model's wrong beams; the rest on-policy.

    Target size N = pairs_per_image × images; each source's target is its share of N (dataset round(ρ·N),
    beams round(beam_share·N), on-policy the rest). On-policy negatives come from `onpolicy`, wrong beams from
    `beams` ({image_id: [kept sample dicts]} each), in a shuffled order. A source whose pool holds fewer than its
    target gives what it has — the others are never shrunk to keep the shares exact: the summary reports each
    source's target, pool and pairs and the set's fill (pairs / N), and `make_pairs` refuses a set below
    `negatives.min_fill`. Chosen = a reference caption of the image. `scorer(text, refs)` gives each
    negative's score (CIDEr-D, corpus df). Returns (pairs, summary).
    """
    if p_easy is not None:
        cfg = dataclasses.replace(cfg, p_easy=p_easy)
    per_image = int(cfg.pairs_per_image)
    target = per_image * len(records)
    pool = []
    for rec in records:
        for k, s in enumerate((onpolicy or {}).get(rec.image_id, [])):
            pool.append((rec, s))
    rng = random.Random(f"pairs:{seed}")
    rng.shuffle(pool)
    beam_pool = [(rec, s) for rec in records for s in (beams or {}).get(rec.image_id, [])]
    beam_rng = random.Random(f"beams:{seed}")  # its own stream: a set without beams draws what it always drew
    beam_rng.shuffle(beam_pool)
    n_dataset = int(round(rho * target))
    beams_target = int(round(beam_share * target))
    onpolicy_target = max(0, target - n_dataset - beams_target)
    n_beams = min(len(beam_pool), beams_target)
    n_onpolicy = min(len(pool), onpolicy_target)
    pairs = []
    # on-policy: the pool in shuffled order, chosen = a random reference
    for rec, s in pool[:n_onpolicy]:
        chosen = rng.choice(rec.captions)
        pairs.append(_pair(rec, chosen, {"text": s["text"], "source": "onpolicy", "kind": "sample",
                                         "score": s.get("score")}))
    # wrong beams: their pool in shuffled order, chosen = a random reference
    for rec, s in beam_pool[:n_beams]:
        pairs.append(_pair(rec, beam_rng.choice(rec.captions), {"text": s["text"], "source": "beam",
                                                                 "kind": s.get("kind", "beam"),
                                                                 "score": s.get("score")}))
    # dataset: cycle over images and their captions deterministically
    slots = [(rec, i) for rec in records for i in range(len(rec.captions))]
    rng.shuffle(slots)
    j = 0
    attempts = 0
    while sum(1 for p in pairs if p["source"] not in ("onpolicy", "beam")) < n_dataset and \
            attempts < 20 * max(1, n_dataset) + 100:
        rec, i = slots[j % len(slots)]
        j += 1
        attempts += 1
        r = random.Random(f"dsneg:{seed}:{rec.image_id}:{i}:{j}")
        neg = dataset_negatives(rec, i, r, cfg, records, external)
        if neg is None:
            continue
        pairs.append(_pair(rec, rec.captions[i], neg))
    rng.shuffle(pairs)
    if scorer is not None:
        for p in pairs:
            if p.get("score") is None:
                p["score"] = float(scorer(p["rejected_text"], p["refs"]))
    counts: dict = {}
    for p in pairs:
        counts[p["source"]] = counts.get(p["source"], 0) + 1
        p.pop("refs", None)
    kinds: dict = {}
    for p in pairs:
        key = f"{p['source']}/{p['kind']}"
        kinds[key] = kinds.get(key, 0) + 1
    n_dataset_made = sum(1 for p in pairs if p["source"] not in ("onpolicy", "beam"))
    summary = {"rho": rho, "target_pairs": target, "pairs": len(pairs), "fill": len(pairs) / target if target else None,
               "dataset": n_dataset_made, "onpolicy": n_onpolicy, "onpolicy_pool": len(pool),
               "by_source": counts, "by_kind": kinds, "images": len(records),
               "rho_effective": (n_dataset_made / len(pairs)) if pairs else None,
               "targets": {"dataset": n_dataset, "onpolicy": onpolicy_target}}
    if beam_share > 0:  # (the summary of a set without beams keeps its keys)
        summary.update({"beam_share": beam_share, "beams": n_beams, "beam_pool": len(beam_pool)})
        summary["targets"]["beams"] = beams_target
    return pairs, summary


def _pair(rec, chosen: str, neg: dict) -> dict:
    return {"image": rec.path, "image_id": rec.image_id, "chosen_text": chosen, "rejected_text": neg["text"],
            "source": neg["source"], "kind": neg.get("kind"), "score": neg.get("score"), "refs": rec.captions}


def to_trl(pair: dict, prompt: str) -> dict:
    """A pair as one line of TRL's conversational vision preference format (plus our metadata)."""
    return {"images": [pair["image"]],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": pair["chosen_text"]}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": pair["rejected_text"]}]}],
            "image_id": pair["image_id"], "source": pair["source"], "kind": pair.get("kind"),
            "score": pair.get("score")}


def write_pairs(path: str, pairs: list, prompt: str):
    from .data import write_text
    write_text(path, "".join(json.dumps(to_trl(p, prompt), sort_keys=True) + "\n" for p in pairs))


def _text_of(turns, role: str, where: str) -> str:
    if not isinstance(turns, list) or len(turns) != 1 or turns[0].get("role") != role:
        raise ValueError(f"'{role}' turn must be a one-element list with role {role!r}")
    content = turns[0].get("content")
    if isinstance(content, str):
        return content
    texts = [c.get("text") for c in content if isinstance(c, dict) and c.get("type") == "text"]
    if len(texts) != 1 or not isinstance(texts[0], str):
        raise ValueError(f"'{role}' turn must hold exactly one text part")
    return texts[0]


def read_pairs(path: str, expected_prompt: str | None = None) -> list:
    """Read a pairs JSONL into trainer items {image, chosen, rejected, image_id, source, kind, score};
    a malformed line raises `DataError` naming file:line."""
    from .data import JsonlLineError, iter_jsonl
    items = []
    for _, where, obj in iter_jsonl(path):
        try:
            if isinstance(obj, JsonlLineError):
                raise ValueError(obj.reason)
            images = obj["images"]
            if not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], str):
                raise ValueError("'images' must be a list with one image path")
            user = obj["prompt"]
            if not isinstance(user, list) or user[0].get("role") != "user":
                raise ValueError("'prompt' must be a user turn")
            prompt_text = _text_of(user, "user", where)
            if expected_prompt is not None and prompt_text != expected_prompt:
                raise ValueError(f"prompt {prompt_text!r} differs from the configured prompt {expected_prompt!r}")
            chosen = _text_of(obj["chosen"], "assistant", where)
            rejected = _text_of(obj["rejected"], "assistant", where)
            if not chosen.strip() or not rejected.strip():
                raise ValueError("empty chosen or rejected text")
            if obj.get("source") is not None and obj["source"] not in SOURCES:
                raise ValueError(f"'source' must be one of {', '.join(SOURCES)}")
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            msg = f"missing key {e}" if isinstance(e, KeyError) else str(e)
            raise DataError(f"{where}: {msg}") from None
        items.append({"image": images[0], "chosen": chosen, "rejected": rejected,
                      "image_id": str(obj.get("image_id", "")), "source": obj.get("source"),
                      "kind": obj.get("kind"), "score": obj.get("score")})
    return items


def read_samples(path: str) -> dict:
    """{image_id: [kept samples]} from an on-policy samples JSONL."""
    from .data import read_jsonl
    return {str(obj["image_id"]): [s for s in obj["samples"] if s["kept"]] for obj in read_jsonl(path)}


# ---------------------------------------------------------------------------------------------------
# the commands

def make_pairs(spec, onpolicy: str | None, out: str, summary_out: str, beams: str | None = None) -> dict:
    """`cwdpo make-pairs` (a `PairsSpec`): Stage-2 (or held-out) preference pairs of the spec's images —
    a share ρ of dataset negatives and a share of the wrong beams of `beams` among the on-policy samples of
    `onpolicy` — in TRL's format, and their summary. Negatives are scored by CIDEr-D with the document
    frequencies of all the split's images."""
    from .data import BadInputLog, DataError, load_records, stage_records, write_json
    from .metrics import simple_tokenize
    from .metrics import corpus_scorer
    if spec.beams > 0 and beams is None:
        raise DataError(f"the negatives set mixes in wrong beams (beams {spec.beams}) but no --beams file was given")
    bad = BadInputLog()
    corpus = load_records(spec.data, bad_log=bad)
    records = stage_records(corpus, spec.data)
    external = None
    if spec.negatives.external:
        external = read_external(spec.negatives.external, {r.image_id for r in corpus},
                                 on_bad_input=spec.data.on_bad_input, bad_log=bad,
                                 max_chars=spec.negatives.external_max_chars)
    scorer = corpus_scorer(corpus)
    pairs, summary = build_pairs(records, spec.negatives, spec.rho, spec.seed,
                                 onpolicy=read_samples(onpolicy) if onpolicy else None, external=external,
                                 p_easy=spec.p_easy, beams=read_samples(beams) if beams else None,
                                 beam_share=spec.beams,
                                 scorer=lambda text, refs: scorer.score_one(simple_tokenize(text),
                                                                            [simple_tokenize(r) for r in refs]))
    check_fill(summary, spec)
    write_pairs(out, pairs, spec.prompt)
    summary["truncated"] = truncation_counts(pairs, spec)
    summary["bad_input"] = bad.summary()
    write_json(summary_out, summary)
    return summary


def check_fill(summary: dict, spec) -> None:
    """Refuse a set that holds less than `spec.min_fill` of its target pairs (or none at all), in one line that
    names each short pool, how it was drawn and the knob that fills it."""
    if summary["pairs"] and summary["fill"] >= spec.min_fill:
        return
    from .data import DataError
    short = [f"{src} pool {summary[pool]} of the {summary['targets'][src]} needed"
             for src, pool in (("onpolicy", "onpolicy_pool"), ("beams", "beam_pool"))
             if src in summary["targets"] and summary.get(pool, 0) < summary["targets"][src]]
    name = f"negatives set {spec.name!r}" if spec.name else "the pairs"
    raise DataError(f"{name}: {summary['pairs']} of its {summary['target_pairs']} target pairs "
                    f"({100 * (summary['fill'] or 0):.0f}%), below min_fill {spec.min_fill:g}: "
                    + (", ".join(short) or "no pairs could be made")
                    + (f" ({spec.pools})" if spec.pools else "")
                    + "; draw more (raise that k), or lower the set's share of that source or its min_fill")


def truncation_counts(pairs: list, spec) -> dict:
    """How many chosen / rejected responses (per source) the length limit cuts: their assistant turn, as
    the chat template renders it, is longer than `spec.max_response_tokens` tokens (TRL's DPOTrainer cuts
    the same tokens under `max_length` = prompt + that limit). Counted without torch (`cwdpo.chat`)."""
    from .chat import CompletionCounter
    counter = CompletionCounter(spec.tokenizer, spec.prompt, spec.max_response_tokens)
    out = {"max_response_tokens": int(spec.max_response_tokens), "chosen": 0, "rejected": 0, "by_source": {}}
    for p in pairs:
        c, r = counter.truncated(p["chosen_text"]), counter.truncated(p["rejected_text"])
        out["chosen"] += c
        out["rejected"] += r
        if c or r:
            src = out["by_source"].setdefault(p["source"], {"chosen": 0, "rejected": 0})
            src["chosen"] += c
            src["rejected"] += r
    return out


def write_probe_set(spec, onpolicy: str | None, out: str) -> list:
    """`cwdpo probe-set` (a `ProbeSetSpec`): the fixed probe set of the runs that start from one model —
    probe images with their positive, gentle, easy and on-policy negatives (the model's lowest-scoring
    sample of each probe image, from `onpolicy`)."""
    from .data import DataError, JsonlLineError, iter_jsonl, load_records, write_text
    records = load_records(spec.probe_data)[: spec.probe_images]
    samples = {}
    if onpolicy:
        for _, where, obj in iter_jsonl(onpolicy):
            if isinstance(obj, JsonlLineError):
                raise DataError(f"{where}: {obj.reason}")
            if obj.get("split") == "probe":
                samples[str(obj["image_id"])] = obj["samples"]
    rows = build_probe_set(records, samples, spec.negatives, seed=spec.seed)
    write_text(out, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return rows
