"""EstimateCost figures of pairwise judging: two calls per sampled candidate, added to the
LLM judges' figures (one budget for both)."""

import math
from typing import Any

from services.common.errors import Violations
from services.judge.llm.cost import PRICED_PROVIDERS, call_cost, expected_judged
from services.judge.pairwise.config import PairwiseConfig
from services.judge.pairwise.prompts import DEFAULT_RUBRIC, template_chars
from services.judge.schema import JudgeConfig

CALLS_PER_PAIR = 2
# A pairwise prompt shows the item (prompt, reference, one response) and a second response.
ITEMS_PER_CALL = 2


def add_estimate(figures: dict[str, Any], settings: Any, config: JudgeConfig,
                 prediction_count: int, average_item_tokens: int) -> dict[str, Any]:
    """`figures` (services.judge.llm.cost.estimate) with the pairwise calls of
    `prediction_count` candidates added; a paid model without a price is INVALID_ARGUMENT
    naming config.pairwise.model."""
    pairwise = config.pairwise
    if pairwise is None:
        return figures
    price = _price_or_error(settings, pairwise)
    pairs = expected_judged(prediction_count, pairwise.sample_rate)
    item_tokens = (average_item_tokens if average_item_tokens > 0
                   else settings.llm_average_item_tokens)
    template = math.ceil(template_chars(pairwise.criterion, pairwise.rubric or DEFAULT_RUBRIC)
                         / settings.llm_chars_per_token)
    calls = pairs * CALLS_PER_PAIR
    input_tokens = calls * (ITEMS_PER_CALL * item_tokens + template)
    output_tokens = calls * settings.llm_average_output_tokens
    cost = figures["cost_usd"] + call_cost(price, input_tokens, output_tokens)
    llm = config.llm
    budget = (llm.budget_usd if llm is not None and llm.budget_usd is not None
              else settings.llm_default_budget_usd)
    return {**figures, "llm_calls": figures["llm_calls"] + calls,
            "judged_predictions": max(figures["judged_predictions"], pairs),
            "input_tokens": figures["input_tokens"] + input_tokens,
            "output_tokens": figures["output_tokens"] + output_tokens, "cost_usd": cost,
            "judge_model": figures["judge_model"] or pairwise.judge_model,
            "exceeds_budget": cost > budget,
            "above_warning": cost > settings.llm_cost_warning_usd}


def pairwise_warnings(settings: Any, config: JudgeConfig) -> list[str]:
    """What this judge does differently from what a valid pairwise section asks."""
    pairwise = config.pairwise
    if pairwise is None:
        return []
    if settings.llm_enabled(pairwise.provider, pairwise.endpoint):
        _price_or_error(settings, pairwise)
        return []
    return [f"config.pairwise: provider {pairwise.provider} is not configured on this judge "
            "(no API key or endpoint): pairwise judging is off"]


def _price_or_error(settings: Any, pairwise: PairwiseConfig) -> Any:
    """The model's price; a paid provider's model without one is INVALID_ARGUMENT naming
    config.pairwise.model (its spending could not be counted against the budget)."""
    price = settings.price_for(pairwise.provider, pairwise.model)
    if price is None and pairwise.provider in PRICED_PROVIDERS:
        violations = Violations()
        violations.add("config.pairwise.model", f"no price configured for "
                       f"{pairwise.judge_model} (EPOCHLENS_JUDGE_LLM_PRICES)")
        violations.raise_if_any()
    return price
