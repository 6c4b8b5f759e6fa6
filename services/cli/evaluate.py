"""`epochlens eval DATASET`: evaluate a model, an endpoint or ready responses on a dataset.

The rows are stored as an evaluation run through EvaluationService.Evaluate (writer) in
chunks; the run's judge config (rules, and LLM judges when asked) judges them. The request id
is derived from the dataset's content, the model (or endpoint) and the run name, so running
the same command again continues the same run: the rows already stored (QueryService
ListPredictions) are neither generated nor sent again. Before any paid LLM judging the cost
estimate (JudgeService.EstimateCost) is printed and confirmed (or --yes). Then it waits for
judging (GetRunSummary until nothing is pending), prints the per-criterion summary (or --json)
and checks --fail-under.

Exit status: 0 done; 1 a --fail-under threshold not met, rows whose generation failed (the
run stays open: run the command again), or judging not finished (LLM judging paused, or still
pending after EPOCHLENS_CLI_EVAL_WAIT_S; run the command again to wait more); 2 a usage
error (bad option, unreadable dataset, unknown criterion in --fail-under, no confirmation
possible without a terminal); 130 interrupted (Ctrl-C): what was stored is kept, and the
same command continues the run.
"""

from pathlib import Path

import typer

from services.cli.context import cli_context, one_line_errors

DATASET = typer.Argument(..., help="A .jsonl/.json or .csv file, or a directory written by "
                         "datasets.Dataset.save_to_disk.")
MODEL = typer.Option(None, "--model", help="Local Hugging Face model directory that "
                     "generates the responses.")
ADAPTER = typer.Option(None, "--adapter", help="PEFT LoRA adapter directory on top of "
                       "--model.")
JUDGE_CONFIG = typer.Option(None, "--judge-config", help="JSON file: the judge section of "
                            "a run config (or a run config holding one).")
FAIL_UNDER = typer.Option([], "--fail-under", help="CRITERION=VALUE (mean score) or "
                          "CRITERION=pass:VALUE (pass rate): exit 1 when below. Repeatable.")


def evaluate(
    ctx: typer.Context,
    dataset: Path = DATASET,
    name: str | None = typer.Option(None, "--name", help="Run name (default: the dataset's "
                                    "file name without suffix); part of the run's identity."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N rows."),
    model: Path | None = MODEL,
    adapter: Path | None = ADAPTER,
    endpoint: str | None = typer.Option(None, "--endpoint", help="Name of an OpenAI-compatible "
                                        "endpoint the operator configured for the judge "
                                        "(EPOCHLENS_JUDGE_LLM_ENDPOINTS) that generates."),
    endpoint_model: str | None = typer.Option(None, "--endpoint-model", help="Model to ask "
                                              "--endpoint for."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Prompts a local "
                                          "model generates together (EPOCHLENS_CLI_EVAL_"
                                          "BATCH_SIZE)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1, help="Most new "
                                              "tokens per response (EPOCHLENS_CLI_EVAL_MAX_"
                                              "NEW_TOKENS)."),
    chunk_size: int | None = typer.Option(None, "--chunk-size", min=1, help="Rows per Evaluate "
                                          "call (EPOCHLENS_CLI_EVAL_CHUNK_SIZE)."),
    judge_config: Path | None = JUDGE_CONFIG,
    llm: str | None = typer.Option(None, "--llm", help="LLM judge PROVIDER/MODEL, e.g. "
                                   "openai/gpt-4o-mini."),
    criteria: str | None = typer.Option(None, "--criteria", help="Comma-separated criteria: "
                                        "rule names select rule judges, others LLM criteria."),
    budget_usd: float | None = typer.Option(None, "--budget-usd", min=0, help="Most the LLM "
                                            "judging of this run may spend, US dollars."),
    on_error: str | None = typer.Option(None, "--on-error", help="LLM judge errors: skip, "
                                        "retry or fail."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Accept the cost estimate without "
                             "asking."),
    fail_under: list[str] = FAIL_UNDER,
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Evaluate responses on DATASET: store them as an evaluation run, judge them, summarize.

    Responses come from the rows ('response' column), a local model (--model, --adapter) or
    an endpoint (--endpoint, --endpoint-model). Running the same command again resumes.
    """
    from services.cli import eval_run  # datasets, trainer client, judge rules: only here

    eval_run.execute(cli_context(ctx).settings, eval_run.Options(
        dataset=dataset, name=name, limit=limit, model=model, adapter=adapter,
        endpoint=endpoint, endpoint_model=endpoint_model, batch_size=batch_size,
        max_new_tokens=max_new_tokens, chunk_size=chunk_size, judge_config=judge_config,
        llm=llm, criteria=criteria, budget_usd=budget_usd, on_error=on_error, yes=yes,
        fail_under=fail_under, as_json=as_json))


register = one_line_errors(evaluate)
