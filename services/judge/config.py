"""Settings of the judge service (env prefix EPOCHLENS_JUDGE_) and the check of a judge config
against them.

JudgeSettings = the common service settings + the LLM settings (services.judge.llm.settings)
+ the queue, limits, rule defaults and ceilings below. validate_judge_config() turns the
"judge" section of a run's config (a Struct as a dict) into a JudgeConfig, or raises
InvalidArgument naming each bad field (`config.llm.concurrency`,
`config.llm.criteria[2].scale_max`, `config.llm.panel[1].endpoint`, ...).
"""

import json
import math
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.config import ENV_FILE, ServiceSettings
from services.common.errors import Violations
from services.judge.llm.prompts import rubric_of
from services.judge.llm.settings import LlmSettings
from services.judge.pairwise.config import check_pairwise
from services.judge.rules import RULE_NAMES, RuleDefaults
from services.judge.schema import (
    CRITERION_NAME_TAG,
    CRITERION_OBJECT_TAG,
    STANDARD_LLM_CRITERIA,
    CustomCriterion,
    JudgeConfig,
    LlmJudgeConfig,
    PanelMember,
    pattern_error,
)

DEFAULT_RULE_THRESHOLDS = {
    "exact_match": 1.0, "chrf": 0.5, "edit_similarity": 0.8, "length": 1.0, "structure": 1.0,
    "keywords": 1.0, "citation": 1.0, "output_format": 1.0, "policy_scope": 1.0,
}
# Bracketed numbers [1], author-year (Smith, 2020) / (Smith et al. 2020), or a URL.
DEFAULT_CITATION_PATTERN = r"\[\d+(?:[,-]\s*\d+)*\]|\([A-Z][^()]{0,80}?,? \d{4}[a-z]?\)|https?://\S+"


