"""The web UI's run comparison page (/runs/{id}/vs, QueryService.CompareRuns) and the run
page's pairwise and judge-human agreement tables, in a real headless Chromium against the
real stack (tests/web/test_pages.py drives the browser the same way).

Two runs without judges (NO_JUDGING) with known rule scores seeded as the database admin:
the baseline's epoch 1 scores chrf FIRST, the candidate's epoch 2 SECOND (pass at 4), on the
same five prompts, so every number the page shows is known here (the bootstrap intervals from
the same resampling, written out in tests/integration/test_compare.py). Pairwise results of
the candidate's epoch 2 against the baseline are inserted into judge.pairwise_results; an
LLM criterion on the candidate's epoch 1 gets people's judgments through the real
RecordHumanJudgment. The baseline run's name and one prompt are written in HTML.
"""

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from epochlens.v1 import judge_pb2, judge_pb2_grpc, writer_pb2, writer_pb2_grpc
from services.common.auth import mint_token
from services.judge.models import judgments_table
from services.judge.pairwise.models import Outcome, pairwise_results_table
from services.query.pairwise import wilson_interval
from tests.helpers import create_run, item
from tests.integration.test_compare import FIRST, LEVEL, SECOND, interval, scores
from tests.integration.test_query_judgments import LLM, NO_JUDGING, insert_rows, settled
from tests.web.test_pages import (  # noqa: F401 (browser: the Chromium fixture)
    assert_labelled,
    browser,
    check_inert,
    count,
    in_browser,
    log_in,
    no_horizontal_scroll,
    table_rows,
    texts,
    wait_for,
)

DASH = "\u2013"  # what the pages show for a value that is not defined (js/dom.js DASH)
HOSTILE_NAME = '<img src=x onerror="window.__pwned = 11">base'
HOSTILE_PROMPT = '<img src=x onerror="window.__pwned = 12">what is two?'
SAMPLES = len(FIRST)
# outcome of the candidate's samples 0..4 against the baseline; the tie is position-biased
OUTCOMES = [Outcome.WIN, Outcome.WIN, Outcome.WIN, Outcome.LOSS, Outcome.TIE]
PAIR_COST = 0.002
DELTA_COLS = ("criterion", "judge", "pairs", "baseline", "candidate", "delta", "pass",
              "pass-delta", "improved", "regressed", "unchanged")
CHANGE_COLS = ("sample", "baseline-sample", "criterion", "judge", "baseline", "candidate",
               "change")


@dataclass
class Runs:
    user: str
    baseline: str
    candidate: str
    candidate_name: str
    other_user: str
    other: str  # the other user's run


def prompt(sample: int) -> str:
    return HOSTILE_PROMPT if sample == 2 else f"question {sample}?"


def predictions(epoch: int, step: int) -> list:
    return [item(step, s, epoch=epoch, prompt=prompt(s), ground_truth=f"answer {s}")
            for s in range(SAMPLES)]


async def write(stack, stub, user: str, name: str, epochs: list[tuple[int, int]]) -> str:
    md = stack.metadata(user)
    run = await create_run(stub, md, name=name, config=NO_JUDGING)
    for epoch, step in epochs:
        await stub.WritePredictions(writer_pb2.WritePredictionsRequest(
            run_id=run.id, predictions=predictions(epoch, step)), metadata=md)
    await stub.FinishRun(writer_pb2.FinishRunRequest(run_id=run.id), metadata=md)
    await settled(stack, run.id)
    return run.id


def pairwise_rows(runs: Runs) -> list[dict]:
    return [{"run_id": uuid.UUID(runs.candidate), "step": 20, "sample_index": s,
             "criterion": "preference", "judge_model": "openai/gpt-test", "user_id": runs.user,
             "epoch": 2, "baseline_run_id": uuid.UUID(runs.baseline), "baseline_epoch": 1,
             "baseline_step": 10, "baseline_sample_index": s, "outcome": int(outcome),
             "answer_1": "B", "answer_2": "A", "reason_1": "", "reason_2": "",
             "position_bias": outcome == Outcome.TIE, "unscored_reason": "",
             "input_tokens": 10, "output_tokens": 2, "cost_usd": PAIR_COST,
             "prompt_version": "v1", "create_time": datetime.now(UTC)}
            for s, outcome in enumerate(OUTCOMES)]


@pytest.fixture(scope="module")
async def runs(stack) -> Runs:
    user, tag = f"web-vs-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex[:6]
    async with grpc.aio.insecure_channel(stack.writer.address) as channel:
        stub = writer_pb2_grpc.PredictionWriterServiceStub(channel)
        baseline = await write(stack, stub, user, HOSTILE_NAME, [(1, 10)])
        candidate = await write(stack, stub, user, f"cand-{tag}", [(1, 10), (2, 20)])
        other = await write(stack, stub, f"{user}-b", f"theirs-{tag}", [(1, 10)])
    made = Runs(user, baseline, candidate, f"cand-{tag}", f"{user}-b", other)
    rows = scores(baseline, user, 1, 10, FIRST) + scores(candidate, user, 2, 20, SECOND)
    # accuracy (LLM) on the candidate's epoch 1, for the agreement with people
    rows += scores(candidate, user, 1, 10, [8.0, 3.0], "accuracy", LLM, 7.0)
    rows += scores(candidate, user, 1, 10, [6.0], "accuracy", LLM, 7.0,
                   judge_model="anthropic/claude-test")
    await insert_rows(stack, judgments_table, rows)
    await insert_rows(stack, pairwise_results_table, pairwise_rows(made))
    return made


