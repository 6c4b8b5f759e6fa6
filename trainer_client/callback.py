"""PredictionsCallback: one TrainerCallback that samples, generates and streams predictions.

Lifecycle:

- construction: the config is validated and the dataset format is checked (an
  unknown format fails here, not at the first epoch);
- on_train_begin: draws the fixed sample, estimates the generation cost
  (printed; training is refused past cost_ceiling_s), and on rank 0 opens the
  spool, starts the upload thread and creates the run (model, dataset, the
  predictions config, trainer precision, world size);
- on_epoch_end (frequency "epoch") or on_step_end every step_interval steps
  (frequency "steps"): every rank generates its shard, rank 0 gathers and
  enqueues; the trainer thread never waits for the network;
- on_train_end: flushes for up to flush_timeout_s, finishes the run, prints
  what was stored and what is still spooled.

Epoch numbers: the trainer's state.epoch is a float (epoch + fraction done). A
prediction is labelled with the 1-based number of the epoch in progress:
ceil(state.epoch), after rounding state.epoch to EPOCH_DECIMALS decimals so that
float noise such as 2.0000000001 at the end of epoch 2 still counts as 2.
Predictions made before training (predict_at_start) are epoch 0, step 0.
"""

import logging
import math
import numbers
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback

from trainer_client import distributed
from trainer_client.config import PredictionsConfig
from trainer_client.cost import CostEstimate, check_ceiling, estimate_cost, measure_ms_per_step
from trainer_client.genconfig import apply_generation_config
from trainer_client.generator import Generator, trainer_autocast_dtype
from trainer_client.matching import exact_match_rate
from trainer_client.predictor import Predictor
from trainer_client.run import Run
from trainer_client.sampler import Formatter, SampleDraw, Sampler
from trainer_client.streaming import FlushReport, StreamingClient

log = logging.getLogger(__name__)

EPOCH_DECIMALS = 6
# Names of the numbers a predictions pass reports (metrics and the trainer's log_history).
PASS_PREFIX = "epochlens/"
# Keys of the trainer's logs that are not metrics (the position of the log).
NOT_METRICS = frozenset({"epoch", "step"})


def epoch_number(epoch: float | None) -> int:
    """The 1-based epoch in progress for the trainer's float epoch (0 before training)."""
    if not epoch:
        return 0
    return int(math.ceil(round(epoch, EPOCH_DECIMALS)))


