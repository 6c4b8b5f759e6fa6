"""`epochlens report` against the real in-process services on PostgreSQL, and the
file it writes opened in a real headless Chromium (Debian chromium and
chromium-driver, installed by `make browser`). The run's judgments (a rule
criterion and an LLM one, inserted into schema `judge` directly) show in the
header, the charts (one per kind of number), the epochs table and the sample
explorer, where a reasoning written in HTML stays text. The page opens on the
headline numbers (the config collapsed below them), every series of every chart
can be seen even where lines coincide, and nothing is wider than a 1280 px window.

The CLI is synchronous and the servers run on this thread's event loop, so the
CLI runs in a worker thread.
"""

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from typer.testing import CliRunner

from epochlens.v1 import writer_pb2
from services.cli.main import app
from services.cli.report import embed_json
from services.common.auth import mint_token
from services.judge.models import judgments_table
from tests.helpers import create_run, item
from tests.integration.test_query_judgments import (
    LLM_MODEL,
    NO_JUDGING,
    RULE,
    insert_rows,
    judgment_row,
    llm_row,
    settled,
)

# The services on PostgreSQL only: the report is a client of the query service alone.
ON_POSTGRES = pytest.mark.parametrize("stack", ["postgres"], indirect=True)

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HTML_PREDICTION = "<script>window.__pwned = 1</script><b>bold</b>"
HTML_REASONING = '<img src=x onerror="window.__pwned = 2"><b>bold</b> & <i>so on</i>'
TRUTHS = ["the answer is 0", "the answer is 1", "the answer is 2", None]
PROMPTS = ["question 0: what is the answer?", "question 1: what is the answer?",
           "<!--<script> question 2 </script>", "write a haiku"]
# Per sample, its prediction at epochs 1, 2, ...; sample 2 has no epoch 4, sample 3 (no
# ground truth) only epochs 1 and 2.
PREDICTIONS = [
    ["nonsense words here", "the answer maybe 0", "  the answer is 0\n", "the answer is 0"],
    ["hmm", HTML_PREDICTION, "the answer is one", "the answer is 1"],
    ["blah", "the answer is 2 or 3", "the answer is 2"],
    ["first try", "second try"],
]
EPOCH_ROWS = [("1", "4", "0 / 3"), ("2", "4", "0 / 3"), ("3", "3", "2 / 3"), ("4", "2", "2 / 2")]
# Judgments: chrf (rules) 0.25 * epoch, pass at 0.5; helpfulness (LLM) 2 * epoch + 1, pass at 7,
# billed $0.01 each, unscored for sample 3. Per epoch: chrf mean, helpfulness mean and pass
# rate, judge cost (LLM judgments: 4, 4, 3, 2).
JUDGE_ROWS = [("0.250", "3.00", "0.0%", "$0.0400"), ("0.500", "5.00", "0.0%", "$0.0400"),
              ("0.750", "7.00", "100.0%", "$0.0300"), ("1.000", "9.00", "100.0%", "$0.0200")]
CHART_TOP, CHART_PLOT_HEIGHT = 16, 188  # CHART.top, CHART.height - top - bottom in the page
# Per chart (in page order), its legend: one entry per series.
LEGENDS = {"exact": ["exact-match rate"], "mean-1": ["chrf (rules) mean score"],
           "mean-10": [f"helpfulness ({LLM_MODEL}) mean score"],
           "pass": ["chrf (rules) pass rate", f"helpfulness ({LLM_MODEL}) pass rate"]}
