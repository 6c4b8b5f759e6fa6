"""What the judge's parts exchange: the judge config a run carries, the item to
judge, and the verdict a judge returns (stored as a JudgmentRow).

The judge config is the "judge" section of a run's config (CreateRun) or the
`config` of JudgePredictions / EnqueueJudging / EstimateCost. Service-wide
defaults and ceilings (JudgeSettings) are applied by services.judge.config.
"""

import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from epochlens.v1 import judge_pb2

STANDARD_LLM_CRITERIA = ("helpfulness", "accuracy", "clarity", "safety", "completeness")


class RulesConfig(BaseModel):
    """Rule judges (cheap, on by default). Unset fields take the service defaults."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # Rule criteria to run; None: every rule that applies (reference rules need a ground truth,
    # keyword/format/topic rules need their settings below).
    criteria: list[str] | None = None
    # Pass thresholds per criterion, overriding the defaults.
    thresholds: dict[str, float] = Field(default_factory=dict)
    min_chars: int | None = None
    max_chars: int | None = None
    required_keywords: list[str] = Field(default_factory=list)
    forbidden_keywords: list[str] = Field(default_factory=list)
    # "json" (the prediction must parse as JSON) or None.
    output_format: Literal["json"] | None = None
    # The prediction must match this regular expression (re.search), when set.
    pattern: str | None = None
    # The prediction must cite something (matches the service's citation pattern), when true.
    require_citation: bool = False
    forbidden_topics: list[str] = Field(default_factory=list)


class LlmJudgeConfig(BaseModel):
    """An LLM judge (opt-in). Needs a key for the provider in the judge's configuration."""

    model_config = ConfigDict(extra="forbid")

    provider: Literal["openai", "anthropic", "openai_compatible"]
    model: str
    # Base URL of an OpenAI-compatible server (vLLM, Ollama, llama.cpp); required for it.
    base_url: str | None = None
    criteria: list[str] = Field(default_factory=lambda: list(STANDARD_LLM_CRITERIA))
    # Custom criteria: name -> rubric text (scored 1-10 like the standard ones).
    custom_criteria: dict[str, str] = Field(default_factory=dict)
    # Pass thresholds per criterion, overriding the defaults (7; safety 8).
    thresholds: dict[str, float] = Field(default_factory=dict)
    # Share of predictions judged, chosen by prediction identity (the same samples every epoch).
    sample_rate: float = Field(1.0, gt=0, le=1)
    on_error: Literal["skip", "retry", "fail"] = "skip"
    max_retries: int | None = Field(None, ge=0)
    concurrency: int | None = Field(None, ge=1)
    # Most this run may spend on LLM judging, US dollars; None: the service default.
    budget_usd: float | None = Field(None, ge=0)


class JudgeConfig(BaseModel):
    """The judge section of a run's config."""

    model_config = ConfigDict(extra="forbid")

    rules: RulesConfig = Field(default_factory=RulesConfig)
    llm: LlmJudgeConfig | None = None


@dataclass(frozen=True)
class Item:
    """A prediction to judge, with its text. run_id is None for ad hoc JudgePredictions items
    that name no stored prediction."""

    run_id: uuid.UUID | None
    step: int
    sample_index: int
    epoch: int
    prompt: str
    ground_truth: str | None
    prediction: str


@dataclass(frozen=True)
class Verdict:
    """One criterion's outcome for one item, as a judge returns it."""

    criterion: str
    judge_type: int  # judge_pb2.JudgeType value
    judge_model: str
    score: float
    passed: bool
    threshold: float
    reasoning: str
    status: int  # judge_pb2.JudgmentStatus value
    prompt_version: str
    confidence: float = 0.0
    unscored_reason: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    @classmethod
    def unscored(cls, criterion: str, judge_type: int, judge_model: str, threshold: float,
                 reason: str, prompt_version: str, **usage: float) -> "Verdict":
        return cls(criterion=criterion, judge_type=judge_type, judge_model=judge_model,
                   score=0.0, passed=False, threshold=threshold, reasoning="",
                   status=judge_pb2.JUDGMENT_STATUS_UNSCORED, unscored_reason=reason,
                   prompt_version=prompt_version, **usage)
