"""A real training run streaming into an open run page: the demo's tiny model (trainer
client callback, real torch training on the CPU) writes through the real writer while
headless Chromium shows its run page; each epoch's row and the loss points appear without
a reload, and the page says when the run finished. The numbers on the page are checked
against the query service's own answer once the run is over. Skipped without torch (the
trainer extras).
"""

import asyncio
import time
import uuid

import grpc
import pytest
from selenium.webdriver.common.by import By

from epochlens.v1 import query_pb2, query_pb2_grpc
from services.common.auth import mint_token
from tests.conftest import JWT_SECRET
from tests.web import test_pages as pages
from tests.web.test_pages import count, in_browser, log_in, texts, wait_for

pytest.importorskip("torch")  # the demo trains with it
from trainer_client.demo import DemoSettings, main  # noqa: E402

browser = pages.browser  # the same module-scoped fixture: one Chromium for this module
EPOCHS, SAMPLES = 4, 8
RUN_WAIT_S = 60.0
TRAINING_WAIT_S = 180.0


async def created_run(stack, user: str) -> str:
    """The id of the user's run once the demo has created it."""
    deadline = time.monotonic() + RUN_WAIT_S
    async with grpc.aio.insecure_channel(stack.query.address) as channel:
        stub = query_pb2_grpc.QueryServiceStub(channel)
        while True:
            page = await stub.ListRuns(query_pb2.ListRunsRequest(), metadata=stack.metadata(user))
            if page.runs:
                return page.runs[0].id
            assert time.monotonic() < deadline, "the demo created no run"
            await asyncio.sleep(0.1)


def open_running_page(driver, base: str, run_id: str) -> tuple[list[str], list[str]]:
    """Opens the run page; (its state, its epoch rows) when the live stream is open."""
    driver.get(f"{base}/runs/{run_id}")
    wait_for(driver, lambda d: d.find_element(By.ID, "live-status").text.startswith("Live:"),
             what="live stream open")
    # read in one script: the page redraws as epochs arrive
    return driver.execute_script(
        "window.__sameDocument = true;"
        "return [Array.from(document.querySelectorAll('[data-fact=\"State\"]'))"
        "  .map((n) => n.textContent),"
        " Array.from(document.querySelectorAll('#epochs-table tbody tr'))"
        "  .map((n) => n.dataset.epoch)];")


def finished_page(driver, loss_points: int) -> None:
    """Waits for the run's end on the same document: every epoch row, every loss point."""
    wait_for(driver, lambda d: d.find_element(By.ID, "live-status").text == "The run finished.",
             TRAINING_WAIT_S, "the run finished on the page")
    wait_for(driver, lambda d: texts(d, "#epochs-table tbody tr", "data-epoch") == [
        str(e) for e in range(EPOCHS + 1)], what="every epoch row")
    wait_for(driver, lambda d: count(d, '[data-chart="loss"] path.pt[data-series="loss"]')
             == loss_points, what=f"{loss_points} loss points")
    assert driver.execute_script("return window.__sameDocument") is True  # never reloaded


async def stored_loss_points(stack, user: str, run_id: str) -> int:
    async with grpc.aio.insecure_channel(stack.query.address) as channel:
        reply = await query_pb2_grpc.QueryServiceStub(channel).ListMetrics(
            query_pb2.ListMetricsRequest(run_id=run_id, names=["loss"]),
            metadata=stack.metadata(user))
    (series,) = reply.series
    return len(series.points)


async def test_training_run_streams_into_the_open_run_page(stack, web, browser, monkeypatch,
                                                            tmp_path):
    user = f"web-train-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("EPOCHLENS_AUTH_JWT_SECRET", JWT_SECRET)  # the demo mints its token
    monkeypatch.setenv("EPOCHLENS_TRAINER_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.chdir(tmp_path)
    await in_browser(log_in, browser, web.url, mint_token(stack.auth, user))
    settings = DemoSettings(epochs=EPOCHS, sample_count=SAMPLES, torch_threads=1,
                            writer_address=stack.writer.address,
                            query_address=stack.query.address, user=user, run_name="live-demo",
                            start_stack=False, _env_file=None)
    demo = asyncio.ensure_future(asyncio.to_thread(main, settings))
    try:
        run_id = await created_run(stack, user)
        state, rows = await in_browser(open_running_page, browser, web.url, run_id)
        assert state == ["running"] and len(rows) <= EPOCHS, (state, rows)
        assert await demo == 0
        loss_points = await stored_loss_points(stack, user, run_id)
        assert loss_points >= EPOCHS
        await in_browser(finished_page, browser, loss_points)
    finally:
        await asyncio.wait({demo}, timeout=TRAINING_WAIT_S)
