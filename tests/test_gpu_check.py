"""benchmarks/gpu_check.sh: executable, valid bash, and its skeleton (time budget, summary,
missing data, skipped steps) runs under ``set -u`` without a GPU in about a second; the
arguments it gives fsg bench and benchmarks/gpu_profile.py exist."""

import importlib.util
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
    for needed in ("-m pytest -q -m cuda", "tests/test_ssm_triton.py", "--ref-scan-length",
                   "compare_runs.py", "benchmarks/gpu_profile.py --device", "cifar10-jpeg.tar.gz",
                   "ResNet20-CIFAR10-pretrain.pth", "--layout stream", "import pytest"):
        assert needed in text, needed
    assert "benchmarks/compare.py" not in text
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "gpu-data/" in ignored


def test_skeleton_runs_records_skips_and_missing_data(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_DATA=str(tmp_path / "no-data"), DEADLINE="60", TESTS="1", PROFILE="1",
               SKIP="nvidia-smi env smoke profile pytest-cuda triton-tests bench")
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    summary = (out / "summary.txt").read_text()
    assert "unbound variable" not in proc.stderr, proc.stderr
    assert "MISSING" in summary and "cifar10-jpeg.tar.gz" in summary
    for name in ("nvidia-smi", "env", "smoke", "profile", "pytest-cuda", "triton-tests", "bench"):
        assert f"SKIPPED  {name} (SKIP)" in summary
    assert "bench: no result" in summary and "profile: no result" in summary and "gpu_check: done in" in summary
    assert proc.returncode == 0  # skipping on request is not a failure
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])


def test_time_is_held_for_the_runs_and_extras_are_opt_in(tmp_path):
    """With the data there, RUN_TIME seconds are kept for the runs: a step before them that would
    eat into them is cut (here: all of a 60 s deadline); without TESTS=1 / PROFILE=1 the Triton
    test files and the profile are skipped with a note."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "cifar10-jpeg.tar.gz").write_bytes(b"not a tar")
    (data / "ResNet20-CIFAR10-pretrain.pth").write_bytes(b"not weights")
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_DATA=str(data), DEADLINE="60", RUN_TIME="80",
               SKIP="env smoke profile bench run-ste run-multifc run-fsg-flat run-fsg-stream")
    env.pop("TESTS", None)
    env.pop("PROFILE", None)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "unbound variable" not in proc.stderr, proc.stderr
    assert "SKIPPED  nvidia-smi: out of time" in proc.stdout
    assert "SKIPPED  triton-tests: TESTS=0" in proc.stdout and "SKIPPED  profile: PROFILE=0" in proc.stdout
    assert "SKIPPED  pytest-cuda: out of time" in proc.stdout or "pytest is not installed" in proc.stdout
    assert "SKIPPED  run-ste (SKIP)" in proc.stdout


def test_bench_and_profile_accept_the_scripts_arguments():
    """The flags gpu_check.sh passes exist (fsg bench's parser, gpu_profile.py's)."""
    import fsg.cli.bench as bench

    args = bench.build_parser().parse_args(["--device", "cuda", "--json", "--timeout", "45", "--steps", "2", "--reps",
                                            "1", "--skip-mambapy", "--ref-scan-length", "20001"])
    assert args.steps == 2 and args.reps == 1 and args.skip_mambapy and args.ref_scan_length == 20001
    spec = importlib.util.spec_from_file_location("gpu_profile", ROOT / "benchmarks" / "gpu_profile.py")
    profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile)
    args = profile.parse_args(["--device", "cuda", "--out", "x", "--sweep-budget", "25", "--deadline", "45"])
    assert args.sweep_budget == 25 and args.deadline == 45 and args.sections == ["scan", "steps", "sweep"]
