"""The web UI's pages in a real headless Chromium (the Debian chromium and driver of the
report tests) against the real stack on PostgreSQL: writer, judge and query servers and the
web service, all in-process (the `stack` and `web` fixtures of tests/web/conftest.py). Runs
are seeded through the real writer (predictions and metrics) and judged by the real judge
(rules exact_match and chrf); an LLM criterion with a reasoning written in HTML is inserted
into schema `judge` directly.

The servers run on this thread's event loop, so every browser step runs in a worker thread
(asyncio.to_thread) and the loop stays free to answer the browser.
"""

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from epochlens.v1 import common_pb2, writer_pb2, writer_pb2_grpc
from services.common.auth import mint_token
from services.judge.models import judgments_table
from tests.helpers import create_run, item
from tests.integration.test_query_judgments import NO_JUDGING, insert_rows, llm_row, settled

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WAIT_S = 10.0
LIVE_WAIT_S = 2.0  # the target: a committed epoch visible on the open page within 2 s
EPOCHS, SAMPLES, STEPS_PER_EPOCH = 4, 12, 10
RUNS_PAGE = 20  # runs per page of the runs list (services/web/static/js/runs.js)
SAMPLE_PAGE = 20  # epochs per page of the sample view (services/web/static/js/sample.js)
HOSTILE = ('<script>alert(1); window.__pwned = 1</script>'
           '<img src=x onerror="alert(2); window.__pwned = 2">'
           '<a href="javascript:alert(3); window.__pwned = 3">click me</a>')
HOSTILE_AT = (2, 7)  # (epoch, sample) of the prediction written in HTML
HTML_REASONING = '<img src=x onerror="window.__pwned = 4"><b>bold</b> reasoning'
RULES = {"judge": {"rules": {"criteria": ["exact_match", "chrf"]}}}


def truth(sample: int) -> str:
    return f"answer {sample}"


def prediction_text(run: str, epoch: int, sample: int) -> str:
    """Run alpha gets 3 more samples right each epoch (exact match 25, 50, 75, 100 %), run
    beta 2 more (exact match 16.7, 33.3, 50 %, three epochs)."""
    if run == "alpha" and (epoch, sample) == HOSTILE_AT:
        return HOSTILE
    right = 3 * epoch if run == "alpha" else 2 * epoch
    return truth(sample) if sample < right else f"{run} guess {epoch} for {sample}"


@dataclass
class Seeded:
    alpha: str
    beta: str
    other: str  # user B's run
    user_a: str
    user_b: str


async def write_epoch(stub, md, run_id: str, run: str, epoch: int) -> None:
    step = epoch * STEPS_PER_EPOCH
    items = [item(step, s, epoch=epoch, prompt=f"question {s}: what is the answer?",
                  ground_truth=truth(s), prediction=prediction_text(run, epoch, s))
             for s in range(SAMPLES)]
    await stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run_id, predictions=items), metadata=md)
    metrics = [writer_pb2.MetricInput(step=k, name="loss", value=round(2.0 - 0.04 * k, 4))
               for k in range(step - STEPS_PER_EPOCH + 1, step + 1)]
    metrics.append(writer_pb2.MetricInput(step=step, name="eval_loss",
                                          value=round(2.2 - 0.3 * epoch, 4)))
    metrics += [writer_pb2.MetricInput(step=k, name="learning_rate", value=1e-4 / k)
                for k in range(step - STEPS_PER_EPOCH + 1, step + 1)]
    await stub.WriteMetrics(writer_pb2.WriteMetricsRequest(run_id=run_id, metrics=metrics),
                            metadata=md)


async def seed_run(stack, stub, user: str, run: str, epochs: int, model: str, rate: float,
                   finish: bool = True) -> str:
    md = stack.metadata(user)
    created = await create_run(stub, md, name=f"{run}-{uuid.uuid4().hex[:6]}", model_name=model,
                               config={"learning_rate": rate, **RULES})
    for epoch in range(1, epochs + 1):
        await write_epoch(stub, md, created.id, run, epoch)
    if finish:
        await stub.FinishRun(writer_pb2.FinishRunRequest(run_id=created.id), metadata=md)
    return created.id


def llm_rows(run_id: str, user: str) -> list[dict]:
    """helpfulness (LLM) for samples 0..2 of every epoch: score 2 * epoch + 1, pass at 7."""
    return [llm_row(run_id, user, e, e * STEPS_PER_EPOCH, s, 2 * e + 1,
                    reasoning=HTML_REASONING if (e, s) == (2, 1) else f"helpful at {e}")
            for e in range(1, EPOCHS + 1) for s in range(3)]


