"""fsg bench on a tiny problem: every key present, measurements positive, skips explained."""

import json

import pytest
import torch

import fsg.cli.bench as bench
import fsg.ssm
from fsg.cli.bench import EXTRA_KEYS, KEYS
from fsg.cli.app import main


def test_bench_json_tiny(capsys):
    rc = main(["bench", "--json", "--model", "small-cnn", "--batch-size", "4", "--steps", "1", "--reps", "1",
               "--scan-length", "300", "--skip-mambapy", "--threads", "1"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    for k in KEYS:
        assert k in res
    for k in ("ste_step_s", "fsg_flat_step_s", "fsg_stream_step_s", "scan_s", "multifc_step_s",
              "fsg_stream_bf16_step_s"):
        assert res[k] is not None and res[k] > 0, (k, res["notes"])
    assert res["device"] == "cpu" and all(k in res for k in EXTRA_KEYS)
    for k in ("fsg_flat_peak_rss_mb", "fsg_stream_peak_rss_mb", "fsg_stream_bf16_peak_rss_mb"):
        assert res[k] > 50  # a whole process with torch loaded
    assert res["mambapy_scan_s"] is None and "skipped" in res["notes"]["mambapy_scan_s"]
    assert res["ratios"]["fsg_flat_step_vs_ste"] == res["fsg_flat_step_s"] / res["ste_step_s"]
    ops = res["aten_ops_per_step"]
    assert set(ops) == {"ste_step", "multifc_step", "fsg_flat_step", "fsg_stream_step", "fsg_stream_bf16_step"}
    assert 0 < ops["ste_step"] < ops["multifc_step"] < ops["fsg_flat_step"]
    assert "ATen ops per step" in bench._table(res)


def test_aten_ops_counts_operators_not_views_backward_included():
    a = torch.randn(3, 3, requires_grad=True)
    b = torch.randn(3, 3)
    assert bench.aten_ops(lambda: (a.view(-1), a.t(), a[0])) == 0
    assert bench.aten_ops(lambda: (a + b, torch.mm(a, b))) == 2
    n_fwd = bench.aten_ops(lambda: (a * b).sum())
    n_both = bench.aten_ops(lambda: (a * b).sum().backward())
    assert n_fwd == 2 and n_both > n_fwd + 1  # backward: at least the expand of the sum's grad and a mul


def test_bench_bad_input(capsys):
    assert main(["bench", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# --device: the new keys on the CPU, the CUDA plan and its result (spawned children faked), the
# CUDA scan case (torch.cuda's timers faked), a clear error without a GPU, the real thing on a GPU


def test_bench_cpu_has_the_new_keys_and_keeps_the_old(capsys, monkeypatch):
    calls = []

    def fake_spawn(argv, timeout):
        calls.append(argv)
        if "step" in argv:
            return {"seconds": 0.5 if "fsg" in argv else 0.1, "mean_seconds": 0.5, "peak_rss_mb": 400.0}
        return {"seconds": 0.2, "mean_seconds": 0.2, "peak_rss_mb": 30.0, "tokens": 300}

    monkeypatch.setattr(bench, "_spawn", fake_spawn)
    res = bench.run_benchmarks(skip_mambapy=True, scan_length=300)
    assert [a[a.index("--estimator") + 1] if "--estimator" in a else a[a.index("--impl") + 1] for a in calls] == \
        ["ste", "multifc", "fsg", "fsg", "fsg", "fused"]
    assert all(a[a.index("--device") + 1] == "cpu" for a in calls)
    for k in KEYS + EXTRA_KEYS:
        assert k in res
    assert res["device"] == "cpu" and res["multifc_step_s"] == 0.1 and res["multifc_peak_rss_mb"] == 400.0
    assert res["ratios"]["multifc_step_vs_ste"] == 1.0
    for k in ("ste_peak_gpu_mb", "scan_long_s", "ref_scan_s", "scan_backend", "fsg_flat_peak_gpu_mb"):
        assert res[k] is None and res["notes"][k].startswith("CUDA only")
    table = bench._table(res)
    assert "MultiFC step" in table and "peak GPU" not in table and "CUDA only" not in table


def test_bench_cuda_plan_and_result_with_faked_children(monkeypatch):
    calls = []

    def fake_spawn(argv, timeout):
        calls.append(argv)
        length = int(argv[argv.index("--scan-length") + 1])
        if "step" in argv:
            return {"seconds": 0.02, "mean_seconds": 0.02, "peak_rss_mb": 900.0, "peak_gpu_mb": 300.0}
        if "reference" in argv:
            return {"seconds": 8.0, "peak_rss_mb": 1000.0, "peak_gpu_mb": 4000.0, "tokens": length,
                    "backend": "reference"}
        if "mambapy" in argv:
            raise RuntimeError("ModuleNotFoundError: No module named 'mambapy'")
        return {"seconds": 0.01 * (1 + length // 200_000), "peak_rss_mb": 900.0, "peak_gpu_mb": 100.0,
                "tokens": length, "backend": "triton"}

    monkeypatch.setattr(bench, "_spawn", fake_spawn)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    res = bench.run_benchmarks(device="cuda")
    scans = {a[a.index("--impl") + 1] + ":" + a[a.index("--scan-length") + 1]: a for a in calls if "scan" in a}
    assert set(scans) == {"fused:184321", "fused:1350000", "reference:184321", "mambapy:184321"}
    assert scans["reference:184321"][scans["reference:184321"].index("--reps") + 1] == "1"
    assert all(a.count("--scan-length") == 1 and a[a.index("--device") + 1] == "cuda" for a in calls)
    for k in KEYS + EXTRA_KEYS:
        assert k in res
    assert res["device"] == "cuda" and res["scan_backend"] == "triton"
    assert res["ste_peak_gpu_mb"] == res["fsg_stream_peak_gpu_mb"] == res["fsg_stream_bf16_peak_gpu_mb"] == 300.0
    per_layer = [a for a in calls if '"batch_layers": false' in " ".join(a)]
    assert len(per_layer) == 1 and res["fsg_flat_per_layer_step_s"] == 0.02
    assert res["fsg_flat_per_layer_peak_gpu_mb"] == 300.0 and "fsg_flat_per_layer_peak_rss_mb" not in res
    assert res["ratios"]["fsg_flat_per_layer_step_vs_ste"] == 1.0
    assert "slow-net per layer" in bench._table(res)
    bf16 = [a for a in calls if '"state_dtype": "bfloat16"' in " ".join(a)]
    assert len(bf16) == 1 and '"layout": "stream"' in " ".join(bf16[0])
    assert res["ratios"]["fsg_stream_bf16_step_vs_ste"] == 1.0
    assert res["scan_long_s"] == 0.07 and res["scan_long_peak_gpu_mb"] == 100.0
    assert res["ref_scan_s"] == 8.0 and res["ratios"]["ref_vs_scan_time"] == 8.0 / 0.01
    assert res["ratios"]["ref_vs_scan_memory"] == 40.0
    assert "1,350,000 tokens" in res["notes"]["ref_scan_long"] and "Python loop" in res["notes"]["ref_scan_long"]
    assert res["notes"]["mambapy_scan"].startswith("mambapy is not installed")
    assert res["setup"]["gpu"] == "Fake GPU" and res["setup"]["ref_scan_tokens"] == 184321
    table = bench._table(res)
    assert "peak GPU MB" in table and "1.35M tokens" in table and "reference" in table and "bfloat16" in table
    json.dumps(res)


class _FakeEvent:
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        import time

        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return (other.t - self.t) * 1000.0


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_cuda_scan_case_runs_with_faked_cuda_timers(monkeypatch, impl):
    """The CUDA scan measurement's code, run on CPU tensors with torch.cuda's timers and memory
    counters faked: warm-up, inputs, backward through every input, timing by events."""
    for name, fn in (("synchronize", lambda *a: None), ("reset_peak_memory_stats", lambda *a: None),
                     ("memory_allocated", lambda *a: 0), ("max_memory_allocated", lambda *a: 2 ** 20)):
        monkeypatch.setattr(torch.cuda, name, fn)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    res = bench._case_scan_cuda(impl, 2, 300, "cpu")
    assert res["seconds"] > 0 and res["reps"] == 2 and res["tokens"] == 300 and res["peak_gpu_mb"] == 1.0
    assert res["backend"] == ("reference" if impl == "reference" else fsg.ssm.select_backend("cpu").name)
    assert res["warmup_tokens"] == 300


def test_bench_device_errors_are_one_line(capsys):
    assert main(["bench", "--device", "foo"]) == 2
    err = capsys.readouterr().err
    assert err == "fsg: error: device 'foo' is not a torch device (e.g. cpu, cuda, cuda:1)\n"
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda", "--json"]) == 2
        out = capsys.readouterr()
        assert out.out == "" and out.err.count("\n") == 1
        assert out.err.startswith("fsg: error: --device cuda: no CUDA GPU is visible to PyTorch")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_cuda_tiny(capsys):
    rc = main(["bench", "--json", "--device", "cuda", "--model", "small-cnn", "--batch-size", "4", "--steps", "1",
               "--reps", "1", "--scan-length", "300", "--long-scan-length", "5000", "--skip-mambapy"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    for k in ("ste_step_s", "multifc_step_s", "fsg_flat_step_s", "fsg_stream_step_s", "scan_s", "scan_long_s",
              "ref_scan_s", "ste_peak_gpu_mb", "fsg_flat_peak_gpu_mb", "scan_peak_gpu_mb"):
        assert res[k] is not None and res[k] > 0, (k, res["notes"])
    assert res["device"] == "cuda" and res["scan_backend"] in ("mamba_ssm", "triton", "reference")
