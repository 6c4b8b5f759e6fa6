"""Cost of LLM judging: per call from the configured prices, and the EstimateCost figures (a
panel's: the sum over its members, each judging every sampled item on every criterion)."""

import math

from services.common.errors import Violations
from services.judge.llm.prompts import CriterionSpec, RenderedPrompt, specs_of, template_chars
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
    return member_prices(settings, config)[0]


def member_prices(settings: LlmSettings, config: LlmJudgeConfig) -> list[ModelPrice | None]:
    """The price of each judge of the config (one, or each panel member, in order); raises
    InvalidArgument naming every paid model without one (config.llm.model or
    config.llm.panel[i].model)."""
    violations = Violations()
    prices = []
    for index, member in enumerate(config.members()):
        price = settings.price_for(member.provider, member.model)
        if price is None and member.provider in PRICED_PROVIDERS:
            where = "config.llm.model" if not config.panel else f"config.llm.panel[{index}].model"
            violations.add(where, missing_price_message(member))
        prices.append(price)
    violations.raise_if_any()
    return prices


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
    prices = member_prices(settings, llm_config)
    judged = expected_judged(prediction_count, llm_config.sample_rate)
    item_tokens = average_item_tokens if average_item_tokens > 0 \
        else settings.llm_average_item_tokens
    specs = [spec for spec in specs_of(llm_config) if spec.rubric is not None]
    # What one judge calls; every member of a panel makes the same calls.
    input_tokens = judged * sum(item_tokens + _template_tokens(settings, spec)
                                for spec in specs)
    output_tokens = judged * len(specs) * settings.llm_average_output_tokens
    cost = math.fsum(call_cost(price, input_tokens, output_tokens) for price in prices)
    budget = llm_config.budget_usd if llm_config.budget_usd is not None \
        else settings.llm_default_budget_usd
    judges = len(prices)
    return {"judged_predictions": judged, "llm_calls": judged * len(specs) * judges,
            "input_tokens": input_tokens * judges, "output_tokens": output_tokens * judges,
            "cost_usd": cost, "judge_model": llm_config.judge_model,
            "exceeds_budget": cost > budget,
            "above_warning": cost > settings.llm_cost_warning_usd}


def _template_tokens(settings: LlmSettings, spec: CriterionSpec) -> int:
    chars = template_chars(settings.prompt_version_for(spec), spec.name, spec.rubric or "",
                           with_reference=True, scale=spec.scale if spec.own_scale else None)
    return math.ceil(chars / settings.llm_chars_per_token)
