"""Grounding: the shapes grammar parsed back from captions against attribute records, and COCO CHAIR."""
import json
import subprocess
import random

import pytest

from cwdpo import grounding as G
from cwdpo import shapes as S


def obj(shape, colour, size="big", cell=(1, 1)):
    return {"shape": shape, "colour": colour, "size": size, "cell": list(cell)}


ONE = {"objects": [obj("circle", "red", "big", (0, 0))], "relation": None}
PAIR_H = {"objects": [obj("star", "blue", "small", (1, 0)), obj("cross", "green", "big", (1, 2))], "relation": "h"}
PAIR_V = {"objects": [obj("square", "black", "big", (0, 1)), obj("triangle", "yellow", "small", (2, 1))],
          "relation": "v"}
ROW3 = {"objects": [obj("circle", "red", "big", (0, 0)), obj("star", "blue", "small", (2, 1)),
                    obj("cross", "orange", "big", (1, 2))], "relation": "row3"}


def test_every_template_of_the_grammar_parses_back_to_its_scene():
    """Every reference caption the generator renders names exactly its objects and states only true
    relations: nothing hallucinated, every object recalled, every attribute and relation right."""
    rng = random.Random(0)
    spec = S.ShapesSpec(splits={"t": 1})
    seen_templates = set()
    for _ in range(2000):
        attrs = S.sample_attributes(rng, spec)
        for cap in S.sample_captions(rng, attrs, spec):
            seen_templates.add((S.layout_family(attrs), cap["template"]))
            g = G.ground(cap["raw"], attrs)
            assert g["hallucinated"] == 0 and g["count_right"] and g["recalled"] == len(attrs["objects"]), cap
            for attr in ("colour", "shape", "size", "relation"):
                assert g[attr][0] == g[attr][1], (cap["raw"], attr, g)
    assert len(seen_templates) == sum(len(t) for t in S.TEMPLATES.values())  # every template was checked


@pytest.mark.parametrize("text,attrs,expect", [
    # synonyms of the size words: large = big, little = small
    ("a large red circle", ONE, dict(mentions=1, hallucinated=0, size=[1, 1])),
    ("a little red circle", ONE, dict(mentions=1, hallucinated=1, size=[0, 1])),
    ("one small red circle in the top left", ONE, dict(hallucinated=1, relation=[0, 0], size=[0, 1])),
    ("a big red circle in the top left", ONE, dict(hallucinated=0, relation=[1, 1])),
    ("a big red circle at the bottom right", ONE, dict(hallucinated=0, relation=[0, 1])),
    # wrong shape, wrong colour: hallucinated; the alignment scores each attribute on its own
    ("a big red star", ONE, dict(hallucinated=1, shape=[0, 1], colour=[1, 1])),
    ("a big blue circle", ONE, dict(hallucinated=1, shape=[1, 1], colour=[0, 1])),
    # relations between two objects, in both orders of mention
    ("a small blue star to the left of a big green cross", PAIR_H, dict(hallucinated=0, relation=[1, 1])),
    ("a big green cross to the left of a small blue star", PAIR_H, dict(hallucinated=0, relation=[0, 1])),
    ("a big green cross on the right of a blue star", PAIR_H, dict(hallucinated=0, relation=[1, 1])),
    ("there is a blue star and a green cross on its right", PAIR_H, dict(relation=[1, 1], recalled=2)),
    ("a small yellow triangle under a black square", PAIR_V, dict(hallucinated=0, relation=[1, 1])),
    ("a black square below a yellow triangle", PAIR_V, dict(hallucinated=0, relation=[0, 1])),
    ("a black square at the top and a yellow triangle at the bottom", PAIR_V, dict(relation=[1, 1])),
    # three-object lists: "from left to right" states the order, a plain list does not
    ("a red circle, a blue star and an orange cross from left to right", ROW3, dict(relation=[2, 2], recalled=3)),
    ("from left to right: a blue star, a red circle and an orange cross", ROW3, dict(relation=[1, 2])),
    ("three shapes: a blue star, a red circle and an orange cross", ROW3, dict(relation=[0, 0], count_right=True)),
    ("a red circle to the left of a blue star and an orange cross", ROW3, dict(relation=[2, 2])),
    # a shape named twice: both mentions exist in the image, but only one object is recalled
    ("a red circle to the left of a red circle", ONE, dict(mentions=2, hallucinated=0, recalled=1,
                                                            count_right=False)),
    # plurals: a quantity word counts the objects, each plural mention is one (CHAIR) mention
    ("two red circles", ONE, dict(mentions=1, hallucinated=0, count_right=False)),
    ("three shapes", ROW3, dict(mentions=0, hallucinated=0, recalled=0, count_right=False)),
    # a caption with no shape word at all
    ("on a white background", ONE, dict(mentions=0, hallucinated=0, recalled=0, count_right=False,
                                        shape=[0, 0])),
])
def test_parser_on_hand_written_captions(text, attrs, expect):
    g = G.ground(text, attrs)
    for key, value in expect.items():
        assert g[key] == value, (text, key, g)


