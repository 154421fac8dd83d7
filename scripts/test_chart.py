"""Tests for chart.py: run it as the README says, on reports shaped as report.rs serialises
them. Run with the Python that has scripts/requirements.txt installed, as .ci/run does:
`.venv-ci/bin/python scripts/test_chart.py`."""

import copy
import json
import os
import subprocess
import sys
import tempfile
import unittest
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CHART = HERE / "chart.py"
SVG_NS = "{http://www.w3.org/2000/svg}"


def phase(requests, secs, p50, p90, p99, p999):
    """A `PhaseStats` as serde writes it (latency in µs, `Option`s as null)."""
    return {
        "requests": requests,
        "ok": requests,
        "secs": secs,
        "throughput": requests / secs,
        "latency_us": {
            "p50": p50,
            "p90": p90,
            "p99": p99,
            "p999": p999,
            "max": p999 * 2,
            "mean": p50 * 1.2,
        },
        "errors": {},
        "transport_errors": 0,
        "open_loop": None,
    }


# Everything measured: ceiling and (flattened) direct-PostgreSQL baseline.
POSTGRES = {
    "target": "http://127.0.0.1:40123",
    "store": "postgres",
    "fsync": "always",
    "widgets": 100000,
    "concurrency": 64,
    "duration_secs": 20.0,
    "rate": None,
    "mix": "put=80,free=10,get=10",
    "create": phase(100000, 4.0, 900, 2000, 5000, 9000),
    "ceiling": phase(177830, 5.0, 1500, 3000, 6000, 12000),
    "load": phase(258280, 20.0, 3790, 9100, 24450, 73280),
    "server": {
        "fsyncs": 9500,
        "wal_records": 257000,
        "requests_per_fsync": 27.1,
        "flush_lag_secs": 0.9,
        "widgets_in_memory": 100000,
        "rss_bytes": 187695104,
    },
    "baseline": {**phase(42200, 20.0, 28720, 48350, 65790, 114620), "retries": 3},
}

# No ceiling, no baseline, external target, open loop with some errors.
SLED = {
    **copy.deepcopy(POSTGRES),
    "target": "http://127.0.0.1:8080",
    "store": "external",
    "fsync": None,
    "rate": 5000.0,
    "ceiling": None,
    "load": {**phase(232140, 20.0, 4430, 9800, 24780, 53890), "ok": 232100},
    "server": {
        "fsyncs": 0,
        "wal_records": 0,
        "requests_per_fsync": None,
        "flush_lag_secs": None,
        "widgets_in_memory": None,
        "rss_bytes": None,
    },
    "baseline": None,
}


