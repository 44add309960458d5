"""benchmarks/op_count.py: operators per step of the CUDA code path, counted without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def test_op_count_small_cnn():
    """The script runs the CUDA path's steps on the CPU (kernels stubbed) and reports per-step
    operator counts; the orderings it exists to show hold: batching layers dispatches fewer
    operators than per layer, and the stream step (one Triton kernel each way per layer) fewer
    than the flat one."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "op_count.py"), "--model", "small-cnn",
                           "--batch-size", "4", "--cases", "ste,fsg-flat,fsg-flat-per-layer,fsg-stream", "--json"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ops = json.loads(proc.stdout.strip().splitlines()[-1])["aten_ops_per_step"]
    assert 0 < ops["ste"] < ops["fsg-stream"] < ops["fsg-flat"] < ops["fsg-flat-per-layer"]
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "op_count.py"), "--cases", "nope"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "unknown case(s) nope" in bad.stderr
