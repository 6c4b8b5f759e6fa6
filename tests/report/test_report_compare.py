"""The report's comparison (--compare-to) and agreement sections, in headless Chromium
(PostgreSQL only, like the other browser tests): the tables show what CompareRuns and
GetRunSummary.agreements say, and each section stays hidden without data."""

import uuid

from selenium.webdriver.common.by import By

from tests.integration.test_agreement import crafted_run
from tests.integration.test_compare import two_epoch_run
from tests.report.test_report import ON_POSTGRES, browser, run_cli, texts

__all__ = ["browser"]  # the module's browser fixture, shared


def table_rows(driver, table_id: str) -> list[list[str]]:
    return [texts(row, "td") for row in
            driver.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr")]


@ON_POSTGRES
async def test_report_compares_epochs_and_hides_agreement_without_people(
        stack, writer_stub, browser, tmp_path):
    user = f"report-cmp-{uuid.uuid4().hex[:6]}"
    run_id = await two_epoch_run(stack, writer_stub, user)
    output = tmp_path / "compare.html"
    result = await run_cli(stack, user, "report", run_id, "-o", str(output),
                           "--compare-to", run_id)
    assert result.exit_code == 0, result.output
    browser.get(output.as_uri())
    assert browser.find_element(By.ID, "comparison-section").is_displayed()
    assert not browser.find_element(By.ID, "agreement-section").is_displayed()
    title = browser.find_element(By.ID, "comparison-title").text
    assert title.startswith("Epoch 2 against epoch 1: 5 shared samples; 95% paired")
    deltas = table_rows(browser, "comparison-table")
    assert [r[:6] for r in deltas] == [["chrf", "rules", "5", "5.000", "5.300", "+0.300"],
                                       ["helpfulness", "human", "2", "7.50", "7.00", "-0.50"]]
    assert [r[-3:] for r in deltas] == [["3", "1", "1"], ["1", "1", "0"]]
    changes = table_rows(browser, "changes-table")
    assert [r[:3] for r in changes] == [["2", "2", "chrf"], ["1", "1", "helpfulness"],
                                        ["0", "0", "chrf"], ["0", "0", "helpfulness"],
                                        ["4", "4", "chrf"], ["3", "3", "chrf"]]
    assert changes[0][4:] == ["6.000 pass", "3.000 fail"]
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


@ON_POSTGRES
async def test_report_shows_agreement_and_no_comparison_unless_asked(stack, writer_stub,
                                                                     browser, tmp_path):
    user = f"report-agree-{uuid.uuid4().hex[:6]}"
    run_id = await crafted_run(stack, writer_stub, user)
    output = tmp_path / "agree.html"
    result = await run_cli(stack, user, "report", run_id, "-o", str(output))
    assert result.exit_code == 0, result.output
    browser.get(output.as_uri())
    assert not browser.find_element(By.ID, "comparison-section").is_displayed()
    assert browser.find_element(By.ID, "agreement-section").is_displayed()
    rows = table_rows(browser, "agreement-table")
    assert [r[:5] for r in rows] == [
        ["accuracy", "rule", "rules", "5", "40.0%"],
        ["accuracy", "llm", "anthropic/claude-test", "1", "100.0%"],
        ["accuracy", "llm", "openai/gpt-test", "9", rows[2][4]]]
    assert rows[0][5:] == ["0.000", "\u2013"] and rows[1][5:] == ["\u2013", "\u2013"]
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
