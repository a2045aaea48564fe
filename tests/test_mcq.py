"""Multiple-choice VQA evaluation: loaders (MMBench / MMMU / JSONL layouts), the `shapes` MCQ set, prompts,
letter parsing, log-likelihood and generation scoring, and circular evaluation."""
import base64
import io
import json
import os

import pytest
import torch
from PIL import Image

from cwdpo.data import DataError
from cwdpo.logprobs import Encoder, completion_logps, hf_forward_logps
from cwdpo.mcq import (ANSWER_INSTRUCTION, MCQItem, compose_images, evaluate_mcq, item_image, load_mcq,
                       mcq_prompt, open_rgb, parse_letter, rotation_order, shapes_mcq)
from cwdpo.models import load_model
from cwdpo.shapes import COLOURS, SHAPES


@pytest.fixture(scope="module")
def model64(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="float64")


def png_bytes(size=(24, 16), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


# ---- prompts, rotations, parsing ----

def test_prompt_layout_and_rotations(shapes_records):
    item = MCQItem("q1", [shapes_records[0].path], "What colour is the circle?", ["red", "blue", "green"], 1,
                   hint="Look closely.", category="colour")
    assert mcq_prompt(item) == ("Look closely.\nWhat colour is the circle?\nA. red\nB. blue\nC. green\n"
                                "Answer with the option's letter from the given choices directly.")
    assert mcq_prompt(item, [2, 0, 1]).split("\n")[2:5] == ["A. green", "B. red", "C. blue"]
    # rotation r shows option (j + r) mod N at letter j: the answer visits every letter once
    positions = [rotation_order(3, r).index(item.answer) for r in range(3)]
    assert sorted(positions) == [0, 1, 2] and rotation_order(3, 0) == [0, 1, 2]
    # several images: one side-by-side image, placeholders rewritten, a note on the layout
    a, b = Image.new("RGB", (30, 20), "red"), Image.new("RGB", (10, 40), "blue")
    multi = MCQItem("m", [a, b], "Is <image 1> bigger than <image 2>?", ["yes", "no"], 0)
    lines = mcq_prompt(multi).split("\n")
    assert lines[0].startswith("The images are shown side by side, from left to right")
    assert lines[1] == "Is image 1 bigger than image 2?" and lines[-1] == ANSWER_INSTRUCTION
    im = item_image(multi)
    assert im.size == (60 + 8 + 10, 40)  # common height 40: 30x20 -> 60x40, gap 8, then 10x40
    assert im.getpixel((5, 5)) == (255, 0, 0) and im.getpixel((64, 5)) == (255, 255, 255)
    assert im.getpixel((72, 5)) == (0, 0, 255)
    single = MCQItem("s", [a], "What is in <image 1>?", ["x", "y"], 0)
    assert "What is in the image?" in mcq_prompt(single)
    assert compose_images([a]).size == (30, 20)


OPTIONS4 = ["red", "green", "blue", "yellow"]


@pytest.mark.parametrize("text,expected", [
    ("B", 1), ("B.", 1), ("(B)", 1), ("[C]", 2), ("B) green", 1), ("B. green", 1), ("C: blue", 2), ("d", 3),
    ("The answer is B", 1), ("The answer is B.", 1), ("Answer: (C)", 2), ("I think the correct option is D", 3),
    ("green", 1), ("Yellow.", 3), ("the answer is blue", 2), ("It is C.", 2),
    ("A red circle", 0), ("a green square", 1),
    ("E", None), ("(F)", None), ("", None), ("   ", None), ("I don't know", None), ("red or blue", None),
    ("B or C", None), ("purple", None),
])
def test_parse_letter(text, expected):
    assert parse_letter(text, OPTIONS4) == expected


def test_parse_letter_respects_the_number_of_options():
    assert parse_letter("C", ["yes", "no"]) is None
    assert parse_letter("I", [str(i) for i in range(9)]) == 8
    assert parse_letter("no", ["yes", "no"]) == 1


# ---- circular evaluation ----

def hand_items(path):
    return [MCQItem("a0", [path], "Q0?", ["w", "x", "y", "z"], 0, category="c1"),
            MCQItem("a2", [path], "Q1?", ["w", "x", "y"], 2, category="c1"),
            MCQItem("b0", [path], "Q2?", ["p", "q"], 0, category="c2"),
            MCQItem("b1", [path], "Q3?", ["p", "q", "r", "s", "t"], 1, category=None)]


def test_circular_evaluation_with_injected_scorers(shapes_records):
    items = hand_items(shapes_records[0].path)

    def always_a(its, pres):
        return [{"pred": 0} for _ in pres]

    plain = evaluate_mcq(None, None, items, scorer=always_a)
    circ = evaluate_mcq(None, None, items, circular=True, scorer=always_a)
    # the items whose answer is the first source option are right in the source order only
    assert plain["accuracy"] == pytest.approx(2 / 4) and plain["presentations"] == 4
    assert circ["presentations"] == 4 + 3 + 2 + 5
    assert circ["accuracy"] == 0.0 and circ["accuracy_circular"] == 0.0
    assert circ["accuracy_plain"] == pytest.approx(2 / 4)
    assert circ["by_category"]["c1"] == {"n": 2, "accuracy": 0.0, "accuracy_plain": 0.5}
    assert circ["by_category"]["(none)"]["n"] == 1
    rec = circ["items"][0]
    assert [p["pred_letter"] for p in rec["predictions"]] == ["A"] * 4
    assert [p["answer_letter"] for p in rec["predictions"]] == ["A", "D", "C", "B"]
    assert [p["correct"] for p in rec["predictions"]] == [True, False, False, False]
    assert rec["correct_plain"] and not rec["correct"]

    def by_content(its, pres):  # rotation-invariant: picks the right option wherever it is shown
        return [{"pred": p.order.index(its[p.item_index].answer)} for p in pres]

    oracle = evaluate_mcq(None, None, items, circular=True, scorer=by_content)
    assert oracle["accuracy"] == 1.0 and oracle["correct"] == 4
    assert all(p["pred_option"] == r["answer"] for r in oracle["items"] for p in r["predictions"])


def per_rotation_predictions(model, processor, item):
    """Argmax of the mean log-probs of "<letter>. <option>" under every rotation, computed directly."""
    preds = []
    for r in range(len(item.options)):
        order = rotation_order(len(item.options), r)
        enc = Encoder(processor, mcq_prompt(item, order), max_response_tokens=256)
        rows = [(0, f"{'ABCDEFGHI'[j]}. {item.options[src]}") for j, src in enumerate(order)]
        with torch.no_grad():
            means = completion_logps(model, enc.build([item.images[0]], rows), enc.image_token_id).means
        preds.append(order[int(means.argmax())])  # the source option picked
    return preds


@pytest.mark.slow
def test_circular_evaluation_with_the_tiny_model(model64, processor, shapes_records):
    # hand-made items whose "answer" is what the model picks in the source order, chosen where the model's
    # pick changes under rotation: plain accuracy counts them, circular evaluation does not
    picked = []
    for rec in shapes_records[:12]:
        base = MCQItem(f"r{rec.image_id}", [rec.path], "What colour is the shape?", ["red", "green", "blue", "black"],
                       0, category="colour")
        preds = per_rotation_predictions(model64, processor, base)
        base.answer = preds[0]
        if len(set(preds)) > 1:
            picked.append(base)
        if len(picked) == 2:
            break
    assert len(picked) == 2, "the tiny model answered every probe item consistently under rotation"
    out = evaluate_mcq(model64, processor, picked, circular=True, batch_size=6)
    assert out["accuracy_plain"] == 1.0 and out["accuracy"] == 0.0
    plain = evaluate_mcq(model64, processor, picked, batch_size=6)
    assert plain["accuracy"] == 1.0 and plain["presentations"] == 2


# ---- scoring agrees with a direct log-likelihood computation ----

@pytest.mark.slow
def test_option_scores_equal_the_stock_hf_forward(model64, processor, shapes_records):
    items = shapes_mcq(shapes_records[:1], seed=0, per_image=1)
    a = Image.open(shapes_records[2].path).convert("RGB")
    b = Image.open(shapes_records[3].path).convert("RGB").resize((84, 56))
    items.append(MCQItem("multi", [a, b], "Which of <image 1> and <image 2> is left?",
                         ["image 1", "image 2", "neither"], 0, hint="Two pictures."))
    # batch_size 12 packs rotations (prompts of different lengths) of both items and both images into one
    # forward: units of 4 + 4 + 4 rows, then 4 + 3 + 3, then 3
    out = evaluate_mcq(model64, processor, items, circular=True, batch_size=12)
    tok = processor.tokenizer
    checked = 0
    for it, rec in zip(items, out["items"]):
        image = open_rgb(item_image(it))
        assert len(rec["predictions"]) == len(it.options)
        for pred in (rec["predictions"][0], rec["predictions"][-1]):  # the source order and the last rotation
            order = pred["order"]
            prompt = mcq_prompt(it, order)
            responses = [f"{'ABCDEFGHI'[j]}. {it.options[s]}" for j, s in enumerate(order)]
            sums = hf_forward_logps(model64, processor, prompt, [image] * len(responses), responses)
            counts = torch.tensor([len(tok(r + "<|im_end|>\n", add_special_tokens=False)["input_ids"])
                                   for r in responses], dtype=sums.dtype)
            ref = (sums / counts).tolist()
            assert pred["scores"] == pytest.approx(ref, abs=1e-5)
            best = max(range(len(ref)), key=lambda j: ref[j])
            assert pred["pred_letter"] == "ABCDEFGHI"[best]
            checked += 1
    assert checked == 2 * len(items) and out["presentations"] == sum(len(it.options) for it in items)
    assert out["settings"]["scoring"] == "loglik" and out["truncated_responses"] == 0
    # a prompt -> Encoder factory instead of the processor, one presentation per forward: the same scores
    again = evaluate_mcq(model64, lambda prompt: Encoder(processor, prompt, max_response_tokens=64), items,
                         circular=True, batch_size=1)
    for r1, r2 in zip(out["items"], again["items"]):
        for p1, p2 in zip(r1["predictions"], r2["predictions"]):
            assert p1["scores"] == pytest.approx(p2["scores"], abs=1e-8)
            assert p1["pred_letter"] == p2["pred_letter"]


@pytest.mark.slow
def test_generate_scoring_parses_the_greedy_output(model64, processor, shapes_records):
    import copy
    from cwdpo.generation import generate_captions
    # the random tiny model only writes newlines (dropped by the whitespace normalisation) and <|im_end|>;
    # with their (tied) embeddings zeroed it writes non-empty text, so the comparison below has content
    model = copy.deepcopy(model64)
    with torch.no_grad():
        for token in ("<|im_end|>", "\u010a"):
            model.get_input_embeddings().weight[processor.tokenizer.convert_tokens_to_ids(token)] = 0
    items = shapes_mcq(shapes_records[:2], seed=0, per_image=1)
    out = evaluate_mcq(model, processor, items, scoring="generate", circular=True, batch_size=3, max_new_tokens=6)
    outputs = []
    for it, rec in zip(items, out["items"]):
        for pred in rec["predictions"]:
            enc = Encoder(processor, mcq_prompt(it, pred["order"]))
            ref = generate_captions(model, enc, [it.images[0]], num_beams=1, max_new_tokens=6, batch_size=1)[0][0]
            assert pred["output"] == ref  # left-padded batches of different prompts = one prompt at a time
            outputs.append(ref)
            expected = parse_letter(ref, [it.options[s] for s in pred["order"]])
            assert pred["pred_letter"] == (None if expected is None else "ABCDEFGHI"[expected])
            assert pred["correct"] == (expected is not None and pred["order"][expected] == it.answer)
    assert all(outputs) and len(outputs) == 8
    assert out["unparsed"] == sum(p["pred_letter"] is None for r in out["items"] for p in r["predictions"])
    assert out["settings"]["scoring"] == "generate" and out["settings"]["max_new_tokens"] == 6


def test_generate_scoring_under_rotation(monkeypatch, shapes_records):
    """Canned outputs through the real parsing path: a content answer survives rotation, a letter does not."""
    import cwdpo.mcq.scoring as mcq
    items = [MCQItem("g1", [shapes_records[0].path], "What colour?", ["red", "green", "blue"], 1),
             MCQItem("g2", [shapes_records[0].path], "What shape?", ["circle", "star"], 0)]
    canned = {"g1": lambda p: "The answer is B", "g2": lambda p: "circle."}

    def fake_generate(model, encoder_for, its, pres, batch_size, max_new_tokens, progress):
        return [{"output": canned[its[p.item_index].id](p)} for p in pres]

    monkeypatch.setattr(mcq, "generate_answers", fake_generate)
    plain = evaluate_mcq(None, lambda prompt: None, items, scoring="generate")
    circ = evaluate_mcq(None, lambda prompt: None, items, scoring="generate", circular=True)
    assert [r["correct"] for r in plain["items"]] == [True, True]
    assert [r["correct"] for r in circ["items"]] == [False, True]
    assert [p["pred_letter"] for p in circ["items"][0]["predictions"]] == ["B", "B", "B"]
    assert [p["pred_letter"] for p in circ["items"][1]["predictions"]] == ["A", "B"]
    assert circ["accuracy"] == 0.5 and circ["accuracy_plain"] == 1.0 and circ["unparsed"] == 0


# ---- the shapes MCQ set ----

def check_shapes_item(item, attrs):
    """Independent check that the item's marked answer is right for the scene and the only right option."""
    objs = attrs["objects"]
    assert len(item.options) == 4 and len(set(item.options)) == 4
    answer = item.options[item.answer]
    q = item.question
    kind = item.category
    if kind == "colour":
        shape = q[len("What colour is the "):-1]
        (obj,) = [o for o in objs if o["shape"] == shape]
        assert answer == obj["colour"] and set(item.options) <= set(COLOURS)
    elif kind == "shape":
        colour = q[len("What shape is the "):-len(" object?")]
        (obj,) = [o for o in objs if o["colour"] == colour]
        assert answer == obj["shape"] and set(item.options) <= set(SHAPES)
    elif kind == "count":
        assert q == "How many shapes are in the image?"
        assert sorted(item.options) == sorted(["one", "two", "three", "four"])
        assert answer == ["one", "two", "three"][len(objs) - 1]
    else:
        assert kind == "relation" and set(item.options) <= set(SHAPES)
        for phrase, axis, sign in (("to the left of", 1, -1), ("to the right of", 1, 1), ("above", 0, -1),
                                   ("below", 0, 1)):
            prefix = f"Which shape is {phrase} the "
            if q.startswith(prefix):
                break
        else:
            raise AssertionError(q)
        words = q[len(prefix):-1].split()
        ref = [o for o in objs if o["shape"] == words[-1] and (len(words) == 1 or o["colour"] == words[0])]
        assert len(ref) == 1, q  # the question names one object
        ref = ref[0]
        other_axis = 1 - axis
        # the objects on that side, in a horizontal (row3/h: different columns) or vertical (v) arrangement
        side = [o for o in objs if o is not ref and (o["cell"][axis] - ref["cell"][axis]) * sign > 0]
        if attrs["relation"] == "v":
            assert axis == 0 and all(o["cell"][other_axis] == ref["cell"][other_axis] for o in objs)
        else:
            assert axis == 1
        assert len(side) == 1, q  # exactly one object there: the answer is unique
        assert answer == side[0]["shape"]


def test_shapes_mcq_is_deterministic_and_correct(shapes_records):
    records = shapes_records[:60]
    items = shapes_mcq(records, seed=0)
    again = shapes_mcq(records, seed=0)
    key = [(it.id, it.question, tuple(it.options), it.answer, it.images[0]) for it in items]
    assert key == [(it.id, it.question, tuple(it.options), it.answer, it.images[0]) for it in again]
    other = shapes_mcq(records, seed=1)
    assert [it.id for it in other] == [it.id for it in items]  # the same questions ...
    assert [it.options for it in other] != [it.options for it in items]  # ... with other distractors/orders
    assert len({it.id for it in items}) == len(items)
    by_id = {r.image_id: r for r in records}
    kinds = {}
    for it in items:
        rec = by_id[it.meta["image_id"]]
        assert it.images == [rec.path]
        check_shapes_item(it, rec.attributes)
        kinds[it.category] = kinds.get(it.category, 0) + 1
    assert set(kinds) == {"colour", "shape", "count", "relation"}
    assert kinds["count"] == len(records)
    # answers are spread over the letters (the options are shuffled)
    assert len({it.answer for it in items}) == 4
    # an image's items do not depend on the other records
    sub = shapes_mcq(records[10:12], seed=0)
    assert [(i.id, i.options) for i in sub] == [(i.id, i.options) for i in items if i.meta["image_id"] in
                                                 {records[10].image_id, records[11].image_id}]
    few = shapes_mcq(records, seed=0, per_image=2)
    counts = {}
    for it in few:
        counts[it.meta["image_id"]] = counts.get(it.meta["image_id"], 0) + 1
    assert max(counts.values()) <= 2 and set(counts) == set(by_id)
    assert {it.id for it in few} <= {it.id for it in items}


# ---- loaders ----

def test_load_mmbench_tsv(tmp_path):
    import pandas as pd
    img = base64.b64encode(png_bytes((24, 16))).decode()
    rows = [
        {"index": 0, "question": "What colour?", "hint": "A hint.", "A": "red", "B": "blue", "C": "green",
         "D": "None", "answer": "D", "category": "attribute", "image": img},
        {"index": 1, "question": "How many?", "hint": None, "A": "1", "B": "2", "C": "3", "D": None,
         "answer": "B", "category": "count", "image": base64.b64encode(png_bytes((10, 30))).decode()},
        # a circular copy of row 0 (VLMEvalKit layout: index + k * 1e6, image given by reference)
        {"index": 1000000, "question": "What colour?", "hint": "A hint.", "A": "None", "B": "red", "C": "blue",
         "D": "green", "answer": "A", "category": "attribute", "image": "0"},
        # a distinct question that reuses row 1's image by reference
        {"index": 2, "question": "Which?", "hint": None, "A": "x", "B": "y", "C": None, "D": None,
         "answer": "a", "category": "count", "image": "1"},
    ]
    path = tmp_path / "mmbench.tsv"
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    items, summary = load_mcq(str(path), "mmbench", cache_dir=str(tmp_path / "cache"))
    assert [it.id for it in items] == ["0", "1", "2"]
    assert summary["loaded"] == 3 and summary["rows"] == 4 and summary["by_reason"] == {"circular copy": 1}
    a, b, c = items
    assert a.options == ["red", "blue", "green", "None"] and a.answer == 3 and a.hint == "A hint."
    assert b.options == ["1", "2", "3"] and b.answer == 1 and b.hint is None and b.category == "count"
    assert c.options == ["x", "y"] and c.answer == 0
    assert isinstance(a.images[0], Image.Image) and a.images[0].size == (24, 16)
    assert c.images[0].size == (10, 30) and open_rgb(c.images[0]).getpixel((0, 0)) == (200, 30, 30)

    bad = rows[:2] + [{**rows[3], "answer": "C"},
                      {**rows[1], "index": 7, "image": base64.b64encode(b"not an image").decode()},
                      {**rows[1], "index": 1}]
    pd.DataFrame(bad).to_csv(path, sep="\t", index=False)
    with pytest.raises(DataError, match=r"mmbench\.tsv: row 2 \(id 2\): answer 'C'"):
        load_mcq(str(path), "mmbench", cache_dir=str(tmp_path / "cache"))
    items, summary = load_mcq(str(path), "mmbench", on_bad_input="skip", cache_dir=str(tmp_path / "cache"))
    assert len(items) == 2 and summary["by_reason"] == {"bad answer": 1, "bad image": 1, "duplicate id": 1}
    assert [s["row"] for s in summary["skipped_rows"]] == [2, 3, 4] and summary["rows"] == 5


def test_load_mmbench_parquet_bytes_and_image_feature(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    cols = {"index": [5, 6], "question": ["Q5", "Q6"], "hint": [None, "h"], "A": ["a", "c"], "B": ["b", "d"],
            "C": [None, "e"], "D": [None, None], "answer": ["B", "C"], "category": ["x", "y"]}
    raw = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({**cols, "image": [png_bytes((20, 20)), png_bytes((8, 12))]}), raw)
    feat = tmp_path / "feature.parquet"
    features = datasets.Features({**{k: datasets.Value("string") for k in cols if k != "index"},
                                  "index": datasets.Value("int64"), "image": datasets.Image()})
    datasets.Dataset.from_dict({**cols, "image": [{"bytes": png_bytes((20, 20)), "path": None},
                                                  {"bytes": png_bytes((8, 12)), "path": None}]},
                               features=features).to_parquet(str(feat))
    for path in (raw, feat):
        items, summary = load_mcq(str(path), "mmbench", cache_dir=str(tmp_path / "cache"))
        assert [(it.id, it.options, it.answer, it.hint) for it in items] == \
            [("5", ["a", "b"], 1, None), ("6", ["c", "d", "e"], 2, "h")]
        assert [it.images[0].size for it in items] == [(20, 20), (8, 12)] and summary["skipped"] == 0


def test_load_mmmu_parquet(tmp_path):
    import datasets
    img = {f"image_{k}": datasets.Image() for k in range(1, 8)}
    features = datasets.Features({"id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "options": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "question_type": datasets.Value("string"), "subfield": datasets.Value("string"),
                                  "topic_difficulty": datasets.Value("string"), **img})

    def row(ident, question, options, answer, qtype, images):
        out = {"id": ident, "question": question, "options": options, "answer": answer, "question_type": qtype,
               "subfield": "Sub", "topic_difficulty": "Easy"}
        for k in range(1, 8):
            data = images.get(k)
            out[f"image_{k}"] = None if data is None else {"bytes": data, "path": None}
        return out

    rows = [row("validation_Art_Theory_1", "What is shown in <image 1>?", "['a vase', 'a cup', 'a bowl']", "B",
                "multiple-choice", {1: png_bytes((30, 20))}),
            row("validation_Math_2", "Compare <image 1> and <image 2>.", "['<image 1> is larger', 'equal', "
                "'<image 2> is larger']", "C", "multiple-choice", {1: png_bytes((30, 20)), 2: png_bytes((10, 40))}),
            row("validation_Math_3", "Compute the area.", "[]", "42", "open", {1: png_bytes()}),
            row("validation_Math_4", "Options only: which is a circle?", "['<image 3>', '<image 4>']", "A",
                "multiple-choice", {1: png_bytes((16, 16)), 3: png_bytes((8, 8)), 4: png_bytes((9, 9))})]
    path = tmp_path / "validation-00000-of-00001.parquet"
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    items, summary = load_mcq(str(path), "mmmu", cache_dir=str(tmp_path / "cache"))
    assert [it.id for it in items] == ["validation_Art_Theory_1", "validation_Math_2", "validation_Math_4"]
    assert summary["by_reason"] == {"open question": 1} and summary["skipped_rows"][0]["id"] == "validation_Math_3"
    art, multi, gap = items
    assert art.category == "Art_Theory" and art.options == ["a vase", "a cup", "a bowl"] and art.answer == 1
    assert art.meta["subfield"] == "Sub" and "What is shown in the image?" in mcq_prompt(art)
    assert len(multi.images) == 2 and multi.answer == 2 and multi.category == "Math"
    assert [im.size for im in multi.images] == [(30, 20), (10, 40)]
    prompt = mcq_prompt(multi)
    assert "Compare image 1 and image 2." in prompt and "C. image 2 is larger" in prompt
    assert item_image(multi).size == (60 + 8 + 10, 40)
    # image_2 is missing: image_3 and image_4 become images 2 and 3 and the placeholders follow them
    assert len(gap.images) == 3 and gap.options == ["<image 2>", "<image 3>"]
    assert mcq_prompt(gap).split("\n")[2:4] == ["A. image 2", "B. image 3"]

    bad = rows[:1] + [{**rows[1], "options": "['a', 'b'"}]
    datasets.Dataset.from_list(bad, features=features).to_parquet(str(path))
    with pytest.raises(DataError, match=r"row 1 \(id validation_Math_2\): options are not a Python list literal"):
        load_mcq(str(path), "mmmu", cache_dir=str(tmp_path / "cache"))
    items, summary = load_mcq(str(path), "mmmu", on_bad_input="skip", cache_dir=str(tmp_path / "cache"))
    assert len(items) == 1 and summary["by_reason"] == {"bad options": 1}


def test_load_jsonl(tmp_path, shapes_records):
    rel = os.path.relpath(shapes_records[0].path, os.path.dirname(shapes_records[0].path))
    root = os.path.dirname(shapes_records[0].path)
    rows = [{"id": "j1", "images": [rel], "question": "Q?", "options": ["a", "b", "c"], "answer": "C",
             "hint": None, "category": "k"},
            {"id": "j2", "images": [rel, rel], "question": "R?", "options": ["a", "b"], "answer": 0}]
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items, summary = load_mcq(str(path), "jsonl", image_root=root, cache_dir=str(tmp_path / "cache"))
    assert [(it.id, it.answer, len(it.images), it.category) for it in items] == [("j1", 2, 1, "k"), ("j2", 0, 2, None)]
    assert items[0].images == [shapes_records[0].path] and summary["loaded"] == 2
    # 0-based integer answers throughout (`datasets` reads the mixed letter/int column above as Json)
    same = tmp_path / "same.jsonl"
    same.write_text("".join(json.dumps({**r, "answer": i}) + "\n" for i, r in enumerate(rows)))
    items, _ = load_mcq(str(same), "jsonl", image_root=root, cache_dir=str(tmp_path / "cache"))
    assert [(it.id, it.answer, it.hint) for it in items] == [("j1", 0, None), ("j2", 1, None)]
    bad = rows + [{"id": "j3", "images": [rel], "question": "S?", "options": ["a"], "answer": 0},
                  {"id": "j4", "images": ["missing.png"], "question": "T?", "options": ["a", "b"], "answer": "B"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in bad) + "{not json\n")
    with pytest.raises(DataError, match=r"items\.jsonl: row 2 \(id j3\): 1 options"):
        load_mcq(str(path), "jsonl", image_root=root, cache_dir=str(tmp_path / "cache"))
    items, summary = load_mcq(str(path), "jsonl", image_root=root, on_bad_input="skip",
                              cache_dir=str(tmp_path / "cache"))
    assert [it.id for it in items] == ["j1", "j2"]
    assert summary["by_reason"] == {"bad options": 1, "bad image": 1, "invalid JSON": 1}
    assert [s["row"] for s in summary["skipped_rows"]] == [2, 3, 4]
