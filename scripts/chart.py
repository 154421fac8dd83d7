#!/usr/bin/env python3
"""Chart of `widgets bench --json` reports: throughput and latency percentiles per run.

Regenerate the committed chart after adding or replacing a run in bench/results/:

    python3 scripts/chart.py bench/results --out bench/chart.svg

Each `<label>.json` in the directory is one run (`widgets bench --json > bench/results/sled.json`);
the label names the run in the chart and runs appear in file-name order. The SVG depends
only on the reports, byte for byte, so `--check` tells whether a committed chart is stale
(exit status 1 if it is). Python 3.11 standard library only: nothing to install.

Fields read, as `src/bench/report.rs` serialises them (the baseline's `PhaseStats` is
`#[serde(flatten)]`, so its throughput is `baseline.throughput`):
  required: load.throughput, load.latency_us.{p50,p90,p99,p999}
  optional: ceiling.throughput, baseline.throughput (either phase may be null or absent),
            and for the caption store, fsync, concurrency, mix, duration_secs, rate,
            load.requests, load.ok
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

DEFAULT_DIR = Path("bench/results")
DEFAULT_OUT = Path("bench/chart.svg")

WIDTH = 960
MARGIN = 24
FONT = "-apple-system, BlinkMacSystemFont, 'Segoe UI', Helvetica, Arial, sans-serif"
BAR = 14
BAR_GAP = 2
GROUP_GAP = 14
# Room right of the plot for the value printed past the longest bar.
VALUE_ROOM = 84
# Rough advance of one character at 13px in the fonts above, to size the label column.
CHAR_WIDTH = 7.6

INK = "#24292f"
MUTED = "#57606a"
GRID = "#d0d7de"

# (key, legend name, colour): throughput series, drawn in this order within a run.
THROUGHPUT_SERIES = (
    ("load", "load (the mix)", "#4c78a8"),
    ("ceiling", "HTTP ceiling (GET /healthz)", "#b0b7bf"),
    ("baseline", "PostgreSQL directly (baseline)", "#f58518"),
)
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
    for key in ("ceiling", "baseline"):
        if report.get(key) is not None:
            throughput[key] = number(report, f"{key}.throughput")
    latency_ms = tuple(
        number(report, f"load.latency_us.{key}") / 1000.0 for key, _, _ in PERCENTILES
    )
    return Run(label, throughput, latency_ms, caption(report))


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


# --- number formatting -------------------------------------------------------------------


def fmt(v: float) -> str:
    """A coordinate: one decimal is below a pixel and keeps the output stable."""
    return f"{v:.1f}"


def fmt_ms(ms: float) -> str:
    """Three significant figures at most, no exponent: 0.215, 4.98, 37.9, 115."""
    if ms == 0:
        return "0"
    ms = float(f"{ms:.3g}")  # round first, so 99.96 gives 100 and not 100.0
    decimals = min(3, max(0, 2 - decade_floor(ms)))
    return f"{ms:,.{decimals}f}"


def fmt_rate(v: float) -> str:
    return f"{v:,.0f}"


def fmt_tick(v: float) -> str:
    return f"{int(v):,}" if v == int(v) else f"{v:,.1f}"


def decade_label(k: int) -> str:
    return f"{10**k:,}" if k >= 0 else "0." + "0" * (-k - 1) + "1"


def nice_step(top: float, ticks: int = 5) -> float:
    raw = top / ticks
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * magnitude:
            return m * magnitude
    return 10 * magnitude


def decade_floor(v: float) -> int:
    k = math.floor(math.log10(v))
    # log10 may land a hair off an exact power of ten.
    if 10.0**k > v:
        k -= 1
    elif 10.0 ** (k + 1) <= v:
        k += 1
    return k


# --- SVG ---------------------------------------------------------------------------------


class Svg:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def rect(self, x: float, y: float, w: float, h: float, fill: str) -> None:
        self.parts.append(
            f'<rect x="{fmt(x)}" y="{fmt(y)}" width="{fmt(w)}" height="{fmt(h)}" fill="{fill}"/>'
        )

    def line(self, x1: float, y1: float, x2: float, y2: float, stroke: str) -> None:
        self.parts.append(
            f'<line x1="{fmt(x1)}" y1="{fmt(y1)}" x2="{fmt(x2)}" y2="{fmt(y2)}" '
            f'stroke="{stroke}" stroke-width="1"/>'
        )

    def text(
        self,
        x: float,
        y: float,
        s: str,
        size: int = 12,
        anchor: str = "start",
        fill: str = INK,
        weight: str = "normal",
    ) -> None:
        attrs = f'x="{fmt(x)}" y="{fmt(y)}" font-size="{size}" fill="{fill}"'
        if anchor != "start":
            attrs += f' text-anchor="{anchor}"'
        if weight != "normal":
            attrs += f' font-weight="{weight}"'
        self.parts.append(f"<text {attrs}>{escape(s)}</text>")


def legend(svg: Svg, x: float, y: float, entries: list[tuple[str, str]]) -> None:
    for name, colour in entries:
        svg.rect(x, y - 10, 12, 12, colour)
        svg.text(x + 17, y, name, size=12, fill=MUTED)
        x += 17 + len(name) * 6.8 + 22


def panel(
    svg: Svg,
    y: float,
    runs: list[Run],
    left: float,
    right: float,
    title: str,
    axis_label: str,
    entries: list[tuple[str, str]],
    bars_of,
    position,
    ticks: list[tuple[float, str]],
    value_label,
) -> float:
    """One bar panel from y down; returns the y below it.

    `bars_of(run)` gives (value, colour) per bar; `position(value)` the x a bar ends at, or
    None for a value the scale cannot show (it gets its label but no bar)."""
    svg.text(MARGIN, y + 16, title, size=15, weight="600")
    legend(svg, left, y + 40, entries)
    top = y + 56
    groups = []
    group_y = top
    for run in runs:
        bars = bars_of(run)
        height = len(bars) * BAR + (len(bars) - 1) * BAR_GAP
        groups.append((run, bars, group_y, height))
        group_y += height + GROUP_GAP
    bottom = group_y - GROUP_GAP + 6
    for x, label in ticks:
        svg.line(x, top - 6, x, bottom, GRID)
        svg.text(x, bottom + 16, label, size=11, anchor="middle", fill=MUTED)
    svg.line(left, top - 6, left, bottom, MUTED)
    for run, bars, by, height in groups:
        svg.text(left - 10, by + height / 2 + 4.5, run.label, size=13, anchor="end", weight="600")
        for value, colour in bars:
            end = position(value)
            if end is not None:
                svg.rect(left, by, max(end - left, 1.0), BAR, colour)
            svg.text(
                (end if end is not None else left) + 5, by + BAR - 3, value_label(value), size=11
            )
            by += BAR + BAR_GAP
    svg.text((left + right) / 2, bottom + 34, axis_label, size=12, anchor="middle", fill=MUTED)
    return bottom + 48


def render(runs: list[Run]) -> str:
    longest = max(len(run.label) for run in runs)
    left = MARGIN + max(80.0, longest * CHAR_WIDTH + 16)
    right = WIDTH - MARGIN - VALUE_ROOM
    span = right - left
    svg = Svg()

    title = "widgets bench: throughput and latency per run"
    svg.text(MARGIN, 34, title, size=20, weight="600")
    y = 52.0

    # Throughput: a linear axis from zero, so bar lengths compare.
    present = [s for s in THROUGHPUT_SERIES if any(s[0] in run.throughput for run in runs)]
    peak = max(v for run in runs for v in run.throughput.values())
    step = nice_step(peak) if peak > 0 else 1.0
    axis_top = math.ceil(peak / step) * step if peak > 0 else step
    count = round(axis_top / step)
    rate_ticks = [(left + span * i / count, fmt_tick(step * i)) for i in range(count + 1)]
    y = panel(
        svg,
        y,
        runs,
        left,
        right,
        "Throughput (higher is better)",
        "requests per second",
        [(name, colour) for _, name, colour in present],
        lambda run: [(run.throughput[k], c) for k, _, c in present if k in run.throughput],
        lambda v: left + span * v / axis_top,
        rate_ticks,
        fmt_rate,
    )

    # Latency: a log axis, since p50 and p99.9 are often orders of magnitude apart.
    positive = [v for run in runs for v in run.latency_ms if v > 0]
    if positive:
        lo = decade_floor(min(positive))
        if 10.0**lo == min(positive):
            lo -= 1  # a bar needs some length above the axis
        hi = decade_floor(max(positive)) + 1
    else:
        lo, hi = -3, 0
    decades = hi - lo
    ms_ticks = [(left + span * i / decades, decade_label(lo + i)) for i in range(decades + 1)]
    y = panel(
        svg,
        y + 8,
        runs,
        left,
        right,
        "Latency of the load phase (lower is better)",
        "milliseconds, log scale",
        [(name, colour) for _, name, colour in PERCENTILES],
        lambda run: [(v, c) for v, (_, _, c) in zip(run.latency_ms, PERCENTILES)],
        lambda v: left + span * (math.log10(v) - lo) / decades if v > 0 else None,
        ms_ticks,
        fmt_ms,
    )

    svg.text(MARGIN, y + 4, "Runs", size=13, weight="600")
    y += 24
    for run in runs:
        details = run.caption or "no details in the report"
        svg.text(MARGIN, y, f"{run.label}: {details}", size=12, fill=MUTED)
        y += 18
    height = math.ceil(y + MARGIN - 10)

    head = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="{FONT}" role="img" '
        f'aria-label="{escape(title)}">\n'
        f"<title>{escape(title)}</title>\n"
        f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>\n'
    )
    return head + "\n".join(svg.parts) + "\n</svg>\n"


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
        "--out", type=Path, default=DEFAULT_OUT, help=f"SVG to write (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if --out differs from what the reports give",
    )
    args = parser.parse_args(argv)
    svg = render(load_runs(args.results))
    if args.check:
        try:
            current = args.out.read_text(encoding="utf-8")
        except OSError:
            current = None
        if current != svg:
            print(f"chart.py: {args.out} is stale; regenerate it without --check", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(svg, encoding="utf-8", newline="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
