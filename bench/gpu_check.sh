#!/usr/bin/env bash
# The GPU measurements in one command, for a borrowed CUDA machine (about 5 minutes):
#
#   bench/gpu_check.sh OUT_DIR            # on a CUDA machine
#   bench/gpu_check.sh OUT_DIR --dry-run  # anywhere: the CUDA-only steps are skipped, the rest runs on CPU
#
# Steps (each under a timeout, its log kept; a failed step is recorded and the next one runs):
#   1. environment: torch, CUDA, GPU name;
#   2. synthetic data: ML-1M scale (6,040 users) for the benchmark, 600 users for the training runs;
#   3. CUDA benchmark, compile cuda-graphs then none: bench/speed.py --device cuda (epoch, capture
#      time, step time at 1, 32 and 256 users, device-vs-CPU agreement);
#   4. one epoch of mamoRec.py on the 600-user data: on CPU, on CUDA with compile none and with
#      cuda-graphs; the CUDA runs' metrics must agree with the CPU run's within 5e-3 (float32
#      rounding differs between devices and grows over an epoch: 7e-4 was measured between two
#      CPU engines that only sum in another order) and with each other within 1e-6 (same kernels);
#   5. the test suite (last, with the time that is left; 8 pytest processes of 2 threads at once,
#      bench/sharded_pytest.py: TEST_WORKERS, TEST_THREADS); the CUDA-only tests also run on their
#      own first.
# OUT_DIR receives at most 8 files: summary.json (every step's status and seconds),
# speed_cuda_cuda-graphs.json, speed_cuda_none.json (speed_cpu_none.json in a dry run),
# agreement_cpu_vs_cuda.json, agreement_graphs_vs_none.json and logs.tar.gz (every step's log and
# the runs' metrics.json). Environment: PYTHON (default python), CPU_THREADS for the CPU run
# (default 4), GPU_CHECK_SECONDS (default 290: the tests get what is left, at least 60 s).
# Exit status: 0 when every step passed, 1 otherwise, 2 for bad arguments.
set -euo pipefail

