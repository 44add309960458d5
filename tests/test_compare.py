"""benchmarks/compare.py: the report from known run records, resuming, bad input."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("compare", Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py")
compare = importlib.util.module_from_spec(SPEC)
sys.modules["compare"] = compare  # dataclasses look their module up
SPEC.loader.exec_module(compare)


def rows(losses, epoch_time, test_acc, val_acc=None, log_every=10):
    """Step rows (window means at every log_every steps, train_time linear in steps) and one epoch row."""
    n = len(losses)
    out = [{"kind": "step", "step": s, "loss": losses[s - 1], "train_time": epoch_time * s / n}
           for s in range(log_every, n + 1, log_every)]
    out.append({"kind": "epoch", "epoch": 1, "step": n, "train_loss": sum(losses) / n, "test_accuracy": test_acc,
                "val_accuracy": val_acc, "epoch_time": epoch_time})
    return out


def test_report_means_sample_std_and_equal_compute():
    runs = {
        "a-s0": {"rows": rows([1.0] * 40, 40.0, 0.50), "config": {"lr": 1e-3}},
        "a-s1": {"rows": rows([3.0] * 40, 40.0, 0.70), "config": {"lr": 1e-3}},
        "b-s0": {"rows": rows([float(40 - i) for i in range(40)], 400.0, 0.90), "config": {"lr": 1e-3}},
    }
    rep = compare.build_report(runs, {"a": ["a-s0", "a-s1"], "b": ["b-s0"]}, {})
    a, b = rep["groups"]["a"], rep["groups"]["b"]
    assert a["test_accuracy"]["mean"] == pytest.approx(0.60)
    assert a["test_accuracy"]["std"] == pytest.approx(math.sqrt(((0.5 - 0.6) ** 2 + (0.7 - 0.6) ** 2) / 1))
    assert a["train_loss"]["mean"] == pytest.approx(2.0) and a["train_loss"]["std"] == pytest.approx(math.sqrt(2))
    assert a["s_per_step"]["mean"] == pytest.approx(1.0) and b["s_per_step"]["mean"] == pytest.approx(10.0)
    assert b["seeds"] == 1 and b["test_accuracy"]["std"] is None
    eq = rep["equal_compute"]
    assert eq["fastest"] == "a" and eq["seconds"] == pytest.approx(40.0)
    # b at 40 s: 40 s / 10 s per step = step 4, but only every 10th step is logged: nothing logged yet
    assert eq["groups"]["b"]["loss"]["n"] == 0
    assert eq["groups"]["a"]["loss"]["mean"] == pytest.approx(2.0) and eq["groups"]["a"]["step"]["mean"] == 40
    md = compare.format_markdown(rep)
    assert "| a | 0.001 | 2 | 40 | 60.00 ± 14.14 | 2.000 ± 1.414 | 1.000 ± 0.000 |" in md
    assert "| b | 0.001 | 1 | 40 | 90.00 | 20.500 | 10.000 |" in md


def test_benchmark_clock_retimes_rows_and_equal_compute():
    """With quiet-benchmark seconds per step, time = step × s/step (written out by hand here):
    a at 1 s/step logged but 0.5 on the benchmark, b at 10 logged but 2 on the benchmark."""
    runs = {
        "a-s0": {"rows": rows([1.0] * 40, 40.0, 0.50), "config": {"lr": 1e-3}},
        "b-s0": {"rows": rows([float(40 - i) for i in range(40)], 400.0, 0.90), "config": {"lr": 1e-3}},
    }
    rep = compare.build_report(runs, {"a": ["a-s0"], "b": ["b-s0"]}, {}, step_seconds={"a": 0.5, "b": 2.0})
    assert rep["clock"] == "benchmark"
    a, b = rep["groups"]["a"], rep["groups"]["b"]
    assert a["s_per_step"]["mean"] == 0.5 and b["s_per_step"]["mean"] == 2.0
    assert a["logged_s_per_step"]["mean"] == 1.0 and b["logged_s_per_step"]["mean"] == 10.0
    assert a["train_seconds"]["mean"] == 20.0 and b["train_seconds"]["mean"] == 80.0
    eq = rep["equal_compute"]
    # a's 40 steps take 20 s; b reaches step 10 at 20 s (logged every 10th step: step 10, loss 31)
    assert eq["fastest"] == "a" and eq["seconds"] == 20.0
    assert eq["groups"]["b"]["step"]["mean"] == 10 and eq["groups"]["b"]["loss"]["mean"] == 31.0
    assert runs["b-s0"]["rows"][0]["train_time"] == 100.0  # the caller's rows are not modified
    md = compare.format_markdown(rep)
    assert "| b | 0.001 | 1 | 40 | 90.00 | 20.500 | 2.000 | 10.000 |" in md and "benchmark clock" in md


def test_step_seconds_from_bench_maps_groups_and_rejects_missing_keys():
    bench = {"ste_step_s": 0.4, "multifc_step_s": 0.6, "fsg_flat_step_s": 10.0, "fsg_stream_step_s": 2.0}
    s = compare.step_seconds_from_bench(bench)
    assert s["ste-adam"] == s["ste-sgd-tuned"] == 0.4 and s["multifc-adam"] == 0.6
    assert s["fsg-flat-sgd"] == 10.0 and s["fsg-stream-sgd"] == 2.0 and set(s) == set(compare.GROUPS)
    with pytest.raises(ValueError, match="multifc_step_s"):
        compare.step_seconds_from_bench({k: v for k, v in bench.items() if k != "multifc_step_s"})


def test_value_at_takes_the_last_row_not_after_the_time():
    r = rows([5.0, 4.0, 3.0, 2.0], 4.0, 0.1, log_every=1)
    assert compare.value_at(r, 2.5) == {"step": 2, "loss": 4.0, "train_time": 2.0}
    assert compare.value_at(r, 0.5) is None


def test_resume_skips_finished_runs_and_tuning_waits_for_seed0(tmp_path):
    groups = [compare.GROUPS["ste-sgd"], compare.GROUPS["ste-sgd-tuned"]]
    cmp = compare.Comparison(tmp_path / "out", tmp_path / "rep", {"model": "resnet20"}, 2, 1, groups)
    names = [j["name"] for j in cmp.jobs()]
    assert "ste-sgd-s0" in names and "ste-sgd-tuned-lr3e-2-s0" in names
    assert not any(n.startswith("ste-sgd-tuned") and n.endswith(("s1", "s2")) for n in names)  # lr not chosen yet
    for lr, acc in zip(compare.TUNE_LRS, (0.3, 0.5, 0.4)):  # the tuning runs finish: 1e-2 is best on validation
        d = cmp.record_dir(compare.run_name("ste-sgd-tuned", 0, lr))
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows([1.0] * 10, 1.0, 0.1, val_acc=acc)))
        (d / "config.json").write_text(json.dumps({"lr": lr}))
    assert cmp.tuning()["best"] == 1e-2
    todo = [j["name"] for j in cmp.jobs() if not cmp.finished(j["name"])]
    assert "ste-sgd-tuned-lr1e-2-s1" in todo and "ste-sgd-tuned-lr1e-2-s2" in todo
    assert not any("tuned" in n and n.endswith("s0") for n in todo)  # finished runs are skipped
    assert [j["config"]["lr"] for j in cmp.jobs() if j["name"] == "ste-sgd-tuned-lr1e-2-s2"] == [1e-2]
    assert cmp.group_runs()["ste-sgd-tuned"] == ["ste-sgd-tuned-lr1e-2-s0"]


def test_unknown_group_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        compare.main(["--groups", "ste-sgd,nope", "--report-only"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "unknown group(s) nope: choose from ste-sgd, multifc-sgd" in err
