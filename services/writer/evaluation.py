"""EvaluationService.Evaluate: batch evaluation of a model or endpoint on a dataset, served by
the writer.

One call: validate the request (as CreateRun would, plus the rows); create the evaluation run
(RUN_KIND_EVALUATION) or take the one the same user's request_id created before; store the
rows that carry a response as predictions (epoch 0, step 0, sample_index = the row's index)
through the writer's normal write path, so the outbox hands each to the judge exactly once;
for the other rows, skip those already stored (duplicates) and ask the judge's
GenerateResponses for the rest, evaluation_generate_chunk rows at a time, storing each chunk's
responses before asking for the next; report the rows whose generation failed; with finish
and no failure, finish the run (SUCCEEDED). Repeating a call stores nothing twice and
generates only what is missing.
"""

import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from epochlens.v1 import (
    common_pb2,
    evaluation_pb2,
    evaluation_pb2_grpc,
    judge_pb2,
    judge_pb2_grpc,
    writer_pb2,
)
from services.common.auth import current_user, mint_token
from services.common.config import AuthSettings
from services.common.convert import run_to_proto
from services.common.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    StorageRefused,
    Unavailable,
    Violations,
)
from services.common.validation import NUL, replace_nul
from services.writer.config import WriterSettings
from services.writer.judge_check import TRANSIENT_CODES, JudgeConfigCheck
from services.writer.repository import Batch, WriterRepository
from services.writer.samples import SampleConflict
from services.writer.servicer import BATCH_DATA_ERRORS
from services.writer.validation import validate_create_run

log = logging.getLogger(__name__)

# Where an evaluation row is stored: its sample_index is the row's index.
EVALUATION_EPOCH, EVALUATION_STEP = 0, 0
# What a repeated call must repeat: the run of its request_id was started with these.
IDENTITY_FIELDS = ("name", "model_name", "config")
# The texts of a row stored with NUL replaced (services.common.validation lets them through).
ROW_TEXTS = ("prompt", "reference", "response")
# The prompts of GenerateResponses are the rows of one chunk: the judge's prompts[i] is
# rows[position of the i-th row of the chunk] here.
_JUDGE_PROMPTS = "prompts["


class GenerationFailed(RuntimeError):
    """The judge answered GenerateResponses with an error that is neither the request's fault
    nor transient (a token it rejects, a defect): a misconfigured deployment, INTERNAL."""


@dataclass
class _Outcome:
    """What one Evaluate call did."""

    inserted: int = 0
    duplicates: int = 0
    generated: int = 0
    failures: list[evaluation_pb2.RowFailure] = field(default_factory=list)
    nul_replaced: list[str] = field(default_factory=list)


def validate_evaluation(request: evaluation_pb2.EvaluateRequest,
                        settings: WriterSettings) -> dict:
    """The run config as a dict, or InvalidArgument naming every bad field (the run's fields
    as CreateRun names them, rows[i].field for the rows)."""
    violations = Violations()
    create = writer_pb2.CreateRunRequest(
        name=request.name, model_name=request.model_name, dataset_name=request.dataset_name,
        config=request.config, request_id=request.request_id,
        kind=common_pb2.RUN_KIND_EVALUATION)
    config: dict = {}
    try:
        config, _ = validate_create_run(create, settings)
    except InvalidArgument as exc:
        violations.items.extend(exc.violations)
    if not request.request_id.strip():
        violations.add("request_id", "required: the evaluation's identity (the same value "
                       "continues the same run)")
    _check_rows(request.rows, settings, violations)
    if any(not row.HasField("response") for row in request.rows):
        _check_generation(request, violations)
    violations.raise_if_any()
    return config


def _check_rows(rows: Sequence[evaluation_pb2.EvaluationRow], settings: WriterSettings,
                violations: Violations) -> None:
    if len(rows) > settings.max_batch_size:
        violations.add("rows", f"{len(rows)} rows exceed the maximum of "
                       f"{settings.max_batch_size} per call")
        return
    first: dict[int, int] = {}
    for position, row in enumerate(rows):
        path = f"rows[{position}]"
        if row.index < 0:
            violations.add(f"{path}.index", f"must be >= 0, got {row.index}")
        elif row.index in first:
            violations.add(f"{path}.index", f"index {row.index} is also rows[{first[row.index]}]"
                           " (indices are unique within an evaluation)")
        else:
            first[row.index] = position
        if not row.prompt:
            violations.add(f"{path}.prompt", "required (empty)")
        for name in ROW_TEXTS:
            size = len(getattr(row, name))
            if size > settings.max_text_chars:
                violations.add(f"{path}.{name}", f"{size} characters exceed the maximum of "
                               f"{settings.max_text_chars}")
        if row.generation_time_ms < 0:
            violations.add(f"{path}.generation_time_ms", "must be >= 0")
        for name in ("prompt_tokens", "completion_tokens"):
            if row.HasField(name) and getattr(row, name) < 0:
                violations.add(f"{path}.{name}", "must be >= 0")


