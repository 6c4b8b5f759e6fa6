"""Rule judges: known inputs give known scores (pure functions, no database)."""

import json

import pytest
import sacrebleu

from epochlens.v1 import judge_pb2
from services.judge.config import JudgeSettings
from services.judge.rules import judge_item, repeated_share, selected_rules
from services.judge.schema import Item, RulesConfig

DEFAULTS = JudgeSettings(_env_file=None).rule_defaults()


def item(prediction: str, ground_truth: str | None = None,
         prompt: str = "Name the capital of France.") -> Item:
    return Item(run_id=None, step=0, sample_index=0, epoch=1, prompt=prompt,
                ground_truth=ground_truth, prediction=prediction)


def scores(prediction: str, ground_truth: str | None = None, **config) -> dict[str, float]:
    verdicts = judge_item(item(prediction, ground_truth), RulesConfig(**config), DEFAULTS)
    return {v.criterion: v.score for v in verdicts}


def test_exact_match_is_normalized():
    assert scores("  The   Capital\tis PARIS ", "the capital is paris")["exact_match"] == 1.0
    assert scores("the capital is paris.", "the capital is paris")["exact_match"] == 0.0


def test_edit_similarity_is_normalized_levenshtein():
    # kitten -> sitting: 3 edits over the longer length 7.
    assert scores("kitten", "sitting")["edit_similarity"] == pytest.approx(1 - 3 / 7)
    assert scores("same text", "same text")["edit_similarity"] == 1.0
    assert scores("abcd", "wxyz")["edit_similarity"] == 0.0


def test_chrf_is_sacrebleu_sentence_chrf_over_100():
    hypothesis = "The quick brown fox jumps over the lazy dog."
    reference = "A quick brown fox jumped over a lazy dog."
    expected = sacrebleu.sentence_chrf(hypothesis, [reference]).score / 100
    assert scores(hypothesis, reference)["chrf"] == pytest.approx(expected)
    assert 0.0 < expected < 1.0
    assert scores(reference, reference)["chrf"] == pytest.approx(1.0)


def test_length_bounds():
    assert scores("abcde", min_chars=2, max_chars=4)["length"] == 0.0
    assert scores("abcd", min_chars=2, max_chars=4)["length"] == 1.0
    assert scores("a", min_chars=2, max_chars=4)["length"] == 0.0
    # Service defaults: 1..8192 characters.
    assert scores("")["length"] == 0.0
    assert scores("x" * 8192)["length"] == 1.0
    assert scores("x" * 8193)["length"] == 0.0


def test_structure_empty_copy_and_repetition():
    assert scores("   ")["structure"] == 0.0
    assert scores("name the CAPITAL of  France.")["structure"] == 0.0
    # 9 words, 7 trigrams of which 3 distinct: 4/7 repeated > 0.5 -> degenerate.
    assert repeated_share("a b c a b c a b c", 3) == pytest.approx(4 / 7)
    assert scores("a b c a b c a b c")["structure"] == 0.0
    # 6 words, 4 trigrams, 1 repeat: 1/4 <= 0.5.
    assert repeated_share("it is paris it is paris", 3) == pytest.approx(1 / 4)
    assert scores("it is paris it is paris")["structure"] == 1.0
    assert scores("Paris.")["structure"] == 1.0


def test_keywords_required_and_forbidden():
    got = scores("Paris is in France, not in London.", required_keywords=["paris", "FRANCE"],
                 forbidden_keywords=["london"])
    assert got["keywords"] == pytest.approx(2 / 3)
    # Whole words only: "Parisian" does not contain the keyword "paris".
    assert scores("Parisian food", required_keywords=["paris"])["keywords"] == 0.0
    assert scores("Paris", required_keywords=["paris"], forbidden_keywords=["rome"])[
        "keywords"] == 1.0


@pytest.mark.parametrize(("text", "expected"), [
    ("As shown in [1], the capital is Paris.", 1.0),
    ("See [2, 3] for details.", 1.0),
    ("Paris (Smith, 2020) is the capital.", 1.0),
    ("Source: https://example.org/paris", 1.0),
    ("The capital is Paris.", 0.0),
])
def test_citation(text, expected):
    assert scores(text, require_citation=True)["citation"] == expected


def test_output_format_json_and_pattern():
    assert scores('{"capital": "Paris"}', output_format="json")["output_format"] == 1.0
    assert scores("capital: Paris", output_format="json")["output_format"] == 0.0
    assert scores("42", output_format="json", pattern=r"^\d+$")["output_format"] == 1.0
    assert scores('"x"', output_format="json", pattern=r"^\d+$")["output_format"] == 0.5
    assert scores("abc", pattern=r"^\d+$")["output_format"] == 0.0


def test_policy_scope_forbidden_topics():
    got = scores("Let us talk about drugs.", forbidden_topics=["weapons", "drugs"])
    assert got["policy_scope"] == 0.5
    assert scores("Paris.", forbidden_topics=["weapons"])["policy_scope"] == 1.0


def test_which_rules_run():
    # Reference rules only with a ground truth; configured rules only when configured.
    assert list(scores("Paris")) == ["length", "structure"]
    assert list(scores("Paris", "Paris")) == ["exact_match", "chrf", "edit_similarity",
                                              "length", "structure"]
    assert list(scores("Paris", required_keywords=["x"], require_citation=True,
                       output_format="json", forbidden_topics=["y"])) == [
        "length", "structure", "keywords", "citation", "output_format", "policy_scope"]
    assert selected_rules(RulesConfig(enabled=False)) == []
    assert list(scores("Paris", "Paris", criteria=["chrf", "length"])) == ["chrf", "length"]


def test_explicit_reference_rule_without_ground_truth_is_unscored():
    verdicts = judge_item(item("Paris"), RulesConfig(criteria=["exact_match"]), DEFAULTS)
    assert len(verdicts) == 1
    assert verdicts[0].status == judge_pb2.JUDGMENT_STATUS_UNSCORED
    assert verdicts[0].unscored_reason == "no ground truth to compare with"
    assert not verdicts[0].passed


def test_verdict_fields_and_thresholds():
    verdicts = judge_item(item("kitten", "sitting"),
                          RulesConfig(thresholds={"edit_similarity": 0.5}), DEFAULTS)
    by_name = {v.criterion: v for v in verdicts}
    similarity = by_name["edit_similarity"]
    assert (similarity.threshold, similarity.passed) == (0.5, True)
    assert by_name["exact_match"].threshold == 1.0 and not by_name["exact_match"].passed
    assert by_name["chrf"].threshold == 0.5
    for verdict in verdicts:
        assert verdict.judge_type == judge_pb2.JUDGE_TYPE_RULE
        assert verdict.judge_model == "rules"
        assert verdict.prompt_version == "rules-v1"
        assert verdict.status == judge_pb2.JUDGMENT_STATUS_SCORED
        assert verdict.reasoning
        assert 0.0 <= verdict.score <= 1.0


def test_service_thresholds_come_from_settings():
    settings = JudgeSettings(_env_file=None, rule_thresholds={"chrf": 0.9})
    defaults = settings.rule_defaults()
    assert defaults.thresholds["chrf"] == 0.9
    assert defaults.thresholds["exact_match"] == 1.0
    verdicts = judge_item(item("Paris", "Paris"), RulesConfig(criteria=["chrf"]), defaults)
    assert verdicts[0].threshold == 0.9
    assert json.loads(settings.model_dump_json())["rule_thresholds"] == {"chrf": 0.9}
