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


def test_duplicate_id_under_skip_keeps_the_first_entry_in_every_job(tmp_path):
    """A repeated image id once made a dict drop a test image silently (42 images, 41 captions scored).
    Under `skip` the later entry is left out — in the report and in every job — and the first is kept."""
    from cwdpo.data import load_records, validate_data
    from cwdpo.specs import ValidateSpec
    import micro_specs as specs
    path, root = _write_karpathy(tmp_path)
    doc = json.load(open(path))
    dup = json.loads(json.dumps(doc["images"][0]))
    dup.update(split="test", filepath="val2014", filename="COCO_val2014_000000000002.jpg")
    doc["images"].append(dup)
    json.dump(doc, open(path, "w"))
    with pytest.raises(DataError, match=r"images\[3\] \(id 1000\): duplicate image id 1000 \(first at images\[0\]\)"):
        load_karpathy(path, root)
    report = str(tmp_path / "validated.json")
    skipped = validate_data(ValidateSpec(json=path, image_root=root, on_bad_input="skip"), report)
    assert [s["where"].split(": ")[-1] for s in skipped] == ["images[3] (id 1000)"]
    recs = load_records(specs.data(path, ["train", "restval", "test"], image_root=root, on_bad_input="skip",
                                   validated=report))
    assert [(r.image_id, r.split) for r in recs] == [("1000", "train"), ("1001", "restval"), ("1002", "test")]


def test_image_paths_stay_inside_the_image_root_but_may_follow_links_in_it(tmp_path):
    path, root = _write_karpathy(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "x.jpg")
    os.symlink(outside, os.path.join(root, "linked"))  # a linked image folder inside the root is fine
    doc = json.load(open(path))
    doc["images"][0].update(filepath="linked", filename="x.jpg")
    json.dump(doc, open(path, "w"))
    assert load_karpathy(path, root)[0].path == os.path.join(root, "linked", "x.jpg")
    for filepath in (str(outside), "../elsewhere", "val2014/../../elsewhere"):
        doc["images"][0].update(filepath=filepath, filename="x.jpg")
        json.dump(doc, open(path, "w"))
        with pytest.raises(DataError, match=r"images\[0\] \(id 1000\): image path .* is outside the image root"):
            load_karpathy(path, root)
        log = BadInputLog()
        assert [r.image_id for r in load_karpathy(path, root, on_bad_input="skip", bad_log=log)] == ["1001", "1002"]
        assert log.summary()["skipped"] == 1


def test_caption_file_not_utf8_names_the_line_or_skips_only_the_entries_holding_it(tmp_path):
    path, root = _write_karpathy(tmp_path)
    raw = open(path, "rb").read().replace(b"A photo number 1.", b"A ph\xe9to number 1.")
    open(path, "wb").write(raw)
    with pytest.raises(DataError, match=r"dataset_coco\.json:1: not UTF-8 text \(byte 0xe9 at offset \d+\)"):
        load_karpathy(path, root)
    log = BadInputLog()
    assert [r.image_id for r in load_karpathy(path, root, on_bad_input="skip", bad_log=log)] == ["1000", "1002"]
    assert log.summary()["by_reason"] == {"not UTF-8 text": 1}


def test_pairs_file_not_utf8_names_file_and_line(tmp_path):
    from cwdpo.negatives import read_pairs
    p = tmp_path / "pairs.jsonl"
    good = json.dumps({"images": ["a.png"], "prompt": [{"role": "user", "content": "Describe the image."}],
                       "chosen": [{"role": "assistant", "content": "a red square"}],
                       "rejected": [{"role": "assistant", "content": "a blue square"}]}).encode()
    p.write_bytes(good + b"\n" + good.replace(b"a blue square", b"a bl\xffe square") + b"\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: not UTF-8 text \(byte 0xff at column \d+\)"):
        read_pairs(str(p))


def test_empty_split_names_the_file_and_its_splits(tmp_path):
    from cwdpo.data import load_records
    import micro_specs as specs
    path, root = _write_karpathy(tmp_path)
    with pytest.raises(DataError, match=r"no images in split\(s\) val, probe; the file's splits: restval \(1\), "
                                        r"test \(1\), train \(1\)"):
        load_records(specs.data(path, ["val", "probe"], image_root=root))


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
