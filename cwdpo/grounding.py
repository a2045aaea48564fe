"""Grounding of captions in the image: what a caption states against the scene's attribute record.

CIDEr rewards the templates' n-grams ("there are three shapes", "on a white background") whether or not
the caption names the right objects; these measures read what the caption *says*. For `shapes` images a
caption is parsed with the shapes grammar (`cwdpo.shapes`) and compared with the image's attribute record:

- an **object mention** is a noun phrase naming a shape with its optional size and colour words
  ("a big red circle", "little blue square", "two stars"); a mention is **hallucinated** when no object of
  the image has that shape with the stated colour and size (words not stated are not checked);
- **CHAIR_i** = hallucinated mentions / all mentions; **CHAIR_s** = share of captions with at least one
  hallucinated mention (Rohrbach et al. 2018, CHAIR, read on the attribute record instead of COCO labels);
- **recall** = share of the image's objects named by a mention that matches it (one mention per object),
  pooled over images (its per-image terms, for the bootstrap, are the pooled ratio's linearisation);
- **per-attribute accuracy**: the caption's mentions are aligned one-to-one with the image's objects (the
  alignment that agrees on the most attributes); colour / shape / size accuracy = share of aligned pairs
  whose stated word is right (size: only where a size word is stated); **count** = the caption names as
  many objects as the image has; **relation** = share of stated relations and locations ("to the left of",
  "above", "from left to right", "in the top left", ...) that hold, among captions whose mentions all name
  real objects (a relation between hallucinated objects cannot be checked).

No torch import.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from .data import caption_tokens
from .shapes import COLOURS, SHAPES, SIZE_WORDS, location_phrase

SIZE_OF = {w: size for size, words in SIZE_WORDS.items() for w in words}
PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle", "stars": "star", "crosses": "cross"}
NUMBERS = {"one": 1, "single": 1, "two": 2, "three": 3, "four": 4}
DETERMINERS = ("a", "an", "one", "single", "the")
LOCATIONS = {location_phrase(r, c) for r in range(3) for c in range(3)}


@dataclass
class Mention:
    """An object mention: shape, and the colour / size words when stated; `count` > 1 for a plural."""
    shape: str
    colour: str | None = None
    size: str | None = None
    count: int = 1
    start: int = 0  # index of its first word in the caption's tokens
    end: int = 0  # one past its shape word


@dataclass
class Parsed:
    mentions: list = field(default_factory=list)
    relations: list = field(default_factory=list)  # (mention i, mention j, "left" | "right" | "above" | "below")
    locations: list = field(default_factory=list)  # (mention i, location phrase)


def parse_caption(text: str) -> Parsed:
    """The object mentions of a caption and the relations and locations it states between them."""
    words = caption_tokens(text)
    out = Parsed()
    for i, w in enumerate(words):
        shape = w if w in SHAPES else PLURALS.get(w)
        if shape is None:
            continue
        j = i
        colour = size = None
        if j > 0 and words[j - 1] in COLOURS:
            colour = words[j - 1]
            j -= 1
        if j > 0 and words[j - 1] in SIZE_OF:
            size = SIZE_OF[words[j - 1]]
            j -= 1
        count = 1
        if j > 0 and words[j - 1] in NUMBERS:
            count = NUMBERS[words[j - 1]]
        elif w in PLURALS:
            count = 2
        out.mentions.append(Mention(shape, colour, size, count, j, i + 1))
    ms = out.mentions
    def words_between(i, j):  # the words from i to j, without the determiners of the next noun phrase
        span = words[i:j]
        while span and span[-1] in DETERMINERS:
            span = span[:-1]
        return " ".join(span)

    for a in range(len(ms) - 1):
        between = words_between(ms[a].end, ms[a + 1].start)
        after = " ".join(words[ms[a + 1].end:])
        b = a + 1
        if between.startswith("to the left of"):
            out.relations.append((a, b, "left"))
            if b + 1 < len(ms) and words_between(ms[b].end, ms[b + 1].start) == "and":
                out.relations.append((a, b + 1, "left"))  # "A to the left of B and C"
        elif between.startswith(("to the right of", "on the right of")):
            out.relations.append((a, b, "right"))
        elif between == "above":
            out.relations.append((a, b, "above"))
        elif between in ("below", "under"):
            out.relations.append((a, b, "below"))
        elif between == "on the left and":
            out.relations.append((a, b, "left"))
        elif between == "at the top and":
            out.relations.append((a, b, "above"))
        elif between == "and" and after.startswith("on its right"):
            out.relations.append((a, b, "left"))
        elif between == "and" and after.startswith("below it"):
            out.relations.append((a, b, "above"))
    if len(ms) >= 3 and "from left to right" in " ".join(words):
        out.relations += [(k, k + 1, "left") for k in range(len(ms) - 1)]
    if len(ms) == 1:  # "A in the top left" / "A at the middle": the single-object location template
        tail = words[ms[0].end:]
        if len(tail) >= 3 and tail[0] in ("in", "at") and tail[1] == "the" and " ".join(tail[2:]) in LOCATIONS:
            out.locations.append((0, " ".join(tail[2:])))
    return out


def _matches(m: Mention, obj: dict) -> bool:
    return m.shape == obj["shape"] and (m.colour is None or m.colour == obj["colour"]) and \
        (m.size is None or m.size == obj["size"])


def _relation_holds(rel: str, a: dict, b: dict) -> bool:
    (ra, ca), (rb, cb) = a["cell"], b["cell"]
    return {"left": ca < cb, "right": ca > cb, "above": ra < rb, "below": ra > rb}[rel]


def ground(text: str, attributes: dict) -> dict:
    """Per-caption grounding counts of `text` against the scene `attributes` (see the module docstring)."""
    p = parse_caption(text)
    objs = attributes["objects"]
    ms = p.mentions
    halluc = [not any(_matches(m, o) for o in objs) for m in ms]
    # recall: the most objects matched one-to-one by mentions
    best_recall = 0
    for perm in itertools.permutations(range(len(ms)), min(len(ms), len(objs))):
        best_recall = max(best_recall, sum(_matches(ms[i], objs[k]) for k, i in enumerate(perm)))
        if best_recall == len(objs):
            break
    # attribute alignment: the one-to-one pairing of mentions and objects agreeing on the most attributes
    n = min(len(ms), len(objs))
    best, best_score = [], -1
    for m_idx in itertools.permutations(range(len(ms)), n):
        for o_idx in itertools.combinations(range(len(objs)), n):
            pairs = list(zip(m_idx, o_idx))
            score = sum((ms[i].shape == objs[k]["shape"]) + (ms[i].colour == objs[k]["colour"]) +
                        (ms[i].size == objs[k]["size"]) for i, k in pairs)
            if score > best_score:
                best, best_score = pairs, score
    out = {"mentions": len(ms), "hallucinated": sum(halluc), "objects": len(objs), "recalled": best_recall,
           "count_right": sum(m.count for m in ms) == len(objs),
           "colour": [0, 0], "shape": [0, 0], "size": [0, 0], "relation": [0, 0]}
    for i, k in best:
        out["shape"][1] += 1
        out["shape"][0] += ms[i].shape == objs[k]["shape"]
        if ms[i].colour is not None:
            out["colour"][1] += 1
            out["colour"][0] += ms[i].colour == objs[k]["colour"]
        if ms[i].size is not None:
            out["size"][1] += 1
            out["size"][0] += ms[i].size == objs[k]["size"]
    if ms and not any(halluc) and (p.relations or p.locations):
        # a mention names one of the objects it matches: the claims hold when some naming (distinct
        # objects for distinct mentions, where the image has enough) makes them hold
        claims = [(a, b, rel) for a, b, rel in p.relations] + [(i, None, phrase) for i, phrase in p.locations]
        hits = [[k for k, o in enumerate(objs) if _matches(m, o)] for m in ms]
        best_held = 0
        for naming in itertools.product(*hits):
            if len(set(naming)) < min(len(ms), len(objs)):
                continue
            held = sum(_relation_holds(rel, objs[naming[a]], objs[naming[b]]) if b is not None
                       else location_phrase(*objs[naming[a]]["cell"]) == rel for a, b, rel in claims)
            best_held = max(best_held, held)
        out["relation"] = [best_held, len(claims)]
    return out


def contradiction(g: dict) -> str | None:
    """What an image contradicts in a caption, from its grounding counts (`ground`): it names an object the
    image does not have ("hallucinated"), leaves one of the image's objects out ("missing"), or both
    ("hallucinated_missing"); else it names the right objects but the wrong number of them ("count") or
    states a relation or location that does not hold ("relation"). None when the parse finds nothing wrong.
    The rule that makes a model's own sample or beam a negative on `shapes` (docs/method.md § Negatives)."""
    hallucinated = g["hallucinated"] > 0
    missing = g["recalled"] < g["objects"]
    if hallucinated and missing:
        return "hallucinated_missing"
    if hallucinated or missing:
        return "hallucinated" if hallucinated else "missing"
    if not g["count_right"]:
        return "count"
    if g["relation"][0] < g["relation"][1]:
        return "relation"
    return None


