"""The Karpathy-format loader, stage splits and the trivial baseline caption."""
import json
import os

import pytest
from PIL import Image

from cwdpo.data import DataError, BadInputLog, load_karpathy, most_frequent_caption, stage_split


def _write_karpathy(tmp_path, with_filepath=True):
    root = tmp_path / "imgs"
    (root / "val2014").mkdir(parents=True)
    images = []
    for i in range(3):
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.new("RGB", (64, 48), (i * 40, 10, 10)).save(root / "val2014" / name)
        entry = {"filename": name, "imgid": i, "cocoid": 1000 + i, "split": ["train", "restval", "test"][i],
                 "sentids": [2 * i, 2 * i + 1],
                 "sentences": [{"raw": f"A photo number {i}.", "tokens": ["a", "photo", "number", str(i)],
                                "imgid": i, "sentid": 2 * i},
                               {"raw": "Something else.", "tokens": ["something", "else"], "imgid": i,
                                "sentid": 2 * i + 1}]}
        if with_filepath:
            entry["filepath"] = "val2014"
        else:
            os.replace(root / "val2014" / name, root / name)
        images.append(entry)
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return str(path), str(root)


def test_reads_hand_made_karpathy_file(tmp_path):
    path, root = _write_karpathy(tmp_path)
    recs = load_karpathy(path, root)
    assert [r.image_id for r in recs] == ["1000", "1001", "1002"]
    assert recs[0].path == os.path.join(root, "val2014", "COCO_val2014_000000000000.jpg")
    assert recs[2].captions == ["A photo number 2", "Something else"]  # trailing periods dropped
    assert [r.split for r in recs] == ["train", "restval", "test"]
    assert [r.image_id for r in load_karpathy(path, root, splits=["train", "restval"])] == ["1000", "1001"]


def test_caption_file_is_parsed_once_per_process_and_reread_when_it_changes(tmp_path, monkeypatch):
    import cwdpo.data as data
    path, root = _write_karpathy(tmp_path)
    parses = []
    real_load = data.json.load
    monkeypatch.setattr(data.json, "load", lambda f: parses.append(f.name) or real_load(f))
    load_karpathy(path, root, splits="test")
    load_karpathy(path, root, splits=["train"])
    assert parses == [path]
    doc = json.loads(open(path).read())
    doc["images"][2]["sentences"][0]["raw"] = "A changed caption, longer than before."
    with open(path, "w") as f:
        json.dump(doc, f)
    assert load_karpathy(path, root, splits="test")[0].captions[0] == "A changed caption, longer than before"
    assert parses == [path, path]


def test_reads_flickr_style_file_without_filepath(tmp_path):
    path, root = _write_karpathy(tmp_path, with_filepath=False)
    recs = load_karpathy(path, root, splits="test")
    assert len(recs) == 1 and os.path.isfile(recs[0].path)


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["images"][1].pop("sentences"), "missing field(s) sentences"),
    (lambda d: d["images"][1]["sentences"][0].update(raw="  "), "empty or missing 'raw'"),
    (lambda d: d["images"][1].update(filename="nope.jpg"), "image file not found"),
])
def test_bad_entries_name_file_and_image_or_are_skipped(tmp_path, mutate, needle):
    path, root = _write_karpathy(tmp_path)
    doc = json.load(open(path))
    mutate(doc)
    json.dump(doc, open(path, "w"))
    with pytest.raises(DataError) as err:
        load_karpathy(path, root)
    assert path in str(err.value) and "images[1] (id 1001)" in str(err.value) and needle in str(err.value)
    log = BadInputLog()
    recs = load_karpathy(path, root, on_bad_input="skip", bad_log=log)
    assert [r.image_id for r in recs] == ["1000", "1002"]
    assert log.summary()["skipped"] == 1


def test_not_json_names_the_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"images": [\n  {"filename": "a.jpg",}\n]}')
    with pytest.raises(DataError, match=r"bad.json:2"):
        load_karpathy(str(p))


def test_stage_split_is_deterministic_and_sized(shapes_records):
    fin = [r for r in shapes_records if r.split == "finetune"]
    a1, a2 = stage_split(fin, 0.75)
    b1, b2 = stage_split(list(reversed(fin)), 0.75)
    assert len(a1) == 30 and len(a2) == 10
    assert {r.image_id for r in a1} == {r.image_id for r in b1}
    assert not {r.image_id for r in a1} & {r.image_id for r in a2}


def test_most_frequent_caption():
    from cwdpo.data import ImageRecord
    recs = [ImageRecord("1", "", "train", ["b cat", "a dog"]), ImageRecord("2", "", "train", ["A dog", "c"])]
    assert most_frequent_caption(recs) == "a dog"


def test_captions_are_normalised_like_the_references(tmp_path):
    """COCO's raw captions end in '.', ' .' or '. ' and hold double spaces; as training targets a model would
    learn to reproduce them. Every job sees one form: spaces collapsed, trailing periods dropped."""
    from cwdpo.data import normalise_caption
    path, root = _write_karpathy(tmp_path)
    doc = json.loads(open(path).read())
    doc["images"][0]["sentences"][0]["raw"] = "A  man riding   a horse .  "
    doc["images"][0]["sentences"][1]["raw"] = "Mr. Smith's dog\n on a mat."
    open(path, "w").write(json.dumps(doc))
    recs = load_karpathy(path, root)
    assert recs[0].captions == ["A man riding a horse", "Mr. Smith's dog on a mat"]
    assert normalise_caption("two dogs") == "two dogs" and normalise_caption("a cat...") == "a cat"
    # a caption that is only punctuation is empty: the loader names it
    doc["images"][1]["sentences"][0]["raw"] = " . "
    open(path, "w").write(json.dumps(doc))
    with pytest.raises(DataError, match="empty or missing 'raw' caption"):
        load_karpathy(path, root)
