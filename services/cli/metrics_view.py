"""`epochlens metrics RUN`: a run's training metrics (QueryService.ListMetrics), one line per
series: how many values are stored, the step range, the first, last, smallest and largest
value, and an ASCII sparkline of the (server-downsampled) points scaled to the series' range.
"""

import typer
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from epochlens.v1 import query_pb2
from services.cli import render
from services.cli.context import cli_context

RUN = typer.Argument(..., metavar="RUN", help="Run id (see `epochlens runs`).")
NAMES = typer.Option(None, "--name", "-n", help="Only this metric (repeatable).")
MAX_POINTS = typer.Option(0, "--max-points", min=0, help="Points per series; longer series "
                          "are downsampled by the service (0: the service default).")
WIDTH = typer.Option(40, "--width", min=1, help="Characters of each sparkline.")
JSON = typer.Option(False, "--json", help="Print JSON (ListMetricsResponse.series), and "
                    "nothing else, on stdout.")


def metrics(ctx: typer.Context, run_id: str = RUN, names: list[str] | None = NAMES,
            max_points: int = MAX_POINTS, width: int = WIDTH, as_json: bool = JSON) -> None:
    """List a run's training metrics (loss, learning rate, eval scores...)."""
    with cli_context(ctx).client() as client:
        reply = client.metrics(run_id, names or [], max_points)
    if as_json:
        render.print_json([render.message_dict(s) for s in reply.series])
        return
    if not reply.series:
        typer.echo(f"run {run_id} has no metrics" + (" with those names" if names else ""))
        return
    Console().print(metrics_table(reply.series, width))
    if reply.omitted_names:
        typer.echo(f"{len(reply.omitted_names)} more metrics not shown: "
                   f"{', '.join(reply.omitted_names)} (ask with --name)", err=True)


def metrics_table(series: list[query_pb2.MetricSeries], width: int) -> Table:
    table = render.new_table(Column("metric", overflow="fold"), "values", "steps", "first",
                             "last", "min", "max", Column("trend", no_wrap=True))
    for s in series:
        points = list(s.points)
        low = min(p.min_value for p in points)
        high = max(p.max_value for p in points)
        table.add_row(Text(s.name), str(s.stored_count),
                      f"{points[0].step}-{points[-1].step}", _number(points[0].value),
                      _number(points[-1].value), _number(low), _number(high),
                      render.sparkline(_scaled(points, low, high, width)))
    return table


def _scaled(points: list[query_pb2.MetricPoint], low: float, high: float,
            width: int) -> list[float]:
    """Up to `width` values in [0, 1]: the points (evenly picked) relative to [low, high]."""
    count = min(width, len(points))
    chosen = [points[i * len(points) // count] for i in range(count)]
    span = high - low
    return [0.5 if span == 0 else (p.value - low) / span for p in chosen]


def _number(value: float) -> str:
    return f"{value:.6g}"