def signed(value: float, digits: int) -> str:
    """As js/judging.js signed: the sign, then the absolute value."""
    return ("-" if value < 0 else "+") + f"{abs(value):.{digits}f}"


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def expected_delta_row() -> tuple[str, ...]:
    diffs = [c - b for c, b in zip(SECOND, FIRST, strict=True)]
    low, high = interval(diffs)
    passes = [float(c >= 4) - float(b >= 4) for c, b in zip(SECOND, FIRST, strict=True)]
    p_low, p_high = interval(passes)
    return ("chrf", "rules", "5", "5.000", "5.300",
            f"+0.300 [{signed(low, 3)}, {signed(high, 3)}]", "60.0% -> 60.0%",
            f"+0.0 pts [{signed(100 * p_low, 1)}, {signed(100 * p_high, 1)}]", "3", "1", "1")


def win_rate_text() -> str:
    low, high = wilson_interval(3.5, 5, LEVEL)
    return f"70.0% [{pct(low)}, {pct(high)}]"


def short(run_id: str) -> str:
    return run_id[:8]


# --- browser steps (run in a worker thread) ---------------------------------------------

def check_default_and_baseline_run(driver, base: str, runs: Runs) -> None:
    driver.get(f"{base}/runs/{runs.candidate}")
    link = wait_for(driver, lambda d: d.find_element(By.ID, "vs-link"), what="run page link")
    link.click()
    wait_for(driver, lambda d: d.find_elements(By.ID, "vs-header"), what="default comparison")
    assert driver.current_url == f"{base}/runs/{runs.candidate}/vs"
    own = f"{runs.candidate_name} ({short(runs.candidate)})"
    assert driver.find_element(By.ID, "vs-header").text == (
        f"Epoch 2 of {own} against epoch 1: 5 shared samples; intervals: 95% paired "
        "bootstrap, 2000 resamples.")
    assert count(driver, "#deltas-empty") == 1  # chrf only at epoch 2, accuracy only at 1
    assert count(driver, "#vs-pairwise-table") == 0  # judged against the other run only
    Select(driver.find_element(By.ID, "vs-baseline")).select_by_value(runs.baseline)
    driver.find_element(By.CSS_SELECTOR, '#vs-form button[type="submit"]').click()
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#deltas-table tbody tr"),
             what="comparison with the baseline run")
    assert driver.current_url == f"{base}/runs/{runs.candidate}/vs?baseline={runs.baseline}"
    assert driver.find_element(By.ID, "vs-header").text == (
        f"Epoch 2 of {own} against run {HOSTILE_NAME} ({short(runs.baseline)}) epoch 1: "
        "5 shared samples; intervals: 95% paired bootstrap, 2000 resamples.")
    check_inert(driver)


def check_numbers(driver, runs: Runs) -> None:
    assert table_rows(driver, "#deltas-table", DELTA_COLS) == [expected_delta_row()]
    assert table_rows(driver, "#changes-table", CHANGE_COLS) == [
        ("2", "2", "chrf", "rules", "6.000 pass", "3.000 fail", "regressed"),
        ("0", "0", "chrf", "rules", "2.000 fail", "5.000 pass", "improved"),
        ("4", "4", "chrf", "rules", "9.000 pass", "10.000 pass", "+1.000"),
        ("3", "3", "chrf", "rules", "3.000 fail", "3.500 fail", "+0.500")]
    hrefs = texts(driver, '#changes-table td[data-col="sample"] a', "href")
    assert hrefs[0].endswith(f"/runs/{runs.candidate}/samples/2")
    base_hrefs = texts(driver, '#changes-table td[data-col="baseline-sample"] a', "href")
    assert base_hrefs[0].endswith(f"/runs/{runs.baseline}/samples/2")
    assert table_rows(driver, "#vs-pairwise-table", ("criterion", "judge", "wlt", "unscored",
                                                     "win-rate", "biased", "cost")) == [
        ("preference", "openai/gpt-test", "3/1/1", "0", win_rate_text(), "1", "$0.0100")]
    assert_labelled(driver)
    assert no_horizontal_scroll(driver)


def check_changed_sample_link(driver, base: str, runs: Runs) -> None:
    driver.find_element(By.CSS_SELECTOR, '#changes-table td[data-col="sample"] a').click()
    wait_for(driver, lambda d: d.find_element(By.ID, "sample-prompt").text == HOSTILE_PROMPT,
             what="the changed sample's page")
    assert driver.current_url == f"{base}/runs/{runs.candidate}/samples/2"
    check_inert(driver)


