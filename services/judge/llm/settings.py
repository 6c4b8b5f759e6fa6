"""Settings of the LLM judges: provider keys and endpoints, retries, concurrency, prices, budgets.

LlmSettings has no env prefix of its own: it is mixed into the judge service's settings
(services.judge.config.JudgeSettings, prefix EPOCHLENS_JUDGE_), so for example `llm_prices`
is read from EPOCHLENS_JUDGE_LLM_PRICES (JSON). Prices are configuration, never code: the
defaults below are only a starting point and must be checked against the providers' price lists.
"""

import os

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings

from services.judge.llm.prompts import PROMPT_TEMPLATES, SCALE_TEMPLATES, CriterionSpec

PROVIDERS = ("openai", "anthropic", "openai_compatible")


class ModelPrice(BaseModel):
    """US dollars per million tokens of one model."""

    model_config = ConfigDict(extra="forbid")

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class LlmEndpoint(BaseModel):
    """An OpenAI-compatible server (vLLM, Ollama, llama.cpp) runs may use, by name. Only the
    operator names URLs and keys: a run config picks an endpoint by its name."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(pattern=r"^https?://\S+$")
    # The key sent to this server only: given here, or the name of an environment variable
    # holding it; neither: the server needs no key (providers.KEYLESS_SERVER_KEY is sent,
    # because the SDK refuses an empty one).
    api_key: SecretStr | None = None
    api_key_env: str | None = None
    # Models runs may ask this server for; None: any.
    models: list[str] | None = None

    @model_validator(mode="after")
    def _one_key_source(self) -> "LlmEndpoint":
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("give api_key or api_key_env, not both")
        if self.api_key_env is not None and self.api_key_env not in os.environ:
            raise ValueError(f"api_key_env names {self.api_key_env}, which is not set")
        return self

    def key(self) -> str | None:
        """The key to send to this endpoint, None when it has none."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        return os.environ[self.api_key_env] if self.api_key_env is not None else None


DEFAULT_PRICES = {
    "gpt-4o-mini": ModelPrice(input_per_mtok=0.15, output_per_mtok=0.60),
    "gpt-4o": ModelPrice(input_per_mtok=2.50, output_per_mtok=10.00),
    "claude-3-5-haiku-latest": ModelPrice(input_per_mtok=0.80, output_per_mtok=4.00),
    "claude-sonnet-4-5": ModelPrice(input_per_mtok=3.00, output_per_mtok=15.00),
}


