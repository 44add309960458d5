#!/usr/bin/env bash
# FSG on a GPU: correctness tests, benchmarks and a short real-data run, in one script.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; results in ./gpu-out
#   OUT=/somewhere bash benchmarks/gpu_check.sh
#
# Made for one CUDA GPU (sized for an H200: under 5 minutes in all, DEADLINE seconds) on a machine
# with PyTorch (CUDA), Triton, numpy, Pillow and tqdm but no package registry: nothing is
# installed, fsg runs from src/ (PYTHONPATH). pytest and matplotlib are used when present.
#
# Steps (each under `timeout`, each recorded in $OUT/summary.txt; a failing step does not stop
# the others; the data is decoded in the background meanwhile):
#   nvidia-smi   the GPU, driver, memory                              -> nvidia-smi.txt
#   env          torch / CUDA / Triton / optional packages, fsg's scan backend -> env.txt
#   smoke        Triton scan vs the reference on CUDA (values, gradients), the device-resident
#                data loader vs the CPU one, one bf16 FSG step (no pytest needed) -> smoke.log
#   profile      (only with PROFILE=1) benchmarks/gpu_profile.py: the 1.35M-token scan kernel by kernel
#                (torch.profiler), one STE / FSG flat / FSG stream step profiled (device busy vs wall:
#                launch-bound?), the scan's tiling sweep (25 s budget) -> gpu_profile.json, profile.log
#   pytest-cuda  python -m pytest -m cuda (tests needing a GPU)       -> pytest-cuda.log/.xml
#   triton-tests (only with TESTS=1) python -m pytest tests/test_ssm_triton.py tests/test_triton_stream.py
#                on CUDA                                            -> triton-tests.log/.xml
#   bench        fsg bench --device cuda --json --steps 2 --reps 1 --skip-mambapy, the reference scan
#                timed on REF_SCAN_TOKENS tokens                    -> bench.json, bench.log
#   runs         fsg train x4 on CIFAR-10 (JPEG copy) from the pre-trained ResNet-20: ste, multifc,
#                fsg flat, fsg stream; dorefa, SGD lr 1e-3, batch 128, seed 0, MAX_STEPS steps,
#                a step row every 10 steps, the whole test set at the end
#                -> runs/<name>/{metrics.jsonl,metrics.csv,config.json,result.json,train.log}
#                (a run cut by its time share keeps the rows it logged: a partial curve)
#   plot         benchmarks/compare_runs.py (needs matplotlib)        -> loss.png, runs.md
#
# Inputs (git-ignored, not in the repository): gpu-data/cifar10-jpeg.tar.gz and
# gpu-data/ResNet20-CIFAR10-pretrain.pth (GPU_DATA=dir to look elsewhere). Run directories with
# their checkpoints (FSG stream's holds 1.7 GB of slow-net state) go to $WORK (default
# gpu-data/runs), the decoded-image cache to $FSG_CACHE (default gpu-data/cache); only small
# files go to $OUT.
#
# Time: every step has a cap, and no step runs past DEADLINE (285 s from the start, for
# everything; 12 s of it kept for the plot and the summary). Until the runs, RUN_TIME (80) more
# seconds are kept for them (when the data is there): a step that would eat into them is cut. On
# an H200 (seconds, cap in brackets; estimates from the first run): nvidia-smi 1 [20], env 7 [30],
# smoke ~25 [40], pytest-cuda ~47 [50], bench ~90 [100: nine measurements, each a fresh process
# of ~8 s start-up, imports and warm-up; the repetitions are a small part], then the runs share
# the rest, ~100 s (weights ste 2, multifc 2, fsg flat 4, fsg stream 3; a run finishing early
# leaves its time to the next). The profile (~55 s) and the Triton test files on CUDA (over 50 s)
# do not fit beside those: PROFILE=1 / TESTS=1, each with about 60 s more DEADLINE.
#
# Knobs (environment): OUT, DEVICE (cuda), MAX_STEPS (300), LOG_EVERY (10), DEADLINE (285),
# RUN_TIME (80), TESTS (0; 1: also the triton-tests step), PROFILE (0; 1: the profile step), GPU_DATA,
# WORK, PYTHON,
# BENCH_ARGS (extra `fsg bench` arguments), REF_SCAN_TOKENS (20001: the reference scan, a Python
# loop over time, 15.8 s on fsg bench's 184,321 tokens, is timed on this many; 184321 for all),
# PROFILE_ARGS (extra gpu_profile.py arguments), TEST_SUBSET (empty: the whole test set), SKIP
# (space-separated step names, e.g. "bench run-fsg-stream").
# Exit status: 0 when every step succeeded, else 1 (the files are written either way).

