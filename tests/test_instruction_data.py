"""Instruction data of the testbed (issue: the testbed answers questions): the `shapes` generator's
question–answer turns (cwdpo/mcq/shapes_set.py `qa_turns`, cwdpo/shapes.py), their mix into training
(cwdpo/train.py `qa_items`) and the collator that asks each turn its own prompt (cwdpo/logprobs.py)."""
import json
import os
import random

import pytest
import torch

from cwdpo import shapes
from cwdpo.data import DataError, load_karpathy
from cwdpo.mcq import LETTERS, MCQItem, mcq_prompt, shapes_questions
from cwdpo.mcq.shapes_set import qa_turns
from cwdpo.pope import shapes_objects

UNIVERSE = [f"{c} {s}" for c in shapes.COLOURS for s in shapes.SHAPES]


@pytest.fixture(scope="module")
def qa_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("qa")
    shapes.generate(str(out / "on"), shapes.ShapesSpec(splits={"train": 30, "test": 6}, seed=5, qa=True),
                    progress=False)
    shapes.generate(str(out / "off"), shapes.ShapesSpec(splits={"train": 30, "test": 6}, seed=5), progress=False)
    return out


def test_qa_turns_add_to_the_dataset_and_change_nothing_else(qa_records):
    on = json.load(open(qa_records / "on" / "dataset_shapes.json"))
    off = json.load(open(qa_records / "off" / "dataset_shapes.json"))
    assert all("qa" in img and img["qa"] for img in on["images"]) and not any("qa" in img for img in off["images"])
    assert [{k: v for k, v in img.items() if k != "qa"} for img in on["images"]] == off["images"]
    for name in os.listdir(qa_records / "off" / "images" / "train"):
        assert (qa_records / "on" / "images" / "train" / name).read_bytes() == \
            (qa_records / "off" / "images" / "train" / name).read_bytes()
    recs = load_karpathy(str(qa_records / "on" / "dataset_shapes.json"))
    assert recs[0].qa == on["images"][0]["qa"] and "qa" not in recs[0].extra


def test_every_turn_is_answered_by_the_attribute_record_in_the_scorers_format(qa_records):
    recs = load_karpathy(str(qa_records / "on" / "dataset_shapes.json"))
    seen = set()
    for r in recs:
        questions = {q[2]: q[3] for q in shapes_questions(r.attributes)}
        present = set(shapes_objects(r.attributes))
        yes = no = 0
        for t in r.qa:
            seen.add(t["kind"])
            assert t["answer"] != t["negative"]
            if t["kind"] == "existence":
                obj = t["prompt"][len("Is there a "):-len(" in the image?")]
                assert t["answer"] == ("Yes" if obj in present else "No")
                yes, no = yes + (t["answer"] == "Yes"), no + (t["answer"] == "No")
                continue
            lines = t["prompt"].split("\n")
            question, options = lines[0], [line[3:] for line in lines[1:5]]
            item = MCQItem(id="", images=[""], question=question, options=options,
                           answer=options.index(questions[question]), category=t["kind"])
            assert t["prompt"] == mcq_prompt(item)  # exactly what the MCQ scorer shows
            assert t["answer"] == f"{LETTERS[item.answer]}. {questions[question]}"  # what its log-likelihood reads
            assert t["negative"][3:] != questions[question] and t["negative"][3:] in options
        assert yes == len(present) and no == len(present)  # as many absent objects as present ones
    assert seen == {"colour", "shape", "count", "relation", "existence"}


def test_qa_turns_are_drawn_from_their_own_rng():
    attrs = {"objects": [{"shape": "circle", "colour": "red", "size": "big", "cell": [0, 0]}], "relation": None}
    assert qa_turns(attrs, random.Random(1), UNIVERSE) == qa_turns(attrs, random.Random(1), UNIVERSE)


class _Rec:
    def __init__(self, i, qa):
        self.path, self.qa = f"/img/{i}.png", qa


def test_qa_items_make_the_configured_share_of_the_examples():
    from cwdpo.train import qa_items
    turns = [{"kind": "colour", "prompt": f"q{i}", "answer": "A. red", "negative": "B. blue"} for i in range(7)]
    recs = [_Rec(0, turns[:4]), _Rec(1, turns[4:])]
    assert qa_items(recs, 30, 0.0, "sft") == []
    items = qa_items(recs, 30, 0.25, "sft")  # 0.25 / 0.75 × 30 = 10 turns, every turn before any repeat
    assert len(items) == 10 and len({it["prompt"] for it in items[:7]}) == 7
    assert all(set(it) == {"image", "prompt", "response"} for it in items)
    sftc = qa_items(recs, 30, 0.25, "sft_c")
    assert [(it["positive"], it["negative"]) for it in sftc] == [("A. red", "B. blue")] * 10
    assert qa_items(recs, 30, 0.25, "sft", seed=1) != items  # seeded
    with pytest.raises(DataError, match="data.shapes.qa: true"):
        qa_items([_Rec(0, [])], 30, 0.5, "sft")


def test_the_collator_asks_each_item_its_own_prompt(encoder, shapes_records):
    from cwdpo.logprobs import Collator, Encoder
    rec = shapes_records[0]
    prompt = "How many shapes are in the image?\nA. one\nB. two\nC. three\nD. four\n" \
             "Answer with the option's letter from the given choices directly."
    items = [{"image": rec.path, "response": rec.captions[0]},
             {"image": rec.path, "prompt": prompt, "response": "B. two"}]
    batch = Collator(encoder, "sft")(items)["batch"]
    assert batch["row_image"].tolist() == [0, 1]  # one slot per (image, prompt)
    own = Encoder(encoder.processor, prompt, max_response_tokens=40).build([rec.path], [(0, "B. two")])
    caption = encoder.build([rec.path], [(0, rec.captions[0])])
    for row, ref in ((1, own), (0, caption)):
        n = int(ref.attention_mask[0].sum())
        assert torch.equal(batch["input_ids"][row, :n], ref.input_ids[0, :n])
        assert torch.equal(batch["completion_mask"][row, :n], ref.completion_mask[0, :n])
        assert torch.equal(batch["position_ids"][:, row, :n], ref.position_ids[:, 0, :n])
    same = Collator(encoder, "sft")([items[0], dict(items[0])])["batch"]
    assert same["row_image"].tolist() == [0, 0]  # items without a prompt share the image's slot, as before
