"""The `make demo` session: watch a tiny language model learn, end to end, on a CPU.

What it does, with every tunable in DemoSettings (env prefix EPOCHLENS_DEMO_):

1. generates a toy task with a checkable answer (reverse or sort short words,
   trainer_client.toy), with training words and held-out sample words disjoint;
2. builds a tiny Llama from a config and trains a character-level tokenizer on
   the spot (nothing downloaded), or loads `model` (a Hugging Face id or a local
   path) instead;
3. trains it with a real transformers.Trainer, a PredictionsCallback streaming
   the held-out samples' predictions to the writer at every epoch end (and once
   before training, as a baseline);
4. reads the run back through the QueryService over gRPC and prints, per epoch,
   how many predictions match the ground truth exactly, next to one sample's
   prediction at that epoch.

The services: when the writer and the query service already serve where
`epochlens up` puts them, the demo uses them and leaves them running; when
neither answers, it starts them as `epochlens up` does and stops them when it
ends (also on failure or interrupt); anything in between is an error before
any training, with nothing started or stopped. The run belongs to
EPOCHLENS_CLI_USER (the user `epochlens` reads as), so the commands the demo
prints at the end show it as they are. The exit status is 0 only when every
epoch's predictions were stored with the same sample indices.

    python -m trainer_client.demo
"""

import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    PrinterCallback,
    Trainer,
    TrainingArguments,
    set_seed,
)

from epochlens.v1 import common_pb2, query_pb2, query_pb2_grpc
from services.cli import stack
from services.cli.config import CliSettings
from services.common.auth import mint_token
from services.common.config import ENV_FILE, AuthSettings
from services.common.startup import StartupError
from services.query.config import QuerySettings
from services.writer.config import WriterSettings
from trainer_client import toy
from trainer_client.callback import PredictionsCallback
from trainer_client.config import PredictionsConfig

log = logging.getLogger(__name__)


