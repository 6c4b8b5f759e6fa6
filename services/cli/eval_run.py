"""What `epochlens eval` does (services.cli.evaluate holds the command and its options and
imports this module only when it runs, so that the other commands do not load the dataset
reader, the trainer client's sampler and the judge's rule names).

Plan (options and dataset checked, nothing called) -> start (Evaluate with no rows: the run;
ListPredictions: what it holds) -> confirm_cost (EstimateCost) -> store (chunks of Evaluate,
local generation first for --model) -> finish -> wait_judging (GetRunSummary) -> outcome.
"""

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from google.protobuf import struct_pb2

from epochlens.v1 import (
    evaluation_pb2,
    evaluation_pb2_grpc,
    judge_pb2,
    judge_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
)
from services.cli import eval_data, eval_options
from services.cli.client import CliError, ServiceClient
from services.cli.config import CliSettings
from services.cli.progress import CountBar, progress_pages, stderr_is_terminal
from trainer_client.config import PredictionsConfig


class EvalClients(ServiceClient):
    """Evaluate at the writer (with its long deadline), ListPredictions and GetRunSummary at
    the query service, EstimateCost at the judge: one token, three channels."""

    service = "writer"

    def __init__(self, settings: CliSettings) -> None:
        super().__init__(settings.model_copy(update={"timeout_s": settings.eval_rpc_timeout_s}),
                         settings.writer_address)
        self._query = _Side(settings, settings.query_address, "query service")
        self._judge = _Side(settings, settings.judge_address, "judge service")
        self._evaluation = evaluation_pb2_grpc.EvaluationServiceStub(self._channel)
        self._query_stub = query_pb2_grpc.QueryServiceStub(self._query.channel)
        self._judge_stub = judge_pb2_grpc.JudgeServiceStub(self._judge.channel)

    def __exit__(self, *exc_info: Any) -> None:
        self._query.__exit__(*exc_info)
        self._judge.__exit__(*exc_info)
        super().__exit__(*exc_info)

    def evaluate(self, request: evaluation_pb2.EvaluateRequest) -> evaluation_pb2.EvaluateResponse:
        return self.call(self._evaluation.Evaluate, request, "evaluation")

    def stored_indices(self, run_id: str, page_size: int) -> set[int]:
        request = query_pb2.ListPredictionsRequest(run_id=run_id, page_size=page_size)
        stored: set[int] = set()
        while True:
            reply = self._query.call(self._query_stub.ListPredictions, request, f"run {run_id}")
            stored.update(p.sample_index for p in reply.predictions)
            if not reply.next_page_token:
                return stored
            request.page_token = reply.next_page_token

    def summary(self, run_id: str) -> query_pb2.RunSummary:
        return self._query.call(self._query_stub.GetRunSummary,
                                query_pb2.GetRunSummaryRequest(run_id=run_id), f"run {run_id}")

    def estimate(self, count: int, judge: dict[str, Any]) -> judge_pb2.EstimateCostResponse:
        request = judge_pb2.EstimateCostRequest(prediction_count=count, config=to_struct(judge))
        return self._judge.call(self._judge_stub.EstimateCost, request, "cost estimate")


class _Side(ServiceClient):
    """A second channel with the same settings (query service, judge service)."""

    def __init__(self, settings: CliSettings, address: str, service: str) -> None:
        super().__init__(settings, address)
        self.service = service
        self.channel = self._channel


