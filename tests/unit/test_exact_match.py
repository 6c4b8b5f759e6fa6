"""One exact-match definition (services.common.matching): the judge's exact_match rule, the
CLI's per-epoch counts and the report's figures agree on case, whitespace and Unicode
variants, and disagree with none of them on real differences."""

import uuid

from epochlens.v1 import common_pb2
from services.cli.report import ReportCollector
from services.cli.stats import epoch_stats
from services.common.matching import exact_match, normalize
from services.judge.config import JudgeSettings
from services.judge.rules import judge_item
from services.judge.schema import Item, RulesConfig

TRUTH = "The Caf\u00e9 opens at 9"
CASES = [
    ("the caf\u00e9 opens at 9", True),            # case
    ("The  Caf\u00e9\topens\nat 9 ", True),        # inner and outer whitespace
    ("THE CAFE\u0301 OPENS AT 9", True),            # decomposed accent (NFC) and case
    ("The Cafe opens at 9", False),                 # a different letter
    ("The Caf\u00e9 opens at 9.", False),           # punctuation counts
    ("The Caf\u00e9 opensat 9", False),             # the place of spaces counts
]


def test_normalize_is_nfc_collapsed_whitespace_and_casefold():
    assert normalize("  Stra\u00dfe \t\n X ") == "strasse x"
    assert exact_match("a", None) is None


def judge_verdicts() -> list[bool]:
    """What the judge's exact_match rule says of each case."""
    defaults = JudgeSettings(_env_file=None).rule_defaults()
    config = RulesConfig(criteria=["exact_match"])
    out = []
    for index, (text, _) in enumerate(CASES):
        item = Item(run_id=uuid.uuid4(), step=1, sample_index=index, epoch=1, prompt="p",
                    ground_truth=TRUTH, prediction=text)
        (verdict,) = judge_item(item, config, defaults)
        out.append(verdict.passed)
    return out


def predictions() -> list[common_pb2.Prediction]:
    return [common_pb2.Prediction(run_id="r", epoch=1, step=1, sample_index=i, prompt="p",
                                  ground_truth=TRUTH, prediction=text)
            for i, (text, _) in enumerate(CASES)]


def test_judge_cli_and_report_agree_on_every_variant():
    expected = [match for _, match in CASES]
    assert judge_verdicts() == expected
    assert [exact_match(text, TRUTH) for text, _ in CASES] == expected
    (stats,) = epoch_stats([predictions()])
    assert (stats.exact_match_count, stats.with_ground_truth) == (3, 6)
    report = ReportCollector()
    for prediction in predictions():
        report.add(prediction, [])
    payload = report.payload()
    (epoch,) = payload["epochs"]
    assert (epoch["exact"], epoch["with_truth"], epoch["rate"]) == (3, 6, 0.5)
    assert [p["exact"] for s in payload["samples"] for p in s["predictions"]] == expected


def test_trainer_side_definition_is_the_same():
    """The server's exact match is trainer_client.matching's (one definition), and the rate a
    training loop logs counts only predictions with a ground truth."""
    from trainer_client import matching as trainer
    from trainer_client.results import GenerationResult

    assert (exact_match, normalize) == (trainer.exact_match, trainer.normalize)
    results = [GenerationResult(i, "p", TRUTH, text, 1.0) for i, (text, _) in enumerate(CASES)]
    results += [GenerationResult(98, "p", None, "x", 1.0),
                GenerationResult(99, "p", TRUTH, None, 1.0, error="RuntimeError")]
    assert trainer.exact_match_rate(results) == 3 / 6
    assert trainer.exact_match_rate(results[-2:]) is None
