"""Caption metrics: BLEU-4, METEOR, ROUGE-L, CIDEr-D and SPICE through pycocoevalcap, and a corpus-df CIDEr-D.

- Tokenization is pycocoevalcap's PTB tokenizer (Stanford CoreNLP 3.4.1, Java), run with its temporary
  file in a writable temp folder instead of inside the installed package (read-only in containers).
- `CiderD` is CIDEr-D (Vedantam et al. 2015; clipped tf-idf n-gram cosine, Gaussian length penalty
  σ = 6, n = 1..4, ×10) — the formula pycocoevalcap reports as "CIDEr" — with document frequencies taken
  from a *fixed reference corpus*. With the corpus = the evaluated set it equals pycocoevalcap's `Cider`
  exactly; with the whole reference corpus it gives a caption the same score alone or in a batch
  (needed to rank on-policy samples, docs/method.md § Negatives).
- SPICE needs Stanford CoreNLP 3.6.0 jars that pycocoevalcap downloads on first use; when they are
  absent (no network) SPICE is reported as `None` with the reason — never a made-up number.

No torch import here.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import tempfile
from collections import defaultdict

import numpy as np

from .data import caption_tokens, read_json, write_json

PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                "...", ";"}
METRIC_NAMES = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
# Metrics whose corpus value is the mean of the per-image values: a bootstrap over images resamples that
# same statistic. BLEU-4 and METEOR are corpus-level (pooled n-gram / alignment statistics): no per-image
# bootstrap for them (their single-seed cells get no interval).
MEAN_OF_IMAGES = ("ROUGE-L", "CIDEr", "SPICE")


def _pkg_dir() -> str:
    import importlib.util
    spec = importlib.util.find_spec("pycocoevalcap")  # a namespace package: no __file__
    return os.path.abspath(list(spec.submodule_search_locations)[0])


_PTB_MEMO: dict = {}  # caption → PTB-tokenized caption, for this process


def ptb_tokenize(captions: dict) -> dict:
    """PTB-tokenize {key: [caption, ...]} → {key: [tokenized lower-case caption, ...]} (punctuation removed).

    Same command and post-processing as `pycocoevalcap.tokenizer.PTBTokenizer`, but the input file lives
    in the system temp folder, so it works from a read-only installation. With `-preserveLines` every
    caption is one line tokenized on its own, so each distinct caption is sent to Java once per process
    (a scoring job sees the same references and many identical captions across models) — one JVM start
    per call that has anything new.
    """
    new = sorted({c.replace("\n", " ") for caps in captions.values() for c in caps} - _PTB_MEMO.keys())
    if new:
        jar = os.path.join(_pkg_dir(), "tokenizer", "stanford-corenlp-3.4.1.jar")
        with tempfile.NamedTemporaryFile("w", delete=False, suffix=".txt") as f:
            f.write("\n".join(new))
            path = f.name
        try:
            out = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                                  "-lowerCase", path], capture_output=True, check=True).stdout.decode()
        finally:
            os.remove(path)
        lines = out.split("\n")
        for i, caption in enumerate(new):
            line = lines[i] if i < len(lines) else ""
            _PTB_MEMO[caption] = " ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)
    return {k: [_PTB_MEMO[c.replace("\n", " ")] for c in caps] for k, caps in captions.items()}


def simple_tokenize(text: str) -> str:
    """Java-free tokenization for cheap scoring (on-policy ranking): the caption's Karpathy tokens joined."""
    return " ".join(caption_tokens(text))


def _ngrams(sentence: str, n: int = 4) -> dict:
    words = sentence.split()
    counts: dict = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


