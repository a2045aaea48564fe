"""The `shapes` generator: deterministic, Karpathy format, captions that describe their images."""
import hashlib
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from cwdpo import shapes


def _digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    spec = shapes.ShapesSpec(splits={"train": 12, "test": 4}, seed=7)
    shapes.generate(str(tmp_path / "a"), spec, progress=False)
    shapes.generate(str(tmp_path / "b"), spec, progress=False)
    shapes.generate(str(tmp_path / "c"), shapes.ShapesSpec(splits={"train": 12, "test": 4}, seed=8), progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_split_content_independent_of_other_split_sizes(tmp_path):
    shapes.generate(str(tmp_path / "a"), shapes.ShapesSpec(splits={"train": 5, "test": 3}), progress=False)
    shapes.generate(str(tmp_path / "b"), shapes.ShapesSpec(splits={"train": 9, "test": 3}), progress=False)
    for i in range(3):
        name = f"images/test/shapes_test_{i:06d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_a_split_can_have_its_own_object_counts():
    import random
    spec = shapes.ShapesSpec(splits={"train": 50, "test": 50}, p_counts=(0, 0, 1), counts_by_split={"train": (1, 0, 0)})
    train = [shapes.sample_attributes(random.Random(i), spec, split="train") for i in range(50)]
    test = [shapes.sample_attributes(random.Random(i), spec, split="test") for i in range(50)]
    assert {len(a["objects"]) for a in train} == {1}
    assert {len(a["objects"]) for a in test} == {3}


def test_karpathy_fields_and_five_distinct_references(shapes_dir):
    doc = json.load(open(os.path.join(shapes_dir, "dataset_shapes.json")))
    assert doc["dataset"] == "shapes"
    for img in doc["images"]:
        for key in ("filepath", "filename", "imgid", "cocoid", "split", "sentids", "sentences", "attributes"):
            assert key in img
        assert os.path.isfile(os.path.join(shapes_dir, img["filepath"], img["filename"]))
        raws = [s["raw"] for s in img["sentences"]]
        assert len(raws) == 5 and len(set(raws)) == 5
        for s in img["sentences"]:
            assert s["tokens"] == re.findall(r"[a-z0-9]+", s["raw"].lower())
            assert s["imgid"] == img["imgid"]
    with Image.open(os.path.join(shapes_dir, doc["images"][0]["filepath"], doc["images"][0]["filename"])) as im:
        assert im.size == (112, 112) and im.mode == "RGB"


def _relation_ok(raw, attrs):
    """Independent check of the relation words against the grid cells of the attribute record."""
    objs = attrs["objects"]
    named = shapes.mentioned_objects(raw)

    used = []

    def cell_of(size, colour, shape):
        # identical-looking objects are told apart by the order they are used in
        o = next(o for o in objs if id(o) not in used and o["colour"] == colour and o["shape"] == shape
                 and size in (None, o["size"]))
        used.append(id(o))
        return o["cell"]

    if len(objs) == 2 and len(named) == 2:
        a, b = (cell_of(*n) for n in named)
        if " to the left of " in raw or " on the left and " in raw:
            return a[1] < b[1]
        if " to the right of " in raw or " on the right of " in raw:
            return a[1] > b[1]
        if " above " in raw or " at the top and " in raw:
            return a[0] < b[0]
        if " below " in raw and "below it" not in raw or " under " in raw:
            return a[0] > b[0]
        if "below it" in raw:
            return a[0] < b[0]
        if "on its right" in raw:
            return a[1] < b[1]
    if len(objs) == 3 and ("from left to right" in raw or "three shapes" in raw):
        cols = [cell_of(*n)[1] for n in named]
        return cols == sorted(cols)
    if len(objs) == 1:
        row, col = objs[0]["cell"]
        loc = shapes.location_phrase(row, col)
        if re.search(r" (in|at) the ", raw):
            return raw.endswith(loc)
    return True


def test_every_caption_describes_its_image(shapes_records):
    for rec in shapes_records:
        for raw in rec.captions:
            assert shapes.describes(raw, rec.attributes), (raw, rec.attributes)
            assert _relation_ok(raw, rec.attributes), (raw, rec.attributes)
            named = shapes.mentioned_objects(raw)
            assert sorted((c, s) for _, c, s in named) == sorted(
                (o["colour"], o["shape"]) for o in rec.attributes["objects"])


def test_describes_rejects_a_wrong_caption(shapes_records):
    rec = next(r for r in shapes_records if len(r.attributes["objects"]) == 1)
    obj = rec.attributes["objects"][0]
    other = next(c for c in shapes.COLOURS if c != obj["colour"])
    assert not shapes.describes(rec.captions[0].replace(obj["colour"], other), rec.attributes)


def test_pixels_match_the_attribute_record(shapes_records):
    for rec in shapes_records[:40]:
        arr = np.asarray(Image.open(rec.path).convert("RGB")).astype(int)
        for obj in rec.attributes["objects"]:
            row, col = obj["cell"]
            cy, cx = int((row + 0.5) * 112 / 3), int((col + 0.5) * 112 / 3)
            # the shape's centre (within the ±3 px jitter) carries its colour
            patch = arr[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3)
            target = np.array(shapes.RGB[obj["colour"]])
            assert np.abs(patch - target).sum(axis=1).min() <= 3, (rec.image_id, obj)


@pytest.mark.parametrize("family", [1, "h", "v", 3])
def test_every_template_renders_with_the_right_objects(family):
    import random
    rng = random.Random(0)
    spec = shapes.ShapesSpec(splits={})
    for _ in range(200):
        attrs = shapes.sample_attributes(rng, spec)
        if shapes.layout_family(attrs) != family:
            continue
        for t in range(len(shapes.TEMPLATES[family])):
            raw = shapes.render_caption(attrs, t, {"size_forms": [0] * len(attrs["objects"]), "prep": "in"})
            assert shapes.describes(raw, attrs)
        break
