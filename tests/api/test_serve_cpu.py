"""benchmarks/serve_cpu.py: the CPU seconds it reads from /proc grow with work done, it finds the engine-core
child of a server process, and its summary derives per-token CPU and the core's busy share from the runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import serve_cpu


def test_cpu_seconds_count_this_process_work():
    before = serve_cpu.cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    assert serve_cpu.cpu_seconds(os.getpid()) - before >= 0.2


def test_the_child_running_a_marker_is_found_and_a_missing_one_is_an_error():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "engine-core-marker"])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert serve_cpu.child_pid(os.getpid(), "engine-core-marker") == child.pid
                break
            except RuntimeError:  # the child has not exec'd its command line yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with pytest.raises(RuntimeError):
            serve_cpu.child_pid(os.getpid(), "no-such-marker")
    finally:
        child.kill()
        child.wait()


def test_summary_medians_and_derived_figures():
    runs = [
        {
            "wall_s": w,
            "output_tokens": 100,
            "output_throughput": 100 / w,
            "cpu_front end": f,
            "cpu_engine core": c,
            "cpu_load generator": 0.1,
        }
        for w, f, c in ((1.0, 0.2, 0.9), (2.0, 0.4, 1.0), (1.5, 0.3, 1.2))
    ]
    summary = serve_cpu.summarize(runs)
    assert summary["wall_s"] == 1.5 and summary["cpu_engine core"] == 1.0
    assert summary["cpu_ms_per_token_front end"] == pytest.approx(3.0)
    assert summary["core_busy_share"] == pytest.approx(1.0 / 1.5)