set -u

OUT=${OUT:-./gpu-out}
DEVICE=${DEVICE:-cuda}
MAX_STEPS=${MAX_STEPS:-300}
LOG_EVERY=${LOG_EVERY:-10}
DEADLINE=${DEADLINE:-285}
RUN_TIME=${RUN_TIME:-80}
TESTS=${TESTS:-0}
PROFILE=${PROFILE:-0}
GPU_DATA=${GPU_DATA:-gpu-data}
WORK=${WORK:-$GPU_DATA/runs}
BENCH_ARGS=${BENCH_ARGS:-}
REF_SCAN_TOKENS=${REF_SCAN_TOKENS:-20001}
PROFILE_ARGS=${PROFILE_ARGS:-}
TEST_SUBSET=${TEST_SUBSET:-}
SKIP=${SKIP:-}
export FSG_CACHE=${FSG_CACHE:-$GPU_DATA/cache}

if [ ! -f pyproject.toml ] || [ ! -d src/fsg ]; then
    echo "gpu_check: run me from the repository root (bash benchmarks/gpu_check.sh)" >&2
    exit 2
fi
PY=${PYTHON:-$(command -v python || command -v python3)}
export PY OUT DEVICE BENCH_ARGS REF_SCAN_TOKENS PROFILE_ARGS
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK" "$FSG_CACHE"
OUT=$(cd "$OUT" && pwd)
export OUT
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
START=$(date +%s)
FAILURES=0

elapsed() { echo $(( $(date +%s) - START )); }
remaining() { echo $(( DEADLINE - $(elapsed) )); }
note() { echo "$*" | tee -a "$SUMMARY"; }
skipped() { case " $SKIP " in *" $1 "*) return 0 ;; esac; return 1; }

# step NAME CAP LOG CMD...: run CMD (a program, or `bash -c FUNCTION` for an exported function)
# under `timeout` (CAP seconds, less if the deadline is nearer; RESERVE seconds are kept for the
# plot and the summary, HOLD more for the steps after this one), its output to LOG, one line in
# summary.txt.
RESERVE=12
HOLD=0
step() {
    local name=$1 cap=$2 log=$3
    shift 3
    if skipped "$name"; then
        note "SKIPPED  $name (SKIP)"
        return 0
    fi
    local left=$(( $(remaining) - RESERVE - HOLD ))
    local t=$(( cap < left ? cap : left ))
    if [ "$t" -lt 5 ]; then
        note "SKIPPED  $name: out of time (deadline ${DEADLINE}s)"
        FAILURES=$((FAILURES + 1))
        return 1
    fi
    local t0
    t0=$(date +%s)
    echo "gpu_check: $name (up to ${t}s) ..." >&2
    timeout -k 10 "$t" "$@" > "$log" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then
        note "ok       $name (${dt}s)"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        note "TIMEOUT  $name after ${dt}s (limit ${t}s; see $(basename "$log"))"
        FAILURES=$((FAILURES + 1))
    else
        note "FAILED   $name: exit $rc after ${dt}s (see $(basename "$log")): $(tail -n 1 "$log" | cut -c1-160)"
        FAILURES=$((FAILURES + 1))
    fi
    return $rc
}

