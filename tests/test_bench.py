"""fsg bench on a tiny problem: every key present, measurements positive, skips explained."""

import json

from fsg.bench import KEYS
from fsg.cli import main


def test_bench_json_tiny(capsys):
    rc = main(["bench", "--json", "--model", "small-cnn", "--batch-size", "4", "--steps", "1", "--reps", "1",
               "--scan-length", "300", "--skip-mambapy", "--threads", "1"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    for k in KEYS:
        assert k in res
    for k in ("ste_step_s", "fsg_flat_step_s", "fsg_stream_step_s", "scan_s"):
        assert res[k] is not None and res[k] > 0, (k, res["notes"])
    for k in ("fsg_flat_peak_rss_mb", "fsg_stream_peak_rss_mb"):
        assert res[k] > 50  # a whole process with torch loaded
    assert res["mambapy_scan_s"] is None and "skipped" in res["notes"]["mambapy_scan_s"]
    assert res["ratios"]["fsg_flat_step_vs_ste"] == res["fsg_flat_step_s"] / res["ste_step_s"]


def test_bench_bad_input(capsys):
    assert main(["bench", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
