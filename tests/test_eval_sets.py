"""Extra evaluation sets: the shapes OOD split (held-out combinations), NoCaps-style per-domain scores."""
import dataclasses
import json
import os

import pytest

from cwdpo import shapes
from cwdpo.data import load_karpathy
import micro_specs as specs
from conftest import run

HELD = (("red", "star"), ("blue", "cross"), ("green", "triangle"), ("yellow", "circle"), ("purple", "square"))


@pytest.fixture(scope="module")
def ood_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ood")
    shapes.generate(str(out), shapes.ShapesSpec(splits={"train": 150, "finetune": 60, "test": 20}, seed=5,
                                                heldout=HELD, ood={"in-domain": 20, "near-domain": 20,
                                                                   "out-of-domain": 20}), progress=False)
    return str(out)


def _combos(attrs):
    return [(o["colour"], o["shape"]) for o in attrs["objects"]]


def test_held_out_combinations_never_appear_in_training(ood_dir):
    from cwdpo.negatives import build_pairs, sft_c_items
    recs = load_karpathy(os.path.join(ood_dir, "dataset_shapes.json"))
    train = [r for r in recs if r.split != "ood"]
    for r in train:
        assert not set(_combos(r.attributes)) & set(HELD), r.attributes
        for c in r.captions:
            assert not {(col, sh) for _, col, sh in shapes.mentioned_objects(c)} & set(HELD)
    # nor in the training negatives: gentle perturbations avoid the held-out pairs
    fin = [r for r in train if r.split == "finetune"]
    cfg = specs.negatives(heldout=[list(x) for x in HELD])
    texts = [it["negative"] for it in sft_c_items(fin, cfg, seed=0)]
    pairs, _ = build_pairs(fin, dataclasses.replace(cfg, pairs_per_image=3, p_easy=0.0), rho=1.0, seed=0)
    texts += [p["rejected_text"] for p in pairs]
    assert len(texts) > 200
    for t in texts:
        assert not {(col, sh) for _, col, sh in shapes.mentioned_objects(t)} & set(HELD), t


def test_ood_split_domains(ood_dir):
    recs = [r for r in load_karpathy(os.path.join(ood_dir, "dataset_shapes.json")) if r.split == "ood"]
    assert {r.domain for r in recs} == {"in-domain", "near-domain", "out-of-domain"}
    for r in recs:
        held = [c in HELD for c in _combos(r.attributes)]
        if r.domain == "in-domain":
            assert not any(held)
        elif r.domain == "near-domain":
            assert sum(held) == 1
        else:
            assert all(held)
        assert all(shapes.describes(c, r.attributes) for c in r.captions)


def test_nocaps_per_domain_aggregation_on_a_hand_made_file(tmp_path):
    from cwdpo.metrics import score_captions
    anns = {"images": [{"id": 10 + i, "file_name": f"{i}.jpg", "domain": d}
                       for i, d in enumerate(["in-domain", "in-domain", "near-domain", "near-domain", "out-domain",
                                              "out-domain"])],
            "annotations": [{"image_id": 10 + i, "caption": c} for i in range(6) for c in
                            (f"a photo of thing {i}", f"an image showing thing {i} today", "a generic photo")]}
    ann_path = tmp_path / "nocaps_val.json"
    ann_path.write_text(json.dumps(anns))
    conv = tmp_path / "nocaps_karpathy.json"
    run(["cwdpo", "convert-nocaps", "--annotations", str(ann_path), "--out", str(conv)])
    recs = load_karpathy(str(conv), check_files=False)
    assert [r.domain for r in recs][:3] == ["in-domain", "in-domain", "near-domain"]
    assert recs[-1].domain == "out-of-domain" and len(recs[0].captions) == 3
    caps = {r.image_id: (f"a photo of thing {int(r.image_id) - 10}" if int(r.image_id) % 2 else "a generic thing")
            for r in recs}
    doc = {"captions": caps, "references": {r.image_id: r.captions for r in recs},
           "domains": {r.image_id: r.domain for r in recs}}
    cpath, spath = tmp_path / "captions.json", tmp_path / "scores.json"
    cpath.write_text(json.dumps(doc))
    run(["cwdpo", "score", "--captions", str(cpath), "--out", str(spath), "--metrics", "CIDEr,BLEU-4"])
    scores = json.load(open(spath))
    assert set(scores["domains"]) == {"in-domain", "near-domain", "out-of-domain"}
    for d in scores["domains"]:
        ids = [i for i, dom in doc["domains"].items() if dom == d]
        alone = score_captions({i: doc["references"][i] for i in ids}, {i: caps[i] for i in ids},
                               metrics=["CIDEr", "BLEU-4"])
        assert scores["domains"][d]["corpus"]["CIDEr"] == pytest.approx(alone["corpus"]["CIDEr"], abs=1e-12)
    entire = score_captions(doc["references"], caps, metrics=["CIDEr", "BLEU-4"])
    assert scores["corpus"]["CIDEr"] == pytest.approx(entire["corpus"]["CIDEr"], abs=1e-12)
