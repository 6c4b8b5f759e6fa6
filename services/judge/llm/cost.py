"""Cost of LLM judging: per call from the configured prices, and the EstimateCost figures."""

import math

from services.common.errors import Violations
from services.judge.llm.prompts import RenderedPrompt, criteria_of, rubric_of, template_chars
from services.judge.llm.settings import LlmSettings, ModelPrice
from services.judge.schema import LlmJudgeConfig

PRICED_PROVIDERS = ("openai", "anthropic")
TOKENS_PER_MTOK = 1_000_000


def call_cost(price: ModelPrice | None, input_tokens: int, output_tokens: int) -> float:
    """US dollars of one call; 0 for a model without a price (openai_compatible only)."""
    if price is None:
        return 0.0
    return (input_tokens * price.input_per_mtok
            + output_tokens * price.output_per_mtok) / TOKENS_PER_MTOK


def max_call_cost(settings: LlmSettings, price: ModelPrice | None,
                  prompt: RenderedPrompt) -> float:
    """The most one call with `prompt` may cost, reserved from the run's budget before it is
    made: its input tokens are bounded by the prompt's UTF-8 bytes (a token covers at least
    one byte) plus llm_reserve_overhead_tokens, its output by llm_max_output_tokens."""
    input_bound = (len(prompt.system.encode()) + len(prompt.user.encode())
                   + settings.llm_reserve_overhead_tokens)
    return call_cost(price, input_bound, settings.llm_max_output_tokens)


def price_or_error(settings: LlmSettings, config: LlmJudgeConfig) -> ModelPrice | None:
    """The model's price; a paid provider's model without one is a configuration error (its
    spending could not be counted against the budget). Raises InvalidArgument."""
    price = settings.price_for(config.provider, config.model)
    if price is None and config.provider in PRICED_PROVIDERS:
        violations = Violations()
        violations.add("config.llm.model", missing_price_message(config))
        violations.raise_if_any()
    return price


def missing_price_message(config: LlmJudgeConfig) -> str:
    return (f"no price configured for {config.provider}/{config.model} "
            "(EPOCHLENS_JUDGE_LLM_PRICES)")


def expected_judged(prediction_count: int, sample_rate: float) -> int:
    """Predictions the sample rate is expected to keep."""
    return min(prediction_count, math.ceil(prediction_count * sample_rate))


def estimate(settings: LlmSettings, llm_config: LlmJudgeConfig | None, prediction_count: int,
             average_item_tokens: int) -> dict:
    """EstimateCostResponse fields for judging `prediction_count` predictions with
    `llm_config` (average_item_tokens <= 0: the configured average)."""
    if llm_config is None:
        return {"judged_predictions": 0, "llm_calls": 0, "input_tokens": 0,
                "output_tokens": 0, "cost_usd": 0.0, "judge_model": "",
                "exceeds_budget": False, "above_warning": False}
    price = price_or_error(settings, llm_config)
    judged = expected_judged(prediction_count, llm_config.sample_rate)
    item_tokens = average_item_tokens if average_item_tokens > 0 \
        else settings.llm_average_item_tokens
    criteria = [name for name in criteria_of(llm_config)
                if rubric_of(llm_config, name) is not None]
    input_tokens = judged * sum(item_tokens + _template_tokens(settings, llm_config, name)
                                for name in criteria)
    output_tokens = judged * len(criteria) * settings.llm_average_output_tokens
    cost = call_cost(price, input_tokens, output_tokens)
    budget = llm_config.budget_usd if llm_config.budget_usd is not None \
        else settings.llm_default_budget_usd
    return {"judged_predictions": judged, "llm_calls": judged * len(criteria),
            "input_tokens": input_tokens, "output_tokens": output_tokens, "cost_usd": cost,
            "judge_model": f"{llm_config.provider}/{llm_config.model}",
            "exceeds_budget": cost > budget,
            "above_warning": cost > settings.llm_cost_warning_usd}


def _template_tokens(settings: LlmSettings, config: LlmJudgeConfig, criterion: str) -> int:
    rubric = rubric_of(config, criterion) or ""
    chars = template_chars(settings.llm_prompt_version, criterion, rubric, with_reference=True)
    return math.ceil(chars / settings.llm_chars_per_token)
