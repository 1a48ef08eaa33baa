#!/usr/bin/env bash
# The one script to run on a GPU device machine for the GPU step-speed figures: device set-up,
# then train_step.py and profile_step.py in order of priority, inside a fixed time budget, so
# that one session of a few minutes brings back whole tables. Run from the repo root, with the
# wheels carried:
#
#     bash benchmarks/build_wheels.sh            # first, here: .whl/ (cp312 wheels of our pins, ~46 MiB)
#     bash benchmarks/gpu_run.sh                 # the device run (carry=[".whl"]), under 8 minutes
#     bash benchmarks/gpu_run.sh --dry-run       # the same sequence on CPU (or DRY_RUN=1), a few minutes
#     PARTS="zero3 1b-b4 refs" bash benchmarks/gpu_run.sh   # other parts, in this order (a second session)
#
# Parts, in the default order (PARTS picks and orders them; setup always runs first on a GPU):
#   setup          bash benchmarks/device_setup.sh (wheels, pargo_dist on the path; ~30 s)
#   1b-b16         train_step 1b, batch 16: pargo_dist ZeRO-2, pargo_dist megatron (TP=1)
#   profile-ds     profile_step 1b DeepSpeed ZeRO-2, batch 16: parts, GPU busy, host syncs per step
#   compiled       train_step 1b, batch 16: pargo_dist with train.compile=true (the compile is in warm-up)
#   3b             train_step 3b, batch 8 (B3_BATCH): pargo_dist ZeRO-2, megatron (the planner puts
#                  batch 16 at ~140 GiB, the H200's edge, and batch 8 at ~100; an out-of-memory row
#                  still shows the prediction)
#   profile-mcore  profile_step 1b megatron TP=1, batch 16
#   zero3          train_step 1b, batch 16: pargo_dist ZeRO-3 forced to stage 3 on one GPU (--force-zero3)
#   1b-b4          train_step 1b, batch 4: pargo_dist ZeRO-2, megatron (the batch of earlier results)
#   refs           train_step 1b, batch 16: bare deepspeed, hf trainer (framework overhead)
# Why this order: a 1b row costs ~50-70 s on an H200, mostly start-up (imports, model build,
# DeepSpeed set-up; the tables' "start s" column says how much), so 8 minutes hold about six
# runs. The first parts answer the main questions (our step vs megatron at a batch that
# fills the GPU, where the host waits, what compile buys, whether 3b fits as planned); the rest
# run when time is left and are reported as skipped otherwise.
#
# Time: BUDGET_S (default 450 s, from the script's start: 7.5 minutes) is a hard budget. A part
# starts only with MIN_PART_S (default 60; dry run 10) left; it runs under `timeout` at the lesser
# of its own slice and what is left, and train_step.py gets --budget-s (10 s less), so it skips
# rows rather than being killed and always prints its table. Elapsed seconds are printed after
# each part. B3_BATCH (default 8) sets the 3b part's batch (the planner: ~80 GiB at 4, ~100 at 8, ~120 at 12).
#
# Output: everything is tee'd into $OUT/gpu_run.log (OUT defaults to ./gpu-out), and the tables
# and profile reports are gathered in $OUT/summary.txt (printed at the end), with each part's
# status and seconds. Only these two files: the device runner returns at most 8.
#
# --dry-run / DRY_RUN=1: the same parts on CPU, without setup, with size small for 1b and tiny
# for 3b, batch 2 for 16 and 1 for 4, one warm-up and one timed step, compile_backend aot_eager
# (inductor's C++ build takes minutes on CPU), the venv's python and a budget of 900 s: it checks
# that every command, option and table works, not any figure.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

DRY="${DRY_RUN:-0}"
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_run.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
    esac
done

OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_run.log"
SUMMARY="$OUT/summary.txt"
PARTS_DIR="$(mktemp -d)"  # per-part logs (not in $OUT: the runner returns 8 files at most)
trap 'rm -rf "$PARTS_DIR"' EXIT
: >"$LOG"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE= TOKENIZERS_PARALLELISM=false

if [ "$DRY" = 1 ]; then
    PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    BUDGET_S="${BUDGET_S:-900}"
    S1B=small S3B=tiny B16=2 B8=2 B4=1 STEPS=(--warmup 1 --steps 1) PSTEPS=(--warmup 1 --steps 1)
    CASE=300 COMPILE=(--compile-backend aot_eager) MIN_ROW=10 MIN_PART=10
    DEFAULT_PARTS="1b-b16 profile-ds compiled 3b profile-mcore zero3 1b-b4 refs"
else
    PY="${PYTHON:-python3}"
    BUDGET_S="${BUDGET_S:-450}"
    S1B=1b S3B=3b B16=16 B8=8 B4=4 STEPS=(--warmup 2 --steps 6) PSTEPS=(--warmup 1 --steps 2)
    CASE=150 COMPILE=() MIN_ROW=40 MIN_PART=60
    DEFAULT_PARTS="setup 1b-b16 profile-ds compiled 3b profile-mcore zero3 1b-b4 refs"
fi
MIN_PART_S="${MIN_PART_S:-$MIN_PART}"
B3="${B3_BATCH:-$B8}"
PARTS="${PARTS:-$DEFAULT_PARTS}"
if [ "$DRY" != 1 ] && [[ " $PARTS " != *" setup "* ]]; then PARTS="setup $PARTS"; fi