note "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ): device $DEVICE, max_steps $MAX_STEPS, deadline ${DEADLINE}s, git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

# ---- the data, decoded and cached in the background (CPU work, overlaps the GPU tests)
TAR="$GPU_DATA/cifar10-jpeg.tar.gz"
PRETRAINED="$GPU_DATA/ResNet20-CIFAR10-pretrain.pth"
DATA_PID=""
if [ -f "$TAR" ] && [ -f "$PRETRAINED" ]; then
    ( timeout 200 "$PY" -c "
import sys, time
from fsg.data import load_dataset
t = time.time()
for split in ('train', 'test'):
    ds = load_dataset('imagefolder', data_dir=sys.argv[1], split=split)
    print(split, ds, f'{time.time() - t:.1f}s', flush=True)
" "$TAR" > "$OUT/data.log" 2>&1 ) &
    DATA_PID=$!
    HOLD=$RUN_TIME  # kept for the runs until they start
else
    note "MISSING  $TAR or $PRETRAINED: the real-data runs will be skipped (put both in $GPU_DATA/)"
fi

# ---- env
gpu_info() {
    nvidia-smi && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
}
env_info() {
    "$PY" - <<'EOF'
import os, platform, sys
import torch
print("python", sys.version.split()[0], platform.machine(), "cpus", os.cpu_count())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
for mod in ("triton", "numpy", "PIL", "tqdm", "pytest", "matplotlib", "mamba_ssm", "mambapy"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as e:
        print(mod, "missing:", type(e).__name__)
import fsg, fsg.ssm
print("fsg", fsg.__version__, "from", os.path.dirname(fsg.__file__))
try:
    print("scan backend on", os.environ.get("DEVICE", "cuda"), ":", fsg.ssm.select_backend(os.environ.get("DEVICE", "cuda")).name)
except Exception as e:
    print("scan backend:", e)
EOF
}
export -f gpu_info env_info
step nvidia-smi 20 "$OUT/nvidia-smi.txt" bash -c gpu_info
step env 30 "$OUT/env.txt" bash -c env_info

# ---- smoke: no pytest needed
smoke() {
    "$PY" - <<'EOF'
import os, time
import torch
import fsg
from fsg.ssm import select_backend, selective_scan, selective_scan_ref
dev = os.environ.get("DEVICE", "cuda")
t0 = time.time()
print("scan backend:", select_backend(dev).name)
torch.manual_seed(0)
for (b, d, n, L) in [(1, 100, 16, 1), (2, 100, 16, 1000), (1, 100, 16, 20001)]:
    u, delta, z = (torch.randn(b, d, L, device=dev) for _ in range(3))
    delta = delta * 0.5 - 2
    A = -torch.rand(d, n, device=dev) - 0.5
    B, C = torch.randn(b, n, L, device=dev), torch.randn(b, n, L, device=dev)
    D, bias = torch.randn(d, device=dev), torch.randn(d, device=dev) * 0.1
    ins = [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]
    grads = []
    for fn in (selective_scan, selective_scan_ref):
        y, last = fn(*ins[:5], D=ins[5], z=ins[6], delta_bias=ins[7], delta_softplus=True, return_last_state=True)
        g = torch.autograd.grad((y * torch.linspace(-1, 1, L, device=dev)).sum() + last.sum(), ins)
        grads.append((y.detach(), last.detach(), g))
    (y1, l1, g1), (y2, l2, g2) = grads
    # largest error over the largest value, floored at 1e-3: at L = 1 the true dA is exactly 0 and
    # the kernel's 1e-8 (from h - b) must not read as a relative error
    err = max([float((y1 - y2).abs().max() / y2.abs().max().clamp_min(1e-3)),
               float((l1 - l2).abs().max() / l2.abs().max().clamp_min(1e-3))]
              + [float((a - c).abs().max() / c.abs().max().clamp_min(1e-3)) for a, c in zip(g1, g2)])
    print(f"scan vs reference b={b} d={d} n={n} L={L}: max relative error {err:.2e}")
    assert err < 1e-3, err

from fsg.data import DataLoader, ImageDataset
g = torch.Generator().manual_seed(0)
ds = ImageDataset(torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(300) % 10,
                  [str(i) for i in range(10)], (0.49, 0.48, 0.45), (0.2, 0.2, 0.2))
for (xa, ya), (xb, yb) in zip(DataLoader(ds, 128, train=True, seed=1), DataLoader(ds, 128, train=True, seed=1, device=dev)):
    assert xb.device.type == torch.device(dev).type and torch.equal(ya, yb.cpu())
    assert float((xa - xb.cpu()).abs().max()) < 1e-5
print("device-resident DataLoader == CPU DataLoader")

from fsg.models import get_model
for amp in (None, torch.bfloat16):
    torch.manual_seed(0)
    model = fsg.binarize(get_model("resnet20"), "dorefa").to(dev)
    tr = fsg.Trainer(model, "fsg", optimizer="sgd", lr=1e-3, autocast_dtype=amp)
    x, y = torch.randn(128, 3, 32, 32, device=dev), torch.randint(0, 10, (128,), device=dev)
    losses = [tr.step(x, y).loss for _ in range(3)]
    assert all(l == l for l in losses), losses
    assert all(l.parametrization.grad.dtype == torch.float32 for l in tr.layers)
    print(f"ResNet-20 fsg steps, autocast {amp}: losses {[round(l, 4) for l in losses]}")
print(f"smoke ok in {time.time() - t0:.1f}s")
EOF
}
export -f smoke
step smoke 40 "$OUT/smoke.log" bash -c smoke

# ---- profile (PROFILE=1): where the time goes (the sweep stops starting tilings at 45 s, the cap is 60)
if [ "$PROFILE" = 1 ]; then
    # shellcheck disable=SC2086 - PROFILE_ARGS is a list of arguments
    step profile 60 "$OUT/profile.log" "$PY" benchmarks/gpu_profile.py --device "$DEVICE" --out "$OUT" \
        --sweep-budget 25 --deadline 45 $PROFILE_ARGS
else
    note "SKIPPED  profile: PROFILE=$PROFILE (~55 s more: PROFILE=1 DEADLINE=340)"
fi

# ---- tests: the cuda-marked ones; the Triton test file on CUDA with TESTS=1
if "$PY" -c "import pytest" 2> /dev/null; then
    step pytest-cuda 50 "$OUT/pytest-cuda.log" "$PY" -m pytest -q -m cuda -p no:cacheprovider tests \
        --ignore=tests/test_ssm_triton.py -k "not bench_cuda_tiny" --junitxml="$OUT/pytest-cuda.xml"
    if [ "$TESTS" = 1 ]; then
        step triton-tests 50 "$OUT/triton-tests.log" "$PY" -m pytest -q -p no:cacheprovider \
            tests/test_ssm_triton.py tests/test_triton_stream.py --junitxml="$OUT/triton-tests.xml"
    else
        note "SKIPPED  triton-tests: TESTS=$TESTS (~50 s more: TESTS=1 DEADLINE=340; smoke checks the scan)"
    fi
else
    note "SKIPPED  pytest-cuda, triton-tests: pytest is not installed here (the smoke step checks the Triton scan)"
fi

# ---- bench: nine measurements (mambapy skipped: not installed there), each its own process; the
# reference scan on REF_SCAN_TOKENS tokens (bench.json's setup and notes say so)
bench_json() {
    # shellcheck disable=SC2086 - BENCH_ARGS is a list of arguments
    "$PY" -m fsg bench --device "$DEVICE" --json --timeout 45 --steps 2 --reps 1 --skip-mambapy \
        --ref-scan-length "$REF_SCAN_TOKENS" $BENCH_ARGS > "$OUT/bench.json"
}
export -f bench_json
step bench 100 "$OUT/bench.log" bash -c bench_json
HOLD=0

# ---- real-data runs
if [ -n "$DATA_PID" ]; then
    while kill -0 "$DATA_PID" 2> /dev/null && [ "$(remaining)" -gt $((RESERVE + 40)) ]; do sleep 1; done
    if kill -0 "$DATA_PID" 2> /dev/null; then
        kill "$DATA_PID" 2> /dev/null
        note "TIMEOUT  data: still decoding at $(elapsed)s (see data.log); the runs are skipped"
        FAILURES=$((FAILURES + 1))
        DATA_OK=0
    else
        wait "$DATA_PID"
        rc=$?
        DATA_OK=1
        if [ $rc -eq 0 ]; then note "ok       data (decoded and cached; $(tail -n 1 "$OUT/data.log" | cut -c1-140))"
        else note "FAILED   data: exit $rc (see data.log): $(tail -n 1 "$OUT/data.log" | cut -c1-160)"; FAILURES=$((FAILURES + 1)); fi
    fi
    # time shares by weight (FSG flat is the slowest step), from what is left of the deadline
    RUNS="ste:2 multifc:2 fsg-flat:4 fsg-stream:3"
    w_left=11
    for run in $RUNS; do
        name=${run%%:*}
        w=${run##*:}
        [ "$DATA_OK" -eq 1 ] || break
        case $name in
            ste) est=(--estimator ste) ;;
            multifc) est=(--estimator multifc) ;;
            fsg-flat) est=(--estimator fsg --layout flat) ;;
            fsg-stream) est=(--estimator fsg --layout stream) ;;
        esac
        rm -rf "${WORK:?}/$name"
        mkdir -p "$OUT/runs/$name"
        share=$(( ($(remaining) - RESERVE) * w / w_left ))
        subset=()
        [ -n "$TEST_SUBSET" ] && subset=(--test-subset "$TEST_SUBSET")
        step "run-$name" "$share" "$OUT/runs/$name/train.log" \
            "$PY" -m fsg train --model resnet20 --pretrained "$PRETRAINED" --dataset imagefolder --data-dir "$TAR" \
            "${est[@]}" --quantizer dorefa --optimizer sgd --lr 1e-3 --batch-size 128 --seed 0 --device "$DEVICE" \
            --max-steps "$MAX_STEPS" --log-every "$LOG_EVERY" ${subset[@]+"${subset[@]}"} --no-progress --json \
            --out "$WORK/$name"
        grep -q '^{' "$OUT/runs/$name/train.log" && sed -n '/^{/,/^}/p' "$OUT/runs/$name/train.log" > "$OUT/runs/$name/result.json"
        for f in metrics.jsonl metrics.csv config.json; do
            [ -f "$WORK/$name/$f" ] && cp "$WORK/$name/$f" "$OUT/runs/$name/"
        done
        rows=$(grep -c '"kind": "step"' "$OUT/runs/$name/metrics.jsonl" 2> /dev/null)
        note "         run-$name: ${rows:-0} step rows logged (one every $LOG_EVERY steps)"
        w_left=$((w_left - w))
    done
