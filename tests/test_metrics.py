"""Caption scoring: our CIDEr-D and PTB wrapper against pycocoevalcap; corpus document frequencies; SPICE n/a."""
import json
import os

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from cwdpo import metrics

GTS = {"1": ["A dog runs on the green grass.", "A brown dog running in a field."],
       "2": ["A cat sits on a red sofa.", "A cat is lying on the couch."],
       "3": ["Two people ride bikes in the park.", "People cycling through a park."]}
RES = {"1": "A dog running on grass.", "2": "A cat on a red couch.", "3": "Two men riding bicycles."}


def test_ptb_tokenize_equals_pycocoevalcap():
    ours = metrics.ptb_tokenize(GTS)
    theirs = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in GTS.items()})
    assert ours == theirs


def test_cider_d_equals_pycocoevalcap_on_hand_made_example():
    g = metrics.ptb_tokenize(GTS)
    r = metrics.ptb_tokenize({k: [v] for k, v in RES.items()})
    score, per = Cider().compute_score(g, r)
    ours = metrics.CiderD([g[k] for k in g]).score([r[k][0] for k in g], [g[k] for k in g])
    assert ours.mean() == pytest.approx(score, abs=1e-12)
    np.testing.assert_allclose(ours, per, atol=1e-12)
    assert score > 0
    # and through the full scoring entry point
    out = metrics.score_captions(GTS, RES, metrics=["CIDEr"])
    assert out["corpus"]["CIDEr"] == pytest.approx(score, abs=1e-12)


def test_corpus_df_gives_the_same_score_alone_or_in_a_batch():
    corpus = [[metrics.simple_tokenize(c) for c in v] for v in GTS.values()]
    scorer = metrics.CiderD(corpus)
    refs = corpus[0]
    cand = metrics.simple_tokenize(RES["1"])
    alone = scorer.score([cand], [refs])[0]
    batch = scorer.score([metrics.simple_tokenize(RES["2"]), cand, cand], [corpus[1], refs, refs])
    assert alone == batch[1] == batch[2] > 0
    # pycocoevalcap's per-call df gives a single image 0.0, which is why ranking samples needs a corpus df
    assert Cider().compute_score({"1": refs}, {"1": [cand]})[0] == 0.0


def test_spice_is_n_a_with_a_reason_when_corenlp_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("CWDPO_SPICE_LIB", str(tmp_path))
    ok, reason = metrics.spice_status()
    assert not ok and "stanford-corenlp-3.6.0.jar" in reason
    out = metrics.score_captions(GTS, RES, metrics=["SPICE", "BLEU-4"])
    assert out["corpus"]["SPICE"] is None and "stanford-corenlp" in out["na_reasons"]["SPICE"]
    assert 0 < out["corpus"]["BLEU-4"] <= 1


@pytest.mark.slow
def test_all_metrics_finite_and_perfect_caption_scores_high():
    perfect = {k: v[0] for k, v in GTS.items()}
    out = metrics.score_captions(GTS, perfect, metrics=["BLEU-4", "METEOR", "ROUGE-L", "CIDEr"])
    worse = metrics.score_captions(GTS, RES, metrics=["BLEU-4", "METEOR", "ROUGE-L", "CIDEr"])
    for m in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        assert np.isfinite(out["corpus"][m]) and out["corpus"][m] > worse["corpus"][m]
        assert set(out["per_image"][m]) == set(GTS)


def test_ptb_memo_tokenizes_each_caption_once_and_agrees_with_one_shot_tokenization(monkeypatch):
    caps = {"a": ["A dog's ball, \"red\".", "", "Two  cats."], "b": ["Two  cats.", "A dog's ball, \"red\"."]}
    metrics._PTB_MEMO.clear()
    first = metrics.ptb_tokenize(caps)
    theirs = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in caps.items()})
    assert first == theirs and first["a"][1] == ""

    def no_java(*args, **kwargs):
        raise AssertionError("Java started for captions already tokenized")
    monkeypatch.setattr(metrics.subprocess, "run", no_java)
    assert metrics.ptb_tokenize({"z": caps["b"][::-1]}) == {"z": first["b"][::-1]}


@pytest.mark.slow
def test_meteor_pool_equals_pycocoevalcap_and_reuses_segment_statistics():
    from pycocoevalcap.meteor.meteor import Meteor
    g = metrics.ptb_tokenize(GTS)
    r = metrics.ptb_tokenize({k: [v] for k, v in RES.items()})
    reference = Meteor()
    theirs, theirs_per = reference.compute_score(g, r)
    pool = metrics.MeteorPool()
    ours, ours_per = pool.compute_score(g, r)
    assert ours == theirs and ours_per == theirs_per and 0 < ours < 1
    calls = []
    stat = pool.get()._stat
    pool.get()._stat = lambda *a: calls.append(a) or stat(*a)
    sub = {k: g[k] for k in ("3", "1")}  # a subset in another order: its own corpus score, no new alignment
    sub_score, sub_per = pool.compute_score(sub, {k: r[k] for k in sub})
    assert calls == []
    assert (sub_score, sub_per) == reference.compute_score(sub, {k: r[k] for k in sub})
    assert sub_per == [ours_per[2], ours_per[0]]