# Each chart point's top edge (its marker's bounding box, in window coordinates, a quarter
# unit inside the stroke): the element drawn there, which must be that point itself and not a
# point or line of another series drawn over it.
HIDDEN_POINTS_JS = """
const hidden = [];
for (const chart of document.querySelectorAll('svg.chart')) {
  chart.scrollIntoView({block: 'center'});
  const matrix = chart.getScreenCTM();
  for (const point of chart.querySelectorAll('.pt')) {
    const box = point.getBBox();
    const probe = new DOMPoint(box.x + box.width / 2, box.y + 0.25).matrixTransform(matrix);
    const found = document.elementFromPoint(probe.x, probe.y);
    if (found !== point) hidden.push([point.dataset.series, point.dataset.epoch,
      found ? found.getAttribute('data-series') || found.tagName : null]);
  }
}
window.scrollTo(0, 0);
return hidden;
"""
SHOWN_TEXT_JS = """
const card = document.querySelector(
  '#prediction-list .pred-card[data-epoch="' + arguments[0] + '"] .pred-text');
return Array.from(card.childNodes).filter((n) => n.nodeName !== 'DEL')
  .map((n) => n.textContent).join('');
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a fresh profile; skipped only when it is not installed."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (install them with `make browser`)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                "--window-size=1280,1600",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


async def seeded_run(stack, writer_stub, user: str) -> str:
    md = stack.metadata(user)
    run = await create_run(writer_stub, md, name="report-test",
                           config={"learning_rate": 0.001, "predictions": {"every": "epoch"},
                                   **NO_JUDGING})
    items = [item(epoch * 10, sample, epoch=epoch, prompt=PROMPTS[sample],
                  prediction=text, completion_tokens=5)
             for sample, texts in enumerate(PREDICTIONS)
             for epoch, text in enumerate(texts, 1)]
    for sent in items:
        truth = TRUTHS[sent.sample_index]
        if truth is None:
            sent.ClearField("ground_truth")
        else:
            sent.ground_truth = truth
    await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run.id, predictions=items), metadata=md)
    await writer_stub.FinishRun(writer_pb2.FinishRunRequest(run_id=run.id), metadata=md)
    await settled(stack, run.id)
    await insert_rows(stack, judgments_table, judge_rows(run.id, user, items))
    return run.id


def judge_rows(run_id: str, user: str, items) -> list[dict]:
    rows = []
    for sent in items:
        e, s = sent.epoch, sent.sample_index
        rows.append(judgment_row(run_id, user, e, sent.step, s, "chrf", RULE, 0.25 * e, 0.5))
        reasoning = HTML_REASONING if (e, s) == (2, 1) else f"helpful at epoch {e}"
        rows.append(llm_row(run_id, user, e, sent.step, s, 0 if s == 3 else 2 * e + 1,
                            reasoning=reasoning))
    return rows


async def run_cli(stack, user: str, *args: str):
    env = {"EPOCHLENS_CLI_QUERY_ADDRESS": stack.query.address,
           "EPOCHLENS_CLI_TOKEN": mint_token(stack.auth, user)}
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


def texts(driver, selector: str, attribute: str | None = None) -> list[str]:
    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return [e.get_attribute(attribute) if attribute else e.text for e in found]


def assert_headline_first_and_config_collapsed(driver) -> None:
    """Under the run's name come its headline numbers; the config is a collapsed table of
    settings further down, opened by its summary."""
    header = driver.find_element(By.ID, "run-header")
    assert [e.tag_name for e in header.find_elements(By.XPATH, "./*")][:3] == ["h1", "div", "dl"]
    assert header.find_element(By.XPATH, "./*[2]").get_attribute("id") == "headline"
    assert texts(driver, "#headline [data-headline]", "data-headline") == [
        "Exact match", "Epochs", "Samples", "Predictions"]
    assert driver.find_element(By.CSS_SELECTOR, '[data-headline="Exact match"] .big').text \
        == "100.0%"
    assert "2 / 2 at epoch 4; 0.0% at epoch 1" in driver.find_element(
        By.CSS_SELECTOR, '[data-headline="Exact match"]').text
    details = driver.find_element(By.ID, "config-details")
    assert details.get_attribute("open") is None
    assert not driver.find_element(By.ID, "run-config").is_displayed()
    above = driver.execute_script(
        "return document.getElementById('headline').getBoundingClientRect().bottom <= "
        "document.getElementById('config-details').getBoundingClientRect().top")
    assert above is True
    details.find_element(By.TAG_NAME, "summary").click()
    rows = {row.get_attribute("data-key"): row.find_element(By.TAG_NAME, "td").text
            for row in driver.find_elements(By.CSS_SELECTOR, "#run-config tr")}
    assert rows["learning_rate"] == "0.001" and rows["predictions.every"] == "epoch"
    assert driver.find_element(By.CSS_SELECTOR, "#config-details summary").text == (
        f"Config ({len(rows)} settings)")
    details.find_element(By.TAG_NAME, "summary").click()
    assert details.get_attribute("open") is None


def assert_fits_1280(driver) -> None:
    """Neither the page nor the epochs table scrolls sideways in a 1280 px window."""
    assert driver.execute_script("return window.innerWidth") == 1280
    widths = driver.execute_script(
        "const d = document.documentElement, box = document.getElementById('epochs-box');"
        "return [d.scrollWidth, d.clientWidth, box.scrollWidth, box.clientWidth];")
    assert widths[0] <= widths[1], widths
    assert widths[2] <= widths[3], widths


def assert_overview(driver) -> None:
    assert driver.find_element(By.CSS_SELECTOR, "#run-header h1").text == "report-test"
    points = texts(driver, 'svg.chart[data-chart="exact"] .pt[data-series="exact_match"]',
                   "data-epoch")
    assert points == ["1", "2", "3", "4"]
    rows = driver.find_elements(By.CSS_SELECTOR, "#epochs-table tbody tr")
    assert [tuple(texts(row, f'td[data-col="{c}"]')[0] for c in ("epoch", "predictions", "exact"))
            for row in rows] == EPOCH_ROWS
    assert [tuple(texts(row, f'td [data-col="{c}"], td[data-col="{c}"]')[0]
                  for c in ("mean:c0", "mean:c1", "pass:c1", "judge_cost"))
            for row in rows] == JUDGE_ROWS
    assert texts(driver, "#epochs-table th", "data-col") == [
        "epoch", "latest_step", "predictions", "exact", "rate", "judge:c0", "judge:c1",
        "judge_cost", "written"]
    assert texts(driver, '[data-fact="Judge cost"]') == ["$0.1300"]
    assert texts(driver, '[data-fact="Judge criteria"]') == [
        f"chrf (rules), helpfulness ({LLM_MODEL})"]


def assert_charts(driver) -> None:
    """One chart per kind of number, each with its own legend; every criterion drawn per
    epoch on its own scale (the LLM mean on 0..10, a point of the first series of a chart is
    a circle at CHART_TOP + (1 - value / max) * CHART_PLOT_HEIGHT)."""
    charts = texts(driver, "svg.chart", "data-chart")
    assert charts == list(LEGENDS)
    for chart, labels in LEGENDS.items():
        legend = texts(driver, f'figure[data-chart="{chart}"] .legend li')
        assert legend == labels, chart
    for series in ("mean:c0", "pass:c0", "mean:c1", "pass:c1"):
        points = texts(driver, f'svg.chart .pt[data-series="{series}"]', "data-epoch")
        assert points == ["1", "2", "3", "4"], series
    values = dict(zip(texts(driver, 'svg.chart .pt[data-epoch="3"]', "data-series"),
                      texts(driver, 'svg.chart .pt[data-epoch="3"]', "data-value"), strict=True))
    assert values == {"exact_match": "0.6666666666666666", "mean:c0": "0.75", "mean:c1": "7",
                      "pass:c0": "1", "pass:c1": "1"}
    for series, value, top in (("exact_match", 2 / 3, 1), ("mean:c0", 0.75, 1),
                               ("mean:c1", 7.0, 10), ("pass:c0", 1.0, 1)):
        cy = texts(driver, f'svg.chart circle.pt[data-series="{series}"][data-epoch="3"]', "cy")
        assert [float(y) for y in cy] == [round(CHART_TOP + (1 - value / top)
                                                * CHART_PLOT_HEIGHT, 1)], series
    titles = [t.get_attribute("textContent") for t in driver.find_elements(
        By.CSS_SELECTOR, 'svg.chart .pt[data-series="mean:c1"] title')]
    assert titles[2] == f"helpfulness ({LLM_MODEL}) mean score, epoch 3: 7.00"
    assert "rule criteria 0 to 1" in driver.find_element(By.ID, "chart-note").text


def assert_every_series_visible(driver) -> None:
    """The two pass rates coincide at epochs 1, 3 and 4 (0%, 100%, 100%): they differ in
    dash, width and marker, keep the criterion's colour of the mean chart, and no point of
    any chart is covered by another."""
    lines = driver.find_elements(By.CSS_SELECTOR, 'svg.chart[data-chart="pass"] path.line')
    looks = [(e.get_attribute("stroke-dasharray"), e.get_attribute("stroke-width"))
             for e in lines]
    assert len(looks) == 2 and looks[0] != looks[1]
    shapes = {texts(driver, f'svg.chart .pt[data-series="{s}"]', "data-shape")[0]
              for s in ("pass:c0", "pass:c1")}
    assert len(shapes) == 2
    color = {e.get_attribute("data-series"): e.get_attribute("stroke")
             for e in driver.find_elements(By.CSS_SELECTOR, "svg.chart path.line")}
    assert color["mean:c0"] == color["pass:c0"] != color["pass:c1"] == color["mean:c1"]
    assert color["exact_match"] not in (color["pass:c0"], color["pass:c1"])
    assert driver.execute_script(HIDDEN_POINTS_JS) == []


def assert_sample_shown(driver, index: int) -> None:
    assert driver.find_element(By.ID, "sample-prompt").text == PROMPTS[index].strip()
    truth = TRUTHS[index]
    assert driver.find_element(By.ID, "sample-truth").text == (truth or "(no ground truth)")
    cards = texts(driver, "#prediction-list .pred-card", "data-epoch")
    assert cards == [str(e) for e in range(1, len(PREDICTIONS[index]) + 1)]
    markers = texts(driver, "#prediction-list .marker", "data-match")
    assert markers == [None if truth is None else str(p.strip() == truth).lower()
                       for p in PREDICTIONS[index]]
    verdicts = [texts(card, ".judgment", "data-verdict") for card in driver.find_elements(
        By.CSS_SELECTOR, "#prediction-list .pred-card")]
    assert verdicts == [["pass" if e >= 2 else "fail",
                         "unscored" if index == 3 else "pass" if e >= 3 else "fail"]
                        for e in range(1, len(PREDICTIONS[index]) + 1)]


def assert_model_text_is_inert(driver) -> None:
    assert driver.execute_script(SHOWN_TEXT_JS, 2) == HTML_PREDICTION
    assert driver.find_elements(By.CSS_SELECTOR, "#prediction-list ins")
    reasons = texts(driver, '#prediction-list .pred-card[data-epoch="2"] .j-reason',
                    "textContent")
    assert reasons == ["chrf of 20/1", HTML_REASONING]
    assert driver.execute_script("return typeof window.__pwned") == "undefined"
    assert driver.execute_script("return document.querySelectorAll('b, i, img').length") == 0
    assert driver.execute_script("return document.scripts.length") == 2


def assert_unscored_says_why(driver) -> None:
    item = driver.find_element(By.CSS_SELECTOR, '#prediction-list .pred-card[data-epoch="1"] '
                                                '.judgment[data-criterion="helpfulness"]')
    assert item.get_attribute("data-verdict") == "unscored"
    assert texts(item, ".j-score") == ["\u2013"]
    assert texts(item, ".j-reason") == ["reply could not be parsed"]


@ON_POSTGRES
async def test_report_renders_and_explores_samples(stack, writer_stub, browser, tmp_path):
    user = f"report-{uuid.uuid4().hex[:6]}"
    run_id = await seeded_run(stack, writer_stub, user)
    output = tmp_path / "report.html"
    result = await run_cli(stack, user, "report", run_id, "-o", str(output))
    assert result.exit_code == 0, result.output
    assert "4 epochs, 4 samples, 13 predictions" in result.stdout
    browser.get(output.as_uri())
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(height + 200, 6000))
    screenshot = tmp_path / "report.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 20_000
    assert_headline_first_and_config_collapsed(browser)
    assert_fits_1280(browser)
    assert_overview(browser)
    assert_charts(browser)
    assert_every_series_visible(browser)
    assert_sample_shown(browser, 0)
    browser.find_element(By.ID, "next-sample").click()
    assert_sample_shown(browser, 1)
    assert_model_text_is_inert(browser)
    Select(browser.find_element(By.ID, "sample-select")).select_by_value("2")
    assert_sample_shown(browser, 2)
    browser.find_element(By.ID, "next-sample").click()
    assert_sample_shown(browser, 3)
    assert_unscored_says_why(browser)
    assert not browser.find_element(By.ID, "next-sample").is_enabled()
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []


MANY = [f"a_rather_long_rule_criterion_name_{k}" for k in range(9)]


@ON_POSTGRES
async def test_many_coinciding_criteria_fit_the_page_and_stay_visible(stack, writer_stub,
                                                                      browser, tmp_path):
    """Nine rule criteria with long names, every one scoring 1.0 (all lines on one another
    in both judge charts), over six epochs: each chart point can still be seen, and the
    page does not scroll sideways at 1280 px."""
    user = f"report-{uuid.uuid4().hex[:6]}"
    md = stack.metadata(user)
    run = await create_run(writer_stub, md, name="many-criteria", config=NO_JUDGING)
    items = [item(epoch * 10, sample, epoch=epoch, prediction="yes", ground_truth="yes")
             for epoch in range(1, 7) for sample in range(2)]
    await writer_stub.WritePredictions(writer_pb2.WritePredictionsRequest(
        run_id=run.id, predictions=items), metadata=md)
    await writer_stub.FinishRun(writer_pb2.FinishRunRequest(run_id=run.id), metadata=md)
    await settled(stack, run.id)
    await insert_rows(stack, judgments_table, [
        judgment_row(run.id, user, sent.epoch, sent.step, sent.sample_index, name, RULE, 1.0,
                     0.5) for sent in items for name in MANY])
    output = tmp_path / "many.html"
    result = await run_cli(stack, user, "report", run.id, "-o", str(output))
    assert result.exit_code == 0, result.output
    browser.set_window_size(1280, 1600)
    browser.get(output.as_uri())
    assert texts(browser, "svg.chart", "data-chart") == ["exact", "mean-1", "pass"]
    assert [len(texts(browser, f'figure[data-chart="{c}"] .legend li')) for c in
            ("exact", "mean-1", "pass")] == [1, 9, 9]
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart .pt")) == 6 * (1 + 9 + 9)
    assert browser.execute_script(HIDDEN_POINTS_JS) == []
    widths = browser.execute_script(
        "const d = document.documentElement; return [d.scrollWidth, d.clientWidth];")
    assert widths[0] <= widths[1], widths
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


@ON_POSTGRES
async def test_report_of_unknown_run_is_one_line_and_writes_nothing(stack, tmp_path):
    output = tmp_path / "missing.html"
    run_id = str(uuid.uuid4())
    result = await run_cli(stack, "report-nobody", "report", run_id, "-o", str(output))
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: run {run_id} not found"
    assert not output.exists()


@ON_POSTGRES
async def test_report_with_rejected_token_is_one_line(stack, tmp_path):
    env = {"EPOCHLENS_CLI_QUERY_ADDRESS": stack.query.address, "EPOCHLENS_CLI_TOKEN": "bogus"}
    result = await asyncio.to_thread(CliRunner().invoke, app,
                                     ["report", str(uuid.uuid4()), "-o", str(tmp_path / "x")],
                                     env=env)
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: token rejected")


@ON_POSTGRES
async def test_report_of_a_run_without_predictions(stack, writer_stub, browser, tmp_path):
    user = f"report-{uuid.uuid4().hex[:6]}"
    run = await create_run(writer_stub, stack.metadata(user), name="empty")
    output = tmp_path / "empty.html"
    result = await run_cli(stack, user, "report", run.id, "-o", str(output))
    assert result.exit_code == 0, result.output
    browser.get(output.as_uri())
    assert browser.find_element(By.CSS_SELECTOR, "#run-header h1").text == "empty"
    assert browser.find_elements(By.CSS_SELECTOR, "svg.chart") == []
    assert "No samples recorded yet." in browser.find_element(By.ID, "explorer-box").text
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_embedded_json_cannot_close_or_comment_out_its_script_element():
    payload = {"text": "</script><!--<script>a & b\u2028</SCRIPT>"}
    embedded = embed_json(payload)
    assert not set("<>&") & set(embedded)
    assert embedded.isascii()
    assert json.loads(embedded) == payload
