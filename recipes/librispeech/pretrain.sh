#!/usr/bin/env bash
# wav2vec 2.0 or vq-wav2vec pretraining on LibriSpeech 960 h (run prepare.sh first), through accelerate.
#
#   ./pretrain.sh --model base --num-processes 8                      # one node, 8 GPUs
#   ./pretrain.sh --model large --num-processes 8 --num-machines 16 \
#       --machine-rank $RANK --main-process-ip $MASTER                # many nodes (see README.md)
#   ./pretrain.sh --model vq_wav2vec_gumbel --num-processes 8          # vq-wav2vec (the paper's Gumbel)
#   ./pretrain.sh --dry-run true                                      # print the commands only
#
# Batch sizes are per process: conf/pretrain_{base,large}.yaml states them and the total for the
# paper's 64 (BASE) / 128 (LARGE) GPUs; with fewer processes raise train.grad_accum (--extra-set).
set -euo pipefail
cd "$(dirname "$0")"

stage=0
stop_stage=100
dry_run=false
model=base                    # base | large | vq_wav2vec_gumbel | vq_wav2vec_kmeans: conf/pretrain_${model}.yaml
data_dir=data
train_subsets="train-clean-100 train-clean-360 train-other-500"
valid_subset=dev-other
exp_dir=""                    # default exp/pretrain_${model}
precision=bf16                # fp32 | bf16 | fp16 (GPU)
num_processes=1
num_machines=1
machine_rank=0
main_process_ip=127.0.0.1
main_process_port=29500
extra_set=""                  # more --set overrides, e.g. "train.grad_accum=8 optim.lr=5e-4"
. ../../tools/parse_options.sh || exit 1
. ../../tools/recipe_lib.sh
exp_dir=${exp_dir:-exp/pretrain_${model}}
done_dir=$exp_dir/.done
train_tsv=$data_dir/manifests/train-960.tsv

if stage_begin 0 "combine ${train_subsets} into ${train_tsv}"; then
  tsvs=()
  for subset in $train_subsets; do
    tsvs+=("$data_dir/manifests/$subset.tsv")
  done
  run python3 local/combine_manifests.py "${tsvs[@]}" --out "$train_tsv"
  stage_end 0
fi

if stage_begin 1 "pretrain ${model} with ${num_processes} process(es) on ${num_machines} machine(s)"; then
  launch=(accelerate launch --num_processes "$num_processes" --num_machines "$num_machines")
  if [ "$num_processes" -gt 1 ] || [ "$num_machines" -gt 1 ]; then
    launch+=(--multi_gpu --machine_rank "$machine_rank" --main_process_ip "$main_process_ip"
             --main_process_port "$main_process_port")
  fi
  # shellcheck disable=SC2086  # extra_set is a list of overrides
  run "${launch[@]}" -m speechvq pretrain --config "../../conf/pretrain_${model}.yaml" --exp-dir "$exp_dir" \
    --set data.train="$train_tsv" data.valid="$data_dir/manifests/$valid_subset.tsv" \
          train.precision="$precision" $extra_set
  stage_end 1
fi

if stage_begin 2 "curves and codebook usage -> ${exp_dir}/curves.png"; then
  run speechvq plot "$exp_dir"
  stage_end 2
fi

log "Done. Model: $exp_dir/best_model (input of finetune_ctc.sh and bert_units.sh)"
