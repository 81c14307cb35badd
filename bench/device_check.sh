#!/usr/bin/env bash
# One accelerator session's checks, each part under its own time limit so that a slow part leaves the next
# its share and every finished part's files are already written:
#
#   bash bench/device_check.sh OUT_DIR [SECONDS [PART ...]]
#
# Parts, in the default order (name some to run only those, in the order given):
#   info        the machine and library versions;
#   smoke       every implementation against a float64 truth (bench/device_smoke.py, ~1 s a program);
#   tests       the test suite's default tier (one worker per core; failures with their reason, one line
#               each: -v and --tb=line, since pytest-xdist prints tracebacks only at the very end);
#   common-case the common-case suite's decode, causal, jvp, mask_mod and compile parts;
#   auto-rule   the auto rule's measurements (jax.nn's XLA and cuDNN attention, jattn's blockwise kernel and
#               materialized reference up to 4096, bfloat16 first, decode caches), keeping the committed
#               GPU result's cases the time box cuts (--keep: its JSON is whole either way);
#   auto        the common-case suite's auto part.
#
# Runs from the repository root with whatever JAX the machine has (no install: PYTHONPATH). SECONDS is the
# whole budget (default 540). Each part writes OUT_DIR/<part>.log and its JSON result where it has one.
# What one H200 session measured with it is in docs/performance.md ("On a GPU"): there the suite took
# longer than 300 s (85% done), so give `tests` a call of its own.
set -u
out=${1:?usage: bash bench/device_check.sh OUT_DIR [SECONDS [PART ...]]}
budget=${2:-540}
shift $(($# < 2 ? $# : 2))
parts=("$@")
((${#parts[@]})) || parts=(info smoke tests common-case auto-rule auto)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

part() { # part NAME LIMIT_SECONDS COMMAND...: runs COMMAND for at most min(LIMIT, time left - 5) seconds
    local name=$1 limit=$2 left=$((budget - SECONDS - 5))
    shift 2
    local allowed=$((left < limit ? left : limit))
    if ((allowed < 10)); then
        echo "== $name: skipped, ${allowed}s left" | tee "$out/$name.log"
        return
    fi
    echo "== $name (at most ${allowed}s, at ${SECONDS}s)"
    timeout "$allowed" "$@" 2>&1 | tee "$out/$name.log" | grep -Ev ' (PASSED|SKIPPED) |^tests/' | tail -n 60
    echo "== $name: exit ${PIPESTATUS[0]} at ${SECONDS}s"
}

for name in "${parts[@]}"; do
    case $name in
    info) part info 30 bash -c "nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv; nproc;
        $py -c 'import jax, flax, numpy; print(jax.__version__, flax.__version__, numpy.__version__, jax.devices())'" ;;
    smoke) part smoke 90 "$py" bench/device_smoke.py ;;
    # pytest-benchmark warns under xdist, and filterwarnings = error would fail the run on it
    tests) part tests 420 "$py" -m pytest -v --tb=line -n "$(nproc)" --dist loadgroup -m "not slow" \
        -p no:benchmark -p no:cov --ignore tests/test_packaging.py --ignore tests/test_docs.py ;;
    common-case) part common-case 200 "$py" -m bench.common_case --part decode causal jvp mask_mod compile \
        --rounds 9 --long-rounds 7 --out "$out/common-case.json" ;;
    auto-rule) part auto-rule 240 "$py" -m bench.auto_rule --seq 256 1024 4096 --dtype bfloat16 float32 \
        --option none causal lengths bias soft_cap decode --rounds 5 --reference-max-seq 4096 \
        --contenders jax.nn:xla jax.nn:cudnn jattn:blockwise jattn:reference \
        --keep bench/results/auto-rule-gpu.json --out "$out/auto-rule.json" ;;
    auto) part auto 150 "$py" -m bench.common_case --part auto --rounds 7 --out "$out/common-case-auto.json" ;;
    *) echo "unknown part $name" >&2 && exit 2 ;;
    esac
done