def _check_generation(request: evaluation_pb2.EvaluateRequest, violations: Violations) -> None:
    """The checks the writer can make alone; the judge checks the rest (the endpoint exists
    and serves the model, the token limits)."""
    if not request.HasField("generation"):
        violations.add("generation", "required: some rows carry no response")
        return
    generation = request.generation
    if not generation.endpoint:
        violations.add("generation.endpoint", "required: the name of an endpoint configured "
                       "on the judge")
    if not generation.model.strip():
        violations.add("generation.model", "required (empty)")
    if generation.max_new_tokens < 0:
        violations.add("generation.max_new_tokens", f"must be >= 0, got "
                       f"{generation.max_new_tokens}")
    if not 0.0 <= generation.temperature <= 2.0:
        violations.add("generation.temperature", f"must be 0 to 2, got {generation.temperature}")


class EvaluationChanged(FailedPrecondition):
    """The request_id names an evaluation started with another name, model or config."""

    reason = "EVALUATION_CHANGED"


def _check_same_evaluation(row, request: evaluation_pb2.EvaluateRequest, config: dict) -> None:
    """FAILED_PRECONDITION when the request_id's run was started with another name, model or
    config (IDENTITY_FIELDS): its rows would otherwise be taken for this model's, and judged
    by the other config, without a word. dataset_name is a label (a renamed file of the same
    rows is the same evaluation) and is not compared."""
    given = {"name": request.name, "model_name": request.model_name, "config": config}
    differing = [name for name in IDENTITY_FIELDS if getattr(row, name) != given[name]]
    if differing:
        raise EvaluationChanged(
            f"request_id {request.request_id[:64]!r} names evaluation run {row.id}, started "
            f"with another {', '.join(differing)}; repeat the call with the run's own values "
            "to continue it, or use another request_id for a new evaluation",
            {"run_id": str(row.id), "fields": ",".join(differing)})


def replace_nul_rows(rows: Sequence[evaluation_pb2.EvaluationRow]) -> list[str]:
    """Replaces NUL in the rows' texts in place; the paths it changed (rows[i].field)."""
    changed = []
    for position, row in enumerate(rows):
        for name in ROW_TEXTS:
            value = getattr(row, name)  # "" when an optional text is unset
            if NUL in value:
                setattr(row, name, replace_nul(value))
                changed.append(f"rows[{position}].{name}")
    return changed


def row_prediction(row: evaluation_pb2.EvaluationRow, response: str,
                   generated: judge_pb2.GeneratedResponse | None = None
                   ) -> common_pb2.PredictionInput:
    """The prediction a row is stored as: its own response and figures, or the generated
    ones."""
    item = common_pb2.PredictionInput(
        epoch=EVALUATION_EPOCH, step=EVALUATION_STEP, sample_index=row.index,
        prompt=row.prompt, prediction=response)
    if row.HasField("reference"):
        item.ground_truth = row.reference
    if generated is None:
        item.generation_time_ms = row.generation_time_ms
        for name in ("prompt_tokens", "completion_tokens"):
            if row.HasField(name):
                setattr(item, name, getattr(row, name))
    else:
        item.generation_time_ms = generated.generation_time_ms
        if generated.prompt_tokens or generated.completion_tokens:
            item.prompt_tokens = generated.prompt_tokens
            item.completion_tokens = generated.completion_tokens
    return item


