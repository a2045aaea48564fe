"""Reading the letter a generated answer picks (the "generate" scoring mode)."""
from __future__ import annotations

import re

from .items import LETTERS


def _norm(text: str) -> str:
    s = " ".join(text.casefold().split())
    return s.strip(" \t\n.,;:!?\"'`()[]")


_LEAD_LETTER = re.compile(r"^[(\[]?([A-Z])(?:[)\].:,]|$)")
_KEYWORD_LETTER = re.compile(r"(?i:answer|option|choice)\s*(?:(?i:is|would be|should be)\s*|:\s*)*"
                             r"[(\[]?([A-Z])(?![A-Za-z0-9])")
_LONE_LETTER = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")


def parse_letter(text: str, options: list) -> int | None:
    """The shown position (0-based letter index) a generated answer picks among `options` (in shown
    order), or None when it cannot be parsed. Rules, first that applies:

    1. the output starts with a letter alone or followed by ). ] . : , — "B", "B.", "(B)", "B) dog",
       "[B]"; a whole output of one lower-case letter ("b") also counts;
    2. a letter after "answer"/"option"/"choice" (+ "is"/":") — "The answer is B", "Answer: (C)";
    3. the output equals one option's text (case, spacing and surrounding punctuation ignored);
    4. exactly one distinct valid upper-case letter stands alone in the output (not "A"/"I" used as a
       word, i.e. followed by a lower-case word);
    5. exactly one option's text occurs in the output as whole words.
    Letters outside the options' range are ignored.
    """
    n = len(options)
    valid = LETTERS[:n]
    s = (text or "").strip()
    if not s:
        return None
    m = _LEAD_LETTER.match(s)
    if m and m.group(1) in valid:
        return valid.index(m.group(1))
    m = re.fullmatch(r"[(\[]?([a-z])[)\].:]?", s)
    if m and m.group(1).upper() in valid:
        return valid.index(m.group(1).upper())
    for m in _KEYWORD_LETTER.finditer(s):
        if m.group(1) in valid:
            return valid.index(m.group(1))
    ns = _norm(s)
    for prefix in ("the answer is ", "answer: ", "answer "):
        if ns.startswith(prefix):
            ns = ns[len(prefix):].strip()
    exact = [j for j, o in enumerate(options) if _norm(o) and _norm(o) == ns]
    if len(exact) == 1:
        return exact[0]
    lone = set()
    for m in _LONE_LETTER.finditer(s):
        letter = m.group(1)
        if letter in "AI" and re.match(r"\s+[a-z]", s[m.end():]):
            continue
        if letter in valid:
            lone.add(letter)
    if len(lone) == 1:
        return valid.index(lone.pop())
    contained = [j for j, o in enumerate(options)
                 if _norm(o) and re.search(r"(?<!\w)" + re.escape(_norm(o)) + r"(?!\w)", ns)]
    if len(contained) == 1:
        return contained[0]
    return None
