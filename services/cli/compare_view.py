"""How `epochlens compare RUN` (without a SAMPLE) compares two runs or two epochs
(QueryService.CompareRuns), and the judge-human agreement table of `summary`: the request
built from the options, the tables of deltas, changed samples and agreements."""

from rich.console import Group
from rich.table import Column, Table
from rich.text import Text

from epochlens.v1 import judge_pb2, query_pb2
from services.cli.client import CliError
from services.cli.render import new_table, percent
from services.cli.stats import format_score, judge_type_name


def compare_request(run_id: str, baseline: str | None, epoch: int | None,
                    baseline_epoch: int | None, best: str | None, first: bool, last: bool,
                    max_changes: int) -> query_pb2.CompareRunsRequest:
    """The CompareRunsRequest of the options; --baseline-epoch, --best, --first and --last
    exclude each other (a CliError with exit status 2)."""
    chosen = [name for name, given in (("--baseline-epoch", baseline_epoch is not None),
                                       ("--best", best is not None), ("--first", first),
                                       ("--last", last)) if given]
    if len(chosen) > 1:
        raise CliError(f"{' and '.join(chosen)} exclude each other", 2)
    choice = (query_pb2.EPOCH_CHOICE_BEST if best is not None
              else query_pb2.EPOCH_CHOICE_FIRST if first
              else query_pb2.EPOCH_CHOICE_LAST if last else query_pb2.EPOCH_CHOICE_UNSPECIFIED)
    return query_pb2.CompareRunsRequest(
        run_id=run_id, epoch=epoch, baseline_run_id=baseline or "",
        baseline_epoch=baseline_epoch, baseline_choice=choice, best_criterion=best or "",
        max_changes=max_changes)


def _signed(value: float, judge_type: int) -> str:
    text = format_score(abs(value), judge_type)
    return f"-{text}" if value < 0 else f"+{text}"


def _points(rate: float) -> str:
    return f"{rate * 100:+.1f} pts"


def comparison_header(reply: query_pb2.CompareRunsResponse) -> Text:
    same = reply.baseline_run_id == reply.run_id
    baseline = (f"epoch {reply.baseline_epoch}" if same
                else f"run {reply.baseline_run_id} epoch {reply.baseline_epoch}")
    return Text(f"run {reply.run_id} epoch {reply.epoch} against {baseline}: "
                f"{reply.shared_samples} shared samples; intervals: "
                f"{reply.confidence_level * 100:g}% paired bootstrap, "
                f"{reply.bootstrap_resamples} resamples")


def deltas_table(reply: query_pb2.CompareRunsResponse) -> Table:
    """Per criterion and judge: pairs, means and pass rates of both sides, the deltas with
    their intervals, and how many samples went up, down or stayed."""
    table = new_table(Column("criterion", overflow="fold"), Column("judge", overflow="fold"),
                      "pairs", "baseline", "candidate", "delta", "interval", "pass rate",
                      "pass delta", "interval", "up", "down", "same")
    for d in reply.deltas:
        kind = d.judge_type
        table.add_row(
            Text(d.criterion), Text(d.judge_model), str(d.paired_count),
            format_score(d.baseline_mean, kind), format_score(d.candidate_mean, kind),
            _signed(d.mean_delta, kind),
            f"[{_signed(d.mean_delta_low, kind)}, {_signed(d.mean_delta_high, kind)}]",
            f"{percent(d.baseline_pass_rate)} -> {percent(d.candidate_pass_rate)}",
            _points(d.pass_rate_delta),
            f"[{_points(d.pass_rate_delta_low)}, {_points(d.pass_rate_delta_high)}]",
            str(d.improved_count), str(d.regressed_count), str(d.unchanged_count))
    return table


def _verdict(passed: bool) -> str:
    return "pass" if passed else "fail"


def changes_table(reply: query_pb2.CompareRunsResponse) -> Table:
    """The changed samples in the service's order: verdict regressions, improvements, then
    the largest score changes."""
    table = new_table("sample", "baseline sample", Column("criterion", overflow="fold"),
                      Column("judge", overflow="fold"), "baseline", "candidate", "change")
    for c in reply.changes:
        kind = c.judge_type
        flip = c.baseline_passed != c.candidate_passed
        change = Text("regressed" if flip and c.baseline_passed
                      else "improved" if flip else _signed(
                          c.candidate_score - c.baseline_score, kind),
                      "bold red" if flip and c.baseline_passed else "bold green" if flip else "")
        table.add_row(str(c.sample_index), str(c.baseline_sample_index), Text(c.criterion),
                      Text(c.judge_model),
                      f"{format_score(c.baseline_score, kind)} {_verdict(c.baseline_passed)}",
                      f"{format_score(c.candidate_score, kind)} {_verdict(c.candidate_passed)}",
                      change)
    return table


def comparison(reply: query_pb2.CompareRunsResponse) -> Group:
    """The whole text view of a CompareRunsResponse."""
    parts: list = [comparison_header(reply)]
    if not reply.deltas:
        parts.append(Text("no criterion was scored on both sides of a shared sample"))
        return Group(*parts)
    parts += [deltas_table(reply), Text("changed samples (verdict flips first)", "bold")]
    parts.append(changes_table(reply) if reply.changes else Text("none"))
    return Group(*parts)


def optional(message, name: str) -> float | None:
    return getattr(message, name) if message.HasField(name) else None


def agreement_table(agreements: list[judge_pb2.JudgeAgreement]) -> Table:
    """Per criterion and rule or LLM judge: pairs with people, agreement on pass/fail,
    Cohen's kappa and Spearman ('-' where undefined)."""
    table = new_table(Column("criterion", overflow="fold"), "type",
                      Column("judge", overflow="fold"), "pairs", "agreement", "kappa",
                      "spearman")
    for a in agreements:
        kappa, rho = optional(a, "cohen_kappa"), optional(a, "spearman")
        table.add_row(Text(a.criterion), judge_type_name(a.judge_type), Text(a.judge_model),
                      str(a.pairs), percent(a.percent_agreement),
                      "-" if kappa is None else f"{kappa:.3f}",
                      "-" if rho is None else f"{rho:.3f}")
    return table