GROUNDING_METRICS = ("CHAIR_i", "CHAIR_s", "recall", "colour acc.", "shape acc.", "size acc.", "count acc.",
                     "relation acc.", "1-obj colour acc.", "1-obj shape acc.", "broken")


def grounding_scores(captions: dict, attributes: dict) -> dict:
    """Corpus grounding measures of `captions` {id: text} against `attributes` {id: attribute record}
    (as fractions in [0, 1]; None where nothing was stated), with the per-image values the tables bootstrap:
    {"corpus": {metric: value}, "per_image": {"CHAIR_s": {id: 0|1}, ...}, "counts": {...}}."""
    from .shapes import caption_fluency
    ids = sorted(captions, key=str)
    per = {i: ground(captions[i], attributes[i]) for i in ids}
    broken = {i: caption_fluency(captions[i]) for i in ids}

    def ratio(num, den):
        return num / den if den else None

    def pooled(key, where=lambda r: True):
        rows = [per[i][key] for i in ids if where(per[i])]
        return ratio(sum(r[0] for r in rows), sum(r[1] for r in rows))

    one = [i for i in ids if len(attributes[i]["objects"]) == 1]
    corpus = {
        "CHAIR_i": ratio(sum(r["hallucinated"] for r in per.values()), sum(r["mentions"] for r in per.values())),
        "CHAIR_s": ratio(sum(r["hallucinated"] > 0 for r in per.values()), len(ids)),
        "recall": ratio(sum(r["recalled"] for r in per.values()), sum(r["objects"] for r in per.values())),
        "colour acc.": pooled("colour"), "shape acc.": pooled("shape"), "size acc.": pooled("size"),
        "count acc.": ratio(sum(r["count_right"] for r in per.values()), len(ids)),
        "relation acc.": pooled("relation"),
        # the vision precondition: a one-object image's caption names its colour / shape (no or several
        # mentions count as wrong)
        "1-obj colour acc.": ratio(sum(_one_right(per[i], "colour") for i in one), len(one)),
        "1-obj shape acc.": ratio(sum(_one_right(per[i], "shape") for i in one), len(one)),
        # fluency: captions that are empty or use a word or character the caption grammar never writes
        # (shapes.caption_fluency)
        "broken": ratio(sum(b is not None for b in broken.values()), len(ids)),
    }
    per_image = {"CHAIR_s": {str(i): float(per[i]["hallucinated"] > 0) for i in ids},
                 "recall": _ratio_terms({str(i): (per[i]["recalled"], per[i]["objects"]) for i in ids}),
                 "count acc.": {str(i): float(per[i]["count_right"]) for i in ids},
                 "broken": {str(i): float(broken[i] is not None) for i in ids}}
    counts = {"images": len(ids), "one_object_images": len(one), "mentions": sum(r["mentions"] for r in per.values()),
              **{why: sum(b == why for b in broken.values()) for why in ("empty", "oov", "chars")}}
    return {"corpus": corpus, "per_image": per_image, "counts": counts}


