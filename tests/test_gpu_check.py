"""benchmarks/gpu_check.sh: executable, valid bash, and its skeleton (time budget, summary,
missing data, skipped steps) runs under ``set -u`` without a GPU in about a second."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_script_is_executable_and_parses():
    assert os.access(SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "\nset -u\n" in text
    for needed in ("-m pytest -q -m cuda", "tests/test_ssm_triton.py", "bench --device", "compare_runs.py",
                   "cifar10-jpeg.tar.gz", "ResNet20-CIFAR10-pretrain.pth", "--layout stream", "import pytest"):
        assert needed in text, needed
    assert "benchmarks/compare.py" not in text
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "gpu-data/" in ignored


def test_skeleton_runs_records_skips_and_missing_data(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_DATA=str(tmp_path / "no-data"), DEADLINE="60",
               SKIP="nvidia-smi env smoke pytest-cuda triton-tests bench")
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    summary = (out / "summary.txt").read_text()
    assert "unbound variable" not in proc.stderr, proc.stderr
    assert "MISSING" in summary and "cifar10-jpeg.tar.gz" in summary
    for name in ("nvidia-smi", "env", "smoke", "pytest-cuda", "triton-tests", "bench"):
        assert f"SKIPPED  {name} (SKIP)" in summary
    assert "bench: no result" in summary and "gpu_check: done in" in summary
    assert proc.returncode == 0  # skipping on request is not a failure
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])