START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "$*" | tee -a "$LOG"; }
STATUS=()  # "part | status | seconds" lines for the summary

# run_part NAME SLICE_S KIND CMD...: KIND is "table" (train_step: gets --budget-s) or "plain".
run_part() {
    local name="$1" slice="$2" kind="$3"; shift 3
    local left=$(( BUDGET_S - $(elapsed) ))
    if [ "$left" -lt "$MIN_PART_S" ]; then
        say "== $name: skipped ($left s of the ${BUDGET_S} s budget left, under MIN_PART_S=$MIN_PART_S)"
        STATUS+=("$name | skipped: budget | 0")
        return 0
    fi
    local limit=$(( slice < left ? slice : left ))
    if [ "$kind" = table ] && [ $(( limit - 10 )) -lt "$MIN_ROW" ]; then
        say "== $name: skipped ($limit s is too little for a row: MIN_ROW=$MIN_ROW s + 10 s to print)"
        STATUS+=("$name | skipped: budget | 0")
        return 0
    fi
    local cmd=("$@")
    [ "$kind" = table ] && cmd+=(--budget-s "$(( limit - 10 ))" --min-row-s "$MIN_ROW")
    say "== $name: ${cmd[*]}  (limit ${limit} s; at $(elapsed) s of ${BUDGET_S})"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "${cmd[@]}" 2>&1 | tee "$PARTS_DIR/$name.txt" >>"$LOG"
    local rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - t0 ))
    local status="ok"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="timed out after ${limit} s"
    [ "$rc" -ne 0 ] && [ "$status" = ok ] && status="exit $rc"
    say "== $name: $status in ${took} s (elapsed $(elapsed) s of ${BUDGET_S})"
    STATUS+=("$name | $status | $took")
    return "$rc"
}

TS=("$PY" benchmarks/train_step.py --case-timeout "$CASE" "${STEPS[@]}")
PS=("$PY" benchmarks/profile_step.py "${PSTEPS[@]}")
say "gpu_run.sh: $([ "$DRY" = 1 ] && echo "DRY RUN (CPU)" || echo "device run") | parts: $PARTS | budget ${BUDGET_S} s | python $PY | out $OUT"

for part in $PARTS; do
    case "$part" in
        setup)
            [ "$DRY" = 1 ] && { say "== setup: skipped (dry run)"; STATUS+=("setup | skipped: dry run | 0"); continue; }
            if ! run_part setup 120 plain bash benchmarks/device_setup.sh; then
                say "== setup failed: nothing else can run (see $LOG)"
                break
            fi ;;
        1b-b16)
            run_part 1b-b16 170 table "${TS[@]}" --sizes "$S1B" --batch "$B16" --zero 2 \
                --contenders pargo_dist megatron ;;
        profile-ds)
            run_part profile-ds 90 plain "${PS[@]}" --size "$S1B" --batch "$B16" --backend deepspeed --zero 2 ;;
        compiled)
            run_part compiled 180 table "${TS[@]}" --sizes "$S1B" --batch "$B16" --zero 2 \
                --contenders compiled "${COMPILE[@]}" ;;
        3b)
            run_part 3b 240 table "${TS[@]}" --sizes "$S3B" --batch "$B3" --zero 2 \
                --contenders pargo_dist megatron --case-timeout 200 ;;
        profile-mcore)
            run_part profile-mcore 90 plain "${PS[@]}" --size "$S1B" --batch "$B16" --backend megatron ;;
        zero3)
            run_part zero3 100 table "${TS[@]}" --sizes "$S1B" --batch "$B16" --zero 3 --force-zero3 \
                --contenders pargo_dist ;;
        1b-b4)
            run_part 1b-b4 150 table "${TS[@]}" --sizes "$S1B" --batch "$B4" --zero 2 \
                --contenders pargo_dist megatron ;;
        refs)
            run_part refs 150 table "${TS[@]}" --sizes "$S1B" --batch "$B16" --zero 2 \
                --contenders "bare deepspeed" "hf trainer" ;;
        *)
            say "== $part: unknown part (known: setup 1b-b16 profile-ds compiled 3b profile-mcore zero3 1b-b4 refs)"
            STATUS+=("$part | unknown | 0") ;;
    esac
done

{
    echo "gpu_run.sh summary: $([ "$DRY" = 1 ] && echo "DRY RUN (CPU; figures mean nothing)" || echo "device run")," \
        "$(elapsed) s in all (budget ${BUDGET_S} s)"
    [ "$DRY" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    printf '%-15s %-28s %s\n' part status seconds
    for line in "${STATUS[@]}"; do
        IFS='|' read -r p s t <<<"$line"
        printf '%-15s %-28s %s\n' "$(echo $p)" "$(echo $s)" "$(echo $t)"
    done
    for part in $PARTS; do
        f="$PARTS_DIR/$part.txt"
        [ -s "$f" ] || continue
        case "$part" in
            setup) echo; echo "---- setup"; grep -E '^(imports ok|note:|NVIDIA|nvidia-smi)' "$f" ;;
            profile-*) echo; echo "---- $part"; awk '/^\[[A-Za-z0-9]+\] /{on=1} on' "$f" ;;
            *) echo; echo "---- $part"; awk '/^\[[A-Za-z0-9]+ \| batch [0-9]+\] /{on=1} on && /^$/{on=0} on' "$f" ;;
        esac
    done
} >"$SUMMARY"
echo | tee -a "$LOG"
tee -a "$LOG" <"$SUMMARY"
