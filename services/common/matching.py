"""The one definition of exact match, shared by the judge's exact_match rule
(services.judge.rules), the command line (services.cli.stats) and the HTML report.

Two texts match exactly when they are equal after normalize(): Unicode NFC (a composed and
a decomposed accent are the same letter), surrounding whitespace removed, every inner run
of whitespace (spaces, tabs, newlines) made one space, and case folded. So "Paris",
" paris\\n" and "PARIS" match; "Paris." and "Pari s" do not (punctuation and the place of
spaces count). A prediction without a ground truth is neither a match nor a miss.
"""

import unicodedata


def normalize(text: str) -> str:
    """NFC, outer whitespace stripped, inner whitespace collapsed to one space, case folded."""
    return " ".join(unicodedata.normalize("NFC", text).split()).casefold()


def exact_match(prediction: str, ground_truth: str | None) -> bool | None:
    """Whether the prediction matches the ground truth; None when there is no ground truth."""
    if ground_truth is None:
        return None
    return normalize(prediction) == normalize(ground_truth)
