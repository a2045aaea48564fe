"""Negatives: gentle (one attribute), easy (other images, shuffled, off-topic), external JSONL, on-policy
samples, mixing ratio ρ, and the TRL-format pairs file."""
import json
import random

import pytest

from cwdpo import negatives as N
from cwdpo import shapes as S
from cwdpo.data import DataError, ImageRecord
import micro_specs as specs


def _diff(a, b):
    """What differs between two attribute records: a list of (what, index) entries."""
    out = []
    if len(a["objects"]) != len(b["objects"]):
        return [("count", None)]
    if a["relation"] != b["relation"]:
        out.append(("relation", None))
    # objects are compared as a multiset of (colour, shape, size, cell)
    ka = sorted((o["colour"], o["shape"], o["size"], tuple(o["cell"])) for o in a["objects"])
    kb = sorted((o["colour"], o["shape"], o["size"], tuple(o["cell"])) for o in b["objects"])
    for fld, i in (("colour", 0), ("shape", 1), ("size", 2)):
        if sorted(x[:i] + x[i + 1:] for x in ka) == sorted(x[:i] + x[i + 1:] for x in kb) and \
                sorted(x[i] for x in ka) != sorted(x[i] for x in kb):
            out.append((fld, None))
    if not out and ka != kb:
        ca = sorted((x[0], x[1], x[2]) for x in ka)
        cb = sorted((x[0], x[1], x[2]) for x in kb)
        out.append(("relation", None) if ca == cb else ("several", None))
    return out


def test_every_gentle_negative_changes_exactly_one_attribute(shapes_records):
    kinds = ["colour", "shape", "size", "count", "relation"]
    seen_kinds = set()
    n = 0
    for rec in shapes_records:
        for i in range(len(rec.captions)):
            neg = N.gentle_shapes(rec, i, random.Random(f"t{rec.image_id}:{i}"), kinds)
            if neg is None:
                continue
            n += 1
            seen_kinds.add(neg["kind"])
            d = _diff(rec.attributes, neg["attributes"])
            assert len(d) == 1 and d[0][0] != "several", (rec.captions[i], neg)
            # it describes the changed scene, not the image, and is no paraphrase of a reference
            assert S.describes(neg["text"], neg["attributes"]), neg
            assert not S.describes(neg["text"], rec.attributes), (neg["text"], rec.attributes)
            assert neg["text"].lower() not in {c.lower() for c in rec.captions}
    assert n > 0.8 * sum(len(r.captions) for r in shapes_records)
    assert seen_kinds == set(kinds)


def test_gentle_negative_keeps_the_positive_wording():
    attrs = {"objects": [{"shape": "circle", "colour": "red", "size": "big", "cell": [0, 0]},
                         {"shape": "star", "colour": "blue", "size": "small", "cell": [0, 2]}], "relation": "h"}
    slots = {"size_forms": [1, None], "prep": "in"}
    rec = ImageRecord("1", "x.png", "finetune", [S.render_caption(attrs, 0, slots)], attrs,
                      extra={"sentence_meta": [{"template": 0, "slots": slots}]})
    assert rec.captions[0] == "a large red circle to the left of a blue star"
    neg = N.gentle_shapes(rec, 0, random.Random(0), ["colour"])
    words_pos, words_neg = rec.captions[0].split(), neg["text"].split()
    assert len(words_pos) == len(words_neg)
    assert sum(a != b for a, b in zip(words_pos, words_neg)) == 1
    rel = N.gentle_shapes(rec, 0, random.Random(0), ["relation"])
    assert rel["text"] == "a blue star to the left of a large red circle"
    # a caption without size words has no size negative
    assert N.gentle_shapes(
        ImageRecord("2", "x.png", "f", ["a blue star to the left of ..."], attrs,
                    extra={"sentence_meta": [{"template": 0, "slots": {"size_forms": [None, None]}}]}),
        0, random.Random(0), ["size"]) is None


