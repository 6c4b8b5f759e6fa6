"""The judge section of a run config as a careless or hostile user writes it: a panel of one,
the same model twice, and LLM criteria named like rule criteria (their 1..10 scores would be
pooled with the rule's 0..1 scores in every per-criterion summary, comparison and
--fail-under); each refused naming the field."""

import pytest

from services.common.errors import InvalidArgument
from services.judge.config import JudgeSettings, validate_judge_config
from services.judge.rules import RULE_NAMES

MEMBER = {"provider": "openai", "model": "gpt-4o-mini"}


def violations(data: dict) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        validate_judge_config(JudgeSettings(_env_file=None, port=0), data)
    return {v.field: v.description for v in caught.value.violations}


def criterion(name: str) -> dict:
    return {"name": name, "rubric": "Is it right?", "scale_min": 1, "scale_max": 5,
            "threshold": 3}


def test_panel_of_one_and_the_same_model_twice():
    assert "2..5 members" in violations({"llm": {"panel": [MEMBER]}})["config.llm.panel"]
    twice = violations({"llm": {"panel": [MEMBER, dict(MEMBER)]}})
    assert "same judge as panel[0]" in twice["config.llm.panel[1]"]


@pytest.mark.parametrize("name", RULE_NAMES)
def test_llm_criterion_named_like_a_rule_is_refused(name):
    found = violations({"llm": {**MEMBER, "criteria": [criterion(name)]}})
    assert "is a rule criterion" in found["config.llm.criteria[0].name"]
    found = violations({"llm": {**MEMBER, "custom_criteria": {name: "Is it right?"},
                                "criteria": ["accuracy", name]}})
    assert "is a rule criterion" in found["config.llm.criteria[1]"]


def test_criterion_of_its_own_name_is_accepted():
    config = validate_judge_config(JudgeSettings(_env_file=None, port=0), {
        "rules": {"criteria": ["exact_match"]},
        "llm": {**MEMBER, "criteria": [criterion("exact match, by a person's reading")]}})
    assert [c.name for c in config.llm.criteria] == ["exact match, by a person's reading"]


def test_an_empty_provider_key_means_the_provider_is_off(monkeypatch):
    """docker-compose passes `${OPENAI_API_KEY:-}`: an empty (or blank) key must not turn the
    provider on and be sent to it."""
    from services.judge.config import JudgeSettings

    monkeypatch.setenv("EPOCHLENS_JUDGE_PORT", "0")
    monkeypatch.setenv("EPOCHLENS_JUDGE_OPENAI_API_KEY", "")
    monkeypatch.setenv("EPOCHLENS_JUDGE_ANTHROPIC_API_KEY", "   ")
    settings = JudgeSettings(_env_file=None)
    assert settings.openai_api_key is None and settings.anthropic_api_key is None
    assert not settings.llm_enabled("openai") and not settings.llm_enabled("anthropic")
    monkeypatch.setenv("EPOCHLENS_JUDGE_OPENAI_API_KEY", "sk-real")
    assert JudgeSettings(_env_file=None).llm_enabled("openai")