class EvaluationServicer(evaluation_pb2_grpc.EvaluationServiceServicer):
    def __init__(self, repository: WriterRepository, settings: WriterSettings, auth: AuthSettings,
                 judge: judge_pb2_grpc.JudgeServiceStub | None = None,
                 judge_check: JudgeConfigCheck | None = None) -> None:
        """judge: the judge's stub (None: judging is off, and only rows that carry a
        response can be evaluated); judge_check: CreateRun's check of the judge section."""
        self._repo = repository
        self._settings = settings
        self._auth = auth
        self._judge = judge
        self._judge_check = judge_check
        self.counts: Counter[str] = Counter()

    async def Evaluate(self, request: evaluation_pb2.EvaluateRequest,
                       context: grpc.aio.ServicerContext) -> evaluation_pb2.EvaluateResponse:
        user = current_user()
        config = validate_evaluation(request, self._settings)
        outcome = _Outcome(nul_replaced=replace_nul_rows(request.rows))
        run = await self._open_run(user, request, config)
        given = [row for row in request.rows if row.HasField("response")]
        if given:
            await self._store(user, run.id, [row_prediction(r, r.response) for r in given],
                              outcome)
        missing = [(position, row) for position, row in enumerate(request.rows)
                   if not row.HasField("response")]
        if missing:
            await self._generate_missing(user, run.id, request.generation, missing, outcome)
        if request.finish and not outcome.failures:
            run = await self._repo.finish_run(user, run.id, common_pb2.RUN_STATE_SUCCEEDED)
        self._note(user, run.id, outcome)
        return evaluation_pb2.EvaluateResponse(
            run=run_to_proto(run), inserted_count=outcome.inserted,
            duplicate_count=outcome.duplicates, generated_count=outcome.generated,
            failures=outcome.failures, nul_replaced_fields=outcome.nul_replaced)

    async def _open_run(self, user: str, request: evaluation_pb2.EvaluateRequest, config: dict):
        """The evaluation run of (user, request_id), created on the first call."""
        if self._judge_check is not None:
            await self._judge_check.check(user, config)
        row = await self._repo.create_run(user, {
            "name": request.name, "model_name": request.model_name,
            "dataset_name": request.dataset_name, "config": config,
            "kind": common_pb2.RUN_KIND_EVALUATION, "request_id": request.request_id})
        if row.kind != common_pb2.RUN_KIND_EVALUATION:
            raise FailedPrecondition(
                f"request_id {request.request_id[:64]!r} names run {row.id}, which is not an "
                "evaluation (CreateRun made it); use another request_id",
                {"run_id": str(row.id)})
        _check_same_evaluation(row, request, config)
        return row

    async def _store(self, user: str, run_id: uuid.UUID,
                     items: list[common_pb2.PredictionInput], outcome: _Outcome) -> None:
        try:
            result, missing = await self._repo.commit(user, [Batch(run_id, items)])
        except BATCH_DATA_ERRORS as exc:
            log.error("database refused the rows of evaluation run %s of %s: %s", run_id,
                      user, exc.orig, exc_info=exc)
            raise StorageRefused(f"the database refused these rows ({type(exc.orig).__name__})"
                                 "; the server log has the details") from exc
        except SampleConflict as exc:
            raise _row_conflict(run_id, user, items, exc) from exc
        if missing:
            raise NotFound(f"run {run_id} not found", {"run_id": str(run_id)})
        outcome.inserted += result.inserted
        outcome.duplicates += result.duplicates

    async def _generate_missing(self, user: str, run_id: uuid.UUID,
                                generation: judge_pb2.GenerationConfig,
                                rows: list[tuple[int, evaluation_pb2.EvaluationRow]],
                                outcome: _Outcome) -> None:
        """Generates and stores the rows not stored yet, one chunk at a time."""
        stored = await self._repo.stored_samples(user, run_id, EVALUATION_STEP,
                                                 [row.index for _, row in rows])
        outcome.duplicates += len(stored)
        todo = [(position, row) for position, row in rows if row.index not in stored]
        if todo and self._judge is None:
            raise FailedPrecondition("generating responses needs the judge service, and this "
                                     "writer has none (EPOCHLENS_WRITER_JUDGE_ADDRESS)",
                                     {"service": "judge"})
        chunk = self._settings.evaluation_generate_chunk
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            reply = await self._call_judge(user, generation, part)
            items = self._settle_chunk(part, reply, outcome)
            if items:
                await self._store(user, run_id, items, outcome)

    def _settle_chunk(self, part: list[tuple[int, evaluation_pb2.EvaluationRow]],
                      reply: judge_pb2.GenerateResponsesResponse,
                      outcome: _Outcome) -> list[common_pb2.PredictionInput]:
        """The predictions of a chunk's generated rows; its failed rows go to `failures`."""
        answers = {answer.index: answer for answer in reply.responses}
        items = []
        for position, row in part:
            answer = answers.get(row.index)
            if answer is None or answer.error:
                reason = answer.error if answer is not None else "the judge returned no outcome"
                outcome.failures.append(evaluation_pb2.RowFailure(index=row.index, reason=reason))
                continue
            response = answer.response
            if NUL in response:
                response = replace_nul(response)
                outcome.nul_replaced.append(f"rows[{position}].response")
            outcome.generated += 1
            items.append(row_prediction(row, response, answer))
        return items

    async def _call_judge(self, user: str, generation: judge_pb2.GenerationConfig,
                          part: list[tuple[int, evaluation_pb2.EvaluationRow]]
                          ) -> judge_pb2.GenerateResponsesResponse:
        """GenerateResponses for one chunk, acting for the user (a token minted for them)."""
        assert self._judge is not None
        request = judge_pb2.GenerateResponsesRequest(generation=generation, prompts=[
            judge_pb2.GenerationPrompt(index=row.index, prompt=row.prompt) for _, row in part])
        metadata = (("authorization", f"Bearer {mint_token(self._auth, user)}"),)
        try:
            return await self._judge.GenerateResponses(
                request, timeout=self._settings.evaluation_generate_timeout_s,
                metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise self._refused(user, exc, [position for position, _ in part]) from exc

    def _refused(self, user: str, exc: grpc.aio.AioRpcError,
                 positions: list[int]) -> Exception:
        code = exc.code()
        self.counts[f"judge_{code.name}"] += 1
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidArgument(generation_violations(exc, positions))
        if code in TRANSIENT_CODES:
            log.warning("judge unavailable for GenerateResponses of %s's evaluation: %s: %s "
                        "(%d so far)", user, code.name, exc.details(),
                        self.counts[f"judge_{code.name}"])
            return Unavailable(f"the judge service cannot generate responses now "
                               f"({code.name}); what was stored is kept: repeat the call to "
                               "continue", {"service": "judge"})
        log.error("judge refused GenerateResponses of %s's evaluation: %s: %s (%d so far)",
                  user, code.name, exc.details(), self.counts[f"judge_{code.name}"])
        return GenerationFailed(f"judge answered {code.name}: {exc.details()}")

    def _note(self, user: str, run_id: uuid.UUID, outcome: _Outcome) -> None:
        for name in ("inserted", "duplicates", "generated"):
            self.counts[name] += getattr(outcome, name)
        self.counts["failures"] += len(outcome.failures)
        log.info("evaluation run %s of %s: %d rows stored, %d already stored, %d generated, "
                 "%d failed (%d failed so far)", run_id, user, outcome.inserted,
                 outcome.duplicates, outcome.generated, len(outcome.failures),
                 self.counts["failures"])
        if outcome.nul_replaced:
            self.counts["nul_replaced_fields"] += len(outcome.nul_replaced)
            log.warning("evaluation run %s of %s: NUL replaced by U+FFFD in %d texts (%s)",
                        run_id, user, len(outcome.nul_replaced),
                        ", ".join(outcome.nul_replaced[:5]))


def generation_violations(exc: grpc.aio.AioRpcError,
                          positions: list[int]) -> list[FieldViolation]:
    """The judge's field violations of GenerateResponses as fields of Evaluate: its
    generation.* stay, its prompts[i].* become rows[position of that row].*."""
    status = rpc_status.from_call(exc)
    violations = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [FieldViolation(_row_path(v.field, positions), v.description)
                           for v in bad.field_violations]
    return violations or [FieldViolation("generation", exc.details() or "refused by the judge")]


def _row_path(path: str, positions: list[int]) -> str:
    if not path.startswith(_JUDGE_PROMPTS):
        return path
    number, _, rest = path[len(_JUDGE_PROMPTS):].partition("]")
    if number.isdigit() and int(number) < len(positions):
        return f"rows[{positions[int(number)]}]{rest}"
    return "rows"


def _row_conflict(run_id: uuid.UUID, user: str, items: list[common_pb2.PredictionInput],
                  exc: SampleConflict) -> InvalidArgument:
    """A row whose prompt or reference differs from the one stored for its index in this
    evaluation run (a repeated call with other rows): INVALID_ARGUMENT naming the rows."""
    violations = []
    for violation in exc.violations[0]:
        position = int(violation.field.split("[", 1)[1].split("]", 1)[0])
        name = "reference" if violation.field.endswith("ground_truth") else "prompt"
        violations.append(FieldViolation("rows", f"the row with index "
                                         f"{items[position].sample_index}: its {name} "
                                         "differs from the one stored for that index in this "
                                         "evaluation run"))
    log.warning("evaluation run %s of %s: %d rows differ from the stored ones", run_id, user,
                len(violations))
    return InvalidArgument(violations)
