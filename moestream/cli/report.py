"""`moestream report DIR`: a recorded profile as terminal tables and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..errors import MoestreamError
from ..files import describe_os_error
from ..profiling.report import PLOTS_HINT, plots, summary_problem, summary_rows
from .app import cli


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--no-plots", is_flag=True, help="Only the tables.")
def report(directory, no_plots):
    """Show a --profile DIR: summary tables, and plots written to DIR/plots/."""
    path = Path(directory) / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except OSError as e:
        raise MoestreamError(f"cannot read {path} ({e.strerror}): record one with --profile {directory}") from None
    except (ValueError, UnicodeDecodeError):
        raise MoestreamError(f"{path} is not valid JSON: record the profile again") from None
    problem = summary_problem(summary)
    if problem:
        raise MoestreamError(f"{path} is not a moestream profile summary ({problem}): record the profile again "
                             f"with --profile {directory}")
    con = Console(highlight=False)
    table = Table(title=f"profile of {summary['model']}", show_header=False)
    for key, value in summary_rows(summary):
        table.add_row(key, value)
    con.print(table)
    if no_plots:
        return
    try:
        files = plots(summary, Path(directory) / "plots")
    except ImportError:
        con.print(f"plots: {PLOTS_HINT}", style="dim", markup=False)
        return
    except OSError as e:
        raise MoestreamError(f"cannot write the plots to {Path(directory) / 'plots'}: {describe_os_error(e)} "
                             "(--no-plots shows the tables alone)") from None
    for f in files:
        con.print(f"wrote {f}", markup=False)