def to_struct(data: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(data)
    return struct


@dataclass
class Plan:
    """Everything the options decided, before any call."""

    dataset: Path
    rows: list[eval_data.EvalRow]
    run_name: str
    source: str  # "rows", "model" or "endpoint"
    model_name: str
    request_id: str
    judge: dict[str, Any]
    chunk_size: int
    generation: judge_pb2.GenerationConfig | None = None
    local: Any = None  # eval_local.LocalGenerator for --model
    thresholds: list[eval_options.Threshold] = field(default_factory=list)


@dataclass
class Tally:
    """What the storing calls reported."""

    inserted: int = 0
    duplicates: int = 0
    generated: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    nul_replaced: list[str] = field(default_factory=list)

    def add(self, reply: evaluation_pb2.EvaluateResponse) -> None:
        self.inserted += reply.inserted_count
        self.duplicates += reply.duplicate_count
        self.generated += reply.generated_count
        self.failures += [{"index": f.index, "reason": f.reason} for f in reply.failures]
        self.nul_replaced += list(reply.nul_replaced_fields)


# The ErrorInfo reason of Evaluate when the request_id's run was started with another name,
# model or config (services/writer/evaluation.py): for the CLI, another judge config.
CHANGED_EVALUATION = "EVALUATION_CHANGED"
# A row of an Evaluate call in the writer's field violations: rows[k] and its field.
ROW_PATH = re.compile(r"rows\[(\d+)\](?:\.\w+)?")
# Bytes a repeated message field adds to each row of a request (tag and length prefix).
ROW_FRAMING_BYTES = 6
# Exit status after Ctrl-C (SIGINT), as a shell reports a process it interrupted.
INTERRUPTED_EXIT = 130


def usage_error(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def stdin_is_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def load_rows(dataset: Path, limit: int | None) -> list[eval_data.EvalRow]:
    """The dataset's rows (the first `limit`), with the sampler's default templates."""
    records = eval_data.read_records(dataset)
    return eval_data.parse_rows(records, PredictionsConfig(), limit)


def describe_source(dataset: Path, model: Path | None, adapter: Path | None,
                    endpoint: str | None, endpoint_model: str | None) -> tuple[str, str]:
    """(source, model_name): where responses come from, and the run's model_name."""
    if model is not None:
        name = str(model.resolve())
        return "model", name + (f"+{adapter.resolve()}" if adapter is not None else "")
    if endpoint is not None:
        return "endpoint", f"{endpoint}/{endpoint_model}"
    return "rows", f"responses of {dataset.name}"


def start(clients: EvalClients, plan: Plan, page_size: int) -> tuple[Any, set[int]]:
    """The evaluation run (created, or the one of a previous attempt) and the indices of the
    plan's rows it already holds."""
    try:
        reply = clients.evaluate(base_request(plan))
    except CliError as exc:
        if exc.reason == CHANGED_EVALUATION:
            raise usage_error(f"{exc} (the same dataset, model and --name were evaluated "
                              "before with another judge config: give another --name to "
                              "evaluate with this one)") from None
        raise
    stored = clients.stored_indices(reply.run.id, page_size)
    return reply.run, stored & {row.index for row in plan.rows}


def base_request(plan: Plan, rows: list[evaluation_pb2.EvaluationRow] | None = None,
                 finish: bool = False) -> evaluation_pb2.EvaluateRequest:
    return evaluation_pb2.EvaluateRequest(
        name=plan.run_name, model_name=plan.model_name, dataset_name=plan.dataset.name,
        config=to_struct({"judge": plan.judge}), request_id=plan.request_id,
        rows=rows or [], generation=plan.generation, finish=finish)


def confirm_cost(clients: EvalClients, plan: Plan, todo: int, yes: bool) -> None:
    """Prints the expected cost of the LLM judging of `todo` new rows and asks to go on; no
    LLM judge or nothing new: nothing to ask. Without a terminal and --yes: exit 2."""
    if todo == 0 or not plan.judge.get("llm"):
        return
    estimate = clients.estimate(todo, plan.judge)
    typer.echo(f"LLM judging of {estimate.judged_predictions} of {todo} new rows with "
               f"{estimate.judge_model}: {estimate.llm_calls} calls, about "
               f"{estimate.input_tokens} input and {estimate.output_tokens} output tokens, "
               f"about ${estimate.cost_usd:.4f}", err=True)
    if estimate.exceeds_budget:
        typer.echo("the estimate is above the run's budget: judging stops when the budget "
                   "is spent", err=True)
    if yes:
        return
    if not stdin_is_terminal():
        raise usage_error("paid LLM judging needs a confirmation: run in a terminal, or pass "
                          "--yes to accept the estimate above")
    if not typer.confirm("Go on?", default=False, err=True):
        typer.echo("stopped before any paid call", err=True)
        raise typer.Exit(1)


def store(clients: EvalClients, plan: Plan, todo: list[eval_data.EvalRow],
          settings: CliSettings, show: bool) -> Tally:
    """Generates (locally, or through Evaluate's endpoint) and stores the rows in chunks."""
    tally = Tally()
    chunks = (todo[i:i + plan.chunk_size] for i in range(0, len(todo), plan.chunk_size))
    what = {"rows": "storing", "model": "generating", "endpoint": "generating"}[plan.source]
    for chunk in progress_pages(chunks, len(todo), what, settings, show):
        rows = request_rows(plan, chunk, tally)
        for batch in sized_batches(rows, settings.eval_request_max_bytes):
            try:
                tally.add(clients.evaluate(base_request(plan, batch)))
            except CliError as exc:
                raise CliError(with_dataset_rows(str(exc), batch), exc.exit_code,
                               exc.retryable) from None
    return tally


def with_dataset_rows(message: str, batch: list[evaluation_pb2.EvaluationRow]) -> str:
    """The writer's message with each `rows[k].field` of the call followed by the dataset row
    it is (the call holds one chunk, so k alone does not say which row of the file)."""
    def named(match: re.Match) -> str:
        position = int(match.group(1))
        if position >= len(batch):
            return match.group(0)
        return f"{match.group(0)} (dataset row {batch[position].index})"
    return ROW_PATH.sub(named, message)


def sized_batches(rows: list[evaluation_pb2.EvaluationRow],
                  max_bytes: int) -> list[list[evaluation_pb2.EvaluationRow]]:
    """The rows in order, in batches whose encoded size stays within max_bytes (a row larger
    than that alone): a chunk of long texts (up to 4 bytes a character) must not exceed the
    gRPC message limit."""
    batches: list[list[evaluation_pb2.EvaluationRow]] = []
    size = 0
    for row in rows:
        row_bytes = row.ByteSize() + ROW_FRAMING_BYTES
        if not batches or size + row_bytes > max_bytes:
            batches.append([])
            size = 0
        batches[-1].append(row)
        size += row_bytes
    return batches


def request_rows(plan: Plan, chunk: list[eval_data.EvalRow],
                 tally: Tally) -> list[evaluation_pb2.EvaluationRow]:
    """The EvaluationRows of a chunk: with the dataset's responses, without any (the endpoint
    generates them), or with a local model's (failed rows are tallied, not sent)."""
    if plan.source == "rows":
        return [evaluation_pb2.EvaluationRow(index=r.index, prompt=r.prompt,
                                             reference=r.reference, response=r.response)
                for r in chunk]
    if plan.source == "endpoint":
        return [evaluation_pb2.EvaluationRow(index=r.index, prompt=r.prompt,
                                             reference=r.reference) for r in chunk]
    rows = []
    for row, result in zip(chunk, plan.local.generate(chunk), strict=True):
        if result.error is not None:
            tally.failures.append({"index": row.index, "reason": result.error})
            continue
        tally.generated += 1
        rows.append(evaluation_pb2.EvaluationRow(
            index=row.index, prompt=result.prompt, reference=row.reference,
            response=result.prediction, generation_time_ms=result.generation_time_ms,
            prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens))
    return rows


def wait_judging(clients: EvalClients, run_id: str, total: int, settings: CliSettings,
                 show: bool) -> query_pb2.RunSummary:
    """GetRunSummary until no stored row waits for the judge (or LLM judging is paused, or
    eval_wait_s passed); a bar shows the rows judged."""
    deadline = time.monotonic() + settings.eval_wait_s
    with CountBar(total, "judging", settings, show) as bar:
        while True:
            summary = clients.summary(run_id)
            waiting = summary.pending_predictions + summary.handoff_waiting
            bar.update(max(0, total - waiting))
            if waiting == 0 or summary.llm_paused_reason or time.monotonic() >= deadline:
                return summary
            time.sleep(settings.eval_poll_s)


def outcome(plan: Plan, run: Any, stored_before: int, tally: Tally,
            summary: query_pb2.RunSummary) -> dict[str, Any]:
    """The machine-readable summary (--json); OptionError for an unknown --fail-under
    criterion."""
    results = eval_options.criterion_results(summary)
    thresholds = eval_options.check_thresholds(plan.thresholds, results)
    pending = summary.pending_predictions + summary.handoff_waiting
    complete = pending == 0 and not summary.llm_paused_reason
    return {
        "run_id": run.id, "run_name": plan.run_name, "request_id": plan.request_id,
        "dataset": str(plan.dataset), "source": plan.source, "model_name": plan.model_name,
        "rows": len(plan.rows), "already_stored": stored_before, "inserted": tally.inserted,
        "duplicates": tally.duplicates + stored_before, "generated": tally.generated,
        "failures": tally.failures, "nul_replaced_fields": tally.nul_replaced,
        "judging": {"complete": complete, "pending": pending,
                    "failed": summary.failed_predictions,
                    "llm_paused_reason": summary.llm_paused_reason,
                    "cost_usd": summary.total_cost_usd, "budget_usd": summary.budget_usd,
                    "budget_exhausted": summary.budget_exhausted},
        "criteria": {name: {"mean_score": r.mean_score, "pass_rate": r.pass_rate,
                            "scored": r.scored, "unscored": r.unscored,
                            "judges": list(r.judges)} for name, r in results.items()},
        "thresholds": thresholds,
        # an evaluation with rows not stored or not judged yet passes nothing
        "passed": not tally.failures and complete and all(t["passed"] for t in thresholds),
    }


def print_text(result: dict[str, Any]) -> None:
    typer.echo(f"run {result['run_id']} ({result['run_name']}): {result['rows']} rows, "
               f"{result['inserted']} stored now, {result['duplicates']} already stored, "
               f"{result['generated']} generated, {len(result['failures'])} failed")
    for failure in result["failures"]:
        typer.echo(f"  row {failure['index']} failed: {failure['reason']}")
    if result["nul_replaced_fields"]:
        typer.echo(f"NUL (U+0000) replaced by U+FFFD in: "
                   f"{', '.join(result['nul_replaced_fields'])}")
    judging = result["judging"]
    if not judging["complete"] or judging["failed"]:
        typer.echo(f"judging: {judging['pending']} rows pending, {judging['failed']} failed"
                   + (f", LLM judging paused: {judging['llm_paused_reason']}"
                      if judging["llm_paused_reason"] else ""))
    if judging["cost_usd"]:
        typer.echo(f"LLM judging cost: ${judging['cost_usd']:.4f}")
    typer.echo(f"{'criterion':<24} {'mean':>8} {'pass rate':>9} {'scored':>7}  judges")
    for name, c in result["criteria"].items():
        typer.echo(f"{name:<24} {c['mean_score']:>8.3f} {c['pass_rate']:>9.3f} "
                   f"{c['scored']:>7}  {', '.join(c['judges'])}")
    for t in result["thresholds"]:
        mark = "ok" if t["passed"] else "FAILED"
        typer.echo(f"--fail-under {t['threshold']}: measured {t['measured']:.4f} {mark}")


@dataclass(frozen=True)
class Source:
    """Where responses come from, as the options give it."""

    model: Path | None
    adapter: Path | None
    endpoint: str | None
    endpoint_model: str | None
    batch_size: int
    max_new_tokens: int

    def check(self) -> None:
        if self.adapter is not None and self.model is None:
            raise eval_options.OptionError("--adapter needs --model")
        if self.model is not None and self.endpoint is not None:
            raise eval_options.OptionError("give one of --model and --endpoint")
        if (self.endpoint is None) != (self.endpoint_model is None):
            raise eval_options.OptionError("--endpoint and --endpoint-model go together")


def make_plan(dataset: Path, name: str | None, limit: int | None, source: Source,
              judge: dict[str, Any], chunk_size: int, thresholds: list[str],
              settings: CliSettings) -> Plan:
    """The plan, or OptionError / DatasetError (exit 2) before anything is called."""
    source.check()
    parsed = [eval_options.parse_threshold(t) for t in thresholds]
    rows = load_rows(dataset, limit)
    kind, model_name = describe_source(dataset, source.model, source.adapter, source.endpoint,
                                       source.endpoint_model)
    check_rows(rows, kind)
    if kind != "rows":
        rows = [eval_data.EvalRow(r.index, r.prompt, r.reference, None) for r in rows]
    run_name = name or dataset.stem
    digest = eval_data.content_hash(dataset, settings.eval_hash_chunk_bytes)
    generation = None
    if kind == "endpoint":
        generation = judge_pb2.GenerationConfig(
            endpoint=source.endpoint, model=source.endpoint_model,
            max_new_tokens=source.max_new_tokens)
    return Plan(dataset, rows, run_name, kind, model_name,
                eval_data.request_id(digest, model_name, run_name), judge, chunk_size,
                generation=generation, thresholds=parsed)


def check_rows(rows: list[eval_data.EvalRow], kind: str) -> None:
    """Rows must hold a response unless a model or endpoint gives them one; chat rows need
    a local model's chat template."""
    if kind == "rows":
        missing = [r.index for r in rows if r.response is None]
        if missing:
            raise eval_options.OptionError(
                f"{len(missing)} rows have no response (first: row {missing[0]}): add a "
                "'response' column, or generate them with --model or --endpoint")
    if kind != "model":
        chat = [r.index for r in rows if r.chat]
        if chat:
            raise eval_options.OptionError(
                f"{len(chat)} rows are chat turns (first: row {chat[0]}): they need a "
                "tokenizer's chat template, give --model")


def load_local(source: Source, settings: CliSettings) -> Any:
    from services.cli.eval_local import LocalGenerator, LocalModelError

    try:
        return LocalGenerator(source.model, source.adapter, source.batch_size,
                              source.max_new_tokens, settings.eval_precision,
                              settings.eval_device)
    except LocalModelError as exc:
        raise usage_error(str(exc)) from None


@dataclass(frozen=True)
class Options:
    """The command line's options, as typer parsed them."""

    dataset: Path
    name: str | None
    limit: int | None
    model: Path | None
    adapter: Path | None
    endpoint: str | None
    endpoint_model: str | None
    batch_size: int | None
    max_new_tokens: int | None
    chunk_size: int | None
    judge_config: Path | None
    llm: str | None
    criteria: str | None
    budget_usd: float | None
    on_error: str | None
    yes: bool
    fail_under: list[str]
    as_json: bool


def execute(settings: CliSettings, o: Options) -> None:
    """The whole command; exits with its status (typer.Exit)."""
    source = Source(o.model, o.adapter, o.endpoint, o.endpoint_model,
                    o.batch_size or settings.eval_batch_size,
                    o.max_new_tokens or settings.eval_max_new_tokens)
    try:
        if o.on_error is not None and o.on_error not in eval_options.ON_ERROR_CHOICES:
            raise eval_options.OptionError(f"--on-error {o.on_error!r}: one of skip, retry, "
                                           "fail")
        judge = eval_options.judge_config(o.judge_config, o.llm, split_list(o.criteria),
                                          o.budget_usd, o.on_error)
        plan = make_plan(o.dataset, o.name, o.limit, source, judge,
                         o.chunk_size or settings.eval_chunk_size, o.fail_under, settings)
    except (eval_options.OptionError, eval_data.DatasetError) as exc:
        raise usage_error(str(exc)) from None
    try:
        result = run_plan(plan, source, o.yes, settings)
    except KeyboardInterrupt:
        typer.echo(f"interrupted: the rows stored so far are kept (request id "
                   f"{plan.request_id}); run the same command again to continue", err=True)
        raise typer.Exit(INTERRUPTED_EXIT) from None
    if o.as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        print_text(result)
    raise typer.Exit(0 if result["passed"] else 1)


def split_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def run_plan(plan: Plan, source: Source, yes: bool, settings: CliSettings) -> dict[str, Any]:
    """Start or resume the run, store what is missing, wait for judging, summarize."""
    show = stderr_is_terminal()
    with EvalClients(settings) as clients:
        run, stored = start(clients, plan, settings.export_page_size)
        todo = [row for row in plan.rows if row.index not in stored]
        confirm_cost(clients, plan, len(todo), yes)
        if plan.source == "model" and todo:
            plan.local = load_local(source, settings)
            check_chat_template(plan.local, todo)
        tally = store(clients, plan, todo, settings, show)
        if not tally.failures:
            run = clients.evaluate(base_request(plan, finish=True)).run
        summary = wait_judging(clients, run.id, len(stored) + tally.inserted, settings, show)
    try:
        return outcome(plan, run, len(stored), tally, summary)
    except eval_options.OptionError as exc:
        raise usage_error(str(exc)) from None


def check_chat_template(local: Any, rows: list[eval_data.EvalRow]) -> None:
    if any(r.chat for r in rows) and not getattr(local.tokenizer, "chat_template", None):
        raise usage_error("the dataset has chat rows and the model's tokenizer has no "
                          "chat_template")