class DemoSettings(BaseSettings):
    """What the demo trains, on which task, and where it streams to."""

    model_config = SettingsConfigDict(env_prefix="EPOCHLENS_DEMO_", env_file=ENV_FILE,
                                      extra="ignore")

    # --- model ---
    model: str | None = Field(None, description="Hugging Face model id or local path of a "
                              "causal LM to train instead of the tiny model (unset: a tiny "
                              "Llama built from config, with a tokenizer trained on the spot).")
    hidden_size: int = Field(64, ge=8, description="Tiny model: hidden size.")
    layers: int = Field(2, ge=1, description="Tiny model: decoder layers.")
    heads: int = Field(4, ge=1, description="Tiny model: attention heads (divides hidden_size).")
    mlp_ratio: int = Field(4, ge=1, description="Tiny model: MLP width as a multiple of "
                           "hidden_size.")
    # --- task ---
    task: Literal["reverse", "sort"] = Field("reverse", description="What the model learns to "
                                             "do with a word: reverse it or sort its letters.")
    alphabet: str = Field("abcdefghij", min_length=1, description="Letters the words are "
                          "made of.")
    min_length: int = Field(4, ge=1, description="Shortest word of the task.")
    max_length: int = Field(8, ge=1, description="Longest word of the task.")
    train_size: int = Field(2000, ge=1, description="Training examples (distinct words).")
    sample_count: int = Field(16, ge=1, description="Held-out words whose predictions are "
                              "streamed at every epoch (distinct from the training words).")
    max_new_tokens: int | None = Field(None, ge=1, description="Generation cap per "
                                       "prediction; unset: max_length + 2 (a space, the "
                                       "answer, the end token).")
    baseline: bool = Field(True, description="Also predict once before training (epoch 0).")
    # --- training ---
    epochs: int = Field(8, ge=1, description="Training epochs.")
    batch_size: int = Field(32, ge=1, description="Training batch size.")
    learning_rate: float = Field(2e-3, gt=0, description="Peak learning rate (linear decay); "
                                 "lower it a lot for a pretrained `model`.")
    seed: int = Field(0, description="Seed of the task words, the model weights, the data "
                      "order and the sample draw: the same seed gives the same demo.")
    torch_threads: int = Field(0, ge=0, description="CPU threads torch uses; 0: one per CPU "
                               "core this process may run on.")
    use_cpu: bool = Field(True, description="Train on the CPU even when a GPU is present.")
    # --- services ---
    writer_address: str | None = Field(None, description="Writer host:port; unset: where "
                                       "`epochlens up` serves it (EPOCHLENS_WRITER_HOST/PORT).")
    query_address: str | None = Field(None, description="Query service host:port; unset: "
                                      "where `epochlens up` serves it (EPOCHLENS_QUERY_HOST/PORT).")
    user: str | None = Field(None, min_length=1, description="User the demo mints its token "
                             "for (with the EPOCHLENS_AUTH_ secret); it owns the run. Unset: "
                             "EPOCHLENS_CLI_USER, the user `epochlens` reads as, so the CLI "
                             "shows the run.")
    start_stack: bool = Field(True, description="When neither the writer nor the query service "
                              "answers where `epochlens up` serves them (writer_address and "
                              "query_address unset), start them as `epochlens up` does and "
                              "stop them when the demo ends; services already up are used "
                              "and left running.")
    run_name: str = Field("demo", min_length=1, description="Name of the demo's run.")
    rpc_timeout_s: float = Field(10.0, gt=0, description="Deadline of each query RPC, seconds.")
    shown_sample: int | None = Field(None, ge=0, description="Sample whose predictions are "
                                     "shown; unset: the first one wrong before and right at "
                                     "the end (else sample 0).")
    log_level: str = Field("INFO", description="Python logging level of the demo process.")

    @model_validator(mode="after")
    def _check(self) -> "DemoSettings":
        if self.min_length > self.max_length:
            raise ValueError(f"min_length={self.min_length} exceeds "
                             f"max_length={self.max_length}")
        if self.model is None and self.hidden_size % self.heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"heads={self.heads}")
        if self.shown_sample is not None and self.shown_sample >= self.sample_count:
            raise ValueError(f"shown_sample={self.shown_sample} is not below "
                             f"sample_count={self.sample_count}")
        return self

    def toy_task(self) -> toy.ToyTask:
        return toy.ToyTask(self.task, self.alphabet, self.min_length, self.max_length)


class DemoError(RuntimeError):
    """The demo could not complete; the message says what is missing and where to look."""


@dataclass
class EpochResult:
    """One epoch of the run as the query service returns it."""

    epoch: int
    step: int
    stored: int
    sample_indices: tuple[int, ...]
    exact_indices: frozenset[int]
    loss: float | None = None


@dataclass
class DemoResult:
    """What the demo read back: per-epoch results and the sample shown across epochs."""

    run_id: str
    epochs: list[EpochResult]
    shown_index: int
    prompt: str
    ground_truth: str | None
    shown_predictions: dict[int, str]
    upload_complete: bool = False
    problems: list[str] = field(default_factory=list)


def main(settings: DemoSettings | None = None) -> int:
    """Runs the demo; returns the exit status (0: everything stored and read back)."""
    try:
        settings = settings if settings is not None else DemoSettings()
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(levelname)s %(name)s: %(message)s")
        result = run(settings)
    except grpc.RpcError as exc:
        return _failed(f"{exc.code().name}: {exc.details()}", exc)
    except (DemoError, ValueError) as exc:  # ValueError: settings or task out of range
        return _failed(str(exc), exc)
    except (StartupError, stack.StackError) as exc:  # starting the services failed
        return _failed(str(exc), exc)
    for problem in result.problems:
        log.error("demo check failed for run %s: %s", result.run_id, problem)
    return 1 if result.problems else 0