@pytest.fixture(scope="module")
async def seeded(stack) -> Seeded:
    tag = uuid.uuid4().hex[:6]
    user_a, user_b = f"web-a-{tag}", f"web-b-{tag}"
    async with grpc.aio.insecure_channel(stack.writer.address) as channel:
        stub = writer_pb2_grpc.PredictionWriterServiceStub(channel)
        alpha = await seed_run(stack, stub, user_a, "alpha", EPOCHS, "tiny-model", 0.001)
        beta = await seed_run(stack, stub, user_a, "beta", EPOCHS - 1, "other-model", 0.0001)
        other = await seed_run(stack, stub, user_b, "bravo", 1, "tiny-model", 0.001)
    for run_id in (alpha, beta, other):
        await settled(stack, run_id)
    await insert_rows(stack, judgments_table, llm_rows(alpha, user_a))
    return Seeded(alpha, beta, other, user_a, user_b)


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a fresh profile, 1280 px wide; skipped only when it is not
    installed."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (install them with `make browser`)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                "--window-size=1280,900",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_window_size(1280, 900)
    try:
        yield driver
    finally:
        driver.quit()


# --- browser steps (run in a worker thread) ---------------------------------------------

def wait_for(driver, condition: Callable, timeout: float = WAIT_S, what: str = "",
             poll: float = 0.2):
    """The first truthy result of condition(driver), checked every `poll` seconds (stale
    elements retried)."""
    def attempt(d):
        try:
            return condition(d)
        except (NoSuchElementException, StaleElementReferenceException):
            return False
    try:
        return WebDriverWait(driver, timeout, poll_frequency=poll).until(attempt)
    except TimeoutException:
        page = driver.execute_script("return document.body ? document.body.innerText : ''")
        raise AssertionError(f"timed out waiting for {what} at {driver.current_url}; page: "
                             f"{page[:800]!r}; console: {driver.get_log('browser')}") from None


def texts(scope, selector: str, attribute: str | None = None) -> list[str]:
    found = scope.find_elements(By.CSS_SELECTOR, selector)
    return [e.get_attribute(attribute) if attribute else e.text for e in found]


def count(driver, selector: str) -> int:
    return len(driver.find_elements(By.CSS_SELECTOR, selector))


def log_in(driver, base: str, token: str) -> None:
    driver.delete_all_cookies()
    driver.get(base + "/login")
    field = wait_for(driver, lambda d: d.find_element(By.ID, "token"), what="login form")
    label = driver.find_element(By.CSS_SELECTOR, 'label[for="token"]').text
    assert label == "Access token"
    field.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, '#login-form button[type="submit"]').click()
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#runs-table, #runs-empty"),
             what="runs list after login")
    driver.get_log("browser")  # drained: the 401s that led to the login page are expected


def no_horizontal_scroll(driver) -> bool:
    return driver.execute_script(
        "return document.documentElement.scrollWidth <= document.documentElement.clientWidth")


def table_rows(driver, selector: str, cols: tuple[str, ...]) -> list[tuple[str, ...]]:
    rows = driver.find_elements(By.CSS_SELECTOR, selector + " tbody tr")
    return [tuple(row.find_element(By.CSS_SELECTOR, f'td[data-col="{c}"]').text for c in cols)
            for row in rows]


def assert_labelled(driver) -> None:
    """Every form control of the page has a label."""
    unlabelled = driver.execute_script(
        "return Array.from(document.querySelectorAll('input:not([type=hidden]), select, "
        "textarea')).filter((c) => !c.labels.length).map((c) => c.id || c.name);")
    assert unlabelled == []


