"""The one definition of exact match (it lives in trainer_client.matching, which needs no
server package, so that a training loop logs the same rate), shared by the judge's exact_match rule
(services.judge.rules), the command line (services.cli.stats) and the HTML report.

Two texts match exactly when they are equal after normalize(): Unicode NFC (a composed and
a decomposed accent are the same letter), surrounding whitespace removed, every inner run
of whitespace (spaces, tabs, newlines) made one space, and case folded. So "Paris",
" paris\\n" and "PARIS" match; "Paris." and "Pari s" do not (punctuation and the place of
spaces count). A prediction without a ground truth is neither a match nor a miss.
"""

from trainer_client.matching import exact_match, normalize

__all__ = ["exact_match", "normalize"]
