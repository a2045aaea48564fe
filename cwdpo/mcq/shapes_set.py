"""A generated multiple-choice set over `shapes` images, answerable from each image's attribute record."""
from __future__ import annotations

import random

from ..shapes import COLOURS, SHAPES
from .items import MCQItem

COUNT_WORDS = ("one", "two", "three", "four")
SHAPES_MCQ_KINDS = ("colour", "shape", "count", "relation")


def _refer(obj: dict, objs: list) -> str | None:
    """'the circle' when the shape is unique in the scene, else 'the red circle' when that is, else None."""
    if sum(o["shape"] == obj["shape"] for o in objs) == 1:
        return f"the {obj['shape']}"
    if sum(o["shape"] == obj["shape"] and o["colour"] == obj["colour"] for o in objs) == 1:
        return f"the {obj['colour']} {obj['shape']}"
    return None


def shapes_questions(attributes: dict) -> list:
    """Every answerable question of one `shapes` scene: (kind, key, question, answer, vocabulary).

    colour: "What colour is the {shape}?" for each shape occurring once; shape: "What shape is the {colour}
    object?" for each colour occurring once; count: "How many shapes are in the image?" (one..four);
    relation: horizontal pairs "Which shape is to the left of X?" / "...to the right of X?", vertical pairs
    "Which shape is above X?" / "...below X?", left-to-right triples the same two questions about the middle
    object (the only ones with a single answer); X names the reference object unambiguously ('the circle'
    or 'the red circle'), the answer is the other object's shape. Positions come from the grid cells.
    """
    objs = attributes["objects"]
    out = []
    for shape in SHAPES:
        hits = [o for o in objs if o["shape"] == shape]
        if len(hits) == 1:
            out.append(("colour", shape, f"What colour is the {shape}?", hits[0]["colour"], COLOURS))
    for colour in COLOURS:
        hits = [o for o in objs if o["colour"] == colour]
        if len(hits) == 1:
            out.append(("shape", colour, f"What shape is the {colour} object?", hits[0]["shape"], SHAPES))
    if 1 <= len(objs) <= len(COUNT_WORDS):
        out.append(("count", "count", "How many shapes are in the image?", COUNT_WORDS[len(objs) - 1], COUNT_WORDS))
    relation = attributes.get("relation")
    pairs = []  # (asked-about object, relation phrase, answer object)
    if relation == "h" and len(objs) == 2:
        a, b = sorted(objs, key=lambda o: o["cell"][1])
        pairs = [(b, "to the left of", a), (a, "to the right of", b)]
    elif relation == "v" and len(objs) == 2:
        a, b = sorted(objs, key=lambda o: o["cell"][0])
        pairs = [(b, "above", a), (a, "below", b)]
    elif relation == "row3" and len(objs) == 3:
        a, b, c = sorted(objs, key=lambda o: o["cell"][1])
        pairs = [(b, "to the left of", a), (b, "to the right of", c)]
    for ref, phrase, ans in pairs:
        name = _refer(ref, objs)
        if name is not None:
            key = f"{phrase.replace('to the ', '').replace(' ', '-')}:{name[4:].replace(' ', '-')}"
            out.append(("relation", key, f"Which shape is {phrase} {name}?", ans["shape"], SHAPES))
    return out


def shapes_mcq(records: list, seed: int = 0, per_image: int | None = None,
               kinds: tuple = SHAPES_MCQ_KINDS) -> list:
    """A deterministic MCQ set over `shapes` images, answerable from each record's attribute record.

    For every record (in order), the questions of `shapes_questions` whose kind is in `kinds`; with
    `per_image`, a seeded sample of at most that many of them (kept in generation order). Each question
    has 4 options: the answer and 3 distinct distractors drawn from the same vocabulary (colours, shapes,
    or one..four), shuffled. All randomness comes from an RNG seeded by (seed, image id), so an image's
    items do not depend on the other records. Item ids are "shapes:{image_id}:{kind}:{key}"; category is
    the kind.
    """
    items = []
    for rec in records:
        if not rec.attributes:
            raise ValueError(f"record {rec.image_id} has no attribute record (not a `shapes` image?)")
        rng = random.Random(f"shapes-mcq:{seed}:{rec.image_id}")
        questions = [q for q in shapes_questions(rec.attributes) if q[0] in kinds]
        if per_image is not None and len(questions) > per_image:
            keep = sorted(rng.sample(range(len(questions)), int(per_image)))
            questions = [questions[i] for i in keep]
        for kind, key, question, answer, vocab in questions:
            distractors = rng.sample([v for v in vocab if v != answer], 3)
            options = [answer] + distractors
            rng.shuffle(options)
            items.append(MCQItem(id=f"shapes:{rec.image_id}:{kind}:{key}", images=[rec.path], question=question,
                                 options=options, answer=options.index(answer), category=kind,
                                 meta={"image_id": rec.image_id, "kind": kind}))
    return items


def qa_turns(attributes: dict, rng: random.Random, universe: list) -> list:
    """The instruction turns of one `shapes` scene, for training: {kind, prompt, answer, negative}.

    - every question of `shapes_questions`, shown as the MCQ scorer shows an item (`mcq_prompt`: the question,
      4 lettered options — the answer and 3 distractors of its vocabulary, shuffled — and the answer
      instruction); the answer is "<letter>. <option>" (what the scorer's log-likelihood reads), the negative
      the same for a wrong option (SFT-C's gentle negative of the turn);
    - existence ("Is there a {colour} {shape} in the image?", POPE's question): "Yes" for each object of the
      scene and "No" for as many absent objects of `universe` drawn uniformly (never POPE's popular or
      adversarial sampling: those are evaluation settings); the negative is the other answer.
    """
    from ..pope import question, shapes_objects
    from .items import mcq_prompt, option_responses
    out = []
    for kind, _, text, answer, vocab in shapes_questions(attributes):
        options = [answer] + rng.sample([v for v in vocab if v != answer], 3)
        rng.shuffle(options)
        item = MCQItem(id="", images=[""], question=text, options=options, answer=options.index(answer),
                       category=kind)
        responses = option_responses(item, list(range(4)))
        wrong = rng.choice([r for j, r in enumerate(responses) if j != item.answer])
        out.append({"kind": kind, "prompt": mcq_prompt(item), "answer": responses[item.answer], "negative": wrong})
    present = shapes_objects(attributes)
    absent = rng.sample([o for o in universe if o not in present], min(len(present), len(universe) - len(present)))
    for obj, yes in [(o, True) for o in present] + [(o, False) for o in absent]:
        out.append({"kind": "existence", "prompt": question(obj), "answer": "Yes" if yes else "No",
                    "negative": "No" if yes else "Yes"})
    return out
