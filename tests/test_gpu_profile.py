"""benchmarks/gpu_profile.py end to end on the CPU (--quick: the Triton scan in Triton's
interpreter, SmallCNN steps): every section in gpu_profile.json, sane values, the report printed."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_profile.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its interpreter)")


def test_quick_profile_on_the_cpu(tmp_path):
    src = str(ROOT / "src")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=src + os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else src)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(tmp_path),
                           "--sweep-budget", "8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_profile.json").read_text())
    assert res["setup"]["quick"] and res["setup"]["device"] == "cpu" and res["setup"]["triton_interpret"] == "1"
    assert set(res["section_s"]) == {"scan", "steps", "sweep"}

    scan = res["scan"]
    assert scan["tokens"] == 40 and scan["wall_s"] > 0 and scan["profiled_wall_s"] > 0
    assert scan["kernels"] == [] and scan["top_cpu_ops"]  # no device events on the CPU

    cases = res["steps"]["cases"]
    assert set(cases) == {"ste", "fsg_flat", "fsg_stream"}
    for c in cases.values():
        assert c["wall_s"] > 0 and c["aten_op_events"] > 0 and len(c["top_ops_by_cpu"]) <= 15
        assert c["device_busy"] is None and c["peak_gpu_mb"] is None
    assert cases["ste"]["aten_op_events"] < cases["fsg_flat"]["aten_op_events"]
    assert cases["fsg_flat"]["warmup_steps"] == 6 and cases["ste"]["warmup_steps"] == 2

    sweep = res["sweep"]
    runs = [r for r in sweep["runs"] if "seconds" in r]
    assert runs[0]["block_d"] is None and runs[0]["max_rel_diff"] == 0.0  # the default tiling, the reference
    assert len(runs) >= 2 and all(r["seconds"] > 0 and r["max_rel_diff"] < 1e-4 for r in runs)
    assert len(sweep["runs"]) + len(sweep["not_run"]) == 10  # the default and gpu_profile.TILINGS
    assert (runs[1]["chunk"], runs[1]["block_d"], runs[1]["num_warps"]) == (8, 64, 1)  # two channels per lane
    for title in ("== scan:", "== steps:", "-- fsg_stream:", "== sweep:", "3 of 3 sections ok"):
        assert title in proc.stdout