class ChartTest(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = Path(tmp.name)
        self.results = self.dir / "results"
        self.results.mkdir()
        self.out = self.dir / "out" / "chart.svg"

    def write(self, name, content):
        path = self.results / name
        path.write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
        return path

    def chart(self, *extra, results=None, python=(sys.executable,), env=None):
        results = self.results if results is None else results
        return subprocess.run(
            [*python, str(CHART), str(results), "--out", str(self.out), *extra],
            capture_output=True,
            text=True,
            env=env,
        )

    def texts(self, path=None):
        root = ET.parse(path or self.out).getroot()
        self.assertEqual(root.tag, SVG_NS + "svg")
        return [t.text for t in root.iter(SVG_NS + "text")]

    def test_two_runs_give_a_labelled_svg(self):
        self.write("postgres.json", POSTGRES)
        self.write("sled.json", SLED)
        done = self.chart()
        self.assertEqual(done.returncode, 0, done.stderr)

        texts = self.texts()
        self.assertIn("widgets bench: throughput, latency and CPU per run", texts)
        for label in ("postgres", "sled"):
            self.assertIn(label, texts)
        # Axes say what they measure, legends name every series charted.
        for text in ("requests per second", "milliseconds (log scale)", "load (the mix)",
                     "HTTP ceiling (GET /healthz)", "PostgreSQL directly (baseline)",
                     "p50", "p90", "p99", "p99.9"):
            self.assertIn(text, texts)
        # Throughputs: load, ceiling and baseline of postgres, load of sled.
        for rate in ("12,914", "35,566", "2,110", "11,607"):
            self.assertIn(rate, texts)
        # Latency in ms: postgres p50, sled p99.9, postgres baseline's is not charted.
        for ms in ("3.79", "53.9"):
            self.assertIn(ms, texts)
        self.assertNotIn("28.7", texts)
        # Runs in file-name order; the caption copes with what sled lacks.
        self.assertLess(texts.index("postgres"), texts.index("sled"))
        self.assertIn(
            "sled: external store, 64 connections, mix put=80,free=10,get=10, 20 s, "
            "5000 req/s offered, 40 load requests not 2xx",
            texts,
        )

    def test_a_series_no_run_measured_has_no_legend_entry(self):
        self.write("sled.json", SLED)
        self.assertEqual(self.chart().returncode, 0)
        texts = self.texts()
        self.assertIn("load (the mix)", texts)
        self.assertNotIn("HTTP ceiling (GET /healthz)", texts)
        self.assertNotIn("PostgreSQL directly (baseline)", texts)

    def test_cpu_per_request_is_charted_for_the_runs_that_measured_it(self):
        measured = copy.deepcopy(POSTGRES)
        measured["echo"] = phase(300000, 5.0, 700, 1000, 2000, 4000)
        measured["echo"]["cpu"] = {"server_secs": 4.41, "server_us_per_request": 14.7,
                                   "client_secs": 8.1, "client_us_per_request": 27.0}
        measured["load"]["cpu"] = {"server_secs": 22.7, "server_us_per_request": 87.9,
                                   "client_secs": 8.0, "client_us_per_request": 31.0}
        # A phase that ran but whose CPU could not be read: no bar, no error.
        measured["ceiling"]["cpu"] = {"server_secs": None, "server_us_per_request": None,
                                      "client_secs": None, "client_us_per_request": None}
        self.write("a-measured.json", measured)
        self.write("b-older.json", SLED)
        done = self.chart()
        self.assertEqual(done.returncode, 0, done.stderr)
        texts = self.texts()
        self.assertIn("Server CPU per request (lower is better)", texts)
        self.assertIn("87.9", texts)
        self.assertIn("14.7", texts)
        self.assertIn("axum JSON echo (reference)", texts)
        # The echo's throughput joins the throughput panel.
        self.assertIn("60,000", texts)
        # The CPU panel lists only the run that has CPU figures: each label appears once
        # per panel, so the measured run three times and the older one twice.
        self.assertEqual(texts.count("a-measured"), 3)
        self.assertEqual(texts.count("b-older"), 2)

    def test_reports_without_cpu_figures_get_no_cpu_panel(self):
        self.write("postgres.json", POSTGRES)
        done = self.chart()
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertNotIn("Server CPU per request (lower is better)", self.texts())

    def test_a_negative_cpu_figure_is_named(self):
        report = copy.deepcopy(POSTGRES)
        report["load"]["cpu"] = {"server_us_per_request": -3}
        bad = self.write("bad.json", report)
        done = self.chart()
        self.assertEqual(done.returncode, 1)
        self.assertIn(f"{bad}: not a widgets bench --json report: "
                      "load.cpu.server_us_per_request is -3", done.stderr)

    def test_a_zero_latency_is_labelled_without_a_bar(self):
        report = copy.deepcopy(POSTGRES)
        report["load"]["latency_us"]["p50"] = 0
        self.write("fast.json", report)
        done = self.chart()
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("0", self.texts())

    def test_same_reports_give_the_same_bytes(self):
        self.write("b.json", SLED)
        self.write("a.json", POSTGRES)
        self.assertEqual(self.chart().returncode, 0)
        first = self.out.read_bytes()
        self.assertNotIn(b"dc:date", first)
        self.assertNotIn(b"Matplotlib v", first)
        self.out.unlink()
        # Another process, another matplotlib cache, a build date set: the same bytes.
        env = {**os.environ, "MPLCONFIGDIR": str(self.dir / "mplconfig"), "SOURCE_DATE_EPOCH": "0"}
        self.assertEqual(self.chart(env=env).returncode, 0)
        self.assertEqual(self.out.read_bytes(), first)
        self.assertEqual(self.chart("--check").returncode, 0)

        self.write("c.json", POSTGRES)
        stale = self.chart("--check")
        self.assertEqual(stale.returncode, 1)
        self.assertIn("is stale", stale.stderr)
        self.assertIn("regenerate it", stale.stderr)
        self.assertEqual(self.out.read_bytes(), first, "--check writes nothing")

    def test_check_without_a_chart_fails(self):
        self.write("a.json", POSTGRES)
        done = self.chart("--check")
        self.assertEqual(done.returncode, 1)
        self.assertIn("does not exist", done.stderr)
        self.assertFalse(self.out.exists())

    def test_the_committed_runs_chart(self):
        results = REPO / "bench" / "results"
        done = self.chart(results=results)
        self.assertEqual(done.returncode, 0, done.stderr)
        texts = self.texts()
        for path in sorted(results.glob("*.json")):
            report = json.loads(path.read_text())
            self.assertIn(path.stem, texts)
            self.assertIn(f"{report['load']['throughput']:,.0f}", texts)

    def test_png_for_a_look(self):
        self.write("a.json", POSTGRES)
        self.out = self.dir / "chart.png"
        self.assertEqual(self.chart().returncode, 0)
        self.assertEqual(self.out.read_bytes()[:8], b"\x89PNG\r\n\x1a\n")

    def test_a_file_that_is_not_a_report_is_named(self):
        self.write("postgres.json", POSTGRES)
        broken = self.write("broken.json", '{"load": {"throughput": 12')
        listed = self.write("listed.json", "[1, 2]")
        done = self.chart()
        self.assertEqual(done.returncode, 1)
        self.assertIn(f"{broken}: not a widgets bench --json report: not JSON", done.stderr)
        self.assertIn(f"{listed}: not a widgets bench --json report: the top level is list",
                      done.stderr)
        self.assertFalse(self.out.exists())

    def test_a_report_missing_a_required_field_is_named(self):
        report = copy.deepcopy(POSTGRES)
        del report["load"]["latency_us"]["p99"]
        bad = self.write("redis.json", report)
        negative = copy.deepcopy(POSTGRES)
        negative["load"]["throughput"] = -1
        worse = self.write("worse.json", negative)
        done = self.chart()
        self.assertEqual(done.returncode, 1)
        self.assertIn(f"{bad}: not a widgets bench --json report: load.latency_us.p99 is missing",
                      done.stderr)
        self.assertIn(f"{worse}: not a widgets bench --json report: load.throughput is -1",
                      done.stderr)

    def test_an_empty_or_missing_directory_is_an_error(self):
        done = self.chart()
        self.assertEqual(done.returncode, 1)
        self.assertIn("no <label>.json reports", done.stderr)
        done = self.chart(results=self.dir / "nowhere")
        self.assertEqual(done.returncode, 1)
        self.assertIn("not a directory", done.stderr)

    def test_without_matplotlib_it_says_what_to_install(self):
        self.write("a.json", POSTGRES)
        # -S: no site-packages, so no matplotlib.
        done = self.chart(python=(sys.executable, "-S"))
        self.assertEqual(done.returncode, 1)
        self.assertIn("matplotlib is not installed", done.stderr)
        self.assertIn("scripts/requirements.txt", done.stderr)

    def test_the_pinned_versions_are_installed(self):
        # The committed chart is what these versions make; others draw other bytes.
        for line in (HERE / "requirements.txt").read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                name, pinned = line.split("==")
                self.assertEqual(
                    metadata.version(name),
                    pinned,
                    f"{name}: install scripts/requirements.txt (see .ci/run)",
                )


if __name__ == "__main__":
    unittest.main()