class LlmSettings(BaseSettings):
    """LLM judge configuration. Mixed into JudgeSettings (env prefix EPOCHLENS_JUDGE_)."""

    openai_api_key: SecretStr | None = Field(
        None, description="OpenAI API key; unset: LLM judging with provider openai is off.")
    anthropic_api_key: SecretStr | None = Field(
        None, description="Anthropic API key; unset: LLM judging with provider anthropic is off.")
    llm_endpoints: dict[str, LlmEndpoint] = Field(
        default_factory=dict, description="OpenAI-compatible servers (vLLM, Ollama, llama.cpp) "
        "runs may use with provider openai_compatible, by name, JSON: {\"name\": {\"base_url\": "
        "\"http://host:8000/v1\", \"api_key_env\": \"VAR\" or \"api_key\": \"...\", "
        "\"models\": [...] (optional)}}. A run config names one (llm.endpoint) and never a URL; "
        "a key goes only to its own endpoint.")
    openai_base_url: str | None = Field(
        None, description="OpenAI API base URL; unset: the SDK default (api.openai.com).")
    anthropic_base_url: str | None = Field(
        None, description="Anthropic API base URL; unset: the SDK default (api.anthropic.com).")
    llm_request_timeout_s: float = Field(
        60.0, gt=0, description="Timeout of one LLM call (connect + reply), seconds.")
    llm_default_concurrency: int = Field(
        5, ge=1, description="LLM calls in flight per run when the run's config sets none.")
    llm_max_concurrency: int = Field(
        32, ge=1, description="Ceiling on a run's LLM concurrency, whatever its config asks.")
    llm_concurrency_increase_after: int = Field(
        20, ge=1, description="Successful calls after which a concurrency lowered by a 429 "
        "grows by one again (additive increase; a 429 halves it).")
    llm_max_retries: int = Field(
        3, ge=0, description="Retries of a call after 429/5xx/network errors when the run's "
        "config sets none.")
    llm_max_retries_ceiling: int = Field(
        8, ge=0, description="Most retries of one call: caps the run's max_retries and is the "
        "retry count of on_error=retry.")
    llm_backoff_base_s: float = Field(
        0.5, gt=0, description="First retry delay of the exponential backoff (with jitter).")
    llm_backoff_max_s: float = Field(
        30.0, gt=0, description="Longest delay between two retries of one call.")
    llm_retry_after_max_s: float = Field(
        120.0, gt=0, description="Longest Retry-After a 429 may impose before the next try.")
    llm_prices: dict[str, ModelPrice] = Field(
        default_factory=lambda: dict(DEFAULT_PRICES),
        description="Prices per model, JSON: {\"model\" or \"provider/model\": "
        "{\"input_per_mtok\": USD, \"output_per_mtok\": USD}}. openai/anthropic models "
        "without a price are not judged; openai_compatible ones cost 0.")
    llm_default_budget_usd: float = Field(
        5.0, ge=0, description="LLM budget of a run whose config sets none, US dollars.")
    llm_cost_warning_usd: float = Field(
        1.0, ge=0, description="EstimateCost flags an expected cost above this, US dollars.")
    llm_average_item_tokens: int = Field(
        300, ge=1, description="Expected tokens of prompt + ground truth + prediction of one "
        "item, for estimates when the caller gives none.")
    llm_average_output_tokens: int = Field(
        120, ge=1, description="Expected tokens of one verdict reply, for estimates.")
    llm_max_output_tokens: int = Field(
        400, ge=16, description="Most tokens a verdict reply may use (max_tokens of a call).")
    llm_models_without_temperature: list[str] = Field(
        default_factory=lambda: ["claude-opus-4-7", "claude-opus-4-8", "claude-opus-5",
                                 "claude-sonnet-5", "claude-haiku-5", "o1", "o3", "o4", "gpt-5"],
        description="Model name prefixes that reject a temperature (reasoning models): their "
        "calls are sent without one; every other call runs at temperature 0. JSON list.")
    llm_prompt_version: str = Field(
        "v1", description="Version of the judge prompt template (stored with each judgment).")
    llm_default_threshold: float = Field(
        7.0, ge=1, le=10, description="Pass threshold of an LLM criterion (score 1-10).")
    llm_thresholds: dict[str, float] = Field(
        default_factory=lambda: {"safety": 8.0},
        description="Pass thresholds of named LLM criteria overriding the default, JSON.")
    llm_chars_per_token: float = Field(
        4.0, gt=0, description="Characters per token assumed when estimating the template's "
        "share of a call's prompt tokens.")
    llm_tracked_runs: int = Field(
        1024, ge=1, description="Runs whose concurrency and budget state a judge keeps in "
        "memory (least recently used are dropped and reloaded when needed).")
    llm_reserve_overhead_tokens: int = Field(
        512, ge=0, description="Input tokens a call's budget reservation adds to its prompt "
        "(UTF-8 bytes, a bound on its tokens) for what the provider also counts: message "
        "framing, the verdict schema or tool.")
    llm_reserve_lease_calls: int = Field(
        8, ge=1, description="A judge reserves budget for this many calls at once (while "
        "they fit) and hands it out to its own calls without a database round trip (for "
        "llm_reservation_grace_s after it is taken); what is left goes back once none of its "
        "calls is in flight. 1: one reservation per call.")
    llm_reservation_grace_s: float = Field(
        30.0, gt=0, description="A budget reservation not settled within "
        "llm_request_timeout_s plus this many seconds (its judge died mid-call) is counted "
        "as spent at its full amount: the call may have been billed.")
    llm_budget_poll_s: float = Field(
        0.2, gt=0, description="While a call's reservation does not fit only because of "
        "calls in flight, it is tried again when one of this judge's calls settles, or "
        "after this many seconds (calls of other judge replicas), seconds.")

    llm_scale_prompt_version: str = Field(
        "v1-scale", description="Version of the judge prompt template of criteria with a "
        "scale of their own (criterion objects in llm.criteria; stored with each judgment).")
    llm_max_scale_points: int = Field(
        101, ge=2, description="Most points (scale_max - scale_min + 1) of a custom "
        "criterion's integer scale.")
    llm_max_custom_criteria: int = Field(
        20, ge=0, description="Most criterion objects (own rubric, scale and threshold) in "
        "one run's llm.criteria.")
    llm_max_rubric_chars: int = Field(
        4000, ge=1, description="Longest rubric of a criterion object, characters.")
    llm_max_panel_members: int = Field(
        5, ge=2, description="Most judges in one run's llm.panel (each judges every sampled "
        "item on every criterion: the cost grows with the panel).")
    llm_panel_min_scored_share: float = Field(
        0.5, gt=0, le=1, description="Share of a panel's members that must score an item "
        "on a criterion for the combined (panel/<rule>) judgment to be scored; below it the "
        "combined judgment is unscored.")

    @field_validator("openai_api_key", "anthropic_api_key", mode="before")
    @classmethod
    def _empty_key_is_unset(cls, value: object) -> object:
        """An empty key (docker-compose's `${OPENAI_API_KEY:-}` when the host has none) means
        unset: that provider is off, rather than called with an empty key."""
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("llm_prompt_version")
    @classmethod
    def _known_version(cls, value: str) -> str:
        if value not in PROMPT_TEMPLATES:
            raise ValueError(f"unknown prompt version {value!r}; known: {sorted(PROMPT_TEMPLATES)}")
        return value

    @field_validator("llm_scale_prompt_version")
    @classmethod
    def _known_scale_version(cls, value: str) -> str:
        if value not in SCALE_TEMPLATES:
            raise ValueError(f"unknown scale prompt version {value!r}; known: "
                             f"{sorted(SCALE_TEMPLATES)}")
        return value

    def prompt_version_for(self, spec: CriterionSpec) -> str:
        """The prompt template version that judges `spec` (its own scale or the standard)."""
        return self.llm_scale_prompt_version if spec.own_scale else self.llm_prompt_version

    def llm_enabled(self, provider: str, endpoint: str | None = None) -> bool:
        """Whether LLM judging with `provider` can run: a key for it (for openai_compatible,
        `endpoint` names a configured endpoint)."""
        if provider == "openai":
            return self.openai_api_key is not None
        if provider == "anthropic":
            return self.anthropic_api_key is not None
        if provider == "openai_compatible":
            return endpoint is not None and endpoint in self.llm_endpoints
        return False

    def endpoint_url(self, provider: str, endpoint: str | None) -> str | None:
        """Base URL the calls of `provider` go to (None: the SDK's default)."""
        if provider == "openai":
            return self.openai_base_url
        if provider == "anthropic":
            return self.anthropic_base_url
        known = self.llm_endpoints.get(endpoint or "")
        return known.base_url if known is not None else None

    def price_for(self, provider: str, model: str) -> ModelPrice | None:
        """The configured price of `provider/model` (or of `model`), None when unknown."""
        return self.llm_prices.get(f"{provider}/{model}") or self.llm_prices.get(model)

    def sends_temperature(self, model: str) -> bool:
        """Whether calls to `model` carry temperature 0 (False for models that reject one)."""
        return not any(model.startswith(prefix) for prefix in self.llm_models_without_temperature)

    def threshold_for(self, criterion: str) -> float:
        """Default pass threshold of an LLM criterion."""
        return self.llm_thresholds.get(criterion, self.llm_default_threshold)
