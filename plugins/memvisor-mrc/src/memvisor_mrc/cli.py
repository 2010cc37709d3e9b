"""``memvisor mrc TRACE``: the miss-ratio curve of a page-access trace, offline.

The same estimators as the plugin, over a whole trace read by :func:`memvisor.traces.load_trace`:
``--rate R`` (fixed-rate SHARDS, the default at R = 0.01), ``--sample-size S`` (fixed-size),
``--untrace-period T`` with ``--rate`` (traps simulated with an untraced period of ``T``
*accesses*, the trace's only clock, and the curve estimated from the traps alone) and
``--exact`` (Mattson's stack distances, O(N log N)). Bad input is one line and exit status 2
(the ``memvisor`` group turns :class:`~memvisor.errors.UserError` into that).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import attrs
import click

from memvisor.cli import InputFile, Number, OutputFile, json_option, write_json
from memvisor.errors import UserError
from memvisor.files import atomic_write

__all__ = ["SMALL_SAMPLE", "MRCResult", "compute", "mrc"]

SMALL_SAMPLE = 32
"""Below this many sampled pages the command warns that the curve is coarse."""


@attrs.frozen(eq=False)
class MRCResult:
    """A curve computed from a trace, with how it was made.

    :ivar curve: the :class:`~memvisor_mrc.curve.Curve`.
    :ivar method: ``"exact"``, ``"rate"``, ``"sample-size"`` or ``"untrace"``.
    :ivar seconds: time spent computing the curve (reading the trace excluded).
    :ivar read_seconds: time spent reading the trace.
    :ivar trap_rate: traps per access (``--untrace-period`` only), else None.
    """

    curve: Any
    method: str
    seconds: float
    read_seconds: float
    trap_rate: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document."""
        c = self.curve
        return {"cache_pages": c.cache_pages.tolist(), "miss_ratio": c.miss_ratio.tolist(), "accesses": c.accesses,
                "traced_accesses": c.traced_accesses, "sampled_pages": c.sampled_pages, "seconds": self.seconds,
                "read_seconds": self.read_seconds, "method": self.method, "trap_rate": self.trap_rate}


def check_options(rate: float | None, sample_size: int | None, untrace_period: int, exact: bool) -> None:
    """Refuse contradictory or out-of-range options with one line."""
    if exact and (rate is not None or sample_size is not None or untrace_period):
        raise UserError("--exact computes the whole curve: it takes no --rate, --sample-size or --untrace-period")
    if rate is not None and sample_size is not None:
        raise UserError("give --rate or --sample-size, not both")
    if rate is not None and not 0 < rate <= 1:
        raise UserError(f"--rate must be in (0, 1], got {rate}")
    if sample_size is not None and sample_size < 1:
        raise UserError(f"--sample-size must be at least 1, got {sample_size}")
    if untrace_period < 0:
        raise UserError(f"--untrace-period must be 0 or more accesses, got {untrace_period}")
    if untrace_period and sample_size is not None:
        raise UserError("--untrace-period needs a fixed rate (--rate), not --sample-size")


def compute(pages, *, rate: float | None = None, sample_size: int | None = None, untrace_period: int = 0,
            exact: bool = False, seed: int = 0, read_seconds: float = 0.0) -> MRCResult:
    """The curve of ``pages`` as ``memvisor mrc`` computes it (options as the command's)."""
    from memvisor_mrc.shards import sampled_mrc
    from memvisor_mrc.stack_distance import exact_mrc
    from memvisor_mrc.untrace import untraced_sampled_mrc

    check_options(rate, sample_size, untrace_period, exact)
    start = time.perf_counter()
    trap_rate = None
    if exact:
        curve, method = exact_mrc(pages), "exact"
    elif sample_size is not None:
        curve, method = sampled_mrc(pages, sample_size=sample_size, seed=seed), "sample-size"
    elif untrace_period:
        curve, traps = untraced_sampled_mrc(pages, rate if rate is not None else 0.01, untrace_period, seed)
        method, trap_rate = "untrace", traps.trap_rate
    else:
        curve, method = sampled_mrc(pages, rate=0.01 if rate is None else rate, seed=seed), "rate"
    return MRCResult(curve, method, time.perf_counter() - start, read_seconds, trap_rate)


def _progress(quiet: bool):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    # Two steps (read, compute), each one numpy pass with no progress of its own to report.
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                    console=console, disable=quiet or not console.is_terminal, transient=True)


