"""The judge.pairwise section of a run's config, and its checks.

PairwiseConfig is a field of services.judge.schema.JudgeConfig (parsed with the rest of the
judge section); check_pairwise() adds the checks that need the judge's settings (endpoint,
rubric size, ceilings), check_baseline_run() the one that needs the database: a baseline run
that is not the caller's (missing or another user's, the same answer) is INVALID_ARGUMENT
naming config.pairwise.baseline_run_id.
"""

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.ext.asyncio import AsyncEngine

from services.common.db import user_transaction
from services.common.errors import Violations

DEFAULT_CRITERION = "preference"
URL_REFUSED = ("endpoints and their keys are operator configuration "
               "(EPOCHLENS_JUDGE_LLM_ENDPOINTS); name one with pairwise.endpoint instead")


class PairwiseConfig(BaseModel):
    """Pairwise judging of each candidate prediction against its baseline response."""

    model_config = ConfigDict(extra="forbid")

    provider: Literal["openai", "anthropic", "openai_compatible"]
    model: str
    # Name of an OpenAI-compatible server the operator configured; required for
    # openai_compatible, refused for the others.
    endpoint: str | None = None
    # Refused when set (URL_REFUSED): kept only to say why.
    base_url: Any = None
    criterion: str = DEFAULT_CRITERION
    # What "better" means; None: the built-in rubric of the criterion "preference".
    rubric: str | None = None
    # Same run: the baseline epoch (None: the run's lowest). Baseline run: its epoch (None:
    # its last).
    baseline_epoch: int | None = Field(None, ge=0, le=2**63 - 1)
    # Another run of the same user whose responses are the baseline (matched by prompt and
    # reference); None: this run's baseline epoch.
    baseline_run_id: uuid.UUID | None = None
    # Share of samples judged, chosen by sample identity (the same samples every epoch).
    sample_rate: float = Field(1.0, gt=0, le=1)

    @field_validator("base_url")
    @classmethod
    def _no_url(cls, value: Any) -> None:
        if value is not None:
            raise ValueError(URL_REFUSED)
        return None

    @property
    def judge_model(self) -> str:
        return f"{self.provider}/{self.model}"


def check_pairwise(settings: Any, config: PairwiseConfig | None, where: str,
                   violations: Violations) -> None:
    """The checks that need the judge's settings (JudgeSettings); problems go to
    `violations` under `where` (config.pairwise)."""
    if config is None:
        return
    if not config.model.strip():
        violations.add(f"{where}.model", "required (empty)")
    name = config.criterion
    if not name.strip() or len(name) > settings.max_name_chars:
        violations.add(f"{where}.criterion",
                       f"must be 1..{settings.max_name_chars} characters")
    if config.rubric is not None:
        if not config.rubric.strip():
            violations.add(f"{where}.rubric", "must not be empty when given")
        elif len(config.rubric) > settings.pairwise_max_rubric_chars:
            violations.add(f"{where}.rubric", f"{len(config.rubric)} characters exceed the "
                           f"maximum of {settings.pairwise_max_rubric_chars}")
    if config.sample_rate > settings.llm_sample_rate_ceiling:
        violations.add(f"{where}.sample_rate", f"{config.sample_rate} is above this "
                       f"service's ceiling of {settings.llm_sample_rate_ceiling}")
    _check_endpoint(settings, config, where, violations)


def _check_endpoint(settings: Any, config: PairwiseConfig, where: str,
                    violations: Violations) -> None:
    if config.provider != "openai_compatible":
        if config.endpoint is not None:
            violations.add(f"{where}.endpoint", "only for provider openai_compatible")
        return
    known = settings.llm_endpoints.get(config.endpoint or "")
    names = ", ".join(sorted(settings.llm_endpoints)) or "none"
    if known is None:
        violations.add(f"{where}.endpoint", "required for provider openai_compatible: the "
                       f"name of an endpoint this judge is configured with (configured: "
                       f"{names})" if config.endpoint is None else
                       f"unknown endpoint {config.endpoint!r} (configured: {names})")
    elif known.models is not None and config.model not in known.models:
        violations.add(f"{where}.model", f"endpoint {config.endpoint!r} serves only "
                       f"{', '.join(known.models)}")


async def check_baseline_run(engine: AsyncEngine, user_id: str, config: Any,
                             run_id: uuid.UUID | None = None, path: str = "config") -> None:
    """INVALID_ARGUMENT naming {path}.pairwise.baseline_run_id when the judge config's
    baseline run is not one of the caller's runs (missing or another user's: one answer),
    or is the judged run itself."""
    pairwise = getattr(config, "pairwise", None)
    if pairwise is None or pairwise.baseline_run_id is None:
        return
    # Imported here: services.judge.stored imports the writer's models, which the config
    # module (imported by services.judge.schema) need not load.
    from services.judge.stored import owned_runs
    baseline = pairwise.baseline_run_id
    violations = Violations()
    where = f"{path}.pairwise.baseline_run_id"
    if baseline == run_id:
        violations.add(where, "must be another run (this run's own epochs are compared "
                       "with baseline_epoch)")
    else:
        async with user_transaction(engine, user_id) as conn:
            owned = await owned_runs(conn, user_id, [baseline])
        if baseline not in owned:
            violations.add(where, f"run {baseline} not found")
    violations.raise_if_any()
