#!/usr/bin/env bash
# One accelerator session's checks, in priority order, each part under its own time limit so that a slow
# part leaves the next its share and every finished part's files are already written:
#
#   bash bench/device_check.sh OUT_DIR [SECONDS]
#
# 1. the machine and library versions, and a smoke check of every implementation against a float64
#    reference (bench/device_smoke.py);
# 2. the common-case suite's decode, causal, jvp, mask_mod and compile parts (bench/common_case.py);
# 3. the auto rule's measurements on this backend (bench/auto_rule.py: jax.nn's XLA and cuDNN attention,
#    jattn's blockwise kernel and reference, short to long sequences, decode caches);
# 4. the test suite (the default tier, one worker per few cores), as far as the remaining time allows;
# 5. the common-case suite's auto part with what time is left.
#
# Runs from the repository root with whatever JAX the machine has (no install: PYTHONPATH). SECONDS is the
# whole budget (default 540). Each part writes OUT_DIR/<part>.log and its JSON result where it has one.
set -u
out=${1:?usage: bash bench/device_check.sh OUT_DIR [SECONDS]}
budget=${2:-540}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

left() { echo $((budget - SECONDS)); }
part() {  # part NAME LIMIT_SECONDS COMMAND...: runs COMMAND for at most min(LIMIT, time left - 5) seconds
    local name=$1 limit=$2
    shift 2
    local allowed=$(($(left) - 5 < limit ? $(left) - 5 : limit))
    if ((allowed < 10)); then
        echo "== $name: skipped, ${allowed}s left" | tee "$out/$name.log"
        return
    fi
    echo "== $name (at most ${allowed}s, at ${SECONDS}s)"
    timeout "$allowed" "$@" 2>&1 | tee "$out/$name.log" | grep -v '^PASSED\|PASSED \[' | tail -n 40
    echo "== $name: exit ${PIPESTATUS[0]} at ${SECONDS}s"
}

part info 30 bash -c "nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv; nproc;
    $py -c 'import jax, flax, numpy; print(jax.__version__, flax.__version__, numpy.__version__, jax.devices())'"
part smoke 60 "$py" bench/device_smoke.py
part common-case 170 "$py" -m bench.common_case --part decode causal jvp mask_mod compile --rounds 9 \
    --long-rounds 7 --out "$out/common-case.json"
part auto-rule 130 "$py" -m bench.auto_rule --seq 256 1024 4096 --option none causal lengths bias soft_cap decode \
    --rounds 5 --contenders jax.nn:xla jax.nn:cudnn jattn:blockwise jattn:reference --out "$out/auto-rule.json"
part tests 170 "$py" -m pytest -v -n 12 --dist loadgroup -m "not slow" --maxfail 60 \
    --ignore tests/test_packaging.py --ignore tests/test_docs.py
part common-case-auto 120 "$py" -m bench.common_case --part auto --rounds 7 --out "$out/common-case-auto.json"
grep -h "FAILED\|ERROR\|passed\|failed" "$out/tests.log" 2>/dev/null | grep -v "PASSED" | tail -n 70