def severe_logs(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def run_names(driver) -> list[str]:
    return texts(driver, '#runs-table td[data-col="name"]')


def api_status(base: str, path: str, token: str | None) -> tuple[int, dict]:
    request = urllib.request.Request(base + path, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


async def in_browser(step: Callable, *args):
    return await asyncio.to_thread(step, *args)


# --- tests ------------------------------------------------------------------------------

def check_login_and_runs_list(driver, base: str, seeded: Seeded, token: str) -> None:
    driver.delete_all_cookies()
    driver.get(base + "/")
    wait_for(driver, lambda d: d.find_element(By.ID, "login-form"), what="login form shown")
    assert count(driver, "#runs-table") == 0
    log_in(driver, base, token)
    assert driver.current_url == base + "/"
    names = run_names(driver)
    assert [n.split("-")[0] for n in names] == ["beta", "alpha"]  # newest first
    assert texts(driver, '#runs-table td[data-col="model"]') == ["other-model", "tiny-model"]
    assert texts(driver, '#runs-table td[data-col="state"]') == ["finished", "finished"]
    assert texts(driver, '#runs-table td[data-col="kind"]') == ["training", "training"]
    first = driver.find_element(By.CSS_SELECTOR, "#runs-table tbody tr")
    first.send_keys(Keys.ARROW_DOWN)
    focused = driver.switch_to.active_element
    assert focused.get_attribute("data-run-id") == seeded.alpha
    focused.send_keys(Keys.ENTER)
    wait_for(driver, lambda d: d.find_elements(By.ID, "run-name"), what="run opened by Enter")
    assert driver.current_url == f"{base}/runs/{seeded.alpha}"
    driver.back()
    wait_for(driver, lambda d: len(run_names(d)) == 2, what="back to the runs list")


def check_filters_and_logout(driver, base: str) -> None:
    driver.find_element(By.ID, "filter-name").send_keys("alpha")
    driver.find_element(By.CSS_SELECTOR, '#runs-filters button[type="submit"]').click()
    wait_for(driver, lambda d: [n.split("-")[0] for n in run_names(d)] == ["alpha"],
             what="name filter")
    driver.get(base + "/?model=other")
    wait_for(driver, lambda d: [n.split("-")[0] for n in run_names(d)] == ["beta"],
             what="model filter")
    driver.get(base + "/?state=RUN_STATE_RUNNING")
    wait_for(driver, lambda d: d.find_element(By.ID, "runs-empty"), what="state filter")
    assert_labelled(driver)
    assert no_horizontal_scroll(driver)
    driver.find_element(By.CSS_SELECTOR, '#logout-form button[type="submit"]').click()
    wait_for(driver, lambda d: d.find_element(By.ID, "login-form"), what="logged out")
    driver.get(base + "/")
    wait_for(driver, lambda d: d.find_element(By.ID, "login-form"), what="still logged out")
    assert count(driver, "#runs-table") == 0


async def test_login_and_runs_list(stack, seeded, web, browser):
    token = mint_token(stack.auth, seeded.user_a)
    await in_browser(check_login_and_runs_list, browser, web.url, seeded, token)
    await in_browser(check_filters_and_logout, browser, web.url)


def check_run_page(driver, base: str, run_id: str) -> None:
    driver.get(f"{base}/runs/{run_id}")
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#pred-table tbody tr"),
             what="run page rendered")
    assert driver.find_element(By.ID, "run-name").text.startswith("alpha-")
    facts = {k: texts(driver, f'[data-fact="{k}"]')[0]
             for k in ("Model", "Dataset", "State", "Samples", "Epochs", "Judge cost")}
    assert facts == {"Model": "tiny-model", "Dataset": "toy", "State": "finished",
                     "Samples": "12", "Epochs": "4", "Judge cost": "$0.1200"}
    check_charts(driver)
    assert table_rows(driver, "#epochs-table", ("epoch", "predictions", "step", "exact")) == [
        ("1", "12", "10", "25.0%"), ("2", "12", "20", "50.0%"), ("3", "12", "30", "75.0%"),
        ("4", "12", "40", "100.0%")]
    assert texts(driver, '#epochs-table td[data-col="metric:loss"]') == [
        "1.6", "1.2", "0.8", "0.4"]
    assert no_horizontal_scroll(driver)
    assert_labelled(driver)
    driver.set_window_size(1024, 700)  # a small laptop screen
    try:
        assert no_horizontal_scroll(driver)
    finally:
        driver.set_window_size(1280, 900)


def check_charts(driver) -> None:
    assert texts(driver, '[data-chart="loss"] path.line', "data-series") == ["eval_loss", "loss"]
    assert count(driver, '[data-chart="loss"] path.pt[data-series="loss"]') == 40
    assert count(driver, '[data-chart="loss"] path.pt[data-series="eval_loss"]') == 4
    assert count(driver, '[data-chart="loss"] line.boundary') == 4
    assert texts(driver, '[data-chart="exact"] path.pt', "data-y") == ["0.25", "0.5", "0.75", "1"]
    assert texts(driver, '[data-chart="mean-rule"] .legend li') == ["chrf (rules)"]
    assert texts(driver, '[data-chart="mean-llm"] path.pt', "data-y") == ["3", "5", "7", "9"]
    assert texts(driver, '[data-chart="pass"] .legend li') == [
        "chrf (rules)", "helpfulness (openai/gpt-test)"]
    titles = texts(driver, '[data-chart="mean-llm"] path.pt title', "textContent")
    assert titles[2] == "helpfulness (openai/gpt-test), epoch 3: 7"
    assert_nested_lines(driver, "pass")
    assert driver.find_element(By.ID, "metric-name").get_attribute("value") == "learning_rate"
    wait_for(driver, lambda d: count(d, '[data-chart="metric"] path.pt') == 40,
             what="the other metric's chart")


def assert_nested_lines(driver, chart: str) -> None:
    """Each line of the chart is drawn narrower, with smaller markers, than the one before
    it, so a line on the same values as an earlier one leaves that one showing."""
    widths = [float(w) for w in texts(driver, f'[data-chart="{chart}"] path.line',
                                      "stroke-width")]
    assert len(widths) >= 2 and widths == sorted(widths, reverse=True)
    assert len(set(widths)) == len(widths)
    colors = texts(driver, f'[data-chart="{chart}"] path.line', "stroke")
    assert len(set(colors)) == len(colors)


def check_predictions_table(driver) -> None:
    cols = ("epoch", "sample")
    assert table_rows(driver, "#pred-table", cols) == [("1", str(s)) for s in range(10)]
    first = driver.find_element(By.CSS_SELECTOR, "#pred-table tbody tr")
    assert first.find_element(By.CSS_SELECTOR, '[data-col="truth"]').text == "answer 0"
    wait_for(driver, lambda d: texts(d, '#pred-table tbody tr:first-child .chip',
                                     "data-criterion") == ["chrf", "exact_match", "helpfulness"],
             what="judgments in the predictions table")
    driver.find_element(By.ID, "pred-next").click()
    wait_for(driver, lambda d: table_rows(d, "#pred-table", cols) == [
        ("1", "10"), ("1", "11")] + [("2", str(s)) for s in range(8)], what="second page")
    assert driver.find_element(By.ID, "pred-page").text == "Page 2"
    driver.find_element(By.ID, "pred-prev").click()
    wait_for(driver, lambda d: table_rows(d, "#pred-table", cols)[0] == ("1", "0"),
             what="back to the first page")
    Select(driver.find_element(By.ID, "pred-epoch")).select_by_value("3")
    wait_for(driver, lambda d: table_rows(d, "#pred-table", cols) == [
        ("3", str(s)) for s in range(10)], what="epoch filter")
    driver.find_element(By.ID, "pred-next").click()
    wait_for(driver, lambda d: table_rows(d, "#pred-table", cols) == [("3", "10"), ("3", "11")],
             what="epoch filter, second page")
    assert not driver.find_element(By.ID, "pred-next").is_enabled()
    assert no_horizontal_scroll(driver)
    driver.find_element(By.CSS_SELECTOR, '#epochs-table tr[data-epoch="4"]').send_keys(Keys.ENTER)
    wait_for(driver, lambda d: table_rows(d, "#pred-table", cols) == [
        ("4", str(s)) for s in range(10)], what="Enter on an epoch row lists its predictions")
    assert Select(driver.find_element(By.ID, "pred-epoch")).first_selected_option.text == "epoch 4"


async def test_run_page_charts_epochs_and_predictions(stack, seeded, web, browser):
    token = mint_token(stack.auth, seeded.user_a)
    await in_browser(log_in, browser, web.url, token)
    await in_browser(check_run_page, browser, web.url, seeded.alpha)
    await in_browser(check_predictions_table, browser)
    assert await in_browser(severe_logs, browser) == []


def check_verdict_filter(driver, base: str, run_id: str) -> None:
    driver.get(f"{base}/runs/{run_id}")
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#pred-table tbody tr"),
             what="run page rendered")
    Select(driver.find_element(By.ID, "pred-epoch")).select_by_value("2")
    wait_for(driver, lambda d: d.find_element(By.ID, "pred-criterion").is_enabled())
    Select(driver.find_element(By.ID, "pred-criterion")).select_by_value("exact_match")
    wait_for(driver, lambda d: d.find_element(By.ID, "pred-passed").is_enabled())
    Select(driver.find_element(By.ID, "pred-passed")).select_by_value("true")
    wait_for(driver, lambda d: table_rows(d, "#pred-table", ("epoch", "sample")) == [
        ("2", str(s)) for s in range(6)], what="passed filter")
    Select(driver.find_element(By.ID, "pred-passed")).select_by_value("false")
    wait_for(driver, lambda d: table_rows(d, "#pred-table", ("epoch", "sample")) == [
        ("2", str(s)) for s in range(6, 12)], what="failed filter")