usage="usage: bench/gpu_check.sh OUT_DIR [--dry-run]"
[[ $# -ge 1 && $# -le 2 ]] || { echo "$usage" >&2; exit 2; }
out=$1
dry_run=false
if [[ $# -eq 2 ]]; then
  [[ $2 == --dry-run ]] || { echo "$usage (unknown option $2)" >&2; exit 2; }
  dry_run=true
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [[ -n $(ls -A "$out") ]]; then
  echo "gpu_check.sh: $out is not empty; give an empty or new folder (nothing is overwritten)" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
logs=$work/logs
mkdir -p "$logs"
budget=${GPU_CHECK_SECONDS:-290}  # under 5 minutes; the steps before the tests took 190 s on an H200
started=$SECONDS
status_file=$work/steps.tsv
: >"$status_file"
failed=0

# step NAME TIMEOUT_SECONDS COMMAND...: run COMMAND with its output in logs/NAME.log; record status and time.
step() {
  local name=$1 limit=$2
  shift 2
  local begin=$SECONDS rc=0
  echo "== $name (timeout ${limit}s)" >&2
  timeout --kill-after=10 "$limit" "$@" >"$logs/$name.log" 2>&1 || rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - begin))" >>"$status_file"
  if [[ $rc -ne 0 ]]; then
    failed=1
    echo "   $name failed (exit $rc; 124 = timed out); last lines:" >&2
    tail -n 5 "$logs/$name.log" >&2 || true
  fi
  return 0
}

skip() {
  printf '%s\t%s\t%s\n' "$1" "skipped" 0 >>"$status_file"
}

finish() {
  "$python" - "$status_file" "$out/summary.json" "$dry_run" "$((SECONDS - started))" <<'EOF'
import json, sys
path, target, dry_run, seconds = sys.argv[1:]
steps = []
for line in open(path):
    name, status, took = line.rstrip("\n").split("\t")
    steps.append({"step": name, "exit_status": None if status == "skipped" else int(status),
                  "skipped": status == "skipped", "seconds": int(took)})
try:
    import torch
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
except Exception as error:  # the summary is written whatever happened
    env = {"error": repr(error)}
summary = {"dry_run": dry_run == "true", "seconds": int(seconds), "environment": env, "steps": steps,
           "passed": all(s["exit_status"] == 0 for s in steps if not s["skipped"])}
with open(target, "w") as handle:
    json.dump(summary, handle, indent=2)
EOF
  for run in cpu cuda_none cuda_graphs; do
    if [[ -f $work/runs/$run/metrics.json ]]; then cp "$work/runs/$run/metrics.json" "$logs/metrics_$run.json"; fi
  done
  tar -czf "$out/logs.tar.gz" -C "$work" logs
  echo "gpu_check.sh: results in $out (summary.json); work folder $work" >&2
}
trap finish EXIT

if $dry_run; then
  device=cpu
  graphs=none
else
  device=cuda
  graphs=cuda-graphs
fi

step environment 60 "$python" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available()); \
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'); print(torch.__config__.show())"
if ! $dry_run; then
  step nvidia_smi 30 nvidia-smi
fi

# The CUDA-only tests first (graph replay gives exactly the eager numbers; auto picks graphs).
if ! $dry_run; then
  step tests_cuda 120 "$python" -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py
else
  skip tests_cuda
fi

step prepare_ml1m 120 "$python" bench/speed.py --prepare-only --n-users 6040 --work-dir "$work/ml1m"
step prepare_small 60 "$python" bench/speed.py --prepare-only --n-users 600 --work-dir "$work/small"

# The benchmark: the ML-1M-scale set on CUDA; a dry run times the small set on CPU instead.
bench_flags=(--prepared --work-dir "$work/ml1m" --device "$device" --subset 256 --rounds 1 --scaling 1,32,256)
if $dry_run; then
  bench_flags=(--prepared --work-dir "$work/small" --device cpu --subset 64 --rounds 1 --scaling 1,32)
fi
step speed_graphs 150 "$python" bench/speed.py "${bench_flags[@]}" --compile "$graphs" \
  --json "$out/speed_${device}_$graphs.json"
if $dry_run; then
  skip speed_none
else
  step speed_none 150 "$python" bench/speed.py "${bench_flags[@]}" --compile none --json "$out/speed_${device}_none.json"
fi

# One epoch on the small set: CPU, then the device with and without graphs.
run_flags=(--dataset synthetic --data-dir "$work/small/processed" --epochs 1 --no-ablation --quiet)
mkdir -p "$work/runs"
step train_cpu 120 env OMP_NUM_THREADS="${CPU_THREADS:-4}" "$python" mamoRec.py "${run_flags[@]}" --device cpu --compile none \
  --run-dir "$work/runs/cpu"
step train_none 120 "$python" mamoRec.py "${run_flags[@]}" --device "$device" --compile none --run-dir "$work/runs/cuda_none"
step train_graphs 120 "$python" mamoRec.py "${run_flags[@]}" --device "$device" --compile "$graphs" \
  --run-dir "$work/runs/cuda_graphs"
step agree_cpu_vs_cuda 60 "$python" bench/metrics_agreement.py "$work/runs/cpu" "$work/runs/cuda_none" \
  --tolerance 5e-3 --json "$out/agreement_cpu_vs_cuda.json"
step agree_graphs_vs_none 60 "$python" bench/metrics_agreement.py "$work/runs/cuda_graphs" "$work/runs/cuda_none" \
  --tolerance 1e-6 --json "$out/agreement_graphs_vs_none.json"

# The whole suite with the time that is left, as TEST_WORKERS pytest processes of TEST_THREADS
# threads at once (bench/sharded_pytest.py: the test files dealt among them; the GPU image has no
# pytest-xdist). On an H200 machine one process with 16 threads ran the first 233 tests in 125 s,
# 2.6 times as long as the 2-core CI machine. A test still running after 60 s has its stack
# written to its shard's log.
left=$((budget - (SECONDS - started)))
if ((left < 60)); then left=60; fi
step tests "$left" env OMP_NUM_THREADS="${TEST_THREADS:-2}" "$python" bench/sharded_pytest.py \
  --shards "${TEST_WORKERS:-8}" --log-dir "$logs/test_shards" -- -q -p no:cacheprovider --durations=5 \
  -o faulthandler_timeout=60

exit "$failed"
