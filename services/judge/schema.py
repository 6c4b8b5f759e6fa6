"""What the judge's parts exchange: the judge config a run carries, the item to
judge, and the verdict a judge returns (stored as a JudgmentRow).

The judge config is the "judge" section of a run's config (CreateRun) or the
`config` of JudgePredictions / EnqueueJudging / EstimateCost. Service-wide
defaults and ceilings (JudgeSettings) are applied by services.judge.config.
"""

import functools
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import re2
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from epochlens.v1 import judge_pb2
from services.judge.pairwise.config import PairwiseConfig

STANDARD_LLM_CRITERIA = ("helpfulness", "accuracy", "clarity", "safety", "completeness")
# Why a run config may not name a URL: the judge would send it the operator's key (and POST
# to it from inside the operator's network).
BASE_URL_REFUSED = ("endpoints and their keys are operator configuration "
                    "(EPOCHLENS_JUDGE_LLM_ENDPOINTS); name one with llm.endpoint instead")


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> Any:
    """`pattern` compiled by RE2: matching takes time linear in the text, whatever the pattern
    (no backtracking). Raises re2.error for what RE2 cannot compile (backreferences,
    lookaround, repetitions above 1000, programs above RE2's memory bound)."""
    options = re2.Options()
    options.log_errors = False
    return re2.compile(pattern, options)


def pattern_error(pattern: str) -> str | None:
    """Why RE2 refuses `pattern`, or None."""
    try:
        compile_pattern(pattern)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        text = detail.decode(errors="replace") if isinstance(detail, bytes) else str(detail)
        return f"not a regular expression the judge can run in linear time (RE2 syntax): {text}"
    return None


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
    # The prediction must match this regular expression (RE2 syntax, searched), when set.
    pattern: str | None = None
    # The prediction must cite something (matches the service's citation pattern), when true.
    require_citation: bool = False
    forbidden_topics: list[str] = Field(default_factory=list)

    @field_validator("pattern")
    @classmethod
    def _linear_time_pattern(cls, value: str | None) -> str | None:
        """Refused unless RE2 compiles it: a backtracking engine would let one pattern such
        as (a+)+$ hold the judge for hours."""
        if value is not None and (problem := pattern_error(value)) is not None:
            raise ValueError(problem)
        return value


Provider = Literal["openai", "anthropic", "openai_compatible"]
# Tags of the two kinds of entries of llm.criteria (dropped from field paths in errors).
CRITERION_NAME_TAG, CRITERION_OBJECT_TAG = "criterion_name", "criterion_object"


class CustomCriterion(BaseModel):
    """A criterion of the run's own: its rubric, integer scale and pass threshold (checked
    against the service's limits by services.judge.config)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    rubric: str
    scale_min: int
    scale_max: int
    threshold: float


class PanelMember(BaseModel):
    """One LLM judge of a panel (validated like a single judge)."""

    model_config = ConfigDict(extra="forbid")

    provider: Provider
    model: str
    endpoint: str | None = None


def _criterion_tag(value: Any) -> str:
    return CRITERION_OBJECT_TAG if isinstance(value, dict | CustomCriterion) \
        else CRITERION_NAME_TAG


CriterionEntry = Annotated[
    Annotated[str, Tag(CRITERION_NAME_TAG)]
    | Annotated[CustomCriterion, Tag(CRITERION_OBJECT_TAG)],
    Discriminator(_criterion_tag)]


class LlmJudgeConfig(BaseModel):
    """An LLM judge (opt-in): one model (provider, model) or a panel of models whose scores
    are combined by `combine`. Needs a key for each provider in the judge's configuration."""

    model_config = ConfigDict(extra="forbid")

    # Required unless `panel` is given (then absent); services.judge.config checks which.
    provider: Provider | None = None
    model: str | None = None
    # Name of an OpenAI-compatible server (vLLM, Ollama, llama.cpp) the operator configured
    # (EPOCHLENS_JUDGE_LLM_ENDPOINTS); required for provider openai_compatible.
    endpoint: str | None = None
    # Refused when set (BASE_URL_REFUSED): kept only to say why.
    base_url: Any = None
    # Names of standard (or custom_criteria) criteria, and CustomCriterion objects.
    criteria: list[CriterionEntry] = Field(
        default_factory=lambda: list(STANDARD_LLM_CRITERIA))
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
    # Several judges on every criterion, each verdict kept, combined by `combine` (mean when
    # unset): instead of provider/model/endpoint.
    panel: list[PanelMember] | None = None
    combine: Literal["mean", "majority"] | None = None

    @field_validator("base_url")
    @classmethod
    def _no_url(cls, value: Any) -> None:
        if value is not None:
            raise ValueError(BASE_URL_REFUSED)
        return None

    @property
    def combine_rule(self) -> str:
        """How a panel's scores are combined (mean when the config names no rule)."""
        return self.combine or "mean"

    @property
    def judge_model(self) -> str:
        """judge_model of this config's judgments: "provider/model", or "panel/<rule>" for
        the combined judgments of a panel."""
        if self.panel:
            return f"panel/{self.combine_rule}"
        return f"{self.provider}/{self.model}"

    def members(self) -> list["LlmJudgeConfig"]:
        """The single judges this config runs: itself, or one per panel member (each with the
        member's provider, model and endpoint and everything else of this config)."""
        if not self.panel:
            return [self]
        return [self.model_copy(update={"provider": m.provider, "model": m.model,
                                        "endpoint": m.endpoint, "panel": None,
                                        "combine": None}) for m in self.panel]


class JudgeConfig(BaseModel):
    """The judge section of a run's config."""

    model_config = ConfigDict(extra="forbid")

    rules: RulesConfig = Field(default_factory=RulesConfig)
    llm: LlmJudgeConfig | None = None
    # Pairwise judging against a baseline (services.judge.pairwise).
    pairwise: PairwiseConfig | None = None


class RetryLater(Exception):
    """LLM calls of queued tasks still failed with transient errors (5xx, 429, network) after
    their in-call retries: the tasks go back to the queue and are tried again after
    llm_transient_retry_base_s (doubling); the run's on_error applies on the last attempt."""


@dataclass(frozen=True)
class ItemFailure:
    """Judging one item raised: why (the exception, as text). Stands in for that item's
    verdicts only, so the other items of a batch are judged and stored as usual."""

    reason: str


class ItemsFailed(Exception):
    """Some items of an LLM judging call raised (`failures`: item position -> why); `judged`
    holds the verdicts of the others."""

    def __init__(self, failures: dict[int, str], judged: list[tuple["Item", "Verdict"]]) -> None:
        super().__init__(f"{len(failures)} items failed: {next(iter(failures.values()))}")
        self.failures = failures
        self.judged = judged


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