async def test_predictions_filtered_by_criterion_verdict(stack, seeded, web, browser):
    token = mint_token(stack.auth, seeded.user_a)
    await in_browser(log_in, browser, web.url, token)
    await in_browser(check_verdict_filter, browser, web.url, seeded.alpha)


def shown_prediction(driver, epoch: int) -> str:
    """The prediction text of the sample view's card for `epoch` (removed words left out)."""
    return driver.execute_script(
        "const card = document.querySelector("
        "  '#prediction-list .pred-card[data-epoch=\"' + arguments[0] + '\"] .pred-text');"
        "return Array.from(card.children).filter((n) => n.dataset.op !== 'removed')"
        "  .map((n) => n.textContent).join('');", epoch)


def check_sample_view(driver, base: str, run_id: str) -> None:
    driver.get(f"{base}/runs/{run_id}/samples/7")
    wait_for(driver, lambda d: count(d, "#prediction-list .pred-card") == EPOCHS,
             what="sample 7 across epochs")
    assert driver.find_element(By.ID, "sample-prompt").text == "question 7: what is the answer?"
    assert driver.find_element(By.ID, "sample-truth").text == "answer 7"
    assert [shown_prediction(driver, e) for e in range(1, EPOCHS + 1)] == [
        prediction_text("alpha", e, 7) for e in range(1, EPOCHS + 1)]
    assert texts(driver, "#prediction-list .marker", "data-match") == [
        "false", "false", "true", "true"]
    assert count(driver, '#prediction-list .pred-card[data-epoch="3"] [data-op="added"]') == 1
    assert count(driver, '#prediction-list .pred-card[data-epoch="3"] [data-op="removed"]') == 1
    verdicts = texts(driver, '#prediction-list .judgment[data-criterion="exact_match"]',
                     "data-verdict")
    assert verdicts == ["fail", "fail", "pass", "pass"]
    assert_labelled(driver)
    check_inert(driver)