class JudgeSettings(ServiceSettings, LlmSettings):
    model_config = SettingsConfigDict(env_prefix="EPOCHLENS_JUDGE_", env_file=ENV_FILE,
                                      extra="ignore")

    port: int = Field(50053, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    worker_count: int = Field(2, ge=0, description="Queue workers (asyncio tasks) in the "
                              "server; 0: the server only accepts tasks.")
    claim_batch: int = Field(512, ge=1, description="Most tasks one worker claims at once.")
    lease_s: float = Field(120.0, gt=0, description="Lease of a claimed task, seconds; a task "
                           "whose lease passed (its worker died) is claimed again.")
    retry_backoff_base_s: float = Field(2.0, gt=0, description="Delay before a failed task is "
                                        "tried again (doubles per attempt, with jitter).")
    retry_backoff_max_s: float = Field(600.0, gt=0, description="Longest retry delay of a "
                                       "failed task, seconds.")
    max_attempts: int = Field(5, ge=1, description="Attempts of a task before it is marked "
                              "failed.")
    purge_chunk_rows: int = Field(5000, ge=1, description="Rows one transaction of PurgeRun "
                                  "removes from one table; each chunk is its own short "
                                  "transaction, so judging of other runs goes on meanwhile.")
    purge_chunk_pause_s: float = Field(0.0, ge=0, description="Pause between two chunks of "
                                       "PurgeRun, seconds: gives a busy database's CPU back "
                                       "to other work (0: no pause).")
    idle_poll_s: float = Field(0.5, gt=0, description="Pause of a worker that found no task, "
                               "seconds (new tasks enqueued here wake it at once).")
    error_backoff_max_s: float = Field(10.0, gt=0, description="Longest pause of a worker "
                                       "after repeated database errors (exponential from "
                                       "idle_poll_s, with jitter), seconds.")
    rule_processes: int = Field(0, ge=0, description="Processes that compute rule judgments "
                                "(spawned); 0: a thread of the server process.")
    max_items: int = Field(1000, ge=1, description="Most items in one JudgePredictions or "
                           "EnqueueJudging call.")
    max_text_chars: int = Field(32768, ge=1, description="Longest prompt, ground truth or "
                                "prediction, characters.")
    max_name_chars: int = Field(256, ge=1, description="Longest criterion name, characters.")
    max_config_bytes: int = Field(65536, ge=2, description="Largest judge config, JSON bytes.")
    max_pattern_chars: int = Field(512, ge=1, description="Longest regular expression in a "
                                   "judge config (pattern).")
    page_size_default: int = Field(50, ge=1, description="ListCriteria page size when a "
                                   "request asks for 0.")
    page_size_max: int = Field(500, ge=1, description="Larger ListCriteria page sizes are "
                               "clamped to this.")
    rule_thresholds: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_RULE_THRESHOLDS),
        description="Pass thresholds of the rule criteria (score 0..1), JSON; missing "
        "criteria keep the built-in default.")
    rule_min_chars: int = Field(1, ge=0, description="Shortest prediction the length rule "
                                "passes when the run sets no min_chars.")
    rule_max_chars: int = Field(8192, ge=1, description="Longest prediction the length rule "
                                "passes when the run sets no max_chars.")
    rule_repetition_ngram: int = Field(3, ge=1, description="Word n-gram size of the "
                                       "structure rule's repetition check.")
    rule_max_repeated_share: float = Field(
        0.5, ge=0, le=1, description="Share of repeated word n-grams above which the structure "
        "rule calls a prediction degenerate.")
    rule_citation_pattern: str = Field(DEFAULT_CITATION_PATTERN, description="Regular "
                                       "expression (RE2 syntax, searched) the citation rule "
                                       "looks for.")
    llm_sample_rate_ceiling: float = Field(1.0, gt=0, le=1, description="Highest LLM "
                                           "sample_rate a judge config may ask for.")
    llm_budget_ceiling_usd: float = Field(100.0, ge=0, description="Highest LLM budget per "
                                          "run a judge config may ask for, US dollars.")
    llm_transient_retry_base_s: float = Field(
        60.0, gt=0, description="Delay before a queued task whose LLM calls still failed with "
        "transient errors (5xx, 429, network) after their in-call retries is tried again; "
        "doubles per attempt with jitter, capped by retry_backoff_max_s. on_error applies "
        "only on the task's last attempt (max_attempts), so with the defaults a provider "
        "outage is ridden out for about 7 to 15 minutes.")
    estimate_max_predictions: int = Field(1_000_000_000, ge=1, description="Largest "
                                          "prediction_count EstimateCost accepts.")
    estimate_max_item_tokens: int = Field(100_000, ge=1, description="Largest "
                                          "average_item_tokens EstimateCost accepts.")
    human_score_min: float = Field(0.0, description="Lowest score (and threshold) "
                                   "RecordHumanJudgment accepts (a criterion object of the "
                                   "run's judge config: its own scale_min instead).")
    human_score_max: float = Field(10.0, description="Highest score (and threshold) "
                                   "RecordHumanJudgment accepts (10: the LLM judges' scale; a "
                                   "criterion object of the run's judge config: its own "
                                   "scale_max instead).")
    max_human_revisions: int = Field(100, ge=1, description="Most revisions of one person's "
                                     "judgment of one prediction on one criterion.")
    generation_max_prompts: int = Field(
        256, ge=1, description="Most prompts in one GenerateResponses call.")
    generation_max_tokens_default: int = Field(
        512, ge=1, description="max_tokens of a generated response when the request's "
        "max_new_tokens is 0.")
    generation_max_tokens_ceiling: int = Field(
        8192, ge=1, description="Highest max_new_tokens GenerateResponses accepts.")
    generation_concurrency: int = Field(
        8, ge=1, description="Generation calls in flight at once in this judge process "
        "(all GenerateResponses calls together).")
    generation_max_retries: int = Field(
        3, ge=0, description="Retries of one generation call after 429 (Retry-After "
        "honoured), 5xx or network errors; authentication and quota errors never retry.")
    generation_request_timeout_s: float = Field(
        300.0, gt=0, description="Timeout of one generation call to an endpoint (connect + "
        "reply), seconds.")
    # Pairwise judging (services.judge.pairwise).
    pairwise_worker_count: int = Field(1, ge=0, description="Pairwise judging workers "
                                       "(asyncio tasks) in the server; 0: pairwise tasks are "
                                       "only queued.")
    pairwise_claim_batch: int = Field(32, ge=1, description="Most pairwise tasks one worker "
                                      "claims at once (two LLM calls each).")
    pairwise_max_rubric_chars: int = Field(4096, ge=1, description="Longest rubric of a "
                                           "judge.pairwise section, characters.")

    @field_validator("rule_citation_pattern")
    @classmethod
    def _linear_time_citation(cls, value: str) -> str:
        if (problem := pattern_error(value)) is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _human_range(self) -> "JudgeSettings":
        low, high = self.human_score_min, self.human_score_max
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"human_score_min ({low}) must be below human_score_max ({high}), "
                             "both finite")
        return self

    def rule_defaults(self) -> RuleDefaults:
        return RuleDefaults(
            thresholds={**DEFAULT_RULE_THRESHOLDS, **self.rule_thresholds},
            min_chars=self.rule_min_chars, max_chars=self.rule_max_chars,
            repetition_ngram=self.rule_repetition_ngram,
            max_repeated_share=self.rule_max_repeated_share,
            citation_pattern=self.rule_citation_pattern)

    def llm_judging_on(self, config: JudgeConfig) -> bool:
        """LLM judging runs only when the config asks for it and its provider (for a panel:
        the provider of at least one member) has a key (openai_compatible: the endpoint it
        names) configured here."""
        return config.llm is not None and any(
            self.llm_enabled(member.provider or "", member.endpoint)
            for member in config.llm.members())


