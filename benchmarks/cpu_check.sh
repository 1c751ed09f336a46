#!/usr/bin/env bash
# Issue 11's CPU measurements in one command, for a CPU kind not measured yet (or again):
#
#     OUT=cpu-check PAPER_CODE=/path/to/HTmuon/llama_pretraining/muon.py bash benchmarks/cpu_check.sh | tee cpu-check.log
#
# Every figure is a ratio to torch.optim.Muon's step timed in the same run, one torch thread, and
# every table's header names the CPU (model, family/model, matmul ISA: avx2 / avx512_bf16 / amx_bf16).
# About 35-45 minutes of one core on the CPUs measured so far (BENCHMARKS.md §A-12 to §A-14); pause
# other jobs on the machine while it runs (it does not do so itself).
#
# 1. benchmarks/shape_cost.py --matmul and --batched: what bf16 costs against fp32 here (what
#    `method="auto"` / `ns_dtype="auto"` decide from the CPU's flags should agree with it), and
#    batched against per-matrix products (`gram`'s choice).
# 2. benchmarks/step_cost.py: the LLaMA-60M set, every row of issue 11's targets (default, fast in
#    fp32 and in bf16, fast5, interval=5; also eigh and HTMuon's own p = 0 step; with PAPER_CODE the
#    paper's optimizer and its interval variant), 6 rounds; then the LLaMA-135M set, 3 rounds,
#    without errors.
# 3. benchmarks/memory.py: each step's transient memory against issue 11's bound, both sets.
# 4. benchmarks/chunk_budget.py: step time and memory at chunk_bytes 8 / 16 / 32 MiB (the CPU
#    default is 32 MiB; §A-13 found 16 MiB meets the 60M set's bound at the same time on a Zen 5).
# 5. benchmarks/compile_step.py --profile 4: torch.compile(opt.step) against eager, the time split
#    into matrix products and the rest.
#
# PARTS (default "1 2 3 4 5") picks parts; QUICK=1 shrinks every part to a smoke run (a few minutes:
# 1 layer, 1 round; its numbers mean nothing). Data lands in $OUT (default cpu-check) as .json/.txt.
set -u
OUT=${OUT:-cpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
PARTS=" ${PARTS:-1 2 3 4 5} "
t0=$(date +%s)
say() { echo "[cpu_check +$(($(date +%s) - t0))s] $*"; }

paper=()
[ -n "${PAPER_CODE:-}" ] && paper=(--paper-code "$PAPER_CODE")
quick=()
rounds60=6 rounds135=3 budget60=480 budget135=500 crounds=5 csteps=12 cmodels=(60m 135m) blocks=2
if [ -n "${QUICK:-}" ]; then
    quick=(--layers 1)
    rounds60=1 rounds135=1 budget60=60 budget135=60 crounds=1 csteps=2 cmodels=(60m) blocks=1
fi

{
    lscpu | grep -E "Model name|^CPU\(s\)|Thread\(s\) per core"
    grep -m1 "cpu family" /proc/cpuinfo
    grep -m1 "^model[[:space:]]*:" /proc/cpuinfo
    grep -m1 -o -w -E "amx_bf16|avx512_bf16|avx2" /proc/cpuinfo | sort -u | tr '\n' ' '
    echo
    $PY -c "import torch; print('torch', torch.__version__, 'capability', torch.backends.cpu.get_cpu_capability())"
} 2>&1

if [[ $PARTS == *" 1 "* ]]; then
    say "1. bf16 vs fp32 matmul; batched vs per-matrix Gram matrices"
    $PY benchmarks/shape_cost.py --matmul --repeats 5 2>&1 | tee "$OUT/matmul.txt"
    say "matmul: exit ${PIPESTATUS[0]}"
    $PY benchmarks/shape_cost.py --batched --repeats 7 --shapes 1x768x2048 4x512x512 8x512x512 2x512x1376 \
        2x1376x512 4x768x768 2x768x2048 2>&1 | tee "$OUT/batched_gram.txt"
    say "batched: exit ${PIPESTATUS[0]}"
fi

if [[ $PARTS == *" 2 "* ]]; then
    say "2. step cost vs torch.optim.Muon (60M set, then 135M)"
    rows60=(p0 default fast_fp32 fast_bf16 fast5 interval5 eigh)
    rows135=(p0 default fast5 interval5)
    if [ -n "${PAPER_CODE:-}" ]; then
        rows60+=(paper paper_interval5)
        rows135+=(paper)
    fi
    $PY benchmarks/step_cost.py --models 60m --rounds "$rounds60" --budget-s "$budget60" "${quick[@]}" \
        --rows "${rows60[@]}" "${paper[@]}" --json "$OUT/step_cost_60m.json" 2>&1
    say "step cost 60M: exit $?"
    $PY benchmarks/step_cost.py --models 135m --rounds "$rounds135" --budget-s "$budget135" "${quick[@]}" \
        --rows "${rows135[@]}" "${paper[@]}" --no-errors --json "$OUT/step_cost_135m.json" 2>&1
    say "step cost 135M: exit $?"
fi

if [[ $PARTS == *" 3 "* ]]; then
    say "3. memory"
    $PY benchmarks/memory.py --models 60m 135m --rows p0 default fast5 "${quick[@]}" \
        --json "$OUT/memory.json" 2>&1
    say "memory: exit $?"
fi

if [[ $PARTS == *" 4 "* ]]; then
    say "4. chunk budget"
    $PY benchmarks/chunk_budget.py --device cpu --models "${cmodels[@]}" --budgets 8 16 32 --rounds "$crounds" \
        --steps 2 --threads 1 --json "$OUT/chunk_budget.json" 2>&1
    say "chunk budget: exit $?"
fi

if [[ $PARTS == *" 5 "* ]]; then
    say "5. compiled vs eager"
    $PY benchmarks/compile_step.py --configs default,fast5,muon --blocks "$blocks" --steps "$csteps" --profile 4 \
        --json "$OUT/compile_step.json" 2>&1 | grep -v "^W[0-9]"
    say "compile: exit ${PIPESTATUS[0]}"
fi
say "end"