def check_sample_switching(driver, base: str, run_id: str) -> None:
    driver.find_element(By.CSS_SELECTOR, ".pred-card").send_keys(Keys.ARROW_DOWN)
    assert driver.switch_to.active_element.get_attribute("data-epoch") == "2"
    driver.switch_to.active_element.send_keys(Keys.END)
    assert driver.switch_to.active_element.get_attribute("data-epoch") == str(EPOCHS)
    driver.find_element(By.ID, "next-sample").click()
    wait_for(driver, lambda d: d.find_element(By.ID, "sample-truth").text == "answer 8",
             what="next sample")
    assert driver.current_url == f"{base}/runs/{run_id}/samples/8"
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_LEFT)
    wait_for(driver, lambda d: d.find_element(By.ID, "sample-truth").text == "answer 7",
             what="arrow key back to sample 7")
    driver.get(f"{base}/runs/{run_id}/samples/1")
    wait_for(driver, lambda d: count(d, "#prediction-list .pred-card") == EPOCHS)
    reasons = texts(driver, '#prediction-list .pred-card[data-epoch="2"] '
                            '.judgment[data-criterion="helpfulness"] .j-reason', "textContent")
    assert reasons == [HTML_REASONING]
    check_inert(driver)
    assert no_horizontal_scroll(driver)


def check_missing_sample(driver, base: str, run_id: str) -> None:
    driver.get(f"{base}/runs/{run_id}/samples/{SAMPLES}")
    wait_for(driver, lambda d: d.find_element(By.ID, "sample-missing"), what="no such sample")
    assert driver.find_element(By.ID, "sample-missing").text == (
        f"This run has no predictions for sample {SAMPLES}.")
    assert driver.find_element(By.ID, "prev-sample").is_enabled()
    severe = severe_logs(driver)  # the browser logs the 404 that said so; nothing else failed
    assert len(severe) == 1 and f"/samples/{SAMPLES}?" in severe[0]["message"], severe
    assert "404 (Not Found)" in severe[0]["message"]


def check_inert(driver) -> None:
    """No script of the model's text ran (no alert open, nothing set) and none of its markup
    became elements."""
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 (raises when no alert is open)
    assert driver.execute_script("return typeof window.__pwned") == "undefined"
    assert driver.execute_script(
        "return document.querySelectorAll('main img, main script, main b, "
        "a[href^=\"javascript\"]').length") == 0
    assert driver.execute_script("return document.scripts.length") == 1


async def test_sample_view_diffs_switching_and_inert_model_text(stack, seeded, web, browser):
    token = mint_token(stack.auth, seeded.user_a)
    await in_browser(log_in, browser, web.url, token)
    await in_browser(check_sample_view, browser, web.url, seeded.alpha)
    await in_browser(check_sample_switching, browser, web.url, seeded.alpha)
    await in_browser(check_missing_sample, browser, web.url, seeded.alpha)
    assert await in_browser(severe_logs, browser) == []


def check_hostile_in_table(driver, base: str, run_id: str) -> None:
    driver.get(f"{base}/runs/{run_id}")
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#pred-table tbody tr"))
    Select(driver.find_element(By.ID, "pred-epoch")).select_by_value("2")
    sample = driver.find_element(By.ID, "pred-sample")
    sample.send_keys("7", Keys.TAB)
    wait_for(driver, lambda d: table_rows(d, "#pred-table", ("epoch", "sample")) == [("2", "7")],
             what="epoch 2, sample 7")
    cell = driver.find_element(By.CSS_SELECTOR, '#pred-table td[data-col="prediction"]')
    assert cell.get_attribute("textContent") == HOSTILE
    check_inert(driver)
    row = driver.find_element(By.CSS_SELECTOR, "#pred-table tbody tr")
    row.send_keys(Keys.ENTER)
    wait_for(driver, lambda d: d.current_url.endswith(f"/runs/{run_id}/samples/7"),
             what="Enter on a row opens its sample")


async def test_hostile_prediction_stays_text_in_the_table(stack, seeded, web, browser):
    token = mint_token(stack.auth, seeded.user_a)
    await in_browser(log_in, browser, web.url, token)
    await in_browser(check_hostile_in_table, browser, web.url, seeded.alpha)