def _failed(detail: str, exc: Exception) -> int:
    expected = (DemoError, StartupError, stack.StackError)
    log.error("the demo failed: %s", detail, exc_info=not isinstance(exc, expected))
    print(f"demo failed: {detail}", flush=True)
    return 1


def run(settings: DemoSettings) -> DemoResult:
    """Trains with the callback, reads the run back, prints the summary and how to look at
    the run, and returns it; starts and stops the services when none is up."""
    addresses = service_addresses(settings)
    user = demo_user(settings)
    with local_services(settings, addresses) as started:
        result = train_and_read_back(settings, addresses, user)
    print("\n".join(next_steps(result.run_id, user, addresses[1], started)), flush=True)
    return result


def demo_user(settings: DemoSettings) -> str:
    """The run's owner: settings.user, else the CLI's user (EPOCHLENS_CLI_USER)."""
    return settings.user or CliSettings().user


def train_and_read_back(settings: DemoSettings, addresses: tuple[str, str],
                        user: str) -> DemoResult:
    """Trains with the callback, reads the run back, prints the summary and returns it."""
    threads = settings.torch_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    set_seed(settings.seed)
    train_rows, sample_rows = settings.toy_task().split(settings.train_size,
                                                        settings.sample_count, settings.seed)
    tokenizer, model, model_name = load_model(settings, train_rows)
    token = mint_token(AuthSettings(), user)
    print(describe(settings, model, model_name, threads, addresses), flush=True)
    callback = make_callback(settings, sample_rows, tokenizer, token, model_name, addresses[0])
    with tempfile.TemporaryDirectory(prefix="epochlens-demo-") as output_dir:
        trainer = build_trainer(settings, model, tokenizer,
                                toy.train_features(tokenizer, train_rows), output_dir, callback)
        trainer.train()
    report = callback.last_report
    if report is None or report.run_id is None:
        raise DemoError(f"the run was never created on the writer at {addresses[0]}: "
                        f"{report.describe() if report else 'no upload report'}")
    result = read_back(settings, addresses[1], token, report.run_id, epoch_losses(trainer))
    result.upload_complete = report.complete
    result.problems = check(settings, result, report.describe())
    print("\n".join(summary_lines(result, addresses[1])), flush=True)
    return result


def load_model(settings: DemoSettings, train_rows: list[dict]) -> tuple[Any, Any, str]:
    """(tokenizer, model, model name): the tiny model, or settings.model from the hub/disk."""
    if settings.model is None:
        tokenizer = toy.build_tokenizer(r["prompt"] + r["completion"] for r in train_rows)
        config = toy.model_config(tokenizer, settings.hidden_size, settings.layers,
                                  settings.heads, settings.mlp_ratio)
        name = (f"tiny-llama-h{settings.hidden_size}-l{settings.layers}"
                f"-a{settings.heads}")
        return tokenizer, toy.build_model(config, settings.seed), name
    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    if tokenizer.pad_token is None:
        log.info("%s has no pad token: padding with its end token %r", settings.model,
                 tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(settings.model)
    return tokenizer, model, settings.model


def service_addresses(settings: DemoSettings) -> tuple[str, str]:
    """(writer, query) host:port, from the settings or from where `epochlens up` serves."""
    writer = settings.writer_address or _local_address(WriterSettings())
    query = settings.query_address or _local_address(QuerySettings())
    return writer, query


def check_serving(addresses: tuple[str, str], timeout: float) -> None:
    """Fails before any training when the writer or the query service is not serving."""
    for name, address in zip(("writer", "query service"), addresses, strict=True):
        with grpc.insecure_channel(address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout)
            except grpc.RpcError as exc:
                raise DemoError(f"the {name} at {address} is not reachable "
                                f"({exc.code().name}); start the services with "
                                "`epochlens up` (or run `make demo`)") from exc
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            raise DemoError(f"the {name} at {address} reports {status}, not SERVING")


def answers(address: str, timeout: float) -> bool:
    """Whether a gRPC server answers health checks at address (whatever its status)."""
    with grpc.insecure_channel(address) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=timeout)
        except grpc.RpcError:
            return False
    return True