def _ratio_terms(parts: dict) -> dict:
    """Per-image terms of a pooled ratio R = Σ num / Σ den whose mean is R, for a bootstrap over images:
    z_i = R + (num_i − R·den_i) / mean(den), the ratio's linearisation (delta method). (The per-image ratios
    num_i / den_i average to another quantity when images hold different numbers of objects, and their
    bootstrap interval need not contain R.)"""
    den_mean = sum(d for _, d in parts.values()) / len(parts) if parts else 0
    if not den_mean:
        return {}
    r = sum(n for n, _ in parts.values()) / (den_mean * len(parts))
    return {i: r + (n - r * d) / den_mean for i, (n, d) in parts.items()}


def _one_right(row: dict, attr: str) -> bool:
    return row["mentions"] == 1 and row[attr] == [1, 1]



# ---------------------------------------------------------------------------------------------------
# CHAIR on COCO-style data (real captions): the words of the COCO object synonym list

_IRREGULAR = {"people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
              "geese": "goose", "knives": "knife", "oxen": "ox", "feet": "foot", "teeth": "tooth"}


def coco_synonyms() -> dict:
    """{word or two-word phrase: COCO category} from cwdpo/resources/coco_synonyms.txt (CHAIR's list)."""
    import os
    path = os.path.join(os.path.dirname(__file__), "resources", "coco_synonyms.txt")
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            words = [w.strip().lower() for w in line.split(",") if w.strip()]
            for w in words:
                out.setdefault(w, words[0])
    return out


