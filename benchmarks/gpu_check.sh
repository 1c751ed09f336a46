#!/usr/bin/env bash
# The GPU check of issues 11 and 14 in one command, sized for a 15-minute lease of one GPU:
#
#     OUT=gpu-check PAPER_CODE=/path/to/HTmuon/llama_pretraining/muon.py bash benchmarks/gpu_check.sh
#
# 1. benchmarks/step_cost.py on CUDA: every row against torch.optim.Muon on the LLaMA-60M and
#    LLaMA-135M matrix sets (wall-clock ratios; with PAPER_CODE also the paper's own optimizer).
#    Then benchmarks/chunk_budget.py: step time and memory against chunk_bytes, and
#    benchmarks/step_profile.py: operators, kernels and device syncs per step.
# 2. benchmarks/memory.py on CUDA: each step's transient memory (torch.cuda.max_memory_allocated).
# 3. The gpu-60m preset shortened to SHORT_STEPS steps (default 100) of the paper's batch (512 x 256
#    tokens) for AdamW, Muon and HTMuon: it shows the harness runs on the GPU (bf16 autocast) and
#    measures each optimizer's time per step at the paper's size, hence the full preset's time. The
#    data is the built-in corpus (nothing can be downloaded on the lent machine): about ten steps
#    per epoch at this batch, so its losses say nothing about the optimizers.
# 4. Only when PARTS names it: the llama-small size-scan cells of seed 0 in fp32, one process each,
#    at the lrs of RESULTS.md's llama-small command, for at most SMALL_S seconds (default 300; a
#    stopped cell keeps its checkpoint there, which the CPU command cannot continue: fp32 on the GPU
#    is another config than "auto"; never run on a GPU so far).
#
# 0. The tests that need CUDA.
# PARTS (default "0 1 2 3", add 4 for llama-small) picks parts. For a dry run on a CPU: DEVICE=cpu
# LAYERS=1 SHORT_EXTRA="--model llama-micro --batch-size 2 --grad-accum 1" SMALL_EXTRA="--steps 20".
# Tables go to stdout (tee it to a log); data lands in $OUT (default gpu-check): the benchmarks' .json,
# the short runs' results and log, llama-small's run folders as small.tar.gz (no checkpoints).
set -u
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
PARTS=" ${PARTS:-0 1 2 3} "
layers=()
[ -n "${LAYERS:-}" ] && layers=(--layers "$LAYERS")
t0=$(date +%s)
say() { echo "[gpu_check +$(($(date +%s) - t0))s] $*"; }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    lscpu | grep -E "Model name|^CPU\(s\)"
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1

if [[ $PARTS == *" 0 "* ]]; then
    say "0. the CUDA-only tests"
    timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_diagnostics.py tests/test_accelerator_paths.py -k cuda 2>&1 |
        tail -n 8
fi

paper=()
[ -n "${PAPER_CODE:-}" ] && paper=(--paper-code "$PAPER_CODE")

if [[ $PARTS == *" 1 "* ]]; then
    say "1. step cost vs torch.optim.Muon"
    timeout "${STEP_COST_S:-170}" $PY benchmarks/step_cost.py --device "$DEVICE" --threads 0 --models 60m 135m \
        --rounds "${ROUNDS:-30}" --budget-s "${STEP_BUDGET_S:-100}" "${layers[@]}" "${paper[@]}" \
        --json "$OUT/step_cost_gpu.json" 2>&1
    say "step cost: exit $?"
    timeout "${CHUNK_S:-90}" $PY benchmarks/chunk_budget.py --device "$DEVICE" --threads 0 \
        --budgets 48 128 512 --json "$OUT/chunk_budget_gpu.json" 2>&1
    say "chunk budget: exit $?"
    # operators, kernels and device syncs per step (BENCHMARKS.md §A-8 counted them on a CPU)
    timeout "${PROFILE_S:-60}" $PY benchmarks/step_profile.py --device "$DEVICE" --threads 0 --model 60m --rows muon p0 \
        default --steps 3 --python 2>&1 | tee "$OUT/profile_gpu.txt"
    say "profile: exit $?"
fi

if [[ $PARTS == *" 2 "* ]]; then
    say "2. memory"
    timeout "${MEMORY_S:-60}" $PY benchmarks/memory.py --device "$DEVICE" --threads 0 --models 60m 135m \
        "${layers[@]}" "${paper[@]}" --json "$OUT/memory_gpu.json" 2>&1
    say "memory: exit $?"
fi

if [[ $PARTS == *" 3 "* ]]; then
    say "3. gpu-60m, ${SHORT_STEPS:=100} steps per optimizer"
    short=/tmp/gpu-60m-short
    # shellcheck disable=SC2086  # SHORT_EXTRA is a list of options
    timeout "${SHORT_S:-240}" $PY -m htmuon compare --preset gpu-60m --steps "$SHORT_STEPS" --seeds 0 \
        --optimizers adamw,muon,htmuon --eval-every "$SHORT_STEPS" --eval-batches 10 --ckpt-every 0 \
        --log-every 10 --progress log --no-alpha --device "$DEVICE" ${SHORT_EXTRA:-} --out-dir "$short" \
        > "$OUT/gpu60m_short.log" 2>&1
    say "gpu-60m: exit $?"
    tail -n 30 "$OUT/gpu60m_short.log"
    cp "$short/results.json" "$OUT/gpu60m_short_results.json" 2>/dev/null
    cp "$short/results.md" "$OUT/gpu60m_short_results.md" 2>/dev/null
fi

if [[ $PARTS == *" 4 "* ]]; then
    say "4. llama-small, seed 0, at most ${SMALL_S:=300} s"
    small=/tmp/small
    pids=()
    mkdir -p "$small"
    for cell in "muon=0.01" "htmuon:method=fast=0.02" "htmuon:method=fast,p=0.03125=0.01" \
        "htmuon:method=fast,p=0.0625=0.01"; do
        spec=${cell%=*}
        name=$(echo "$spec" | tr ':=,' '___')
        timeout "$SMALL_S" $PY -m htmuon compare --preset size-scan --model llama-small --seeds 0 \
            --optimizers "$spec" --lr-grid "$cell" --adamw-lr-grid "$spec=0.0333" --device "$DEVICE" --dtype fp32 \
            --threads 1 ${SMALL_EXTRA:-} --progress log --no-plots --out-dir "$small/$name" \
            > "$small/$name.log" 2>&1 &
        pids+=($!)
    done
    wait "${pids[@]}"
    say "llama-small done"
    tail -n 3 "$small"/*.log
    tar czf "$OUT/small.tar.gz" -C "$small" --exclude='*.safetensors' --exclude='*.pt' --exclude='ckpt*' . 2>/dev/null
fi
say "end"