class CiderD:
    """CIDEr-D with document frequencies from a fixed corpus of reference sets (one set per image).

    score = 10/|R| · Σ_r mean_n [ Σ_g min(v_h, v_r)·v_r / (|v_h||v_r|) ] · exp(-(len_h - len_r)² / (2σ²)),
    v = tf · (log N - log max(1, df)), N = number of images in the corpus. Inputs are tokenized strings.
    With `memo`, every sentence's vectors and every (candidate, references) score are kept for the life of
    the instance (the scoring job re-scores the same captions for many models); without it nothing is kept,
    so a scorer that sees each sample once (on-policy ranking, a whole corpus of them) does not grow.
    """

    def __init__(self, corpus_refs: list, n: int = 4, sigma: float = 6.0, memo: bool = False):
        self.n, self.sigma = n, sigma
        self.df: dict = defaultdict(float)
        for refs in corpus_refs:
            for ngram in {g for ref in refs for g in _ngrams(ref, n)}:
                self.df[ngram] += 1
        self.ref_len = math.log(float(len(corpus_refs)))
        self._vectors = {} if memo else None  # sentence → its tf-idf vectors (df is fixed per instance)
        self._scores = {} if memo else None  # (candidate, references) → score

    def _vector(self, sentence: str):
        if self._vectors is None:
            return self._vec(_ngrams(sentence, self.n))
        vec = self._vectors.get(sentence)
        if vec is None:
            vec = self._vectors[sentence] = self._vec(_ngrams(sentence, self.n))
        return vec

    def _vec(self, counts: dict):
        vec = [defaultdict(float) for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for ngram, tf in counts.items():
            k = len(ngram) - 1
            v = float(tf) * (self.ref_len - math.log(max(1.0, self.df.get(ngram, 0.0))))
            vec[k][ngram] = v
            norm[k] += v * v
            if k == 1:  # pycocoevalcap's quirk: length counts bigrams (words - 1)
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _sim(self, h, r) -> float:
        (vh, nh, lh), (vr, nr, lr) = h, r
        penalty = math.exp(-((lh - lr) ** 2) / (2 * self.sigma ** 2))
        total = 0.0
        for k in range(self.n):
            ref_k = vr[k]
            val = 0.0
            for g, v in vh[k].items():  # n-grams absent from the reference add min(v, 0)·0 = 0
                rv = ref_k.get(g)
                if rv:
                    val += min(v, rv) * rv
            if nh[k] != 0 and nr[k] != 0:
                val /= nh[k] * nr[k]
            total += val * penalty
        return total / self.n

    def score_one(self, candidate: str, refs: list) -> float:
        if self._scores is None:
            return self._score_one(candidate, refs)
        key = (candidate, tuple(refs))
        if key not in self._scores:
            self._scores[key] = self._score_one(candidate, refs)
        return self._scores[key]

    def _score_one(self, candidate: str, refs: list) -> float:
        h = self._vector(candidate)
        return 10.0 * sum(self._sim(h, self._vector(r)) for r in refs) / len(refs)

    def score(self, candidates: list, refs: list) -> np.ndarray:
        """Per-item CIDEr-D of candidates[i] against refs[i] (tokenized strings)."""
        return np.array([self.score_one(c, r) for c, r in zip(candidates, refs)], dtype=np.float64)


def corpus_scorer(corpus_records: list) -> CiderD:
    """CIDEr-D with document frequencies from the references of `corpus_records` (Java-free tokenizer)."""
    return CiderD([[simple_tokenize(c) for c in r.captions] for r in corpus_records])


_CIDER_BY_REFS: dict = {}


def cider_for(refs: list) -> CiderD:
    """The CIDEr-D scorer whose df is this reference set (one per distinct set per process, so its
    memoised vectors serve every model scored against the same references)."""
    key = tuple(tuple(r) for r in refs)
    if key not in _CIDER_BY_REFS:
        _CIDER_BY_REFS[key] = CiderD(refs, memo=True)
    return _CIDER_BY_REFS[key]


def spice_status() -> tuple[bool, str]:
    """(available, reason): SPICE needs Java and the CoreNLP 3.6.0 jars in pycocoevalcap/spice/lib."""
    lib = os.environ.get("CWDPO_SPICE_LIB") or os.path.join(_pkg_dir(), "spice", "lib")
    needed = ["stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"]
    missing = [j for j in needed if not os.path.isfile(os.path.join(lib, j))]
    if shutil.which("java") is None:
        return False, "java not found on PATH"
    if missing:
        return False, (f"SPICE needs {', '.join(missing)} in {lib} (Stanford CoreNLP 3.6.0, downloaded by "
                       "pycocoevalcap on first use; no network here). Build the container image to get them.")
    return True, "ok"


def java_major() -> int:
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr
        v = out.split('"')[1]
        return int(v.split(".")[1]) if v.startswith("1.") else int(v.split(".")[0])
    except Exception:
        return 0


def spice_or_reason(compute):
    """(compute(), None) when SPICE can run and succeeds, else (None, the reason it is n/a)."""
    ok, reason = spice_status()
    if not ok:
        return None, reason
    try:
        return compute(), None
    except (subprocess.CalledProcessError, OSError, ValueError) as e:
        return None, f"spice-1.0.jar failed: {e}"


_SPICE_CACHES: list = []  # the parse cache of the scoring job (`spice_cache`), innermost last


@contextlib.contextmanager
def spice_cache():
    """One SPICE parse cache for every `run_spice` inside (a `cwdpo score` job, every model and beam scored
    against the same references): CoreNLP parses each reference sentence once per job instead of once per call
    (at paper scale: 25k test references × every model and beam). Removed at the end; with none open each
    call has its own."""
    with tempfile.TemporaryDirectory(prefix="cwdpo-spice-cache-") as folder:
        _SPICE_CACHES.append(folder)
        try:
            yield folder
        finally:
            _SPICE_CACHES.remove(folder)


def run_spice(gts_tok: dict, res_tok: dict) -> tuple[float, dict]:
    """SPICE F-score (corpus mean, per image) via spice-1.0.jar; temp files outside the package.

    Java ≥ 16 breaks SPICE's LMDB/FST parse cache (InaccessibleObjectException), so the cache is used only
    on Java ≤ 15: the open `spice_cache` of the job, else one of this call's own.
    """
    import json
    spice_dir = os.path.join(_pkg_dir(), "spice")
    with tempfile.TemporaryDirectory() as tmp:
        inp = [{"image_id": k, "test": res_tok[k][0], "refs": gts_tok[k]} for k in gts_tok]
        in_path, out_path = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        with open(in_path, "w") as f:
            json.dump(inp, f)
        cmd = ["java", "-jar", "-Xmx8G", os.path.join(spice_dir, "spice-1.0.jar"), in_path, "-out", out_path,
               "-subset", "-silent"]
        if java_major() <= 15:
            cmd[5:5] = ["-cache", _SPICE_CACHES[-1] if _SPICE_CACHES else os.path.join(tmp, "cache")]
        subprocess.run(cmd, cwd=spice_dir, check=True, capture_output=True)
        with open(out_path) as f:
            results = json.load(f)
    per = {str(r["image_id"]): float(r["scores"]["All"]["f"]) for r in results}
    return float(np.mean(list(per.values()))), per


_BLEU_REFS: dict = {}  # (references, n) → pycocoevalcap's cooked references
_BLEU_SEGMENTS: dict = {}  # (hypothesis, references, n) → cooked (references, test)
_ROUGE_L: dict = {}  # (hypothesis, references) → ROUGE-L of the segment


def bleu(gts: dict, res: dict, n: int = 4) -> tuple[list, list]:
    """pycocoevalcap's `Bleu(n).compute_score(gts, res)` (option "closest"), each segment cooked once per
    process: the corpus BLEU sums the segments' cooked n-gram counts, which depend only on
    (hypothesis, references)."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer, cook_refs, cook_test
    scorer = BleuScorer(n=n)
    for i in gts:
        (hypothesis,) = res[i]
        refs_key = (tuple(gts[i]), n)
        key = (hypothesis, *refs_key)
        if key not in _BLEU_SEGMENTS:
            if refs_key not in _BLEU_REFS:
                _BLEU_REFS[refs_key] = cook_refs(gts[i], n=n)
            _BLEU_SEGMENTS[key] = (_BLEU_REFS[refs_key], cook_test(hypothesis, _BLEU_REFS[refs_key], n=n))
        cref, ctest = _BLEU_SEGMENTS[key]
        scorer.crefs.append(cref)
        scorer.ctest.append(ctest)
    return scorer.compute_score(option="closest", verbose=0)


def rouge_l(gts: dict, res: dict) -> tuple[float, np.ndarray]:
    """pycocoevalcap's `Rouge().compute_score(gts, res)`: the mean of per-segment ROUGE-L (β = 1.2), each
    segment computed once per process."""
    from pycocoevalcap.rouge.rouge import Rouge
    rouge = Rouge()
    scores = []
    for i in gts:
        key = (res[i][0], tuple(gts[i]))
        if key not in _ROUGE_L:
            _ROUGE_L[key] = rouge.calc_score(res[i], gts[i])
        scores.append(_ROUGE_L[key])
    return np.mean(np.array(scores)), np.array(scores)


class MeteorPool:
    """One METEOR JVM for many scoring calls (it loads its paraphrase tables once, ~10 s), with every
    segment's statistics memoised.

    `compute_score` is pycocoevalcap's `Meteor.compute_score` protocol: one "SCORE ||| refs ||| hyp" line
    per segment returns that segment's sufficient statistics, then one "EVAL ||| stats ||| ..." line
    returns each segment's score and the corpus score computed from the statistics. A segment's
    statistics depend only on (hypothesis, references), so a (hypothesis, references) pair already seen —
    the same caption from another model, a NoCaps domain re-scoring its segments — is not aligned again.
    """

    def __init__(self):
        self._meteor = None
        self._stats: dict = {}

    def get(self):
        if self._meteor is None:
            from pycocoevalcap.meteor.meteor import Meteor
            self._meteor = Meteor()
        return self._meteor

    def compute_score(self, gts: dict, res: dict) -> tuple[float, list]:
        """(corpus METEOR, [segment METEOR in the order of `gts`]); `res` {id: [hypothesis]}."""
        meteor = self.get()
        ids = list(gts)
        with meteor.lock:
            stats = []
            for i in ids:
                (hypothesis,) = res[i]
                key = (hypothesis, tuple(gts[i]))
                if key not in self._stats:
                    self._stats[key] = meteor._stat(hypothesis, gts[i])
                stats.append(self._stats[key])
            meteor.meteor_p.stdin.write(("EVAL" + "".join(f" ||| {s}" for s in stats) + "\n").encode())
            meteor.meteor_p.stdin.flush()
            scores = [float(meteor.meteor_p.stdout.readline().strip()) for _ in ids]
            score = float(meteor.meteor_p.stdout.readline().strip())
        return score, scores


def score_captions(gts: dict, res: dict, metrics=METRIC_NAMES, tokenize: bool = True,
                   meteor: MeteorPool | None = None) -> dict:
    """Corpus and per-image caption metrics of `res` {id: caption} against `gts` {id: [references]}.

    Returns {"corpus": {metric: value or None}, "per_image": {metric: {id: value}}, "na_reasons":
    {metric: reason}}. CIDEr is CIDEr-D with df from the evaluated references (the COCO convention).
    """
    ids = sorted(gts, key=str)
    if set(ids) != set(res):
        raise ValueError("captions and references cover different image ids")
    if tokenize:
        tok = ptb_tokenize({**{f"g{k}": gts[k] for k in ids}, **{f"r{k}": [res[k]] for k in ids}})
        g = {k: tok[f"g{k}"] for k in ids}
        r = {k: tok[f"r{k}"] for k in ids}
    else:
        g = {k: [simple_tokenize(c) for c in gts[k]] for k in ids}
        r = {k: [simple_tokenize(res[k])] for k in ids}
    corpus, per, na = {}, {}, {}
    if "BLEU-4" in metrics:
        score, scores = bleu(g, r)
        corpus["BLEU-4"] = float(score[3])
        per["BLEU-4"] = {str(k): float(s) for k, s in zip(ids, scores[3])}
    if "METEOR" in metrics:
        if shutil.which("java") is None:
            corpus["METEOR"], na["METEOR"] = None, "java not found on PATH"
        else:
            score, scores = (meteor or MeteorPool()).compute_score(g, r)
            corpus["METEOR"] = float(score)
            per["METEOR"] = {str(k): float(s) for k, s in zip(ids, scores)}
    if "ROUGE-L" in metrics:
        score, scores = rouge_l(g, r)
        corpus["ROUGE-L"] = float(score)
        per["ROUGE-L"] = {str(k): float(s) for k, s in zip(ids, scores)}
    if "CIDEr" in metrics:
        scorer = cider_for([g[k] for k in ids])
        scores = scorer.score([r[k][0] for k in ids], [g[k] for k in ids])
        corpus["CIDEr"] = float(scores.mean())
        per["CIDEr"] = {str(k): float(s) for k, s in zip(ids, scores)}
    if "SPICE" in metrics:
        scored, na["SPICE"] = spice_or_reason(lambda: run_spice(g, r))
        corpus["SPICE"] = scored[0] if scored else None
        if scored:
            per["SPICE"] = {str(k): v for k, v in scored[1].items()}
    return {"corpus": corpus, "per_image": per, "na_reasons": {k: v for k, v in na.items() if v}}


def score_caption_sets(sets: list, metrics=METRIC_NAMES, meteor: MeteorPool | None = None) -> list:
    """`score_captions` of every (gts, res) in `sets`, METEOR's JVM working in a second thread meanwhile.

    METEOR's time is spent in its own (Java) process, so its segments are aligned while this process
    computes BLEU, ROUGE-L, CIDEr-D and SPICE; the results are the same as scoring each set alone.
    """
    from concurrent.futures import ThreadPoolExecutor
    others = [m for m in metrics if m != "METEOR"]
    meteor = meteor or MeteorPool()
    ptb_tokenize({f"{n}:{k}": [*gts[k], res[k]] for n, (gts, res) in enumerate(sets) for k in gts})
    with ThreadPoolExecutor(1) as pool:
        meteor_done = pool.submit(lambda: [score_captions(g, r, ["METEOR"], meteor=meteor) for g, r in sets]) \
            if "METEOR" in metrics else None
        results = [score_captions(g, r, others) for g, r in sets]
        for result, met in zip(results, meteor_done.result() if meteor_done else []):
            for part in ("corpus", "per_image", "na_reasons"):
                result[part].update(met[part])
    return results


def score_beams(gts: dict, beams: dict, metrics=("CIDEr", "SPICE")) -> dict:
    """"Top-k beams" scores (Figure F-stage1): every beam of every image scored against the image's
    references, averaged over the k beams — it rewards a model whose whole beam is good, not only its
    first caption. CIDEr-D uses the evaluated references' df (as `score_captions`); SPICE when available.
    """
    ids = sorted(gts, key=str)
    k = min(len(beams[i]) for i in ids)
    tok = ptb_tokenize({**{f"g{i}": gts[i] for i in ids}, **{f"b{i}": beams[i][:k] for i in ids}})
    g = {i: tok[f"g{i}"] for i in ids}
    corpus, na = {"k": k}, {}
    if "CIDEr" in metrics:
        scorer = cider_for([g[i] for i in ids])
        per = [float(scorer.score(tok[f"b{i}"], [g[i]] * k).mean()) for i in ids]
        corpus["CIDEr"] = float(np.mean(per))
    if "SPICE" in metrics:
        vals, na["SPICE"] = spice_or_reason(lambda: [run_spice(g, {i: [tok[f"b{i}"][j]] for i in ids})[0]
                                                     for j in range(k)])
        corpus["SPICE"] = float(np.mean(vals)) if vals else None
    return {"corpus": corpus, "na_reasons": {m: v for m, v in na.items() if v}}


def grounding_of(doc: dict, chair: str = "reference") -> dict:
    """{"grounding": ...} of a captions file: the shapes grammar against attribute records, CHAIR (variant
    `chair`: config evaluate.chair) against COCO objects; or the reason grounding is n/a (in na_reasons of the
    grounding columns)."""
    from .grounding import chair_scores, grounding_scores
    if doc.get("attributes"):
        return {"grounding": grounding_scores(doc["captions"], doc["attributes"])}
    if doc.get("objects") is not None:
        return {"grounding": chair_scores(doc["captions"], doc["references"], doc["objects"], variant=chair)}
    return {"grounding": {"na": "no attribute records (shapes) or COCO instance annotations (config "
                                "data.karpathy.instances / eval_sets.<name>.instances) for these images"}}


def caption_words(captions: dict) -> dict:
    """Caption length beside CHAIR (which falls as captions get shorter): words per caption (its Karpathy
    tokens, punctuation dropped), {"mean": corpus mean, "per_image": {id: words}}."""
    per = {str(i): len(caption_tokens(c)) for i, c in captions.items()}
    return {"mean": float(np.mean(list(per.values()))) if per else None, "per_image": per}


def caption_quality(doc: dict, chair: str = "reference") -> dict:
    """What the control's calibration rule reads of a captions file, without Java — so its job never waits for
    the scoring job, which scores the runs that wait for the rule: CIDEr-D with the Java-free tokenizer and
    the document frequencies of these references (1.0 = 100; the scoring job's CIDEr-D tokenizes with PTB),
    and — where grounding applies — the share of broken captions and CHAIR_s."""
    ids = sorted(doc["captions"], key=str)
    refs = [[simple_tokenize(r) for r in doc["references"][i]] for i in ids]
    scorer = CiderD(refs)
    cider = float(np.mean([scorer.score_one(simple_tokenize(doc["captions"][i]), r) for i, r in zip(ids, refs)]))
    corpus = grounding_of(doc, chair)["grounding"].get("corpus", {})
    return {"CIDEr": cider, "broken": corpus.get("broken"), "CHAIR_s": corpus.get("CHAIR_s")}


def score_files(caption_paths: list, out_paths: list, metrics=METRIC_NAMES, chair: str = "reference") -> None:
    """`cwdpo score`: every caption file (captions, references, optional beams and per-image domains)
    scored into its scores file. One PTB-tokenizer JVM for every caption of every file, one METEOR JVM;
    a file with domains (NoCaps) is also scored per domain, each domain with its own document frequencies.
    One SPICE parse cache for the whole job (`spice_cache`)."""
    if len(caption_paths) != len(out_paths):
        raise ValueError("give one scores path per captions file")
    with spice_cache():
        _score_files(caption_paths, out_paths, metrics, chair)


def _score_files(caption_paths: list, out_paths: list, metrics, chair: str) -> None:
    import sys
    docs = [read_json(p) for p in caption_paths]
    ptb_tokenize({f"{n}:{kind}:{k}": v if isinstance(v, list) else [v]
                  for n, doc in enumerate(docs) for kind in ("references", "captions", "beams")
                  for k, v in (doc.get(kind) or {}).items()})
    sets, where = [], []  # every file, and for NoCaps-style files every domain on its own (its own df)
    for n, doc in enumerate(docs):
        sets.append((doc["references"], doc["captions"]))
        where.append((n, None))
        for d in sorted(set((doc.get("domains") or {}).values())):
            ids = [i for i, dom in doc["domains"].items() if dom == d]
            sets.append(({i: doc["references"][i] for i in ids}, {i: doc["captions"][i] for i in ids}))
            where.append((n, d))
    results = [{} for _ in docs]
    for (n, domain), scored in zip(where, score_caption_sets(sets, metrics, meteor=MeteorPool())):
        if domain is None:
            results[n] = scored
        else:
            results[n].setdefault("domains", {})[domain] = scored
    for cap_path, out_path, doc, result in zip(caption_paths, out_paths, docs, results):
        result.update(grounding_of(doc, chair))
        result["words"] = caption_words(doc["captions"])
        if doc.get("beams"):
            result["beams"] = score_beams(doc["references"], doc["beams"],
                                          [m for m in ("CIDEr", "SPICE") if m in metrics])
        for metric, reason in result["na_reasons"].items():
            print(f"[cwdpo score] {cap_path}: {metric} = n/a ({reason})", file=sys.stderr)
        write_json(out_path, result)