fi

# ---- plot and summary
with_rows=()
for d in "$OUT"/runs/*/; do
    [ -d "$d" ] && grep -q '"kind": "step"' "$d/metrics.jsonl" 2> /dev/null && with_rows+=("${d%/}")
done
if [ ${#with_rows[@]} -gt 0 ]; then
    if "$PY" -c "import matplotlib" 2> /dev/null; then
        RESERVE=0 step plot 15 "$OUT/runs.md" "$PY" benchmarks/compare_runs.py "${with_rows[@]}" --png "$OUT/loss.png" --last 50
    else
        RESERVE=0 step table 15 "$OUT/runs.md" "$PY" benchmarks/compare_runs.py "${with_rows[@]}" --last 50
        note "SKIPPED  loss.png: matplotlib is not installed (the curves are in runs/*/metrics.jsonl)"
    fi
fi

"$PY" - "$OUT" <<'EOF' >> "$SUMMARY" 2>&1
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
    b = json.loads((out / "bench.json").read_text())
    f = lambda v, s="": "n/a" if v is None else f"{v:.4g}{s}"
    print(f"bench ({b.get('setup', {}).get('gpu', b.get('device'))}): step s (peak GPU MB): "
          + ", ".join(f"{k} {f(b.get(k + '_step_s'))} ({f(b.get(k + '_peak_gpu_mb'))})"
                      for k in ("ste", "multifc", "fsg_flat", "fsg_stream", "fsg_stream_bf16")))
    setup = b.get("setup", {})
    print(f"bench scans fwd+bwd ({b.get('scan_backend')}): {setup.get('scan_tokens', 0):,} tokens "
          f"{f(b.get('scan_s'), ' s')}, {setup.get('long_scan_tokens', 0):,} tokens {f(b.get('scan_long_s'), ' s')}, reference on "
          f"{setup.get('ref_scan_tokens', 0):,} {f(b.get('ref_scan_s'), ' s')}")