@contextmanager
def local_services(settings: DemoSettings, addresses: tuple[str, str]) -> Iterator[bool]:
    """Yields whether the demo started the services. Services that answer are used as they
    are and left running; when none answers at the `epochlens up` addresses (and
    settings.start_stack), they are started here and stopped on the way out."""
    timeout = settings.rpc_timeout_s
    up = [answers(address, timeout) for address in addresses]
    local = settings.writer_address is None and settings.query_address is None
    if any(up) or not local or not settings.start_stack:
        if any(up) and not all(up):
            named = [f"the {name} at {address}" for name, address in
                     zip(("writer", "query service"), addresses, strict=True)]
            answering, silent = (named[0], named[1]) if up[0] else (named[1], named[0])
            raise DemoError(f"{answering} answers but {silent} does not: the demo starts the "
                            "services only when none is up; see their logs (`epochlens up` "
                            f"writes them to {stack.StackSettings().state_dir}/) or stop "
                            "them with `epochlens down`")
        check_serving(addresses, timeout)
        print(f"demo: using the services already up (writer {addresses[0]}, query service "
              f"{addresses[1]}); they stay up", flush=True)
        yield False
        return
    with started_stack(addresses, timeout):
        yield True


@contextmanager
def started_stack(addresses: tuple[str, str], timeout: float) -> Iterator[None]:
    """The stack as `epochlens up` starts it, stopped on the way out (also on SIGTERM); a
    stack whose pid files name live processes is refused with nothing started."""
    settings = stack.StackSettings()
    live = stack.running(settings)
    if live:
        raise DemoError(
            f"the services do not answer at {addresses[0]} and {addresses[1]}, but "
            f"`epochlens up` processes are running ({', '.join(live)}): see their logs in "
            f"{settings.state_dir} or stop them with `epochlens down`; nothing was started")
    print("demo: starting the services (as `epochlens up` does); they are stopped when the "
          "demo ends", flush=True)
    previous = _exit_on_sigterm()
    try:
        stack.up(settings)
        check_serving(addresses, timeout)
        yield
    finally:
        stopped = stack.down(settings)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        print(f"demo: stopped the services it started ({', '.join(stopped) or 'none'}); "
              "the run stays stored", flush=True)


def _exit_on_sigterm() -> Any:
    """SIGTERM raises SystemExit (so the services get stopped); returns the previous handler,
    None outside the main thread, where Python cannot install one."""
    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def epochlens_command() -> str:
    """How to call this environment's `epochlens` from the current directory: the bare name
    when that is what PATH finds, else its path (.venv/bin/epochlens)."""
    script = Path(sys.executable).parent / "epochlens"
    if shutil.which("epochlens") == str(script):
        return "epochlens"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def next_steps(run_id: str, user: str, query_address: str, stopped: bool) -> list[str]:
    """How to look at the run with the CLI and the web UI, as commands that work as printed
    (with EPOCHLENS_CLI_ settings in front where the CLI's own would read elsewhere)."""
    cli = CliSettings()
    env = [] if user == cli.user else [f"EPOCHLENS_CLI_USER={shlex.quote(user)}"]
    if query_address != cli.query_address:
        env.append(f"EPOCHLENS_CLI_QUERY_ADDRESS={query_address}")
    command = " ".join([*env, epochlens_command()])
    lines = ["", f"look at run {run_id}:"]
    if stopped:
        lines.append("  make up    # the services again (the demo stopped the ones it started)")
    return lines + [f"  {command} summary {run_id}",
                    f"  {command} report {run_id} -o report.html",
                    f"  {command} ui"]


def _local_address(service: WriterSettings | QuerySettings) -> str:
    host = "127.0.0.1" if service.host in ("0.0.0.0", "::", "[::]") else service.host
    return f"{host}:{service.port}"


