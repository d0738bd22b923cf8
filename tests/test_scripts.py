"""The benchmark scripts run to their report (their speed is theirs to measure, not the tests')."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.tiny import write_tickets, write_tiny_model


@pytest.mark.parametrize("script, args, reports", [
    ("bench_predict.py", ["--rows", "8", "--repeat", "1"], "speed-up "),
    ("bench_registry.py", ["--total-mb", "2", "--files", "2"], "republish / hashing alone: "),
    ("bench_publish.py", ["--rows", "3000", "--small-rows", "0", "--repeat", "1"], "ratio publish / pyarrow: "),
    # the tiny model on a few tickets (MiniLM on the demo data: 30 s for the same lines of the script)
    ("bench_finetune.py", ["--set=dataset.source={tmp}/tickets.csv", "--set=model.base={tmp}/tiny", "--set=train.max_steps=2",
                           "--set=train.eval_strategy=steps", "--set=train.eval_steps=2", "--set=model.max_length=16"],
     "ratio stage / plain: "),
])
def test_a_benchmark_script_runs_to_its_report(script, args, reports, tmp_path):
    if any("{tmp}" in a for a in args):
        write_tiny_model(tmp_path / "tiny")
        write_tickets(tmp_path / "tickets.csv", rows=120)
    out = subprocess.run([sys.executable, str(REPO / "scripts" / script), *[a.format(tmp=tmp_path) for a in args]],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert reports in out.stdout