class PredictionsCallback(TrainerCallback):
    """Streams predictions on a fixed sample of `dataset` while a Trainer trains.

    Without a dataset, attach(trainer) takes the trainer's eval_dataset (transformers hands
    callbacks no trainer, so a bare callback cannot find it).
    A transformers.GenerationConfig (generation_config=...) overrides the generation
    settings it shares with the config (see trainer_client.genconfig).
    """

    def __init__(self, config: PredictionsConfig | None = None, *, dataset: Any = None,
                 tokenizer: Any = None, writer: str | None = None, token: str | None = None,
                 run_name: str | None = None, model_name: str | None = None,
                 dataset_name: str | None = None, formatter: Formatter | None = None,
                 run_config: Mapping[str, Any] | None = None,
                 generation_config: Any = None) -> None:
        config = config if config is not None else PredictionsConfig()
        self.config = apply_generation_config(config, generation_config)
        self._dataset, self._tokenizer, self._formatter = dataset, tokenizer, formatter
        self._draw: SampleDraw | None = None
        self._writer = writer or self.config.writer_address
        secret = self.config.token.get_secret_value() if self.config.token else None
        self._token = token or secret
        self._names = {"run": run_name or self.config.run_name, "model": model_name,
                       "dataset": dataset_name}
        self._run_config = dict(run_config or {})
        self.counts: Counter[str] = Counter()
        self.sampler: Sampler | None = None
        self.generator: Generator | None = None
        # The pass runner and the run handle (trainer_client.predictor / .run) it is built on.
        self.predictor: Predictor | None = None
        self.run: Run | None = None
        self._trainer: Any = None
        # Headline numbers of the last pass (also in the trainer's log_history).
        self.last_pass_metrics: dict[str, float] = {}
        self.estimate: CostEstimate | None = None
        self.last_report: FlushReport | None = None
        self.upload_counts: dict[str, int] = {}
        self._dtype = None
        self._train_started = 0.0
        self._prediction_s = 0.0
        # Trainer-thread seconds spent handing results to the upload thread (all passes).
        self.submit_s = 0.0
        if self.config.enabled and dataset is not None:
            self._use_dataset(dataset)

    def attach(self, trainer: Any) -> "PredictionsCallback":
        """Adds this callback to `trainer`; without a dataset, its eval_dataset is the one."""
        if self.config.enabled and self._draw is None:
            self._use_dataset(_single_eval_dataset(getattr(trainer, "eval_dataset", None)))
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._trainer = trainer
        return self

    def _use_dataset(self, dataset: Any) -> None:
        """Draws and checks the sample now (a bad row fails here, not at the first epoch)."""
        self._dataset = dataset
        self._draw = SampleDraw(dataset, self.config, self._formatter)
        if self._tokenizer is not None:
            self.sampler = Sampler(self._draw, self.config, self._tokenizer)

    # ----- trainer events -----

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not self.config.enabled:
            log.info("predictions are disabled (EPOCHLENS_TRAINER_ENABLED=false)")
            return
        tokenizer = self._tokenizer or _tokenizer_of(processing_class)
        if tokenizer is None:
            raise ValueError("PredictionsCallback needs a tokenizer: pass tokenizer=... or give "
                             "the Trainer a processing_class")
        if self._draw is None:
            raise ValueError("PredictionsCallback has no dataset: pass dataset=..., or call "
                             "callback.attach(trainer) to use the trainer's eval_dataset")
        self._dtype = trainer_autocast_dtype(args)
        self.predictor = Predictor(self.sampler or self._draw, tokenizer, self.config,
                                   autocast_dtype=self._dtype)
        self.sampler, self.generator = self.predictor.sampler, self.predictor.generator
        self.estimate = distributed.broadcast_from_rank0(self._estimate(state, model))
        self._report_estimate()
        if distributed.rank() == 0:
            self._start_client(args, state, model)
        self._train_started, self._prediction_s = time.perf_counter(), 0.0
        if self.config.predict_at_start:
            self._predict(state, model, epoch=0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if (self.generator is not None and self.config.frequency == "steps"
                and state.global_step > 0
                and state.global_step % self.config.step_interval == 0):
            self._predict(state, model, epoch_number(state.epoch))

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.generator is not None and self.config.frequency == "epoch":
            self._predict(state, model, epoch_number(state.epoch))

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Forwards the numeric scalars the trainer logs (loss, learning_rate, grad_norm,
        eval_*, train_*) as metrics at the current step; the pass's own epochlens/* numbers
        went up with the pass."""
        if self.run is None or not logs:
            return
        values = {name: float(value) for name, value in logs.items()
                  if _is_scalar(value) and name not in NOT_METRICS
                  and not name.startswith(PASS_PREFIX)}
        if values:
            epoch = logs.get("epoch", state.epoch)
            self.run.log_metrics(state.global_step, values,
                                 epoch=float(epoch) if _is_scalar(epoch) else None)

    def on_train_end(self, args, state, control, **kwargs):
        if self.run is None:
            return
        run, self.run = self.run, None
        client = run.client
        try:
            self.last_report = run.finish("succeeded")
        except Exception as exc:  # training is over; report, never raise
            self.counts["flush_errors"] += 1
            log.error("flushing the predictions failed; what was not acked stays in %s: %s",
                      self.config.spool_dir, exc, exc_info=True)
            return
        finally:
            self.upload_counts = dict(client.counts) if client is not None else {}
        message = f"epochlens: {self.last_report.describe()}"
        print(message, flush=True)
        if not self.last_report.complete:
            log.warning(message)

    @property
    def client(self) -> StreamingClient | None:
        """The run's upload client (rank 0, between train begin and train end)."""
        return self.run.client if self.run is not None else None

    @property
    def generation_s(self) -> float:
        """Wall seconds spent generating (and gathering) predictions since train begin."""
        return self._prediction_s

    # ----- helpers -----

    def _estimate(self, state, model) -> CostEstimate | None:
        # Under FSDP2 the speed probe gathers parameters, a collective: every rank runs it
        # (rank 0's estimate is the one broadcast). Otherwise rank 0 alone measures.
        if distributed.rank() != 0 and not distributed.fsdp_units(model):
            return None
        cfg = self.config
        if cfg.decode_ms_per_step is not None:
            speed, source = cfg.decode_ms_per_step, "given"
        elif cfg.measure_speed:
            speed = measure_ms_per_step(self.generator, model, self.sampler.samples,
                                        self._dtype, cfg.speed_probe_tokens)
            source = "measured"
        else:
            return None
        return estimate_cost(cfg, speed, source, len(self.sampler.samples),
                             distributed.world_size(), state.max_steps,
                             state.num_train_epochs)

    def _report_estimate(self) -> None:
        if self.estimate is None:
            log.info("no predictions cost estimate (measure_speed off, no decode_ms_per_step)")
            return
        warning = check_ceiling(self.config, self.estimate)
        if distributed.rank() == 0:
            print(f"epochlens: {self.estimate.describe()}", flush=True)
        if warning:
            log.warning(warning)

    def _start_client(self, args, state, model) -> None:
        self.run = Run(self._run_name(args), model_name=self._model_name(model),
                       dataset_name=self._dataset_name(), config=self.config,
                       run_config=self._run_settings(args, state), writer=self._writer,
                       token=self._token).start()

    def _predict(self, state, model, epoch: int) -> None:
        try:
            gathered = self.predictor.predict(model, step=state.global_step)
        except Exception as exc:  # generation never raises; this is the gather or a bug
            self.counts["failed_passes"] += 1
            log.error("predictions pass at epoch %d step %d failed (%d failed passes): %s",
                      epoch, state.global_step, self.counts["failed_passes"], exc, exc_info=True)
            return
        elapsed = self.predictor.last_pass_s
        self._prediction_s += elapsed
        if gathered is None or self.run is None:
            return
        submitted = time.perf_counter()
        self.run.log_predictions(epoch, state.global_step, gathered)
        self.submit_s += time.perf_counter() - submitted
        self._log_pass(state, epoch, gathered, elapsed)
        self._report_pass(state, gathered, elapsed)

    def _report_pass(self, state, results: list, elapsed: float) -> None:
        """The pass's headline numbers: stored as metrics, and put in the trainer's
        log_history (through trainer.log when the trainer is known, so that report_to
        integrations see them; otherwise appended to state.log_history)."""
        failed = sum(1 for r in results if r.error is not None)
        headline = {f"{PASS_PREFIX}predictions": float(len(results) - failed),
                    f"{PASS_PREFIX}failed_samples": float(failed),
                    f"{PASS_PREFIX}pass_seconds": round(elapsed, 3)}
        rate = exact_match_rate(results)
        if rate is not None:
            headline[f"{PASS_PREFIX}exact_match"] = rate
        self.last_pass_metrics = headline
        self.run.log_metrics(state.global_step, headline,
                             epoch=float(state.epoch) if state.epoch else None)
        if self._trainer is not None:
            # Trainer.log itself, not a subclass's: TRL's SFTTrainer.log merges (and clears)
            # its running metrics (entropy, token accuracy) into whatever is logged. It ends
            # in callback_handler.on_log, which clears control.should_log: keep the
            # trainer's own decision, or its loss log at this step is skipped.
            should_log = self._trainer.control.should_log
            Trainer.log(self._trainer, dict(headline))
            self._trainer.control.should_log = should_log
            return
        state.log_history.append({**headline, "epoch": state.epoch,
                                  "step": state.global_step})

    def _log_pass(self, state, epoch: int, results: list, elapsed: float) -> None:
        failed = sum(1 for r in results if r.error is not None)
        self.counts["passes"] += 1
        self.counts["predictions"] += len(results) - failed
        self.counts["failed_samples"] += failed
        steps = state.global_step
        train_s = time.perf_counter() - self._train_started - self._prediction_s
        cost = (f"= {elapsed / (train_s / steps):.1f} training steps" if steps and train_s > 0
                else "before any training step")
        log.info("predictions at epoch %d step %d: %d generated, %d failed, %.2fs (%s)",
                 epoch, steps, len(results) - failed, failed, elapsed, cost)

    def _run_name(self, args) -> str:
        name = self._names["run"] or getattr(args, "run_name", None)
        return name or Path(args.output_dir).name or "epochlens-run"

    def _model_name(self, model) -> str:
        if self._names["model"]:
            return self._names["model"]
        path = getattr(getattr(model, "config", None), "_name_or_path", "")
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return path or type(base).__name__

    def _dataset_name(self) -> str:
        if self._names["dataset"]:
            return self._names["dataset"]
        info = getattr(self._dataset, "info", None)
        return getattr(info, "dataset_name", None) or ""

    def _run_settings(self, args, state) -> dict:
        precision = "fp32" if self._dtype is None else str(self._dtype).removeprefix("torch.")
        # The caller's run_config goes in at the top level, so its "judge" section is the
        # one the writer hands to the judge; the callback's own keys win on a clash.
        return {**self._run_config, "predictions": self.config.public_dict(),
                "trainer": {"precision": precision, "world_size": distributed.world_size(),
                            "num_train_epochs": state.num_train_epochs,
                            "max_steps": state.max_steps,
                            "learning_rate": getattr(args, "learning_rate", None)},
                "sample": self.sampler.describe(),
                "cost_estimate": self.estimate.as_dict() if self.estimate else None}


def _is_scalar(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _single_eval_dataset(dataset: Any) -> Any:
    """The trainer's eval_dataset; a dict of several is refused (which one is ambiguous)."""
    if dataset is None:
        raise ValueError("PredictionsCallback has no dataset and the trainer has no "
                         "eval_dataset: pass dataset=... or give the trainer an eval_dataset")
    if isinstance(dataset, Mapping):
        if len(dataset) != 1:
            raise ValueError(f"the trainer's eval_dataset is a dict of {sorted(dataset)}: "
                             "pass dataset=trainer.eval_dataset[<name>]")
        return next(iter(dataset.values()))
    return dataset


def _tokenizer_of(processing_class: Any) -> Any:
    if processing_class is None or isinstance(processing_class, PreTrainedTokenizerBase):
        return processing_class
    return getattr(processing_class, "tokenizer", None)