def describe(settings: DemoSettings, model: Any, model_name: str, threads: int,
             addresses: tuple[str, str]) -> str:
    """The header: what is trained on what, and where predictions go."""
    params = sum(p.numel() for p in model.parameters())
    return (f"epochlens demo: {model_name} ({params / 1e6:.2f}M parameters) learns to "
            f"{settings.task} words of {settings.min_length}-{settings.max_length} letters "
            f"from {settings.alphabet!r}: {settings.train_size} training examples, "
            f"{settings.epochs} epochs, batch {settings.batch_size}, {threads} CPU threads; "
            f"{settings.sample_count} held-out words are predicted at every epoch end and "
            f"streamed to the writer at {addresses[0]}")


def make_callback(settings: DemoSettings, sample_rows: list[dict], tokenizer: Any, token: str,
                  model_name: str, writer: str) -> PredictionsCallback:
    """The PredictionsCallback on the held-out rows; other settings from EPOCHLENS_TRAINER_."""
    config = PredictionsConfig(
        sample_count=settings.sample_count, seed=settings.seed,
        predict_at_start=settings.baseline, frequency="epoch",
        max_new_tokens=settings.max_new_tokens or settings.max_length + 2)
    if not config.enabled:
        raise DemoError("EPOCHLENS_TRAINER_ENABLED is false: the demo has nothing to show "
                        "without the predictions callback")
    task = settings.toy_task()
    return PredictionsCallback(
        config, dataset=sample_rows, tokenizer=tokenizer, writer=writer, token=token,
        run_name=settings.run_name, model_name=model_name,
        dataset_name=f"toy-{task.name}-{task.alphabet}-{task.min_length}-{task.max_length}",
        run_config={"demo": settings.model_dump(mode="json")})


def build_trainer(settings: DemoSettings, model: Any, tokenizer: Any, features: list[dict],
                  output_dir: str, callback: PredictionsCallback) -> Trainer:
    """A real transformers.Trainer: no checkpoints, the loss logged once per epoch."""
    args = TrainingArguments(
        output_dir=output_dir, num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size, learning_rate=settings.learning_rate,
        seed=settings.seed, data_seed=settings.seed, use_cpu=settings.use_cpu,
        save_strategy="no", logging_strategy="epoch", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=features,
                      data_collator=DataCollatorForSeq2Seq(tokenizer),
                      processing_class=tokenizer, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)
    return trainer


def epoch_losses(trainer: Trainer) -> dict[int, float]:
    """Mean training loss of each epoch, from the trainer's log history."""
    return {round(entry["epoch"]): entry["loss"] for entry in trainer.state.log_history
            if "loss" in entry and "epoch" in entry}


def read_back(settings: DemoSettings, address: str, token: str, run_id: str,
              losses: dict[int, float]) -> DemoResult:
    """Everything the summary shows, from the QueryService only."""
    metadata = (("authorization", f"Bearer {token}"),)
    timeout = settings.rpc_timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = query_pb2_grpc.QueryServiceStub(channel)
        listed = all_pages(stub.ListEpochs, query_pb2.ListEpochsRequest(run_id=run_id),
                           "epochs", metadata, timeout)
        epochs = []
        for summary in listed:
            request = query_pb2.ListPredictionsRequest(run_id=run_id, epoch=summary.epoch)
            predictions = all_pages(stub.ListPredictions, request, "predictions", metadata,
                                    timeout)
            epochs.append(epoch_result(summary, predictions, losses))
        shown = choose_sample(settings, epochs)
        request = query_pb2.CompareSampleRequest(run_id=run_id, sample_index=shown)
        sample = stub.CompareSample(request, metadata=metadata, timeout=timeout)
        request.page_token = sample.next_page_token
        rest = all_pages(stub.CompareSample, request, "predictions", metadata,
                         timeout) if request.page_token else []
    truth = sample.ground_truth if sample.HasField("ground_truth") else None
    across = {p.epoch: p.prediction for p in [*sample.predictions, *rest]}
    return DemoResult(run_id, epochs, shown, sample.prompt, truth, across)


