#!/usr/bin/env python3
"""Chart of `widgets bench --json` reports: throughput and latency percentiles per run.

Regenerate the committed chart after adding or replacing a run in bench/results/:

    python3 scripts/chart.py bench/results --out bench/chart.svg

Each `<label>.json` in the directory is one run (`widgets bench --json > bench/results/sled.json`);
the label names the run in the chart and runs appear in file-name order. The chart is drawn
with matplotlib, at the exact versions scripts/requirements.txt pins (`.ci/run` installs
them in `.venv-ci/`). With those versions the SVG depends only on the reports, byte for byte:
no date, no random ids, text kept as text. So `--check` tells whether a committed chart is
stale (exit status 1 if it is). An `--out` ending in `.png` writes a picture instead.

Fields read, as `src/bench/report.rs` serialises them (the baseline's `PhaseStats` is
`#[serde(flatten)]`, so its throughput is `baseline.throughput`):
  required: load.throughput, load.latency_us.{p50,p90,p99,p999}
  optional: ceiling.throughput, echo.throughput, baseline.throughput (each phase may be
            null or absent); <phase>.cpu.server_us_per_request for load, ceiling and echo
            (null or absent in reports from builds before the bench measured CPU: the CPU
            panel then leaves the run out, or is not drawn at all); and for the caption
            store, fsync, concurrency, mix, duration_secs, rate, load.requests, load.ok
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
except ImportError:
    sys.exit(
        "chart.py: matplotlib is not installed. Install the pinned version in a venv:\n"
        "  python3 -m venv .venv-ci && .venv-ci/bin/pip install -r scripts/requirements.txt\n"
        "and run this script with .venv-ci/bin/python."
    )

DEFAULT_DIR = Path("bench/results")
DEFAULT_OUT = Path("bench/chart.svg")
TITLE = "widgets bench: throughput, latency and CPU per run"

# Same bytes on every machine: text is measured in the font matplotlib ships (DejaVu Sans,
# found in its own files before the system's) and written as text, ids are fixed, and the
# metadata has no date and no version. A viewer without DejaVu Sans uses the next font.
STYLE = {
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Helvetica", "Arial"],
    "font.size": 9,
    "svg.fonttype": "none",
    "svg.hashsalt": "widgets-bench-chart",
    "svg.id": "widgets-bench-chart",
    "axes.edgecolor": "#57606a",
    "axes.labelcolor": "#57606a",
    "xtick.color": "#57606a",
    "ytick.color": "#24292f",
    "text.color": "#24292f",
}
METADATA = {"Title": TITLE, "Date": None, "Creator": None}

# (key, legend name, colour): throughput series, drawn in this order within a run.
THROUGHPUT_SERIES = (
    ("load", "load (the mix)", "#4c78a8"),
    ("ceiling", "HTTP ceiling (GET /healthz)", "#b0b7bf"),
    ("echo", "axum JSON echo (reference)", "#72b7b2"),
    ("baseline", "PostgreSQL directly (baseline)", "#f58518"),
)
# The server's CPU per request in each of the service's phases that has it, named and
# coloured as in the throughput panel (the baseline is PostgreSQL's, not the server's).
CPU_SERIES = tuple(s for s in THROUGHPUT_SERIES if s[0] != "baseline")
# (JSON key under latency_us, legend name, colour): light to dark as the tail grows.
PERCENTILES = (
    ("p50", "p50", "#9ecae1"),
    ("p90", "p90", "#4292c6"),
    ("p99", "p99", "#2171b5"),
    ("p999", "p99.9", "#08306b"),
)


class ReportError(Exception):
    """A file that is not a `widgets bench --json` report."""


@dataclass(frozen=True)
class Run:
    label: str
    # Requests per second by series key; a series the run did not measure is absent.
    throughput: dict[str, float]
    # Milliseconds, in PERCENTILES order.
    latency_ms: tuple[float, ...]
    caption: str
    # The server's CPU per request in microseconds, by phase key; absent if not measured.
    cpu_us: dict[str, float]


def number(report: object, path: str) -> float:
    """The non-negative finite number at a dotted path, or a ReportError naming the path."""
    value = report
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ReportError(f"{path} is missing")
        value = value[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ReportError(f"{path} is {json.dumps(value)}, not a non-negative number")
    return float(value)


def caption(report: dict) -> str:
    """What the run was, from the fields every report has; any of them may be missing."""
    parts = []
    if isinstance(report.get("store"), str):
        parts.append(f"{report['store']} store")
    if isinstance(report.get("fsync"), str):
        parts.append(f"fsync {report['fsync']}")
    if isinstance(report.get("concurrency"), int):
        parts.append(f"{report['concurrency']} connections")
    if isinstance(report.get("mix"), str):
        parts.append(f"mix {report['mix']}")
    if isinstance(report.get("duration_secs"), (int, float)):
        parts.append(f"{report['duration_secs']:g} s")
    if "rate" in report:
        rate = report["rate"]
        offered = isinstance(rate, (int, float))
        parts.append(f"{rate:g} req/s offered" if offered else "full speed")
    load = report.get("load")
    if isinstance(load, dict):
        requests, ok = load.get("requests"), load.get("ok")
        if isinstance(requests, int) and isinstance(ok, int) and requests > ok:
            parts.append(f"{requests - ok:,} load requests not 2xx")
    return ", ".join(parts)


def parse(label: str, text: str) -> Run:
    try:
        report = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(f"not JSON: {e}") from None
    if not isinstance(report, dict):
        raise ReportError(f"the top level is {type(report).__name__}, not an object")
    throughput = {"load": number(report, "load.throughput")}
    for key in ("ceiling", "echo", "baseline"):
        if report.get(key) is not None:
            throughput[key] = number(report, f"{key}.throughput")
    latency_ms = tuple(
        number(report, f"load.latency_us.{key}") / 1000.0 for key, _, _ in PERCENTILES
    )
    cpu_us = {}
    for key, _, _ in CPU_SERIES:
        phase = report.get(key)
        cpu = phase.get("cpu") if isinstance(phase, dict) else None
        if isinstance(cpu, dict) and cpu.get("server_us_per_request") is not None:
            cpu_us[key] = number(report, f"{key}.cpu.server_us_per_request")
    return Run(label, throughput, latency_ms, caption(report), cpu_us)


def load_runs(directory: Path) -> list[Run]:
    """Every report in the directory, in file-name order; all bad files are named at once."""
    if not directory.is_dir():
        raise SystemExit(f"chart.py: {directory}: not a directory")
    paths = sorted((p for p in directory.iterdir() if p.suffix == ".json"), key=lambda p: p.name)
    if not paths:
        raise SystemExit(f"chart.py: {directory}: no <label>.json reports")
    runs, errors = [], []
    for path in paths:
        try:
            runs.append(parse(path.stem, path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as e:
            errors.append(f"chart.py: {path}: cannot read: {e}")
        except ReportError as e:
            errors.append(f"chart.py: {path}: not a widgets bench --json report: {e}")
    if errors:
        raise SystemExit("\n".join(errors))
    return runs


def fmt_ms(ms: float) -> str:
    """Three significant figures at most, no exponent: 0.215, 4.98, 37.9, 115."""
    if ms == 0:
        return "0"
    ms = float(f"{ms:.3g}")  # round first, so 99.96 gives 100 and not 100.0
    decimals = min(3, max(0, 2 - decade_floor(ms)))
    return f"{ms:,.{decimals}f}"


def decade_floor(v: float) -> int:
    """The k with 10**k <= v < 10**(k+1), exactly (log10 may land a hair off)."""
    k = math.floor(math.log10(v))
    if 10.0**k > v:
        k -= 1
    elif 10.0 ** (k + 1) <= v:
        k += 1
    return k


def fmt_decade(v: float, _pos=None) -> str:
    return f"{v:,.0f}" if v >= 1 else f"{v:.10f}".rstrip("0")


# --- drawing -------------------------------------------------------------------------------
# Sizes in inches; the figure is WIDTH wide and as tall as its runs need.

WIDTH = 9.6
MARGIN = 0.25
BAR = 0.16  # one bar
GROUP_GAP = 0.2  # between runs
PANEL_HEAD = 0.6  # a panel's title and legend, above its plot
PANEL_FOOT = 0.6  # tick labels and axis label, below it
LINE = 0.19  # one caption line
VALUE_ROOM = 0.95  # right of the plot, for the value printed past the longest bar


def panel(fig, top, runs, title, series, bars_of, start, value_label, label_room):
    """A horizontal bar panel whose head starts `top` inches from the figure's bottom.

    `bars_of(run)` gives (value, series index) per bar; a bar runs from `start` to its
    value. A run's bars are stacked top to bottom, runs in file-name order, each run's
    label at its group's middle. Returns the axes and the height it took."""
    groups = [bars_of(run) for run in runs]
    plot = sum(len(g) for g in groups) * BAR + (len(runs) - 1) * GROUP_GAP
    fig_w, fig_h = fig.get_size_inches()
    fig.text(MARGIN / fig_w, (top - 0.25) / fig_h, title, fontsize=11, fontweight="bold")
    bottom = top - PANEL_HEAD - plot
    ax = fig.add_axes(
        (label_room / fig_w, bottom / fig_h, 1 - (label_room + VALUE_ROOM) / fig_w, plot / fig_h)
    )
    y, centres, drawn = 0.0, [], {}
    for bars in groups:
        first = y
        for value, index in bars:
            name, colour = series[index]
            container = ax.barh(
                y + BAR / 2, max(value - start, 0), left=start, height=BAR * 0.88, color=colour
            )
            drawn.setdefault(index, container)
            ax.bar_label(container, labels=[value_label(value)], padding=3, fontsize=8)
            y += BAR
        centres.append((first + y) / 2)
        y += GROUP_GAP
    ax.set_ylim(y - GROUP_GAP + 0.04, -0.04)
    ax.yaxis.set_major_locator(FixedLocator(centres))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda _v, i: runs[i].label))
    ax.tick_params(axis="y", length=0, labelsize=9, pad=8)
    for label in ax.get_yticklabels():
        label.set_fontweight("bold")
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", color="#d0d7de", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    legend = sorted(drawn)
    ax.legend(
        [drawn[i] for i in legend],
        [series[i][0] for i in legend],
        loc="lower left",
        bbox_to_anchor=(0, 1.0),
        ncols=len(legend),
        frameon=False,
        fontsize=8,
        handlelength=1.0,
        handleheight=1.0,
        borderaxespad=0.3,
        borderpad=0,
        columnspacing=1.6,
    )
    return ax, PANEL_HEAD + plot + PANEL_FOOT