def _singular(word: str, vocab: dict) -> str:
    if word in vocab:
        return word
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    for suffix, repl in (("ies", "y"), ("ches", "ch"), ("shes", "sh"), ("xes", "x"), ("sses", "ss"), ("s", "")):
        if word.endswith(suffix) and word[: -len(suffix)] + repl in vocab:
            return word[: -len(suffix)] + repl
    return word


def coco_objects(text: str, vocab: dict) -> set:
    """COCO categories a caption names: two-word phrases first ("hot dog" is not a dog), then single words
    (plurals singularised), each through the synonym list (CHAIR variant `distinct`)."""
    words = [_singular(w, vocab) for w in caption_tokens(text)]
    found, i = set(), 0
    while i < len(words):
        pair = f"{words[i]} {words[i + 1]}" if i + 1 < len(words) else None
        if pair in vocab:
            found.add(vocab[pair])
            i += 2
            continue
        if words[i] in vocab:
            found.add(vocab[words[i]])
        i += 1
    return found


# The reference implementation's special cases (Rohrbach et al. 2018, utils/chair.py of their code): two
# consecutive words read as one — COCO's two-word objects, and qualifiers that would otherwise name a person
# ("baby elephant" is an elephant, "passenger jet" a jet) or another object ("toilet seat" is the toilet).
_REFERENCE_PAIRS = {
    **{p: p for p in ("motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
                      "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
                      "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
                      "mobile phone", "teddy bear", "hair drier", "potted plant", "laptop computer", "home plate")},
    **{f"{q} {a}": a for q in ("baby", "adult") for a in ("bird", "cat", "dog", "horse", "sheep", "cow",
                                                          "elephant", "bear", "zebra", "giraffe", "animal", "cub")},
    "passenger jet": "jet", "passenger train": "train", "bow tie": "tie", "toilet seat": "toilet",
}
CHAIR_VARIANTS = ("reference", "distinct")