def test_lexicon_negatives_for_real_captions():
    rng = random.Random(3)
    cap = "Two dogs sit on the red couch next to a man."
    for _ in range(30):
        neg = N.gentle_lexicon(cap, rng, ["colour", "number", "preposition", "noun"])
        assert neg["text"] != cap
        a, b = cap.split(), neg["text"].split()
        changed = [w for w in a if w not in b]
        assert 1 <= len(changed) <= 2  # one word or one phrase of the lexicon
        assert neg["kind"] in ("colour", "number", "preposition", "noun")
    assert N.gentle_lexicon("Zxq vbn.", rng, ["colour"]) is None
    neg = N.gentle_lexicon("Red apples.", random.Random(0), ["colour"])
    assert neg["text"][0].isupper() and neg["text"].endswith("apples.")


def test_easy_negatives_come_from_other_images(shapes_records):
    recs = shapes_records[:30]
    rng = random.Random(0)
    kinds = set()
    for rec in recs:
        for i in range(len(rec.captions)):
            neg = N.easy_negative(rec, i, rng, ["other_image", "shuffled", "off_topic"], recs)
            kinds.add(neg["kind"])
            assert neg["text"].lower() not in {c.lower() for c in rec.captions}
            if neg["kind"] == "other_image":
                other = next(r for r in recs if r.image_id == neg["other_image"])
                assert other.image_id != rec.image_id and neg["text"] in other.captions
            elif neg["kind"] == "shuffled":
                assert sorted(neg["text"].split()) == sorted(rec.captions[i].split())
            else:
                assert neg["text"] in N.lexicon()["off_topic"]
    assert kinds == {"other_image", "shuffled", "off_topic"}


@pytest.mark.parametrize("line,needle", [
    ('{"image_id": 1, "negative": "a cat"', "not valid"),
    ('{"image_id": 1}', "missing or empty 'negative'"),
    ('{"image_id": 1, "negative": "   "}', "missing or empty 'negative'"),
    ('["image_id", 1]', "not a JSON object"),
    ('{"negative": "a cat"}', "image_id"),
    ('{"image_id": 999, "negative": "a cat"}', "unknown image_id"),
    ('{"image_id": 1, "negative": "a cat", "score": "high"}', "'score' must be a number"),
])
def test_external_reader_names_file_and_line(tmp_path, line, needle):
    p = tmp_path / "ext.jsonl"
    p.write_text('{"image_id": 1, "negative": "a red dog"}\n\n' + line + "\n")
    with pytest.raises(DataError) as err:
        N.read_external(str(p), known_ids={"1", "2"})
    assert f"{p}:3:" in str(err.value)
    assert needle in str(err.value)
    from cwdpo.data import BadInputLog
    log = BadInputLog()
    out = N.read_external(str(p), known_ids={"1", "2"}, on_bad_input="skip", bad_log=log)
    assert out == {"1": [{"text": "a red dog", "source": "external", "kind": "external"}]}
    assert log.summary()["skipped"] == 1


def test_external_negatives_are_used_for_their_images(shapes_records, tmp_path):
    recs = [r for r in shapes_records if r.split == "finetune"][:4]
    ext = {recs[0].image_id: [{"text": "an external negative", "source": "external", "kind": "gpt4o"}]}
    pairs, summary = N.build_pairs(recs, specs.negatives(pairs_per_image=5), rho=1.0, seed=0, external=ext)
    mine = [p for p in pairs if p["image_id"] == recs[0].image_id]
    assert mine and all(p["source"] == "external" and p["rejected_text"] == "an external negative" for p in mine)
    assert summary["by_source"]["external"] == len(mine)


@pytest.mark.parametrize("rho", [0.0, 0.25, 0.5, 1.0])
def test_rho_is_respected_exactly(shapes_records, rho):
    recs = [r for r in shapes_records if r.split == "finetune"][:20]
    onpolicy = {r.image_id: [{"text": f"sample {k} of {r.image_id}", "score": 0.1, "kept": True} for k in range(3)]
                for r in recs}
    pairs, summary = N.build_pairs(recs, specs.negatives(pairs_per_image=2), rho=rho, seed=1, onpolicy=onpolicy)
    n = len(pairs)
    n_ds = sum(p["source"] != "onpolicy" for p in pairs)
    assert n == 40 and n_ds == round(rho * 40) and summary["dataset"] == n_ds
    assert summary["onpolicy"] == n - n_ds and summary["fill"] == 1.0
    # a smaller on-policy pool gives what it has: the dataset share is never shrunk to keep ρ exact, and the
    # summary says how far the set falls short of its target
    small = {k: v[:1] for k, v in list(onpolicy.items())[:5]}
    pairs, summary = N.build_pairs(recs, specs.negatives(pairs_per_image=2), rho=rho, seed=1, onpolicy=small)
    assert summary["dataset"] == round(rho * 40) and summary["targets"]["dataset"] == round(rho * 40)
    assert summary["onpolicy"] == min(5, 40 - round(rho * 40)) == summary["by_source"].get("onpolicy", 0)
    assert summary["pairs"] == len(pairs) == summary["dataset"] + summary["onpolicy"]
    assert summary["fill"] == pytest.approx(len(pairs) / 40) and summary["targets"]["onpolicy"] == 40 - round(rho * 40)


