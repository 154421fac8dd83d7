"""Tests for chart.py: run it as the README says, on reports shaped as report.rs serialises
them. Run with `python3 scripts/test_chart.py`."""

import copy
import json
import subprocess
import sys
import tempfile
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

CHART = Path(__file__).resolve().parent / "chart.py"
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

    def chart(self, *extra):
        return subprocess.run(
            [sys.executable, str(CHART), str(self.results), "--out", str(self.out), *extra],
            capture_output=True,
            text=True,
        )

    def test_two_runs_give_a_labelled_svg(self):
        self.write("postgres.json", POSTGRES)
        self.write("sled.json", SLED)
        done = self.chart()
        self.assertEqual(done.returncode, 0, done.stderr)

        root = ET.parse(self.out).getroot()
        self.assertEqual(root.tag, SVG_NS + "svg")
        texts = [t.text for t in root.iter(SVG_NS + "text")]
        for label in ("postgres", "sled"):
            self.assertIn(label, texts)
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

    def test_same_reports_give_the_same_bytes(self):
        self.write("b.json", SLED)
        self.write("a.json", POSTGRES)
        self.assertEqual(self.chart().returncode, 0)
        first = self.out.read_bytes()
        self.out.unlink()
        self.assertEqual(self.chart().returncode, 0)
        self.assertEqual(self.out.read_bytes(), first)
        self.assertEqual(self.chart("--check").returncode, 0)

        self.write("c.json", POSTGRES)
        stale = self.chart("--check")
        self.assertEqual(stale.returncode, 1)
        self.assertIn("stale", stale.stderr)
        self.assertEqual(self.out.read_bytes(), first, "--check writes nothing")

    def test_a_file_that_is_not_a_report_is_named(self):
        self.write("postgres.json", POSTGRES)
        broken = self.write("broken.json", '{"load": {"throughput": 12')
        done = self.chart()
        self.assertEqual(done.returncode, 1)
        self.assertIn(str(broken), done.stderr)
        self.assertIn("not JSON", done.stderr)
        self.assertFalse(self.out.exists())

    def test_a_report_missing_a_required_field_is_named(self):
        report = copy.deepcopy(POSTGRES)
        del report["load"]["latency_us"]["p99"]
        bad = self.write("redis.json", report)
        done = self.chart()
        self.assertEqual(done.returncode, 1)
        self.assertIn(str(bad), done.stderr)
        self.assertIn("load.latency_us.p99 is missing", done.stderr)

    def test_an_empty_directory_is_an_error(self):
        done = self.chart()
        self.assertEqual(done.returncode, 1)
        self.assertIn("no <label>.json reports", done.stderr)


if __name__ == "__main__":
    unittest.main()