except Exception as e:
    print(f"bench: no result ({type(e).__name__}: {e})")
try:
    p = json.loads((out / "gpu_profile.json").read_text())
    ms = lambda v: "n/a" if v is None else f"{1e3 * v:.2f} ms"
    scan = p.get("scan", {})
    if "wall_s" in scan:
        kernels = ", ".join(f"{k['name']} {100 * (k['share'] or 0):.0f}%" for k in scan["kernels"][:4])
        print(f"profile scan {scan['tokens']:,} tokens: wall {ms(scan['wall_s'])}, kernels {ms(scan['kernel_sum_s'])} "
              f"({kernels})")
    for name, c in p.get("steps", {}).get("cases", {}).items():
        busy = "n/a" if c.get("device_busy") is None else f"{100 * c['device_busy']:.0f}%: {c['bound']}-bound"
        print(f"profile step {name}: wall {ms(c['wall_s'])}, kernels {ms(c['kernel_sum_s'])} in {c['kernel_launches']} "
              f"launches (device busy {busy}), peak GPU {c['peak_gpu_mb'] or 0:.0f} MB")
    fastest = p.get("sweep", {}).get("fastest")
    if fastest:
        print(f"profile sweep: fastest chunk {fastest['chunk']} block_d {fastest['block_d'] or 'default'} "
              f"{ms(fastest['seconds'])} ({len(p['sweep']['runs'])} tilings run)")
    for name, sec in p.items():
        if isinstance(sec, dict) and "error" in sec:
            print(f"profile {name}: {sec['error']}")
except Exception as e:
    print(f"profile: no result ({type(e).__name__}: {e})")
for d in sorted((out / "runs").glob("*/")):
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()] if (d / "metrics.jsonl").exists() else []
    steps = [r for r in rows if r.get("kind") == "step"]
    end = [r for r in rows if r.get("kind") in ("final", "epoch")]
    if not steps:
        print(f"run {d.name}: no step rows")
        continue
    last = end[-1] if end else {}
    acc = last.get("test_accuracy")
    print(f"run {d.name}: {steps[-1]['step']} steps, loss {steps[0]['loss']:.4f} (first row) -> {steps[-1]['loss']:.4f} "
          f"(last row), {(steps[-1].get('train_time') or 0) / max(steps[-1]['step'], 1):.3f} s/step, "
          f"test accuracy {'n/a' if acc is None else f'{100 * acc:.2f}%'}")
EOF
note "gpu_check: done in $(elapsed)s, $FAILURES step(s) failed or skipped; results in $OUT"
echo
cat "$SUMMARY"
[ "$FAILURES" -eq 0 ]