def _plot(result: MRCResult, trace: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = result.curve
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.plot(c.cache_pages, c.miss_ratio, linewidth=1.4, label=result.method)
    ax.set_title(f"LRU miss-ratio curve: {Path(trace).name}")
    ax.set_xlabel("cache size (4 KiB pages)")
    ax.set_ylabel("miss ratio")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    # whole or not at all, in the format its name says (png when it says none)
    atomic_write(path, lambda f: fig.savefig(f, format=Path(path).suffix[1:].lower() or "png"))
    plt.close(fig)


@click.command("mrc")
@click.argument("trace", type=InputFile("trace file"))
@click.option("--rate", type=Number(0, 1), default=None, help="Sampling rate R of the spatial sample (default 0.01).")
@click.option("--sample-size", type=click.IntRange(1, 2**40), default=None,
              help="Fixed-size sample of at most S pages (rate adapts).")
@click.option("--untrace-period", type=click.IntRange(0, 2**62), default=0, show_default=True,
              help="Accesses a sampled page stays untraced after it trapped (simulated; needs a fixed rate).")
@click.option("--exact", is_flag=True, help="Exact curve (Mattson stack distances, O(N log N)).")
@json_option("the curve")
@click.option("--address", is_flag=True, help="The trace holds byte addresses, not page numbers.")
@click.option("--format", "fmt", default=None, type=click.Choice(["npy", "csv", "oracleGeneral"], case_sensitive=False),
              help="Trace format (default: by name).")
@click.option("--plot", "plot_out", default=None, type=OutputFile("PNG file"), help="Draw the curve to this PNG file.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True, help="Seed of the page hash.")
@click.option("--quiet", is_flag=True, help="No progress and no summary.")
def mrc(trace, rate, sample_size, untrace_period, exact, json_out, address, fmt, plot_out, seed, quiet):
    """The LRU miss-ratio curve of TRACE (.npy, .npy.zst, CSV or libCacheSim oracleGeneral)."""
    from memvisor.traces import load_trace

    check_options(rate, sample_size, untrace_period, exact)  # before reading a large trace
    with _progress(quiet or json_out == "-") as progress:
        task = progress.add_task(f"reading {trace}", total=2)
        start = time.perf_counter()
        loaded = load_trace(trace, address=address, fmt=fmt)
        read_seconds = time.perf_counter() - start
        progress.update(task, advance=1, description=f"computing the {'exact' if exact else 'sampled'} curve of "
                                          f"{len(loaded):,} accesses")
        result = compute(loaded.pages, rate=rate, sample_size=sample_size, untrace_period=untrace_period,
                         exact=exact, seed=seed, read_seconds=read_seconds)
        progress.update(task, advance=1)
    write_json(json_out, result.to_json())
    if plot_out:
        try:
            _plot(result, trace, plot_out)
        except OSError as error:
            raise UserError(f"{plot_out}: cannot write: {error.strerror or error}") from None
        except ValueError as error:  # a name whose suffix is no image format matplotlib writes
            raise UserError(f"{plot_out}: {error}") from None
    if not quiet and json_out != "-":
        _summary(result)


def _summary(result: MRCResult) -> None:
    """The curve in a few lines, sizes and times in human units as in the reports."""
    from memvisor.units import shown
    from memvisor_mrc.summary import recommended_pages, working_sets

    c = result.curve
    how = {"exact": "exact", "rate": "sampled at a rate", "sample-size": "sampled, fixed size",
           "untrace": "sampled with untraced periods"}[result.method]
    click.echo(f"curve ({how}): {c.accesses:,} accesses, {c.traced_accesses:,} processed, "
               f"{c.sampled_pages:,} pages sampled, in {shown(result.seconds, 's')} "
               f"(reading the trace {shown(result.read_seconds, 's')})"
               + (f"; traps on {shown(result.trap_rate, 'fraction')} of accesses" if result.trap_rate is not None
                  else ""))
    if result.method != "exact" and c.sampled_pages < SMALL_SAMPLE:
        # A spatial sample of a small footprint can hold a handful of pages, or none: say so
        # rather than let a flat or step-shaped curve pass for a measurement.
        click.echo(f"warning: the sample holds only {c.sampled_pages} pages; the curve is coarse "
                   f"(use a higher --rate, --sample-size or --exact)", err=True)
    ws = working_sets(c, (0.1, 0.05, 0.01))
    click.echo("working set at miss ratio " + ", ".join(f"{shown(float(k), 'fraction')}: {shown(v, 'pages')}"
                                                        for k, v in ws.items()))
    recommended = recommended_pages(c)
    click.echo(f"recommended: {shown(recommended, 'pages')} ({recommended:,} pages), within 1 point of the "
               f"curve's floor, a miss ratio of {shown(float(c.miss_ratio[-1]), 'fraction')}")