def compared(driver) -> list[tuple[str, str]]:
    """(run A, run B) prediction text per epoch of the compared sample."""
    return [tuple(row.find_element(By.CSS_SELECTOR, f'td[data-col="prediction-{side}"] '
                                   '.pred-text').text for side in "ab")
            for row in driver.find_elements(By.CSS_SELECTOR, "#compare-sample tbody tr")]


def check_compare(driver, base: str, seeded: Seeded) -> None:
    driver.get(f"{base}/compare")
    wait_for(driver, lambda d: d.find_elements(By.ID, "run-b"), what="run pickers")
    Select(driver.find_element(By.ID, "run-a")).select_by_value(seeded.alpha)
    Select(driver.find_element(By.ID, "run-b")).select_by_value(seeded.beta)
    driver.find_element(By.CSS_SELECTOR, '#compare-form button[type="submit"]').click()
    wait_for(driver, lambda d: count(d, "#compare-sample tbody tr") == EPOCHS,
             what="compare page")
    assert driver.current_url == f"{base}/compare?a={seeded.alpha}&b={seeded.beta}&sample=0"
    assert table_rows(driver, "#compare-epochs", ("epoch", "exact-a", "exact-b")) == [
        ("1", "25.0%", "16.7%"), ("2", "50.0%", "33.3%"), ("3", "75.0%", "50.0%"),
        ("4", "100.0%", "\u2013")]
    assert texts(driver, '#config-diff tbody tr', "data-key") == ["learning_rate"]
    assert count(driver, '[data-chart="exact"] path.pt') == 7
    assert compared(driver) == [(prediction_text("alpha", e, 0), prediction_text("beta", e, 0)
                                 if e < EPOCHS else "(none)") for e in range(1, EPOCHS + 1)]
    driver.find_element(By.ID, "compare-next-sample").click()
    wait_for(driver, lambda d: compared(d)[0] == ("answer 1", "answer 1"),
             what="compare sample 1")
    assert compared(driver)[3] == (prediction_text("alpha", 4, 1), "(none)")
    assert driver.find_element(By.ID, "compare-truth").text == "answer 1"
    assert_labelled(driver)
    assert no_horizontal_scroll(driver)


async def test_compare_two_runs(stack, seeded, web, browser):
    token = mint_token(stack.auth, seeded.user_a)
    await in_browser(log_in, browser, web.url, token)
    await in_browser(check_compare, browser, web.url, seeded)


def check_no_cookie(driver, base: str, run_id: str) -> None:
    driver.delete_all_cookies()
    driver.get(f"{base}/runs/{run_id}")
    wait_for(driver, lambda d: d.find_element(By.ID, "login-form"), what="login form")
    assert count(driver, "#run-header, #epochs-table, #pred-table") == 0
    assert "alpha" not in driver.find_element(By.TAG_NAME, "main").text


def check_other_user(driver, base: str, run_id: str) -> None:
    driver.get(f"{base}/runs/{run_id}")
    wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR, ".error-message"),
             what="not found message")
    message = driver.find_element(By.CSS_SELECTOR, ".error-message").text
    assert message.startswith("Not found (HTTP 404): ")
    assert count(driver, "#run-header, #epochs-table, #pred-table") == 0
    driver.get(base + "/")
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#runs-table"))
    assert [n.split("-")[0] for n in run_names(driver)] == ["bravo"]


async def test_no_cookie_no_data_and_user_b_cannot_see_a(stack, seeded, web, browser):
    await in_browser(check_no_cookie, browser, web.url, seeded.alpha)
    status, body = await asyncio.to_thread(api_status, web.url, f"/v1/runs/{seeded.alpha}", None)
    assert (status, body["code"]) == (401, grpc.StatusCode.UNAUTHENTICATED.value[0])
    token_b = mint_token(stack.auth, seeded.user_b)
    await in_browser(log_in, browser, web.url, token_b)
    await in_browser(check_other_user, browser, web.url, seeded.alpha)
    status, body = await asyncio.to_thread(api_status, web.url, f"/v1/runs/{seeded.alpha}",
                                           token_b)
    assert (status, body["code"]) == (404, grpc.StatusCode.NOT_FOUND.value[0])


def live_row_and_point(driver, epoch: int) -> bool:
    rows = texts(driver, "#epochs-table tbody tr", "data-epoch")
    points = count(driver, '[data-chart="loss"] path.pt[data-series="loss"]')
    return rows == [str(e) for e in range(1, epoch + 1)] and points == epoch * STEPS_PER_EPOCH


def live_exact_rates(driver) -> list[str]:
    """The exact-match chart's points (from the judge, which judges after the commit)."""
    return texts(driver, '[data-chart="exact"] path.pt', "data-y")


