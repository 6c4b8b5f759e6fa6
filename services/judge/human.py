"""The score range of a human judgment (RecordHumanJudgment): a criterion the run's judge
config defines as a criterion object ({name, rubric, scale_min, scale_max, threshold} in
llm.criteria) is judged by people on that criterion's own scale; any other criterion on the
service's human_score_min..human_score_max."""

import logging
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.judge.config import JudgeSettings
from services.judge.schema import CustomCriterion
from services.judge.stored import run_judge_section

log = logging.getLogger(__name__)

# Stored criterion objects that could not be read (the service range applied instead).
counts: Counter[str] = Counter()


@dataclass(frozen=True)
class ScoreRange:
    """Where a human score and threshold must lie, and where that range comes from."""

    low: float
    high: float
    # Appended to the range in an error ("" for the service range, as before).
    source: str = ""


def service_range(settings: JudgeSettings) -> ScoreRange:
    return ScoreRange(settings.human_score_min, settings.human_score_max)


def custom_scale(section: Any, criterion: str) -> CustomCriterion | None:
    """The criterion object named `criterion` in a stored judge section's llm.criteria, or
    None (no such object: a standard or custom_criteria name, or not judged by an LLM)."""
    llm = section.get("llm") if isinstance(section, dict) else None
    entries = llm.get("criteria") if isinstance(llm, dict) else None
    if not isinstance(entries, list):
        return None
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") == criterion:
            return CustomCriterion.model_validate(entry)
    return None


async def human_range(settings: JudgeSettings, engine: AsyncEngine, user_id: str,
                      run_id: uuid.UUID, criterion: str) -> ScoreRange:
    """The range of a person's score of `criterion` in the user's run: the criterion
    object's scale_min..scale_max when the run's stored judge config defines one, else the
    service range (also for a run that is not the user's: recording then says NOT_FOUND)."""
    section = await run_judge_section(engine, user_id, run_id)
    try:
        found = custom_scale(section, criterion)
    except ValidationError as exc:
        return _unreadable(settings, run_id, criterion,
                           f"{exc.error_count()} errors, first: {exc.errors()[0]['msg']}")
    if found is None:
        return service_range(settings)
    if found.scale_min >= found.scale_max:
        return _unreadable(settings, run_id, criterion,
                           f"scale_min {found.scale_min} is not below scale_max "
                           f"{found.scale_max}")
    return ScoreRange(float(found.scale_min), float(found.scale_max),
                      f" (the scale of criterion {criterion!r} in the run's judge config)")


def _unreadable(settings: JudgeSettings, run_id: uuid.UUID, criterion: str,
                why: str) -> ScoreRange:
    """The service range, for a stored criterion object that is not valid (a run stored
    through a writer that did not check its judge config), logged and counted."""
    counts["unreadable_criterion"] += 1
    log.warning("run %s: criterion object %r of the stored judge config is not valid (%s); "
                "human judgments of it use the service range (unreadable criterion objects "
                "so far: %d)", run_id, criterion, why, counts["unreadable_criterion"])
    return service_range(settings)