def test_corpus_measures_chair_recall_and_one_object_accuracy():
    caps = {"a": "a big red circle", "b": "a big red star", "c": "a small blue star to the left of a big green cross",
            "d": "a small blue star to the left of a big red cross"}
    attrs = {"a": ONE, "b": ONE, "c": PAIR_H, "d": PAIR_H}
    out = G.grounding_scores(caps, attrs)
    c = out["corpus"]
    assert c["CHAIR_i"] == pytest.approx(2 / 6)  # "red star", "red cross" of 6 mentions
    assert c["CHAIR_s"] == pytest.approx(2 / 4)
    assert c["recall"] == pytest.approx((1 + 0 + 2 + 1) / 6)
    assert c["1-obj shape acc."] == 0.5 and c["1-obj colour acc."] == 1.0
    assert out["per_image"]["CHAIR_s"] == {"a": 0.0, "b": 1.0, "c": 0.0, "d": 1.0}
    assert c["relation acc."] == 1.0  # "d" names a cross that is not there: its relation is not checked


def test_every_gentle_negative_of_colour_shape_size_or_count_is_caught():
    """A gentle negative that changes what objects the caption names is hallucinated, miscounted or misses
    an object: the grounding measures see every one of them."""
    from cwdpo.data import ImageRecord
    from cwdpo.negatives import gentle_shapes
    rng = random.Random(1)
    spec = S.ShapesSpec(splits={"t": 1})
    checked = 0
    for _ in range(600):
        attrs = S.sample_attributes(rng, spec)
        caps = S.sample_captions(rng, attrs, spec)
        rec = ImageRecord("x", "p", "t", [c["raw"] for c in caps], attrs,
                          extra={"sentence_meta": [{"template": c["template"], "slots": c["slots"]} for c in caps]})
        for kind in ("colour", "shape", "count"):
            neg = gentle_shapes(rec, 0, rng, [kind])
            if neg is None:
                continue
            g = G.ground(neg["text"], attrs)
            assert g["hallucinated"] > 0 or not g["count_right"] or g["recalled"] < g["objects"], neg
            checked += 1
    assert checked > 1000


def test_coco_chair_with_synonyms_two_word_names_and_reference_objects():
    vocab = G.coco_synonyms()
    assert G.coco_objects("Two men eat hot dogs beside a bus", vocab) == {"person", "hot dog", "bus"}
    assert G.coco_objects("a puppy on a sofa", vocab) == {"dog", "couch"}
    out = G.chair_scores(
        {"1": "a dog on a couch next to a cat", "2": "a man riding a bike", "3": "an empty room"},
        {"1": ["a cat sleeping on a sofa"], "2": ["a person on a bicycle"], "3": ["a room with a chair"]},
        {"1": ["cat", "couch"], "2": ["person", "bicycle"], "3": ["chair"]})
    assert out["corpus"]["CHAIR_i"] == pytest.approx(1 / 5)  # dog is in neither annotations nor references
    assert out["corpus"]["CHAIR_s"] == pytest.approx(1 / 3)
    assert out["corpus"]["recall"] == pytest.approx(4 / 5)