def test_memoised_bleu_rouge_cider_equal_pycocoevalcap_on_repeated_and_reordered_sets():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge
    g = metrics.ptb_tokenize(GTS)
    r = metrics.ptb_tokenize({k: [v] for k, v in RES.items()})
    perfect = {k: [g[k][0]] for k in g}
    for res in (r, perfect, r, {k: r[k] for k in ("3", "1", "2")}):  # repeats are served from the memo
        gts = {k: g[k] for k in res}
        assert metrics.bleu(gts, res) == Bleu(4).compute_score(gts, res, verbose=0)
        ours, ours_per = metrics.rouge_l(gts, res)
        theirs, theirs_per = Rouge().compute_score(gts, res)
        assert ours == theirs and list(ours_per) == list(theirs_per)
        score, per = Cider().compute_score(gts, res)
        cider = metrics.cider_for([gts[k] for k in gts]).score([res[k][0] for k in gts], [gts[k] for k in gts])
        np.testing.assert_allclose(cider, per, atol=1e-12)
        assert cider.mean() == pytest.approx(score, abs=1e-12)


def test_cider_memo_is_opt_in_and_changes_no_score():
    """The scoring job's scorer keeps vectors and scores; a ranking scorer (one look per sample) keeps none."""
    corpus = [[metrics.simple_tokenize(c) for c in v] for v in GTS.values()]
    cands = [metrics.simple_tokenize(RES[k]) for k in GTS] * 2
    plain, memo = metrics.CiderD(corpus), metrics.CiderD(corpus, memo=True)
    np.testing.assert_array_equal(plain.score(cands, corpus * 2), memo.score(cands, corpus * 2))
    assert plain._vectors is None and plain._scores is None
    assert len(memo._scores) == 3 and len(memo._vectors) == 3 + sum(len(r) for r in corpus)


def test_one_spice_parse_cache_per_scoring_job(monkeypatch, tmp_path):
    """`cwdpo score` gives every SPICE run of the job (every model's captions, every beam) one parse cache, so
    CoreNLP parses each reference once per job, not once per model and beam; the next job starts clean. (SPICE
    itself cannot run here — no CoreNLP models: its runs are recorded and answered.)"""
    import subprocess
    real_run, seen = subprocess.run, []

    def fake_run(cmd, *args, **kwargs):
        if not any(str(c).endswith("spice-1.0.jar") for c in cmd):
            return real_run(cmd, *args, **kwargs)
        cache = cmd[cmd.index("-cache") + 1]
        seen.append((cache, os.path.isdir(os.path.dirname(cache))))
        items = json.load(open(cmd[cmd.index("-jar") + 3]))
        with open(cmd[cmd.index("-out") + 1], "w") as f:
            json.dump([{"image_id": i["image_id"], "scores": {"All": {"f": 0.5}}} for i in items], f)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(metrics, "spice_status", lambda: (True, "ok"))
    monkeypatch.setattr(metrics, "java_major", lambda: 11)  # the image's Java: SPICE's cache works there
    monkeypatch.setattr(metrics.subprocess, "run", fake_run)
    docs = []
    for n in range(2):  # two models' caption files against the same references, with their beams
        path = tmp_path / f"captions{n}.json"
        path.write_text(json.dumps({"references": GTS, "captions": RES,
                                    "beams": {k: [v, v + " too"] for k, v in RES.items()}}))
        docs.append(str(path))
    outs = [str(tmp_path / f"scores{n}.json") for n in range(2)]
    metrics.score_files(docs, outs, metrics=["CIDEr", "SPICE"])
    assert len(seen) == 2 * (1 + 2)  # per file: its captions and each of its 2 beams
    assert len({c for c, _ in seen}) == 1 and all(parent for _, parent in seen)
    assert not os.path.exists(seen[0][0]) and json.load(open(outs[1]))["corpus"]["SPICE"] == 0.5
    first = seen[0][0]
    seen.clear()
    metrics.score_files(docs[:1], outs[:1], metrics=["SPICE"])
    assert len({c for c, _ in seen}) == 1 and seen[0][0] != first


def test_caption_words_are_counted_per_caption_written_by_the_scoring_job_and_read_beside_chair(tmp_path):
    """Caption length beside CHAIR: words per caption (Karpathy tokens: punctuation is not a word), its mean
    in scores.json's `words`, and the report's `caption words` column with its per-image values."""
    from cwdpo.report import RunData
    captions = {"1": "a big red star.", "2": "two shapes: a small black star and a big orange cross", "3": ""}
    words = metrics.caption_words(captions)
    assert words == {"mean": 5.0, "per_image": {"1": 4, "2": 11, "3": 0}}
    assert metrics.caption_words({}) == {"mean": None, "per_image": {}}
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"references": {k: ["a big red star", "a red star"] for k in captions},
                                "captions": captions}))
    metrics.score_files([str(path)], [str(tmp_path / "scores.json")], metrics=["CIDEr"])
    assert json.load(open(tmp_path / "scores.json"))["words"] == words
    run = RunData({"files": {"scores": str(tmp_path / "scores.json").replace("scores.json", "{key}.json")},
                   "scale": 100})
    value, per_image, why = run.value("scores", "caption words")
    assert (value, per_image, why) == (5.0, [4, 11, 0], None)
