"""Word-level difference between two texts, for `epochlens compare`.

The texts are cut into tokens that are either a run of whitespace or a run of
non-whitespace (a word with its punctuation), so joining the tokens gives the
text back unchanged. difflib.SequenceMatcher aligns the two token lists; the
result is a list of segments, each kept, removed or inserted, in reading order
(removed before inserted where a span was replaced).
"""

import difflib
import re
from typing import Literal, NamedTuple

_TOKEN = re.compile(r"\s+|\S+")

Op = Literal["equal", "delete", "insert"]


class Segment(NamedTuple):
    """A span of text and what happened to it between the old and the new text."""

    op: Op
    text: str


def tokens(text: str) -> list[str]:
    """Words and the whitespace between them; "".join(tokens(t)) == t."""
    return _TOKEN.findall(text)


def word_diff(old: str, new: str) -> list[Segment]:
    """Segments that turn `old` into `new`: equal text, deleted words, inserted words."""
    a, b = tokens(old), tokens(new)
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    segments: list[Segment] = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            segments.append(Segment("equal", "".join(b[j1:j2])))
            continue
        if i2 > i1:
            segments.append(Segment("delete", "".join(a[i1:i2])))
        if j2 > j1:
            segments.append(Segment("insert", "".join(b[j1:j2])))
    return segments


def plain(segments: list[Segment]) -> str:
    """The diff as text without colour, in git's --word-diff=plain notation:
    removed text as [-text-], inserted text as {+text+}."""
    marks = {"equal": "{}", "delete": "[-{}-]", "insert": "{{+{}+}}"}
    return "".join(marks[s.op].format(s.text) for s in segments)