def open_live_page(driver, base: str, run_id: str) -> None:
    driver.get(f"{base}/runs/{run_id}")
    wait_for(driver, lambda d: live_row_and_point(d, 1), what="live run page")
    wait_for(driver, lambda d: d.find_element(By.ID, "live-status").text.startswith("Live:"),
             what="live stream open")
    driver.execute_script("window.__sameDocument = true;"
                          "document.querySelector('#epochs-table tr[data-epoch=\"1\"]').focus()")


def wait_live(driver, condition: Callable, what: str, timeout: float = LIVE_WAIT_S) -> float:
    """Seconds until condition(driver) held, on the same document (no reload)."""
    started = time.monotonic()
    wait_for(driver, condition, timeout, what, poll=0.05)
    assert driver.execute_script("return window.__sameDocument") is True
    return time.monotonic() - started


async def test_live_epoch_appears_without_reload(stack, web, browser):
    user = f"web-live-{uuid.uuid4().hex[:6]}"
    token, md = mint_token(stack.auth, user), stack.metadata(user)
    async with grpc.aio.insecure_channel(stack.writer.address) as channel:
        stub = writer_pb2_grpc.PredictionWriterServiceStub(channel)
        run_id = await seed_run(stack, stub, user, "alpha", 1, "tiny-model", 0.001,
                                finish=False)
        await in_browser(log_in, browser, web.url, token)
        await in_browser(open_live_page, browser, web.url, run_id)
        await write_epoch(stub, md, run_id, "alpha", 2)
        elapsed = await in_browser(wait_live, browser, lambda d: live_row_and_point(d, 2),
                                   "epoch 2 row and its loss points")
        assert elapsed < LIVE_WAIT_S
        focused = await in_browser(browser.execute_script,
                                   "return document.activeElement.dataset.epoch")
        assert focused == "1"  # the redrawn table kept the keyboard focus
        # the judge scores the epoch after its commit: its point follows once judged
        await in_browser(wait_live, browser, lambda d: live_exact_rates(d) == ["0.25", "0.5"],
                         "epoch 2 exact-match point once judged", WAIT_S)
        await in_browser(wait_for, browser, lambda d: table_rows(
            d, "#epochs-table", ("epoch", "exact")) == [("1", "25.0%"), ("2", "50.0%")],
            WAIT_S, "epochs table with both exact-match rates")
        await stub.FinishRun(writer_pb2.FinishRunRequest(run_id=run_id), metadata=md)
        await in_browser(wait_live, browser, lambda d: d.find_element(
            By.ID, "live-status").text == "The run finished.", "finished shown")
        await in_browser(wait_for, browser,
                         lambda d: texts(d, '[data-fact="State"]') == ["finished"], WAIT_S,
                         "finished in the header")


async def test_live_page_says_when_the_run_failed(stack, web, browser):
    user = f"web-live-{uuid.uuid4().hex[:6]}"
    md = stack.metadata(user)
    async with grpc.aio.insecure_channel(stack.writer.address) as channel:
        stub = writer_pb2_grpc.PredictionWriterServiceStub(channel)
        run_id = await seed_run(stack, stub, user, "alpha", 1, "tiny-model", 0.001,
                                finish=False)
        await in_browser(log_in, browser, web.url, mint_token(stack.auth, user))
        await in_browser(open_live_page, browser, web.url, run_id)
        await stub.FinishRun(writer_pb2.FinishRunRequest(
            run_id=run_id, state=common_pb2.RUN_STATE_FAILED), metadata=md)
        await in_browser(wait_live, browser, lambda d: d.find_element(
            By.ID, "live-status").text == "The run failed.", "failed shown")
        await in_browser(wait_for, browser,
                         lambda d: texts(d, '[data-fact="State"]') == ["failed"], WAIT_S,
                         "failed in the header")


def check_runs_paging(driver, base: str, names: list[str]) -> None:
    driver.get(base + "/")
    wait_for(driver, lambda d: run_names(d) == names[:RUNS_PAGE], what="first page of runs")
    assert not driver.find_element(By.ID, "runs-prev").is_enabled()
    driver.find_element(By.ID, "runs-next").click()
    wait_for(driver, lambda d: run_names(d) == names[RUNS_PAGE:], what="second page of runs")
    assert not driver.find_element(By.ID, "runs-next").is_enabled()
    driver.find_element(By.ID, "runs-prev").click()
    wait_for(driver, lambda d: run_names(d) == names[:RUNS_PAGE], what="back to the first page")
    driver.back()
    wait_for(driver, lambda d: run_names(d) == names[RUNS_PAGE:], what="browser back")


