"""cwdpo/pope.py: POPE's answer parsers on hand-written answers, its scores, its three negative-sampling
settings over `shapes` records and the POPE release's file format."""
import json
import os

import pytest

from cwdpo import pope
from cwdpo.data import DataError

# answer -> (original, exact, yes_xor_no)
ANSWERS = {
    "Yes": ("yes", "yes", "yes"),
    "yes": ("yes", "yes", "yes"),
    " No ": ("no", "no", "no"),
    "No, there is not.": ("no", None, "no"),
    "Yes, there is a red circle in the image.": ("yes", None, "yes"),
    "There is not a red circle.": ("no", None, None),
    "a red circle on a white background": ("yes", None, None),  # a caption: original says yes
    "Yes. No.": ("yes", None, None),  # original reads the first sentence only
    "": ("yes", None, None),
    "NO": ("yes", "no", "no"),  # original matches "No"/"no"/"not" exactly
    "no.": ("no", None, "no"),
}


@pytest.mark.parametrize("answer", list(ANSWERS))
def test_each_parser_reads_hand_written_answers_as_its_source_does(answer):
    got = tuple(pope.parse_answer(answer, p) for p in pope.POPE_PARSERS)
    assert got == ANSWERS[answer]


def test_scores_count_yes_as_positive_and_unparsed_as_wrong():
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    answers = ["Yes", "no", "maybe", "No", "yes", "no"]
    out = pope.pope_scores(labels, answers, parser="yes_xor_no")
    # TP 1 (q1), FN 2 (q2 "no", q3 unparsed), FP 1 (q5), TN 2
    assert out["counts"] == {"tp": 1, "fp": 1, "tn": 2, "fn": 2}
    assert out["accuracy"] == pytest.approx(3 / 6) and out["precision"] == pytest.approx(1 / 2)
    assert out["recall"] == pytest.approx(1 / 3) and out["f1"] == pytest.approx(2 * 0.5 / 3 / (0.5 + 1 / 3))
    assert out["yes_ratio"] == pytest.approx(2 / 6) and out["unparsed"] == 1
    # the original parser reads "maybe" as yes: no unparsed answer, one more true positive
    orig = pope.pope_scores(labels, answers)
    assert (orig["unparsed"], orig["counts"]["tp"], orig["parser"]) == (0, 2, "original")
    assert pope.pope_scores(["no"], ["no"])["precision"] is None  # nothing said yes: precision undefined
    with pytest.raises(ValueError, match="POPE parser 'strict'"):
        pope.parse_answer("yes", "strict")


class _Rec:
    def __init__(self, image_id, objects):
        self.image_id, self.path = image_id, f"/img/{image_id}.png"
        self.attributes = {"objects": [{"colour": c, "shape": s} for c, s in objects]}


UNIVERSE = [f"{c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")]
# training images: red circle everywhere; blue square always beside it; green square once alone
TRAIN = [_Rec(f"t{i}", [("red", "circle"), ("blue", "square")]).attributes for i in range(5)] + [
    _Rec("t9", [("green", "square")]).attributes]


def test_settings_draw_absent_objects_at_random_by_popularity_and_by_co_occurrence():
    recs = [_Rec("a", [("red", "circle")]), _Rec("b", [("green", "circle"), ("green", "square")])]
    by = {s: pope.shapes_pope(recs, TRAIN, UNIVERSE, s) for s in pope.POPE_SETTINGS}
    for qs in by.values():
        assert [q["label"] for q in qs] == ["yes", "no", "yes", "yes", "no", "no"]  # balanced per image
        assert all(q["text"] == f"Is there a {q['object']} in the image?" for q in qs)
        assert all(q["object"] not in ("red circle",) for q in qs if q["image_id"] == "a" and q["label"] == "no")
    no = {s: [q["object"] for q in qs if q["label"] == "no"] for s, qs in by.items()}
    # popular: the most frequent absent objects (blue square 5, red circle 5 — ties by name — then green
    # square 1)
    assert no["popular"] == ["blue square", "blue square", "red circle"]
    # adversarial: what co-occurs with the red circle is the blue square
    assert no["adversarial"][0] == "blue square"
    assert pope.shapes_pope(recs, TRAIN, UNIVERSE, "random") == by["random"]  # deterministic
    overlap = pope.setting_overlap(recs, TRAIN, UNIVERSE)
    assert set(overlap) == {"popular", "adversarial"} and all(0 <= v <= 1 for v in overlap.values())


def test_the_pope_release_format_is_read_and_bad_lines_are_named(tmp_path):
    root = tmp_path / "val2014"
    root.mkdir()
    lines = [{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
              "label": "yes"}, {"question_id": 2, "image": "COCO_val2014_000000310196.jpg",
                                "text": "Is there a dog in the image?", "label": "no"}]
    path = tmp_path / "coco_pope_random.json"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    items = pope.load_pope_file(str(path), str(root))
    assert [(q["question_id"], q["label"]) for q in items] == [("1", "yes"), ("2", "no")]
    assert items[0]["image"] == os.path.realpath(root / "COCO_val2014_000000310196.jpg")
    for bad, msg in (({"question_id": 3, "image": "x.jpg", "text": "?"}, "missing label"),
                     ({"question_id": 3, "image": "x.jpg", "text": "?", "label": "maybe"}, "neither yes nor no"),
                     ({"question_id": 3, "image": "../../etc/passwd", "text": "?", "label": "no"}, "outside its root")):
        path.write_text(json.dumps(lines[0]) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=f":2: .*{msg}"):
            pope.load_pope_file(str(path), str(root))


def test_a_model_answers_every_setting_and_the_scores_are_those_of_its_answers(shapes_dir, tiny_model_dir, encoder):
    """evaluate_pope on the (untrained) tiny model: every question answered, each setting scored from its own
    answers by the configured parser, the mean over settings, and how far popular/adversarial differ from
    random."""
    from micro_specs import data as data_spec
    from cwdpo.models import load_model
    from cwdpo.specs import PopeSpec
    path = os.path.join(shapes_dir, "dataset_shapes.json")
    spec = PopeSpec(name="p", out="", format="shapes", settings=["random", "adversarial"], files=None, image_root=None,
                    images=4, parser="yes_xor_no", batch_size=5, max_new_tokens=3, seed=0,
                    data=data_spec(path, ["test"]), train=data_spec(path, ["train"]))
    doc = pope.evaluate_pope(load_model(tiny_model_dir), encoder, spec)
    assert set(doc["settings"]) == {"random", "adversarial"} and doc["parser"] == "yes_xor_no"
    for setting, d in doc["settings"].items():
        labels, answers = [a["label"] for a in d["answers"]], [a["answer"] for a in d["answers"]]
        assert len(answers) == d["n"] > 0 and labels.count("yes") == labels.count("no")
        assert {k: d[k] for k in ("accuracy", "f1", "yes_ratio", "unparsed")} == {
            k: pope.pope_scores(labels, answers, "yes_xor_no")[k] for k in ("accuracy", "f1", "yes_ratio", "unparsed")}
    acc = [d["accuracy"] for d in doc["settings"].values()]
    assert doc["mean"]["accuracy"] == pytest.approx(sum(acc) / len(acc))
    assert set(doc["no_questions_shared_with_random"]) == {"popular", "adversarial"}
