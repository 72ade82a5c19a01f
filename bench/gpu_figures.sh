#!/usr/bin/env bash
# The GPU figures of bench/README.md in one call, on a machine with one CUDA GPU:
#
#     bench/gpu_figures.sh PTB_DATA_DIR OUT_DIR [PART ...]
#
# PARTs (default: all, in this order): capture_test speed_small speed_medium search_1gpu
# search_quarter large_eager large_captured speed_small_compiled speed_large speed_medium_bf16
# speed_large_bf16.
# In order of importance, each part under a time limit of its own (a part that fails or runs
# out of time is logged and the next one starts):
#   1. the captured step against the eager step over 100 steps (tests/test_step_capture.py), and
#      a tiny bench/ptb_speed.py run whose every CUDA graph replays (tests/test_bench.py);
#   2. bench/ptb_speed.py --device cuda: small, medium (fp32), the captured step beside the
#      plain loop and the eager step;
#   3. a search of 8 one-epoch trials from `small`, at 1 GPU per trial, then at 0.25;
#   4. one epoch of `large --gpu`, the eager step (LSTM_CUDA_GRAPH=0), then the captured one;
#   5. bench/ptb_speed.py --compiled for small (torch.compile's reduce-overhead beside the
#      captured step), then large, and bf16 for medium and large.
# OUT_DIR/log.txt gets every command's output; OUT_DIR/figures.jsonl one JSON line per figure.
set -u
data=$(realpath "$1") out=$(realpath "$2")
shift 2
parts=" $* "
wanted() { [[ $parts == "  " || $parts == *" $1 "* ]]; }  # no PARTs: every part
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
log=$out/log.txt figures=$out/figures.jsonl
runs=$(mktemp -d /tmp/gpu-figures-XXXX)
export PYTHONUNBUFFERED=1 RAY_TMPDIR=$runs/ray
mkdir -p "$RAY_TMPDIR"

# part NAME LIMIT_S COMMAND...: run COMMAND, its output appended to the log; its last stdout
# line kept as a figure when it is JSON; its wall time and exit status as a figure too.
part() {
    local name=$1 limit=$2
    shift 2
    wanted "$name" || return 0
    echo "== $(date +%T) $name: $*" | tee -a "$log"
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" >"$runs/$name.out" 2>>"$log"
    local rc=$? wall=$((SECONDS - start))
    cat "$runs/$name.out" >>"$log"
    local last
    last=$(tail -n 1 "$runs/$name.out")
    if [[ $last == \{* ]]; then echo "{\"part\": \"$name\", \"figure\": $last}" >>"$figures"; fi
    echo "{\"part\": \"$name\", \"rc\": $rc, \"wall_s\": $wall}" | tee -a "$figures"
}

# results NAME DIR: a run's results.json (less its config), or a search's search_summary.json
# and its trials' times, as a figure.
results() {
    wanted "$1" || return 0
    $py - "$1" "$2" >>"$figures" <<'EOF'
import json, sys
from pathlib import Path
name, top = sys.argv[1], Path(sys.argv[2])
found = sorted(top.glob("search_summary.json")) or sorted(top.rglob("results.json"))
r = json.loads(found[-1].read_text()) if found else {"missing": str(top)}
r.pop("config", None), r.pop("files", None)
if found and found[-1].name == "search_summary.json":  # each trial: hidden size, train and wall time
    found = sorted(top.rglob("train_runs/*/results.json")) + sorted(top.rglob("trial_*/results.json"))
    runs = [json.loads(f.read_text()) for f in found]  # Train runs (2+ workers), or the trials' own
    keys = ("train_s", "eval_s", "words_per_sec", "valid_ppl")
    r["trials"] = [{"hidden_size": t["config"]["hidden_size"], "wall_time_s": t["wall_time_s"],
                    **{k: t["final"].get(k) for k in keys}} for t in runs]
print(json.dumps({"part": name, "results": r}))
EOF
}

nvidia-smi -L | tee -a "$log"
$py -c "import torch, ray; print('torch', torch.__version__, 'ray', ray.__version__, torch.cuda.get_device_name())" |
    tee -a "$log"

part capture_test 240 env LSTM_SHARED_DATA="$(dirname "$data")" \
    $py -m pytest -q -n 0 -p no:cacheprovider tests/test_step_capture.py tests/test_bench.py

speed=(bench/ptb_speed.py --device cuda --data-dir "$data" --threads 4 --steps 20 --repeats 20)
part speed_small 150 $py "${speed[@]}" --config small --allreduce-iters 3
part speed_medium 150 $py "${speed[@]}" --config medium --allreduce-iters 0

search=(jobs/search.py --base small --num-samples 8 --max-epochs 1 --train-fraction 0.25 --seed 0 --gpu
    --data-dir "$data" --storage-path "$runs/tune")
part search_1gpu 300 $py "${search[@]}" --gpus-per-worker 1 --name gpu1
results search_1gpu "$runs/tune/gpu1"
part search_quarter 300 $py "${search[@]}" --gpus-per-worker 0.25 --name gpu025
results search_quarter "$runs/tune/gpu025"

large=(jobs/ptb.py --config large --gpu --max-max-epoch 1 --data-dir "$data" --storage-path "$runs/ptb")
part large_eager 240 env LSTM_CUDA_GRAPH=0 $py "${large[@]}" --name large-eager
results large_eager "$runs/ptb/large-eager"
part large_captured 240 $py "${large[@]}" --name large-captured
results large_captured "$runs/ptb/large-captured"

part speed_small_compiled 240 $py "${speed[@]}" --config small --compiled --allreduce-iters 0 --repeats 10
part speed_large 150 $py "${speed[@]}" --config large --allreduce-iters 0 --repeats 10
part speed_medium_bf16 150 $py "${speed[@]}" --config medium --precision bf16 --allreduce-iters 0
part speed_large_bf16 150 $py "${speed[@]}" --config large --precision bf16 --allreduce-iters 0 --repeats 10
echo "== $(date +%T) done" | tee -a "$log"