def all_pages(method: Any, request: Any, items: str, metadata: tuple,
              timeout: float) -> list:
    """Every item of a paginated List call, following next_page_token to the end."""
    collected = []
    while True:
        page = method(request, metadata=metadata, timeout=timeout)
        collected.extend(getattr(page, items))
        if not page.next_page_token:
            return collected
        request.page_token = page.next_page_token


def epoch_result(summary: query_pb2.EpochSummary, predictions: list[common_pb2.Prediction],
                 losses: dict[int, float]) -> EpochResult:
    """Counts of one epoch: stored predictions, their sample indices, the exact ones."""
    exact = frozenset(p.sample_index for p in predictions
                      if p.HasField("ground_truth") and p.prediction == p.ground_truth)
    return EpochResult(
        epoch=summary.epoch, step=summary.latest_step, stored=summary.prediction_count,
        sample_indices=tuple(sorted(p.sample_index for p in predictions)),
        exact_indices=exact, loss=losses.get(summary.epoch))


def choose_sample(settings: DemoSettings, epochs: list[EpochResult]) -> int:
    """settings.shown_sample, else the first sample wrong at first and right at the end."""
    if settings.shown_sample is not None:
        return settings.shown_sample
    if epochs:
        first, last = epochs[0], epochs[-1]
        learned = sorted(last.exact_indices - first.exact_indices)
        if learned:
            return learned[0]
        if last.sample_indices:
            return last.sample_indices[0]
    return 0


def check(settings: DemoSettings, result: DemoResult, upload: str) -> list[str]:
    """What is missing from the stored run, one line each (empty: all there)."""
    problems = [] if result.upload_complete else [f"upload incomplete: {upload}"]
    expected = list(range(0 if settings.baseline else 1, settings.epochs + 1))
    found = [e.epoch for e in result.epochs]
    if found != expected:
        problems.append(f"epochs stored {found}, expected {expected}")
    wanted = tuple(range(settings.sample_count))
    for epoch in result.epochs:
        if epoch.sample_indices != wanted or epoch.stored != settings.sample_count:
            problems.append(f"epoch {epoch.epoch}: {epoch.stored} predictions with sample "
                            f"indices {list(epoch.sample_indices)}, expected {list(wanted)}")
    return problems


def summary_lines(result: DemoResult, address: str) -> list[str]:
    """The printed summary: per epoch the exact matches and the shown sample's prediction."""
    count = max((e.stored for e in result.epochs), default=0)
    lines = [f"run {result.run_id}, read back from the query service at {address}:",
             f"sample {result.shown_index}: prompt {result.prompt!r}, expected "
             f"{result.ground_truth!r}",
             f"{'epoch':>5}  {'step':>5}  {'loss':>7}  {'exact':>7}  "
             f"sample {result.shown_index} prediction"]
    for e in result.epochs:
        loss = "-" if e.loss is None else f"{e.loss:.4f}"
        prediction = result.shown_predictions.get(e.epoch)
        mark = "  (exact)" if result.shown_index in e.exact_indices else ""
        lines.append(f"{e.epoch:>5}  {e.step:>5}  {loss:>7}  "
                     f"{len(e.exact_indices):>3}/{count:<3}  {prediction!r}{mark}")
    if result.epochs:
        first, last = result.epochs[0], result.epochs[-1]
        lines.append(f"exact matches: {len(first.exact_indices)}/{first.stored} at epoch "
                     f"{first.epoch} -> {len(last.exact_indices)}/{last.stored} at epoch "
                     f"{last.epoch}")
    lines.extend(f"problem: {problem}" for problem in result.problems)
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