def linear_panel(fig, top, runs, title, series, values_of, value_label, xlabel, label_room):
    """A panel of bars from zero on a linear axis, so their lengths compare: one bar per
    (key, legend name, colour) of `series` that `values_of(run)` has; a series no run has
    gets no legend entry. Returns the height it took."""
    keys = [k for k, _, _ in series if any(k in values_of(r) for r in runs)]
    ax, used = panel(
        fig,
        top,
        runs,
        title,
        [(name, colour) for k, name, colour in series if k in keys],
        lambda r: [(values_of(r)[k], i) for i, k in enumerate(keys) if k in values_of(r)],
        0.0,
        value_label,
        label_room,
    )
    peak = max(v for r in runs for v in values_of(r).values())
    ax.set_xlim(0, peak * 1.1 if peak > 0 else 1)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
    ax.set_xlabel(xlabel)
    return used


def render(runs: list[Run], fmt: str = "svg") -> bytes:
    """The chart as SVG (or PNG) bytes."""
    with matplotlib.rc_context(STYLE):
        return _render(runs, fmt)


def _render(runs: list[Run], fmt: str) -> bytes:
    with_cpu = [r for r in runs if r.cpu_us]
    panels = 3 if with_cpu else 2
    bars = (
        sum(len(r.throughput) for r in runs)
        + len(runs) * len(PERCENTILES)
        + sum(len(r.cpu_us) for r in with_cpu)
    )
    gaps = 2 * (len(runs) - 1) + max(len(with_cpu) - 1, 0)
    plots = bars * BAR + gaps * GROUP_GAP
    height = (
        0.6 + panels * (PANEL_HEAD + PANEL_FOOT) + 0.15 * (panels - 1) + plots + 0.3
        + LINE * len(runs) + 0.2
    )
    fig = Figure(figsize=(WIDTH, height))
    fig.text(MARGIN / WIDTH, 1 - 0.4 / height, TITLE, fontsize=14, fontweight="bold")
    label_room = MARGIN + 0.15 + 0.075 * max(len(r.label) for r in runs)

    # Throughput: a linear axis from zero, so bar lengths compare.
    used = linear_panel(
        fig,
        height - 0.6,
        runs,
        "Throughput (higher is better)",
        THROUGHPUT_SERIES,
        lambda r: r.throughput,
        lambda v: f"{v:,.0f}",
        "requests per second",
        label_room,
    )
    top = height - 0.6 - used - 0.15

    # Latency: a log axis, since p50 and p99.9 are often orders of magnitude apart. Bars
    # start at the decade below the smallest value; a zero gets its label but no bar.
    positive = [v for r in runs for v in r.latency_ms if v > 0]
    lo = decade_floor(min(positive)) if positive else -3
    if positive and 10.0**lo == min(positive):
        lo -= 1  # a bar needs some length above the axis
    hi = decade_floor(max(positive)) + 1 if positive else 0
    ax, used = panel(
        fig,
        top,
        runs,
        "Latency of the load phase (lower is better)",
        [(name, colour) for _, name, colour in PERCENTILES],
        lambda r: [(v, i) for i, v in enumerate(r.latency_ms)],
        10.0**lo,
        fmt_ms,
        label_room,
    )
    ax.set_xscale("log")
    ax.set_xlim(10.0**lo, 10.0**hi)
    ax.xaxis.set_major_locator(FixedLocator([10.0**k for k in range(lo, hi + 1)]))
    ax.xaxis.set_major_formatter(FuncFormatter(fmt_decade))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("milliseconds (log scale)")
    y = top - used - 0.25

    # CPU: only the runs whose report has it (the bench measures it since issue 13).
    if with_cpu:
        top = top - used - 0.15
        used = linear_panel(
            fig,
            top,
            with_cpu,
            "Server CPU per request (lower is better)",
            CPU_SERIES,
            lambda r: r.cpu_us,
            lambda v: f"{v:,.1f}",
            "microseconds of the server's CPU (user + system) per request",
            label_room,
        )
        y = top - used - 0.25

    fig.text(MARGIN / WIDTH, y / height, "Runs", fontsize=10, fontweight="bold")
    for run in runs:
        y -= LINE
        details = run.caption or "no details in the report"
        fig.text(MARGIN / WIDTH, y / height, f"{run.label}: {details}", fontsize=8.5,
                 color="#57606a")

    out = io.BytesIO()
    metadata = METADATA if fmt == "svg" else None
    fig.savefig(out, format=fmt, metadata=metadata, facecolor="white", dpi=100)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Chart widgets bench --json reports (one <label>.json per run) as one SVG."
    )
    parser.add_argument(
        "results",
        nargs="?",
        type=Path,
        default=DEFAULT_DIR,
        help=f"directory of <label>.json reports (default {DEFAULT_DIR})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"SVG to write (default {DEFAULT_OUT}); a name ending in .png writes a PNG",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if --out differs from what the reports give",
    )
    args = parser.parse_args(argv)
    fmt = "png" if args.out.suffix.lower() == ".png" else "svg"
    chart = render(load_runs(args.results), fmt)
    if args.check:
        try:
            current = args.out.read_bytes()
        except OSError:
            current = None
        if current != chart:
            why = "does not exist" if current is None else "is stale"
            print(
                f"chart.py: {args.out} {why}: it is not what matplotlib "
                f"{matplotlib.__version__} makes of {args.results}; regenerate it with\n"
                f"  .venv-ci/bin/python scripts/chart.py {args.results} --out {args.out}\n"
                "(.ci/run makes .venv-ci/ with the versions scripts/requirements.txt pins)",
                file=sys.stderr,
            )
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