def coco_mentions(text: str, vocab: dict) -> list:
    """The COCO category of every object mention of a caption, in order, repeats kept, by the reference's rules
    (CHAIR variant `reference`): words singularised, the pairs of `_REFERENCE_PAIRS` read as one word,
    "seat" dropped from a caption that names a toilet, then every word of the synonym list is a mention."""
    words = [_singular(w, vocab) for w in caption_tokens(text)]
    merged, i = [], 0
    while i < len(words):
        pair = f"{words[i]} {words[i + 1]}" if i + 1 < len(words) else None
        if pair in _REFERENCE_PAIRS:
            merged.append(_REFERENCE_PAIRS[pair])
            i += 2
        else:
            merged.append(words[i])
            i += 1
    if "toilet" in merged:
        merged = [w for w in merged if w != "seat"]
    return [vocab[w] for w in merged if w in vocab]


def chair_scores(captions: dict, references: dict, objects: dict, variant: str = "reference") -> dict:
    """CHAIR_i and CHAIR_s of `captions` {id: text} on COCO-style images: an image's objects are the COCO
    categories of its instance annotations (`objects` {id: [category names]}) and those its reference
    captions name (as Rohrbach et al. do); a caption's object mentions whose category is not among them are
    hallucinated. CHAIR_s = share of captions with one; recall = share of annotated categories the caption
    names; length = mean words per caption (CHAIR falls as captions get shorter).

    - variant `reference` (the reference implementation, and lmms-eval): every mention counts, repeats
      included, by `coco_mentions`' rules — CHAIR_i = hallucinated mentions / mentions;
    - variant `distinct`: each caption's distinct categories (`coco_objects`) — CHAIR_i = hallucinated
      categories / named categories, summed over captions."""
    if variant not in CHAIR_VARIANTS:
        raise ValueError(f"CHAIR variant {variant!r}: one of {', '.join(CHAIR_VARIANTS)}")
    vocab = coco_synonyms()
    said_of = coco_mentions if variant == "reference" else (lambda text, v: sorted(coco_objects(text, v)))
    ids = sorted(captions, key=str)
    named = halluc = recalled = annotated = with_halluc = words = 0
    per_s = {}
    for i in ids:
        annotated_here = {vocab.get(o, o) for o in objects.get(i, [])}
        truth = annotated_here | {o for r in references[i] for o in said_of(r, vocab)}
        said = said_of(captions[i], vocab)
        wrong = [o for o in said if o not in truth]
        named += len(said)
        halluc += len(wrong)
        annotated += len(annotated_here)
        recalled += len(set(said) & annotated_here)
        with_halluc += bool(wrong)
        words += len(caption_tokens(captions[i]))
        per_s[str(i)] = float(bool(wrong))
    corpus = {"CHAIR_i": halluc / named if named else None, "CHAIR_s": with_halluc / len(ids) if ids else None,
              "recall": recalled / annotated if annotated else None, "broken": None,
              "length": words / len(ids) if ids else None}
    return {"corpus": corpus, "per_image": {"CHAIR_s": per_s},
            "counts": {"images": len(ids), "named": named, "hallucinated": halluc}, "variant": variant,
            "na_reasons": {"broken": BROKEN_NA}}


BROKEN_NA = ("fluency is checked against the `shapes` caption grammar's vocabulary; real captions have no closed "
             "vocabulary")


def write_coco_objects(spec, out: str) -> dict:
    """`cwdpo coco-objects` (a `CocoObjectsSpec`): {image id: COCO categories} of the spec's images."""
    from .data import load_records, write_json
    objects = load_coco_instances(spec.instances, [r.image_id for r in load_records(spec.data)])
    write_json(out, objects, indent=None)
    return objects


def load_coco_instances(paths: list, image_ids=None) -> dict:
    """{image id (str): sorted COCO category names} from COCO instance annotation files
    (instances_{train,val}2014.json), for the given ids (all when None)."""
    import json
    wanted = None if image_ids is None else {str(i) for i in image_ids}
    out: dict = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        names = {c["id"]: c["name"] for c in doc["categories"]}
        for img in doc.get("images", []):
            if wanted is None or str(img["id"]) in wanted:
                out.setdefault(str(img["id"]), set())
        for a in doc["annotations"]:
            key = str(a["image_id"])
            if wanted is None or key in wanted:
                out.setdefault(key, set()).add(names[a["category_id"]])
    return {k: sorted(v) for k, v in out.items()}
