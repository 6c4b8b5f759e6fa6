"""The pairwise judging part of `epochlens summary` (RunSummary.pairwise): a table and its
--json form."""

from collections.abc import Iterable

from rich.table import Table

from epochlens.v1 import judge_pb2
from services.cli.render import new_table, percent, usd

TITLE = ("pairwise judging against the baseline (each pair asked in both orders; win rate = "
         "(wins + ties/2) / scored pairs, with its confidence interval)")


def baseline_label(s: judge_pb2.PairwiseSummary, run_id: str) -> str:
    """'epoch N' for the run's own epoch, '<run id prefix> epoch N' for another run's."""
    epoch = "?" if s.baseline_epoch < 0 else str(s.baseline_epoch)
    if s.baseline_run_id == run_id:
        return f"epoch {epoch}"
    return f"run {s.baseline_run_id[:8]} epoch {epoch}"


def pairwise_table(summaries: Iterable[judge_pb2.PairwiseSummary], run_id: str) -> Table:
    table = new_table("epoch", "baseline", "criterion", "judge", "W/L/T", "unscored",
                      "win rate [low, high]", "position-biased pairs", "cost")
    for s in summaries:
        rate = (f"{percent(s.win_rate)} [{percent(s.win_rate_low)}, "
                f"{percent(s.win_rate_high)}]" if s.wins + s.losses + s.ties else "-")
        table.add_row(str(s.epoch), baseline_label(s, run_id), s.criterion, s.judge_model,
                      f"{s.wins}/{s.losses}/{s.ties}", str(s.unscored), rate,
                      str(s.position_bias_pairs), usd(s.cost_usd))
    return table


def pairwise_json(summaries: Iterable[judge_pb2.PairwiseSummary]) -> list[dict]:
    """One object per summary with every PairwiseSummary field (names as in the proto)."""
    return [{"epoch": s.epoch, "baseline_run_id": s.baseline_run_id,
             "baseline_epoch": s.baseline_epoch, "criterion": s.criterion,
             "judge_model": s.judge_model, "wins": s.wins, "losses": s.losses, "ties": s.ties,
             "unscored": s.unscored, "win_rate": s.win_rate, "win_rate_low": s.win_rate_low,
             "win_rate_high": s.win_rate_high, "position_bias_pairs": s.position_bias_pairs,
             "cost_usd": s.cost_usd} for s in summaries]
