#!/usr/bin/env bash
# Toy pretraining demo: generate a small synthetic corpus, pretrain the `tiny` wav2vec 2.0 model
# on the CPU, plot the curves and print the final loss and accuracy.
#
# Usage: recipes/toy/run.sh [--quick]
#   --quick: 60 updates instead of 800 (checks the pipeline only: the model starts to beat
#            chance after about 250 updates)
# Outputs: recipes/toy/data/ (audio, manifests) and recipes/toy/exp/ (checkpoints, metrics, curves.png).
# Delete either to start over; re-running resumes the finished run (nothing left to do).
set -euo pipefail

quick=false
for arg in "$@"; do
  case "$arg" in
    --quick) quick=true ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "$0: unknown option $arg" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")"
python=${PYTHON:-python3}
# the tiny model gains nothing from more intra-op threads, and they thrash on a busy machine
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
log() { echo "$(date '+%H:%M:%S') $*"; }

if $quick; then
  num_files=24; steps=60; exp=exp/tiny_quick
else
  num_files=64; steps=800; exp=exp/tiny
fi

log "Stage 0: synthetic audio -> data/"
"$python" local/make_audio.py --out data --num-files "$num_files"

log "Stage 1: pretrain tiny for $steps updates -> $exp"
"$python" -m speechvq pretrain --config ../../conf/pretrain_tiny.yaml --exp-dir "$exp" \
  --set data.train=data/train.tsv data.valid=data/valid.tsv train.max_steps="$steps" \
        train.log_interval=10 train.valid_interval="$steps" schedule.warmup_steps=$((steps / 10))

log "Stage 2: curves -> $exp/curves.png"
"$python" -m speechvq plot "$exp"

"$python" - "$exp" <<'PY'
import json, math, sys
records = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
train = [r for r in records if r["split"] == "train"]
valid = [r for r in records if r["split"] == "valid"]
first, last = train[0], train[-1]
print(f"train loss {first['loss']:.3f} -> {last['loss']:.3f} nats/target, "
      f"accuracy {first['accuracy']:.3f} -> {last['accuracy']:.3f} (chance {1 / 11:.3f}), "
      f"code perplexity {last['code_perplexity']:.1f}")
if valid:
    print(f"valid loss {valid[-1]['loss']:.3f}, accuracy {valid[-1]['accuracy']:.3f}")
PY