def check_refusal(driver, base: str, runs: Runs) -> None:
    driver.get(f"{base}/runs/{runs.candidate}/vs?choice=best")
    error = wait_for(driver, lambda d: d.find_element(By.ID, "vs-error"), what="refusal")
    assert "HTTP 400" in error.text and "best_criterion" in error.text
    assert driver.find_element(By.ID, "vs-choice").get_attribute("value") == "best"


async def test_comparison_page_numbers_changes_and_pairwise(stack, runs, web,
                                                            browser):  # noqa: F811
    await in_browser(log_in, browser, web.url, mint_token(stack.auth, runs.user))
    await in_browser(check_default_and_baseline_run, browser, web.url, runs)
    await in_browser(check_numbers, browser, runs)
    await in_browser(check_changed_sample_link, browser, web.url, runs)
    await in_browser(check_refusal, browser, web.url, runs)


def check_run_page_pairwise(driver, base: str, runs: Runs) -> None:
    driver.get(f"{base}/runs/{runs.candidate}")
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#pairwise-table tbody tr"),
             what="pairwise table")
    assert table_rows(driver, "#pairwise-table", ("epoch", "baseline", "criterion", "judge",
                                                  "wlt", "unscored", "win-rate")) == [
        ("2", f"{short(runs.baseline)} epoch 1", "preference", "openai/gpt-test", "3/1/1",
         "0", win_rate_text())]
    details = driver.find_element(By.CSS_SELECTOR, '#pairwise-table td[data-col="details"] a')
    assert details.get_attribute("href") == (
        f"{base}/runs/{runs.candidate}/vs?epoch=2&baseline={runs.baseline}&baseline_epoch=1")
    assert count(driver, "#agreement-table") == 0  # no person judged the run yet


def check_run_page_agreement(driver, base: str, runs: Runs) -> None:
    driver.get(f"{base}/runs/{runs.candidate}")
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#agreement-table tbody tr"),
             what="agreement table")
    cols = ("criterion", "type", "judge", "pairs", "agreement", "kappa", "spearman")
    assert table_rows(driver, "#agreement-table", cols) == [
        ("accuracy", "llm", "anthropic/claude-test", "1", "0.0%", DASH, DASH),
        ("accuracy", "llm", "openai/gpt-test", "2", "100.0%", "1.000", "1.000")]
    assert count(driver, "#pairwise-table tbody tr") == 1
    assert no_horizontal_scroll(driver)
    driver.find_element(By.CSS_SELECTOR, '#pairwise-table td[data-col="details"] a').click()
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#vs-pairwise-table tbody tr"),
             what="the pairwise row's comparison")
    assert table_rows(driver, "#vs-pairwise-table", ("wlt", "win-rate")) == [
        ("3/1/1", win_rate_text())]
    assert driver.find_element(By.ID, "vs-baseline-epoch").get_attribute("value") == "1"


async def record_people(stack, runs: Runs) -> None:
    md = stack.metadata(runs.user)
    async with grpc.aio.insecure_channel(stack.judge.address) as channel:
        judge = judge_pb2_grpc.JudgeServiceStub(channel)
        for sample, value in ((0, 9.0), (1, 4.0)):
            await judge.RecordHumanJudgment(judge_pb2.RecordHumanJudgmentRequest(
                prediction=judge_pb2.PredictionRef(run_id=runs.candidate, step=10,
                                                    sample_index=sample),
                criterion="accuracy", score=value, threshold=7.0), metadata=md)


async def test_run_page_pairwise_and_agreement_tables(stack, runs, web,
                                                     browser):  # noqa: F811
    await in_browser(log_in, browser, web.url, mint_token(stack.auth, runs.user))
    await in_browser(check_run_page_pairwise, browser, web.url, runs)
    await record_people(stack, runs)
    await in_browser(check_run_page_agreement, browser, web.url, runs)


def check_other_users_runs(driver, base: str, runs: Runs) -> None:
    driver.get(f"{base}/runs/{runs.candidate}/vs")
    message = wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR, ".error-message"),
                       what="not found message")
    assert message.text.startswith("Not found (HTTP 404): ")
    assert count(driver, "#vs-form, #deltas-table") == 0
    driver.get(f"{base}/runs/{runs.other}/vs?baseline={runs.baseline}")
    error = wait_for(driver, lambda d: d.find_element(By.ID, "vs-error"), what="refusal")
    assert "HTTP 404" in error.text
    assert count(driver, "#deltas-table, #vs-header") == 0
    options = texts(driver, "#vs-baseline option", "value")
    assert runs.baseline in options  # the URL's choice kept, under its id only
    assert "__pwned = 11" not in driver.find_element(By.TAG_NAME, "main").text  # its name


async def test_another_users_run_on_either_side_is_not_found(stack, runs, web,
                                                            browser):  # noqa: F811
    await in_browser(log_in, browser, web.url, mint_token(stack.auth, runs.other_user))
    await in_browser(check_other_users_runs, browser, web.url, runs)