def test_coco_mentions_follow_the_reference_rules_repeats_kept():
    vocab = G.coco_synonyms()
    assert G.coco_mentions("a dog chases another dog and a cat", vocab) == ["dog", "dog", "cat"]
    assert G.coco_mentions("a baby elephant and an adult giraffe", vocab) == ["elephant", "giraffe"]
    assert G.coco_mentions("a passenger jet and a passenger train", vocab) == ["airplane", "train"]
    assert G.coco_mentions("a man in a bow tie", vocab) == ["person", "tie"]
    assert G.coco_mentions("a toilet seat", vocab) == ["toilet"]
    assert G.coco_mentions("the seat of the toilet is up", vocab) == ["toilet"]  # "seat" is no chair here
    assert G.coco_mentions("a seat by the window", vocab) == ["chair"]
    assert G.coco_mentions("two hot dogs", vocab) == ["hot dog"]
    # the distinct count reads the same captions without the qualifier rules
    assert G.coco_objects("a baby elephant", vocab) == {"person", "elephant"}
    assert G.coco_objects("the seat of the toilet is up", vocab) == {"chair", "toilet"}


# Worked by hand from the reference's rules: caption, its references, annotated objects; then per variant
# (named, hallucinated) — reference: every mention; distinct: each caption's categories once.
CHAIR_CASES = [
    # dog named twice, cat once; only the dog is there: reference 1 of 3 mentions, distinct 1 of 2 categories
    ("a dog chases a dog and a cat", ["a dog running"], ["dog"], (3, 1), (2, 1)),
    # "baby elephant" is the elephant: no person; the distinct count reads "baby" as a person
    ("a baby elephant", ["an elephant walking"], ["elephant"], (1, 0), (2, 1)),
    # "passenger jet": the airplane, no person
    ("a passenger jet on the runway", ["a plane at the airport"], ["airplane"], (1, 0), (2, 1)),
    # "seat" beside a toilet is not a chair
    ("a toilet with its seat up and a toilet brush", ["a small bathroom"], ["toilet"], (2, 0), (2, 1)),
    # a hallucinated cat twice: reference 2 of 3 mentions; distinct 1 of 2
    ("a cat and a man and another cat", ["a man standing"], ["person"], (3, 2), (2, 1)),
]


@pytest.mark.parametrize("variant,index", [("reference", 3), ("distinct", 4)])
def test_chair_variants_count_as_worked_by_hand(variant, index):
    caps = {str(n): c[0] for n, c in enumerate(CHAIR_CASES)}
    refs = {str(n): c[1] for n, c in enumerate(CHAIR_CASES)}
    objs = {str(n): c[2] for n, c in enumerate(CHAIR_CASES)}
    out = G.chair_scores(caps, refs, objs, variant=variant)
    named = sum(c[index][0] for c in CHAIR_CASES)
    halluc = sum(c[index][1] for c in CHAIR_CASES)
    assert (out["counts"]["named"], out["counts"]["hallucinated"]) == (named, halluc)
    assert out["corpus"]["CHAIR_i"] == pytest.approx(halluc / named)
    assert out["corpus"]["CHAIR_s"] == pytest.approx(sum(c[index][1] > 0 for c in CHAIR_CASES) / len(CHAIR_CASES))
    assert out["variant"] == variant
    words = [8, 3, 6, 10, 8]
    assert out["corpus"]["length"] == pytest.approx(sum(words) / len(words))
    # the hand-worked totals: reference 10 mentions, 3 hallucinated (CHAIR_i 0.30, CHAIR_s 0.4); distinct
    # 10 categories, 5 hallucinated (0.50, 1.0) — the two counts differ on the same captions
    assert (named, halluc) == {"reference": (10, 3), "distinct": (10, 5)}[variant]


def test_an_unknown_chair_variant_is_refused():
    with pytest.raises(ValueError, match="CHAIR variant 'mean'"):
        G.chair_scores({"1": "a dog"}, {"1": ["a dog"]}, {"1": ["dog"]}, variant="mean")


def test_coco_instances_are_read_into_categories_per_image(tmp_path):
    inst = {"images": [{"id": 7}, {"id": 8}, {"id": 9}], "categories": [{"id": 1, "name": "person"},
                                                                         {"id": 18, "name": "dog"}],
            "annotations": [{"image_id": 7, "category_id": 1}, {"image_id": 7, "category_id": 18},
                            {"image_id": 7, "category_id": 1}, {"image_id": 8, "category_id": 18}]}
    path = tmp_path / "instances_val2014.json"
    path.write_text(json.dumps(inst))
    assert G.load_coco_instances([str(path)], ["7", "9"]) == {"7": ["dog", "person"], "9": []}


