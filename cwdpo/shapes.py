"""The embedded `shapes` dataset: synthetic images of coloured shapes with 5 reference captions each.

A deterministic generator (same seed, same bytes) of RGB images with 1-3 coloured shapes placed in a
3x3 grid, and a caption grammar with synonyms and varied word order. The dataset is written in the
Karpathy `dataset_coco.json` format (images[].filename/filepath/split/imgid/sentences[].raw/tokens), so
one loader (`cwdpo.data.load_karpathy`) serves `shapes`, COCO and Flickr30k. Each image also carries
its attribute record (`attributes`) and each sentence the template and word choices it was rendered
with, so that negatives can be rendered from a changed attribute record with the same wording.

No torch import here: the data rule stays light.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import re
from dataclasses import dataclass

from .data import caption_tokens, load_karpathy, write_atomically, write_json
from .specs import optional

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black")
SIZES = ("big", "small")
SIZE_WORDS = {"big": ("big", "large"), "small": ("small", "little")}
RGB = {
    "red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220), "yellow": (235, 200, 0),
    "purple": (140, 40, 170), "orange": (250, 130, 0), "black": (20, 20, 20),
}
ROW_WORDS = ("top", "middle", "bottom")
COL_WORDS = ("left", "middle", "right")
# half extent of a shape in pixels at image size 112 (scaled with the image size)
HALF_EXTENT = {"big": 16, "small": 9}

TEMPLATES = {
    1: ("{A}", "{A} {prep} the {loc}", "there is {A}", "{A} on a white background", "one {A_}",
        "a single {A_}", "an image of {A}"),
    "h": ("{A} to the left of {B}", "{B} to the right of {A}", "there is {A} and {B} on its right",
          "two shapes: {A} and {B}", "{A} on the left and {B} on the right", "{B} on the right of {A}"),
    "v": ("{A} above {B}", "{B} below {A}", "there is {A} and {B} below it", "two shapes: {A} and {B}",
          "{A} at the top and {B} at the bottom", "{B} under {A}"),
    3: ("three shapes: {A}, {B} and {C}", "{A}, {B} and {C} from left to right",
        "from left to right: {A}, {B} and {C}", "there are three shapes, {A}, {B} and {C}",
        "{A} to the left of {B} and {C}"),
}


def location_phrase(row: int, col: int) -> str:
    """'top left', 'top', 'middle right', 'middle', ... for a 3x3 grid cell."""
    r, c = ROW_WORDS[row], COL_WORDS[col]
    if r == "middle" and c == "middle":
        return "middle"
    if c == "middle":
        return r
    return f"{r} {c}"


def layout_family(attributes: dict) -> object:
    """Template family of an attribute record: 1, 'h' (two in a row), 'v' (two in a column) or 3."""
    n = len(attributes["objects"])
    if n == 2:
        return attributes["relation"]
    return n


def noun_phrase(obj: dict, size_form: int | None, article: bool = True) -> str:
    """'a big red circle' / 'an orange star' / 'little blue square' (size_form None: no size word)."""
    words = []
    if size_form is not None:
        words.append(SIZE_WORDS[obj["size"]][size_form])
    words += [obj["colour"], obj["shape"]]
    phrase = " ".join(words)
    if article:
        phrase = ("an " if phrase[0] in "aeiou" else "a ") + phrase
    return phrase


def render_caption(attributes: dict, template: int, slots: dict) -> str:
    """Render one caption of `attributes` with template index `template` of its layout family.

    `slots` holds the word choices: `size_forms` (one entry per object in caption order: None = no
    size word, 0/1 = which synonym) and `prep` ('in'/'at', single-object location template only).
    """
    family = layout_family(attributes)
    objs = attributes["objects"]  # already in caption order: left-to-right / top-to-bottom
    text = TEMPLATES[family][template]
    forms = slots["size_forms"]
    fields = {}
    for key, obj, form in zip("ABC", objs, forms):
        fields[key] = noun_phrase(obj, form)
        fields[key + "_"] = noun_phrase(obj, form, article=False)
    if "{loc}" in text:
        fields["loc"] = location_phrase(*objs[0]["cell"])
        fields["prep"] = slots.get("prep", "in")
    return text.format(**fields)


def scene_text(attributes: dict) -> str:
    """The attribute record written as text, the input of `model.input: text`: every object as
    "<size> <colour> <shape> in the <location>" in the record's (caption) order, joined by "; " — e.g.
    "big red circle in the top left; small blue star in the middle". The same record always gives the same
    text, and it states exactly what the image shows (its objects, their attributes and cells)."""
    return "; ".join(f"{o['size']} {o['colour']} {o['shape']} in the {location_phrase(*o['cell'])}"
                     for o in attributes["objects"])


def scene_texts(json_path: str) -> dict:
    """{image path: scene_text} of every image of a `shapes` caption file that has an attribute record (all
    splits; the paths are those `cwdpo.data.load_records` gives)."""
    return {r.path: scene_text(r.attributes) for r in load_karpathy(json_path, check_files=False)
            if r.attributes is not None}


@dataclass(frozen=True)
class ShapesSpec:
    """Sizes of one `shapes` dataset (splits in generation order) and its seed.

    `heldout` (colour, shape) combinations never occur in the regular splits. `qa`: each image also gets
    its question–answer turns (entry "qa": `cwdpo.mcq.shapes_set.qa_turns`), drawn from an RNG of their own
    (the images and captions do not change). The `ood` split
    ({domain: count}) is a NoCaps-style test set of images labelled by domain: "in-domain" (only seen
    combinations), "near-domain" (exactly one object with a held-out combination) and "out-of-domain"
    (every object a held-out combination). Each colour and each shape alone is seen in training; only
    the pairings are new.
    """

    splits: dict
    seed: int = 1
    image_size: int = 112
    p_counts: tuple = (0.3, 0.4, 0.3)
    counts_by_split: dict | None = None  # split -> (p of 1, 2, 3 objects) where it differs from p_counts
    p_size_word: float = 0.8
    refs_per_image: int = 5
    heldout: tuple = ()
    ood: dict | None = None
    qa: bool = optional(False)  # also write each image's instruction turns (`cwdpo.mcq.shapes_set.qa_turns`)


DOMAINS = ("in-domain", "near-domain", "out-of-domain")


def sample_attributes(rng: random.Random, spec: ShapesSpec, domain: str | None = None,
                      split: str | None = None) -> dict:
    """One random scene: 1-3 objects in a 3x3 grid, with the relation between them.

    Objects never use a held-out (colour, shape) combination, except in an `ood` domain: near-domain
    makes exactly one object (at random) a held-out combination, out-of-domain all of them."""
    n = rng.choices((1, 2, 3), weights=(spec.counts_by_split or {}).get(split, spec.p_counts))[0]
    heldout = [tuple(x) for x in spec.heldout]
    if domain == "near-domain":
        special = {rng.randrange(n)}
    elif domain == "out-of-domain":
        special = set(range(n))
    else:
        special = set()
    counter = iter(range(n))

    def obj(cell):
        k = next(counter)
        if k in special:
            colour, shape = rng.choice(heldout)
        else:
            while True:
                shape, colour = rng.choice(SHAPES), rng.choice(COLOURS)
                if (colour, shape) not in heldout:
                    break
        return {"shape": shape, "colour": colour, "size": rng.choice(SIZES), "cell": list(cell)}

    if n == 1:
        return {"objects": [obj((rng.randrange(3), rng.randrange(3)))], "relation": None}
    if n == 2:
        relation = rng.choice(("h", "v"))
        line = rng.randrange(3)
        a, b = sorted(rng.sample(range(3), 2))
        cells = [(line, a), (line, b)] if relation == "h" else [(a, line), (b, line)]
        return {"objects": [obj(c) for c in cells], "relation": relation}
    return {"objects": [obj((rng.randrange(3), col)) for col in range(3)], "relation": "row3"}


def sample_captions(rng: random.Random, attributes: dict, spec: ShapesSpec) -> list[dict]:
    """`refs_per_image` distinct captions, each with the template index and slots it was rendered with."""
    family = layout_family(attributes)
    n_templates = len(TEMPLATES[family])
    out, seen = [], set()
    order = list(range(n_templates))
    rng.shuffle(order)
    attempts = 0
    while len(out) < spec.refs_per_image:
        template = order[len(out) % n_templates] if attempts < n_templates else rng.randrange(n_templates)
        attempts += 1
        slots = {"size_forms": [rng.randrange(2) if rng.random() < spec.p_size_word else None
                                for _ in attributes["objects"]],
                 "prep": rng.choice(("in", "at"))}
        raw = render_caption(attributes, template, slots)
        if raw in seen:
            if attempts > 200:
                raise RuntimeError(f"cannot draw {spec.refs_per_image} distinct captions for {attributes}")
            continue
        seen.add(raw)
        out.append({"raw": raw, "template": template, "slots": slots})
    return out


def draw_image(attributes: dict, size: int, rng: random.Random):
    """Render the scene with PIL: near-white background, shapes centred in their grid cell (+-3 px)."""
    from PIL import Image, ImageDraw
    import math

    bg = tuple(rng.randint(235, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    scale = size / 112.0
    cell = size / 3.0
    for obj in attributes["objects"]:
        row, col = obj["cell"]
        cx = (col + 0.5) * cell + rng.randint(-3, 3) * scale
        cy = (row + 0.5) * cell + rng.randint(-3, 3) * scale
        r = HALF_EXTENT[obj["size"]] * scale
        fill = RGB[obj["colour"]]
        shape = obj["shape"]
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape == "square":
            draw.rectangle((cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9), fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)], fill=fill)
        elif shape == "star":
            pts = []
            for k in range(10):
                rad = r if k % 2 == 0 else r * 0.42
                ang = -math.pi / 2 + k * math.pi / 5
                pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
            draw.polygon(pts, fill=fill)
        elif shape == "cross":
            w = r * 0.34
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        else:  # pragma: no cover - SHAPES is closed
            raise ValueError(shape)
    return img


def generate(out_dir: str, spec: ShapesSpec, progress: bool = True) -> str:
    """Write images/<split>/*.png and dataset_shapes.json (Karpathy format) under `out_dir`.

    Every image is drawn from its own RNG seeded by (seed, split, index), so a split's content does not
    depend on the sizes of the other splits. Returns the JSON path.
    """
    from tqdm import tqdm

    if spec.ood and not spec.heldout:
        raise ValueError("shapes: an `ood` split needs held-out (colour, shape) combinations")
    jobs = [(split, i, None) for split, count in spec.splits.items() for i in range(count)]
    k = 0
    for domain in DOMAINS:
        for _ in range((spec.ood or {}).get(domain, 0)):
            jobs.append(("ood", k, domain))
            k += 1
    images, imgid, sentid = [], 0, 0
    if spec.qa:
        from .mcq.shapes_set import qa_turns
        universe = [f"{c} {s}" for c in COLOURS for s in SHAPES]  # every nameable object (POPE's)
    for split in sorted({j[0] for j in jobs}):
        os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
    for split, i, domain in tqdm(jobs, desc="shapes", disable=not progress, mininterval=1.0):
        rng = random.Random(f"shapes:{spec.seed}:{split}:{i}")
        attributes = sample_attributes(rng, spec, domain, split)
        captions = sample_captions(rng, attributes, spec)
        filename = f"shapes_{split}_{i:06d}.png"
        draw_image(attributes, spec.image_size, rng).save(
            os.path.join(out_dir, "images", split, filename), format="PNG")
        sentences = []
        for cap in captions:
            sentences.append({"raw": cap["raw"], "tokens": caption_tokens(cap["raw"]), "imgid": imgid,
                              "sentid": sentid, "template": cap["template"], "slots": cap["slots"]})
            sentid += 1
        entry = {"filepath": f"images/{split}", "filename": filename, "imgid": imgid, "cocoid": imgid,
                 "split": split, "sentids": [s["sentid"] for s in sentences],
                 "sentences": sentences, "attributes": attributes}
        if domain is not None:
            entry["domain"] = domain
        if spec.qa:
            entry["qa"] = qa_turns(attributes, random.Random(f"shapes-qa:{spec.seed}:{split}:{i}"), universe)
        images.append(entry)
        imgid += 1
    path = os.path.join(out_dir, "dataset_shapes.json")
    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump({"dataset": "shapes", "heldout": [list(x) for x in spec.heldout], "images": images}, f,
                      separators=(",", ":"))
    write_atomically(path, dump)
    return path


def write_dataset(spec: ShapesSpec, out_dir: str) -> dict:
    """`cwdpo prepare-data`: the dataset of `spec` under `out_dir`, and summary.json (images per split,
    captions). Returns the summary."""
    records = load_karpathy(generate(out_dir, spec))
    counts: dict = {}
    for r in records:
        counts[r.split] = counts.get(r.split, 0) + 1
    summary = {"images": counts, "captions": sum(len(r.captions) for r in records)}
    write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary


# ---- caption parsing: used by tests and by the negatives to check what a caption states ----

def mentioned_objects(raw: str) -> list[tuple]:
    """(size or None, colour, shape) triples named in a caption, in order of mention."""
    words = caption_tokens(raw)
    size_of = {w: s for s, ws in SIZE_WORDS.items() for w in ws}
    out = []
    for i, w in enumerate(words):
        if w in SHAPES and i >= 1 and words[i - 1] in COLOURS:
            size = size_of.get(words[i - 2]) if i >= 2 else None
            out.append((size, words[i - 1], w))
    return out


def describes(raw: str, attributes: dict) -> bool:
    """True when every object named in `raw` is in the scene (colour, shape, size when named), the count
    matches and every relation or location phrase agrees with the attribute record."""
    named = mentioned_objects(raw)
    objs = attributes["objects"]
    if len(named) != len(objs):
        return False
    # some assignment of mentions to objects must agree on colour, shape and (when named) size
    if not any(all(o["colour"] == c and o["shape"] == sh and (sz is None or o["size"] == sz)
                   for (sz, c, sh), o in zip(named, perm)) for perm in itertools.permutations(objs)):
        return False
    # ordered relations and locations: the caption must be one the grammar renders for this scene
    family = layout_family(attributes)
    for forms in itertools.product((None, 0, 1), repeat=len(objs)):
        for template in range(len(TEMPLATES[family])):
            for prep in ("in", "at"):
                if render_caption(attributes, template, {"size_forms": list(forms), "prep": prep}) == raw:
                    return True
    return False


# ---- fluency: is a caption one the generator's words can write? ----

def caption_vocabulary() -> frozenset:
    """Every word the caption grammar can write (Karpathy tokens): the templates' own words, the noun
    phrases' articles, size, colour and shape words, and the location and preposition words."""
    words = set()
    for family in TEMPLATES.values():
        for template in family:
            words.update(caption_tokens(re.sub(r"\{[A-Za-z_]+\}", " ", template)))
    words.update(("a", "an", "in", "at", "the"))
    words.update(w for ws in SIZE_WORDS.values() for w in ws)
    words.update(COLOURS + SHAPES + ROW_WORDS + COL_WORDS)
    return frozenset(words)


CAPTION_VOCABULARY = caption_vocabulary()
# every character the grammar writes: its words' letters, the templates' punctuation, the space (a caption
# with another one — a U+FFFD from a byte-level token cut in half, a stray digit — is broken, though the
# word tokenizer, which keeps letters and digits only, would not see it)
CAPTION_CHARACTERS = frozenset("".join(CAPTION_VOCABULARY) + " " + "".join(
    re.sub(r"\{[A-Za-z_]+\}", "", t) for family in TEMPLATES.values() for t in family))


def caption_fluency(raw: str) -> str | None:
    """Why a caption is broken, or None when it is fluent: "empty" (no word at all), "oov" (a word the
    caption grammar never writes, e.g. a fused "purpleg" or a stray letter run) or "chars" (a character it
    never writes, e.g. "orange\ufffd"). A fluency check, not a truth check: a fluent caption can still name
    the wrong objects (`cwdpo.grounding`)."""
    words = caption_tokens(raw)
    if not words:
        return "empty"
    if any(w not in CAPTION_VOCABULARY for w in words):
        return "oov"
    if any(ch not in CAPTION_CHARACTERS for ch in raw.strip().lower()):
        return "chars"
    return None