def test_a_set_below_its_floor_stops_with_one_line_naming_pool_rule_and_knob(shapes_records):
    """A Stage-2 set that holds less than min_fill of its target is refused (never trained on silently): the
    message names the set, its fill, the short pool, how it was drawn and the knob that fills it."""
    import dataclasses
    from cwdpo.data import DataError
    recs = [r for r in shapes_records if r.split == "finetune"][:20]
    small = {r.image_id: [{"text": f"sample of {r.image_id}", "score": 0.1}] for r in recs[:5]}
    _, summary = N.build_pairs(recs, specs.negatives(pairs_per_image=2), rho=0.0, seed=1, onpolicy=small)
    spec = dataclasses.replace(specs.micro_plan().pairs_spec("sft_c", 0, "rho0"), min_fill=0.9)
    with pytest.raises(DataError) as err:
        N.check_fill(summary, spec)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("negatives set 'rho0': 5 of its 40 target pairs (12%), below min_fill 0.9: onpolicy pool 5 "
                          "of the 40 needed (on-policy: select grounding, k ")
    assert "(negatives.onpolicy.k)" in msg and "raise that k" in msg
    N.check_fill(summary, dataclasses.replace(spec, min_fill=0.1))  # a set's own lower floor lets it pass
    full = {r.image_id: [{"text": f"sample {k} of {r.image_id}", "score": 0.1} for k in range(2)] for r in recs}
    _, summary = N.build_pairs(recs, specs.negatives(pairs_per_image=2), rho=0.0, seed=1, onpolicy=full)
    N.check_fill(summary, spec)


def test_pairs_file_round_trip_and_bad_lines(shapes_records, tmp_path):
    recs = [r for r in shapes_records if r.split == "finetune"][:3]
    pairs, _ = N.build_pairs(recs, specs.negatives(pairs_per_image=2), rho=1.0, seed=0, scorer=lambda t, refs: 0.5)
    path = str(tmp_path / "pairs.jsonl")
    N.write_pairs(path, pairs, "Describe the image.")
    first = json.loads(open(path).readline())
    assert set(first) >= {"images", "prompt", "chosen", "rejected", "image_id", "source", "score"}
    assert first["prompt"][0]["content"][0] == {"type": "image"}
    items = N.read_pairs(path, "Describe the image.")
    assert [(i["chosen"], i["rejected"]) for i in items] == [(p["chosen_text"], p["rejected_text"]) for p in pairs]
    assert all(i["score"] == 0.5 for i in items)
    with pytest.raises(DataError, match="differs from the configured prompt"):
        N.read_pairs(path, "Another prompt.")
    lines = open(path).read().splitlines()
    bad = json.loads(lines[1])
    bad["chosen"] = []
    open(path, "w").write(lines[0] + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:2:"):
        N.read_pairs(path)


def test_sft_c_items_pair_every_caption_with_a_gentle_negative(shapes_records):
    recs = [r for r in shapes_records if r.split == "finetune"][:10]
    items = N.sft_c_items(recs, specs.negatives(sft_c_kind="gentle"), seed=0)
    assert len(items) >= 0.8 * sum(len(r.captions) for r in recs)
    assert all(it["source"] == "gentle" and it["negative"] != it["positive"] for it in items)
    assert items == N.sft_c_items(recs, specs.negatives(sft_c_kind="gentle"), seed=0)  # deterministic