async def test_runs_list_pages_with_tokens(stack, web, browser):
    user = f"web-pages-{uuid.uuid4().hex[:6]}"
    md = stack.metadata(user)
    async with grpc.aio.insecure_channel(stack.writer.address) as channel:
        stub = writer_pb2_grpc.PredictionWriterServiceStub(channel)
        for i in range(RUNS_PAGE + 2):
            await create_run(stub, md, name=f"paged-{i:02d}")
    names = [f"paged-{i:02d}" for i in reversed(range(RUNS_PAGE + 2))]  # newest first
    await in_browser(log_in, browser, web.url, mint_token(stack.auth, user))
    await in_browser(check_runs_paging, browser, web.url, names)


def check_long_sample(driver, base: str, run_id: str, epochs: int) -> None:
    driver.get(f"{base}/runs/{run_id}/samples/0")
    wait_for(driver, lambda d: count(d, "#prediction-list .pred-card") == SAMPLE_PAGE,
             what="first page of the sample's epochs")
    more = driver.find_element(By.ID, "more-epochs")
    assert more.is_displayed()
    more.click()
    wait_for(driver, lambda d: count(d, "#prediction-list .pred-card") == epochs,
             what="every epoch after Load more")
    assert not driver.find_element(By.ID, "more-epochs").is_displayed()
    assert texts(driver, "#prediction-list .pred-card", "data-epoch") == [
        str(e) for e in range(1, epochs + 1)]
    # the first card of the second page is diffed against the last one of the first page
    first_of_next = f'#prediction-list .pred-card[data-epoch="{SAMPLE_PAGE + 1}"]'
    assert texts(driver, first_of_next + ' [data-op="removed"]', "textContent") == [
        f"{SAMPLE_PAGE}"]
    assert texts(driver, first_of_next + ' [data-op="added"]', "textContent") == [
        f"{SAMPLE_PAGE + 1}"]


async def test_sample_view_loads_more_epochs(stack, web, browser):
    user = f"web-long-{uuid.uuid4().hex[:6]}"
    md = stack.metadata(user)
    epochs = SAMPLE_PAGE + 3
    async with grpc.aio.insecure_channel(stack.writer.address) as channel:
        stub = writer_pb2_grpc.PredictionWriterServiceStub(channel)
        run = await create_run(stub, md, name="long", config=RULES)
        await stub.WritePredictions(writer_pb2.WritePredictionsRequest(run_id=run.id, predictions=[
            item(e, 0, epoch=e, prediction=f"try number {e}") for e in range(1, epochs + 1)]),
            metadata=md)
    await in_browser(log_in, browser, web.url, mint_token(stack.auth, user))
    await in_browser(check_long_sample, browser, web.url, run.id, epochs)


def check_exact_from_trainer(driver, base: str, run_id: str) -> None:
    driver.get(f"{base}/runs/{run_id}")
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#pred-table tbody tr"),
             what="run page rendered")
    # the page re-reads the summary while the judge has tasks of the run (here: none to
    # store), redrawing the charts; read them once it is done
    wait_for(driver, lambda d: texts(d, '[data-fact="Judging"]') == ["up to date"],
             what="judging up to date")
    assert texts(driver, '[data-chart="exact"] path.pt', "data-y") == ["0.5", "0.75"]
    assert texts(driver, '[data-chart="exact"] .chart-note') == [
        "From the trainer pass (epochlens/exact_match)."]
    assert table_rows(driver, "#epochs-table", ("epoch", "exact")) == [
        ("1", "50.0%"), ("2", "75.0%")]
    assert count(driver, '[data-chart="pass"]') == 0  # nothing judged


async def test_exact_match_from_the_trainer_metric_without_a_judge(stack, web, browser):
    """Without judging, the exact-match rate per epoch is the trainer client's pass metric
    at each epoch's predictions step."""
    user = f"web-nojudge-{uuid.uuid4().hex[:6]}"
    md = stack.metadata(user)
    async with grpc.aio.insecure_channel(stack.writer.address) as channel:
        stub = writer_pb2_grpc.PredictionWriterServiceStub(channel)
        run = await create_run(stub, md, name="no-judge", config=NO_JUDGING)
        await stub.WritePredictions(writer_pb2.WritePredictionsRequest(run_id=run.id, predictions=[
            item(e * STEPS_PER_EPOCH, s, epoch=e) for e in (1, 2) for s in range(2)]),
            metadata=md)
        await stub.WriteMetrics(writer_pb2.WriteMetricsRequest(run_id=run.id, metrics=[
            writer_pb2.MetricInput(step=e * STEPS_PER_EPOCH, name="epochlens/exact_match",
                                   value=rate) for e, rate in ((1, 0.5), (2, 0.75))]),
            metadata=md)
        # finished: no live stream whose first events would redraw the page while it is read
        await stub.FinishRun(writer_pb2.FinishRunRequest(run_id=run.id), metadata=md)
    await in_browser(log_in, browser, web.url, mint_token(stack.auth, user))
    await in_browser(check_exact_from_trainer, browser, web.url, run.id)