@pytest.mark.slow
def test_per_image_recall_terms_average_to_the_pooled_recall_and_their_interval_holds_it():
    """Images with 1 and 2 objects: the mean of per-image ratios (0.75 here) is not the pooled recall (2/3);
    the per-image terms the tables bootstrap average to the pooled value, so its interval contains it."""
    from cwdpo.stats import paired_bootstrap_ci
    caps, attrs = {}, {}
    for i in range(40):  # one-object images, all right
        caps[f"one{i}"], attrs[f"one{i}"] = "a big red circle", ONE
    for i in range(40):  # two-object images, half the objects named
        caps[f"two{i}"], attrs[f"two{i}"] = "a small blue star", PAIR_H
    out = G.grounding_scores(caps, attrs)
    pooled = out["corpus"]["recall"]
    assert pooled == pytest.approx((40 + 40) / (40 + 80))
    terms = list(out["per_image"]["recall"].values())
    assert sum(terms) / len(terms) == pytest.approx(pooled)
    _, lo, hi = paired_bootstrap_ci(terms, [0.0] * len(terms))
    assert lo < pooled < hi and hi - lo < 0.2


def test_fluency_check_on_hand_written_captions():
    """Broken = empty, or a word the shapes caption grammar never writes; fluent whatever it claims."""
    from cwdpo.shapes import caption_fluency
    assert caption_fluency("") == "empty" and caption_fluency("  . , ") == "empty"
    assert caption_fluency("a small purpleG a large orange cross and a big green cross from left to right") == "oov"
    assert caption_fluency("a red circle zz") == "oov" and caption_fluency("a red dog") == "oov"
    # a character the grammar never writes, which the word tokenizer drops (seen in a DPO model's captions)
    assert caption_fluency("two shapes: a small red square and a small orange\ufffd") == "chars"
    assert caption_fluency("a red circle; a blue star") == "chars" and caption_fluency("a red circle 2") == "oov"
    for fluent in ("a big red circle in the top left", "there are three shapes, a red star, a blue circle and a "
                   "black cross", "two shapes: a little green square and a yellow star", "a red red red circle"):
        assert caption_fluency(fluent) is None, fluent


def test_every_generated_caption_is_fluent(shapes_records):
    from cwdpo.shapes import caption_fluency
    assert all(caption_fluency(c) is None for r in shapes_records for c in r.captions)


def test_grounding_scores_report_the_broken_share():
    from cwdpo.grounding import grounding_scores
    scene = {"objects": [{"shape": "star", "colour": "red", "size": "small", "cell": [1, 1]}], "relation": None}
    caps = {"1": "a small red star", "2": "", "3": "a smallred star", "4": "a small red star in the middle"}
    g = grounding_scores(caps, {k: scene for k in caps})
    assert g["corpus"]["broken"] == 0.5 and g["counts"]["empty"] == 1 and g["counts"]["oov"] == 1
    assert g["per_image"]["broken"] == {"1": 0.0, "2": 1.0, "3": 1.0, "4": 0.0}


def test_the_score_command_counts_chair_by_the_configured_variant(tmp_path):
    """`cwdpo score --chair` (config evaluate.chair, the score rule passes it): the reference count by default,
    the distinct count when asked, a bad value refused in one line."""
    doc = {"captions": {str(n): c[0] for n, c in enumerate(CHAIR_CASES)},
           "references": {str(n): c[1] for n, c in enumerate(CHAIR_CASES)},
           "objects": {str(n): c[2] for n, c in enumerate(CHAIR_CASES)}}
    cpath = tmp_path / "captions.json"
    cpath.write_text(json.dumps(doc))
    got = {}
    for variant in (None, "distinct"):
        spath = tmp_path / f"scores_{variant}.json"
        cmd = ["cwdpo", "score", "--captions", str(cpath), "--out", str(spath), "--metrics", "BLEU-4"]
        subprocess.run(cmd + (["--chair", variant] if variant else []), check=True, capture_output=True)
        got[variant] = json.loads(spath.read_text())["grounding"]
    assert (got[None]["variant"], got[None]["corpus"]["CHAIR_i"]) == ("reference", pytest.approx(3 / 10))
    assert (got["distinct"]["variant"], got["distinct"]["corpus"]["CHAIR_i"]) == ("distinct", pytest.approx(5 / 10))
    bad = subprocess.run(["cwdpo", "score", "--captions", str(cpath), "--out", str(tmp_path / "x.json"), "--chair",
                          "mean"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.splitlines()[-1] == (
        "cwdpo score: --chair mean: one of reference, distinct (config evaluate.chair)")