def validate_judge_config(settings: JudgeSettings, data: dict[str, Any],
                          path: str = "config") -> JudgeConfig:
    """The judge config in `data`, or InvalidArgument naming every bad field under `path`."""
    violations = Violations()
    size = len(json.dumps(data))
    if size > settings.max_config_bytes:
        violations.add(path, f"{size} bytes exceed the maximum of {settings.max_config_bytes}")
        violations.raise_if_any()
    try:
        config = JudgeConfig.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            where = _field_path(error["loc"])
            violations.add(f"{path}.{where}" if where else path, error["msg"])
        violations.raise_if_any()
        raise
    _check_rules(settings, config, path, violations)
    _check_llm(settings, config, path, violations)
    check_pairwise(settings, config.pairwise, f"{path}.pairwise", violations)
    violations.raise_if_any()
    return config


def _field_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as a field path: list indexes in brackets
    (`llm.criteria[2].scale_max`), without the tags of the criteria union."""
    out = ""
    for index, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in (CRITERION_NAME_TAG, CRITERION_OBJECT_TAG) and index and isinstance(
                loc[index - 1], int):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _check_rules(settings: JudgeSettings, config: JudgeConfig, path: str,
                 violations: Violations) -> None:
    rules, where = config.rules, f"{path}.rules"
    for name in rules.criteria or []:
        if name not in RULE_NAMES:
            violations.add(f"{where}.criteria", f"unknown rule criterion {name!r}; "
                           f"known: {', '.join(RULE_NAMES)}")
    _check_thresholds(rules.thresholds, set(RULE_NAMES), 0.0, 1.0, f"{where}.thresholds",
                      violations)
    for name in ("min_chars", "max_chars"):
        value = getattr(rules, name)
        if value is not None and value < 0:
            violations.add(f"{where}.{name}", f"must be >= 0, got {value}")
    if rules.min_chars is not None and rules.max_chars is not None and (
            rules.min_chars > rules.max_chars):
        violations.add(f"{where}.min_chars", "must be <= max_chars")
    if rules.pattern is not None:
        _check_pattern(settings, rules.pattern, f"{where}.pattern", violations)
    for name in ("required_keywords", "forbidden_keywords", "forbidden_topics"):
        for index, term in enumerate(getattr(rules, name)):
            if not term.strip():
                violations.add(f"{where}.{name}[{index}]", "must not be empty")


def _check_pattern(settings: JudgeSettings, pattern: str, where: str,
                   violations: Violations) -> None:
    """The length bound; what RE2 cannot compile was refused by the schema already
    (RulesConfig.pattern)."""
    if len(pattern) > settings.max_pattern_chars:
        violations.add(where, f"{len(pattern)} characters exceed the maximum of "
                       f"{settings.max_pattern_chars}")


def _check_thresholds(thresholds: dict[str, float], known: set[str], low: float, high: float,
                      where: str, violations: Violations) -> None:
    for name, value in thresholds.items():
        if name not in known:
            violations.add(f"{where}.{name}", "not a criterion this config judges")
        elif not (math.isfinite(value) and low <= value <= high):
            violations.add(f"{where}.{name}", f"must be within {low:g}..{high:g}, got {value}")


def _check_llm(settings: JudgeSettings, config: JudgeConfig, path: str,
               violations: Violations) -> None:
    llm, where = config.llm, f"{path}.llm"
    if llm is None:
        return
    if llm.panel is None:
        _check_single(settings, llm, where, violations)
    else:
        _check_panel(settings, llm, where, violations)
    _check_criteria(settings, llm, where, violations)
    for name, rubric in llm.custom_criteria.items():
        if not name.strip() or len(name) > settings.max_name_chars:
            violations.add(f"{where}.custom_criteria", f"criterion name {name[:64]!r} must "
                           f"be 1..{settings.max_name_chars} characters")
        if not rubric.strip():
            violations.add(f"{where}.custom_criteria.{name}", "rubric text required")
    objects = {c.name: i for i, c in enumerate(llm.criteria) if isinstance(c, CustomCriterion)}
    known = {c for c in llm.criteria if isinstance(c, str)} | set(llm.custom_criteria)
    for name in llm.thresholds.keys() & objects.keys():
        violations.add(f"{where}.thresholds.{name}", "a criterion object carries its own "
                       f"threshold (criteria[{objects[name]}].threshold)")
    _check_thresholds({k: v for k, v in llm.thresholds.items() if k not in objects}, known,
                      1.0, 10.0, f"{where}.thresholds", violations)
    _check_llm_ceilings(settings, config, where, violations)


def _check_single(settings: JudgeSettings, llm: LlmJudgeConfig, where: str,
                  violations: Violations) -> None:
    """One judge: provider and model required, the endpoint one the operator configured."""
    if llm.provider is None:
        violations.add(f"{where}.provider", "required (or a panel of judges in llm.panel)")
    if llm.model is None or not llm.model.strip():
        violations.add(f"{where}.model", "required (empty)")
    if llm.combine is not None:
        violations.add(f"{where}.combine", "only with a panel (llm.panel)")
    if llm.provider is not None and llm.model is not None:
        _check_endpoint(settings, llm, where, violations)


def _check_panel(settings: JudgeSettings, llm: LlmJudgeConfig, where: str,
                 violations: Violations) -> None:
    """2..llm_max_panel_members judges, each checked like a single one, no two with the same
    judge_model (provider/model); provider, model and endpoint belong to the members."""
    assert llm.panel is not None
    for name in ("provider", "model", "endpoint"):
        if getattr(llm, name) is not None:
            violations.add(f"{where}.{name}", "not with a panel: each member of llm.panel "
                           "names its own")
    count, most = len(llm.panel), settings.llm_max_panel_members
    if not 2 <= count <= most:
        violations.add(f"{where}.panel", f"a panel has 2..{most} members, got {count}")
    seen: dict[tuple[str, str], int] = {}
    for index, member in enumerate(llm.panel):
        at = f"{where}.panel[{index}]"
        if not member.model.strip():
            violations.add(f"{at}.model", "required (empty)")
        _check_endpoint(settings, member, at, violations)
        first = seen.setdefault((member.provider, member.model), index)
        if first != index:
            violations.add(at, f"same judge as panel[{first}] ({member.provider}/"
                           f"{member.model}): each member's judgments are stored under it")


def _check_criteria(settings: JudgeSettings, llm: LlmJudgeConfig, where: str,
                    violations: Violations) -> None:
    """Names of standard or custom_criteria criteria, and criterion objects (at most
    llm_max_custom_criteria, names unique and not a standard or custom_criteria name)."""
    objects = 0
    seen: dict[str, tuple[int, bool]] = {}
    for index, entry in enumerate(llm.criteria):
        at = f"{where}.criteria[{index}]"
        is_object = isinstance(entry, CustomCriterion)
        if isinstance(entry, CustomCriterion):
            objects += 1
            name = entry.name
            _check_criterion_object(settings, entry, at, violations)
            if name in STANDARD_LLM_CRITERIA or name in llm.custom_criteria:
                violations.add(f"{at}.name", f"{name!r} is a standard or custom_criteria "
                               "criterion: a criterion object needs a name of its own")
            elif name in RULE_NAMES:
                violations.add(f"{at}.name", _rule_name_taken(name))
        else:
            name = entry
            if rubric_of(llm, name) is None:
                violations.add(at, f"unknown criterion {name!r}: not a standard one and not "
                               "in custom_criteria")
            elif name in RULE_NAMES:
                violations.add(at, _rule_name_taken(name))
        first, first_object = seen.setdefault(name, (index, is_object))
        if first != index and (is_object or first_object):
            violations.add(f"{at}.name" if is_object else at,
                           f"criterion {name[:64]!r} is already criteria[{first}]")
    if objects > settings.llm_max_custom_criteria:
        violations.add(f"{where}.criteria", f"{objects} criterion objects exceed the maximum "
                       f"of {settings.llm_max_custom_criteria}")


def _rule_name_taken(name: str) -> str:
    return (f"{name!r} is a rule criterion: an LLM criterion of that name would be summed up, "
            "compared and thresholded together with the rule's 0..1 scores; give it another "
            "name")


def _check_criterion_object(settings: JudgeSettings, criterion: CustomCriterion, at: str,
                            violations: Violations) -> None:
    """Name and rubric sizes; an integer scale of 2..llm_max_scale_points points; the
    threshold a finite number inside the scale."""
    name, rubric = criterion.name, criterion.rubric
    if not name.strip() or len(name) > settings.max_name_chars:
        violations.add(f"{at}.name", f"must be 1..{settings.max_name_chars} characters")
    if not rubric.strip():
        violations.add(f"{at}.rubric", "rubric text required")
    elif len(rubric) > settings.llm_max_rubric_chars:
        violations.add(f"{at}.rubric", f"{len(rubric)} characters exceed the maximum of "
                       f"{settings.llm_max_rubric_chars}")
    low, high, threshold = criterion.scale_min, criterion.scale_max, criterion.threshold
    points, most = high - low + 1, settings.llm_max_scale_points
    if low >= high:
        violations.add(f"{at}.scale_max", f"must be above scale_min ({low}), got {high}")
    elif points > most:
        violations.add(f"{at}.scale_max", f"the scale {low}..{high} has {points} points, "
                       f"above the maximum of {most}")
    if not math.isfinite(threshold):
        violations.add(f"{at}.threshold", f"must be a finite number, got {threshold}")
    elif low < high and not low <= threshold <= high:
        violations.add(f"{at}.threshold", f"must be within the scale {low}..{high}, got "
                       f"{threshold:g}")


def _check_endpoint(settings: JudgeSettings, llm: LlmJudgeConfig | PanelMember, where: str,
                    violations: Violations) -> None:
    """openai_compatible names an endpoint configured here (which may list its models);
    the other providers use their own configured URL and take none."""
    if llm.provider != "openai_compatible":
        if llm.endpoint is not None:
            violations.add(f"{where}.endpoint", "only for provider openai_compatible")
        return
    known = settings.llm_endpoints.get(llm.endpoint or "")
    if known is None:
        names = ", ".join(sorted(settings.llm_endpoints)) or "none"
        violations.add(f"{where}.endpoint", "required for provider openai_compatible: the "
                       f"name of an endpoint this judge is configured with (configured: {names})"
                       if llm.endpoint is None else
                       f"unknown endpoint {llm.endpoint!r} (configured: {names})")
    elif known.models is not None and llm.model not in known.models:
        violations.add(f"{where}.model", f"endpoint {llm.endpoint!r} serves only "
                       f"{', '.join(known.models)}")


def _check_llm_ceilings(settings: JudgeSettings, config: JudgeConfig, where: str,
                        violations: Violations) -> None:
    llm = config.llm
    assert llm is not None
    limits = (("concurrency", llm.concurrency, settings.llm_max_concurrency),
              ("max_retries", llm.max_retries, settings.llm_max_retries_ceiling),
              ("budget_usd", llm.budget_usd, settings.llm_budget_ceiling_usd),
              ("sample_rate", llm.sample_rate, settings.llm_sample_rate_ceiling))
    for name, value, ceiling in limits:
        if value is not None and value > ceiling:
            violations.add(f"{where}.{name}", f"{value} is above this service's ceiling "
                           f"of {ceiling}")
