"""A real training run streams into an open run page: a tiny Llama trained by a real
transformers.Trainer with the PredictionsCallback writing to the real writer, the page open
in headless Chromium on the real web service; each new epoch's row and the loss points
appear without a reload, and the page says when the run finished."""

import asyncio
import threading
import uuid

import grpc
from selenium.webdriver.common.by import By
from transformers import IntervalStrategy, TrainerCallback

from epochlens.v1 import query_pb2, query_pb2_grpc
from services.common.auth import mint_token
from tests.trainer.test_callback_training import predictions_config
from tests.trainer.tiny import (
    build_model,
    build_tokenizer,
    make_trainer,
    reversal_rows,
    train_features,
)
from tests.web.test_pages import browser, count, in_browser, log_in, texts, wait_for
from trainer_client import PredictionsCallback

__all__ = ["browser"]  # the module-scoped Chromium fixture, shared with the page tests

EPOCHS = 4
STEPS_PER_EPOCH = 4  # 32 rows, batches of 8
GATE_S = 120.0  # the longest the trainer waits for the page after its first epoch
WAIT_S = 60.0  # a loaded 2-core machine trains a tiny epoch in seconds; this is slack


class PageGate(TrainerCallback):
    """Holds the trainer at the end of its first epoch until the page is open, so the
    later epochs land while the test watches."""

    def __init__(self) -> None:
        self.page_open = threading.Event()

    def on_epoch_end(self, args, state, control, **kwargs):
        if round(state.epoch) == 1 and not self.page_open.wait(GATE_S):
            raise TimeoutError("the run page was not opened")


def rows_and_loss_points(driver) -> tuple[list[str], int]:
    return (texts(driver, "#epochs-table tbody tr", "data-epoch"),
            count(driver, '[data-chart="loss"] path.pt[data-series="loss"]'))


def open_page(driver, base: str, run_id: str) -> tuple[list[str], int]:
    driver.get(f"{base}/runs/{run_id}")
    wait_for(driver, lambda d: rows_and_loss_points(d)[0], WAIT_S, "the first epoch's row")
    wait_for(driver, lambda d: d.find_element(By.ID, "live-status").text.startswith("Live:"),
             WAIT_S, "live stream open")
    driver.execute_script("window.__sameDocument = true;")
    return rows_and_loss_points(driver)


def watch_to_the_end(driver) -> tuple[list[str], int]:
    wait_for(driver, lambda d: len(rows_and_loss_points(d)[0]) == EPOCHS, WAIT_S,
             "every epoch's row", poll=0.1)
    wait_for(driver, lambda d: d.find_element(By.ID, "live-status").text
             == "The run finished.", WAIT_S, "finished shown")
    assert driver.execute_script("return window.__sameDocument") is True  # no reload
    return rows_and_loss_points(driver)


async def run_id_of(stack, user: str) -> str:
    """The run the callback created for `user`, once it has its first epoch."""
    async with grpc.aio.insecure_channel(stack.query.address) as channel:
        stub = query_pb2_grpc.QueryServiceStub(channel)
        for _ in range(int(WAIT_S / 0.2)):
            runs = (await stub.ListRuns(query_pb2.ListRunsRequest(),
                                        metadata=stack.metadata(user))).runs
            if runs and (await stub.ListEpochs(query_pb2.ListEpochsRequest(
                    run_id=runs[0].id), metadata=stack.metadata(user))).epochs:
                return runs[0].id
            await asyncio.sleep(0.2)
    raise AssertionError("the trainer's run and first epoch did not appear")


async def test_real_training_streams_into_the_open_page(stack, web, browser, tmp_path):
    user = f"web-train-{uuid.uuid4().hex[:6]}"
    token = mint_token(stack.auth, user)
    tokenizer = build_tokenizer()
    callback = PredictionsCallback(
        predictions_config(tmp_path), dataset=reversal_rows(8, 7), tokenizer=tokenizer,
        writer=stack.writer.address, token=token, run_name="live-training",
        run_config={"judge": {"rules": {"criteria": ["exact_match"]}}})
    gate = PageGate()
    trainer = make_trainer(build_model(tokenizer), tokenizer,
                           train_features(tokenizer, reversal_rows(32)), tmp_path / "out",
                           [callback, gate], epochs=EPOCHS)
    trainer.args.logging_strategy, trainer.args.logging_steps = IntervalStrategy.STEPS, 1
    training = asyncio.ensure_future(asyncio.to_thread(trainer.train))
    try:
        await in_browser(log_in, browser, web.url, token)
        run_id = await run_id_of(stack, user)
        first_rows, first_points = await in_browser(open_page, browser, web.url, run_id)
        gate.page_open.set()
        last_rows, last_points = await in_browser(watch_to_the_end, browser)
        await asyncio.wait_for(training, WAIT_S)
    finally:
        gate.page_open.set()
        if not training.done():
            await asyncio.wait_for(training, GATE_S)
    assert len(first_rows) == 1 and first_points <= STEPS_PER_EPOCH  # the gate held
    assert len(last_rows) == EPOCHS and len(set(last_rows)) == EPOCHS
    assert last_points == EPOCHS * STEPS_PER_EPOCH
