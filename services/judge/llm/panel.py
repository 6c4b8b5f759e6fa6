"""Judge panels: the combined verdict of several LLM judges on one (item, criterion).

Every member of `llm.panel` judges every sampled item on every criterion as a single judge
would (its own verdict stored, judge_model "<provider>/<model>", with its own cost); the
combined verdict is stored beside them with judge_model "panel/<rule>" and costs nothing:

* mean: score = mean of the scored members' scores, pass = score >= threshold;
* majority: pass when more than half of the scored members passed, score = their mean.

The combined verdict is unscored when fewer than llm_panel_min_scored_share of the members
scored (its reason names the members' reasons).
"""

import math
from collections.abc import Sequence

from epochlens.v1 import judge_pb2
from services.judge.llm.prompts import CriterionSpec, specs_of
from services.judge.llm.settings import LlmSettings
from services.judge.schema import Item, LlmJudgeConfig, Verdict

# Tolerance of the scored-share comparison (a share read from the environment as a decimal).
SHARE_EPSILON = 1e-9


def threshold_of(settings: LlmSettings, config: LlmJudgeConfig, spec: CriterionSpec) -> float:
    """Pass threshold of a criterion: a criterion object's own, else the config's override,
    else the service's default."""
    if spec.threshold is not None:
        return spec.threshold
    return config.thresholds.get(spec.name, settings.threshold_for(spec.name))


def combine_panel(settings: LlmSettings, config: LlmJudgeConfig, items: Sequence[Item],
                  judged: Sequence[Sequence[tuple[Item, Verdict]]],
                  failed: dict[int, str]) -> list[tuple[Item, Verdict]]:
    """The members' verdicts (`judged`, one list per member) and the combined verdicts, item
    by item in `items` order, per criterion: each member's verdict then the combined one.
    Items in `failed` (positions whose judging raised in some member) are left out."""
    by_member = [{(id(item), v.criterion): v for item, v in pairs} for pairs in judged]
    specs = specs_of(config)
    out: list[tuple[Item, Verdict]] = []
    for position, item in enumerate(items):
        if position in failed:
            continue
        for spec in specs:
            verdicts = [found for member in by_member
                        if (found := member.get((id(item), spec.name))) is not None]
            if not verdicts:
                continue  # not sampled
            out += [(item, verdict) for verdict in verdicts]
            out.append((item, combined_verdict(settings, config, spec, verdicts)))
    return out


def combined_verdict(settings: LlmSettings, config: LlmJudgeConfig, spec: CriterionSpec,
                     verdicts: Sequence[Verdict]) -> Verdict:
    """The panel's verdict on one (item, criterion) from its members' `verdicts`."""
    threshold = threshold_of(settings, config, spec)
    version = settings.prompt_version_for(spec)
    scored = [v for v in verdicts if v.status == judge_pb2.JUDGMENT_STATUS_SCORED]
    share = settings.llm_panel_min_scored_share
    if not scored or len(scored) < share * len(verdicts) - SHARE_EPSILON:
        reasons = "; ".join(f"{v.judge_model}: {v.unscored_reason}" for v in verdicts
                            if v.status != judge_pb2.JUDGMENT_STATUS_SCORED)
        return Verdict.unscored(
            spec.name, judge_pb2.JUDGE_TYPE_LLM, config.judge_model, threshold,
            f"only {len(scored)} of {len(verdicts)} panel members scored (at least "
            f"{share:g} of them must): {reasons}", version)
    mean = math.fsum(v.score for v in scored) / len(scored)
    votes = sum(1 for v in scored if v.passed)
    if config.combine_rule == "majority":
        passed = 2 * votes > len(scored)
        how = f"majority: {votes} of {len(scored)} scored members passed"
    else:
        passed = mean >= threshold
        how = f"mean {mean:g} of {len(scored)} scored members"
    detail = ", ".join(f"{v.judge_model} {v.score:g}" for v in scored)
    return Verdict(
        criterion=spec.name, judge_type=judge_pb2.JUDGE_TYPE_LLM,
        judge_model=config.judge_model, score=mean, passed=passed, threshold=threshold,
        reasoning=f"{how} ({detail})", status=judge_pb2.JUDGMENT_STATUS_SCORED,
        prompt_version=version,
        confidence=math.fsum(v.confidence for v in scored) / len(scored))
