#!/usr/bin/env bash
# The vq-wav2vec pipeline: fit k-means -> export units -> BERT over units -> CTC on BERT features.
#
#   ./bert_units.sh --model exp/pretrain_base/best_model --layer 6 --k 500
#   ./bert_units.sh --dry-run true
set -euo pipefail
cd "$(dirname "$0")"

stage=0
stop_stage=100
dry_run=false
model=exp/pretrain_base/best_model   # any speechvq model dir (wav2vec 2.0, vq-wav2vec, CTC)
data_dir=data
train_subset=train-clean-100
subsets="train-clean-100 dev-other test-clean"
layer=6
k=500
percent=10                   # of the training frames used to fit k-means
kind=kmeans                  # kmeans | codes (the quantizer's own codes)
bert_config=../../conf/unit_bert_base.yaml
ctc_config=../../conf/finetune_units_small_cpu.yaml   # CTC head on BERT features (scale it up for LibriSpeech)
ctc_train_subset=$train_subset                    # labelled subset the CTC head trains on (units exported in stage 1)
ctc_valid_subset=dev-other
exp_dir=exp/units
extra_set=""
. ../../tools/parse_options.sh || exit 1
. ../../tools/recipe_lib.sh
done_dir=$exp_dir/.done

if stage_begin 0 "fit k-means (k=${k}) on layer ${layer}"; then
  if [ "$kind" = kmeans ]; then
    run speechvq fit-kmeans "$model" "$data_dir/manifests/$train_subset.tsv" --layer "$layer" --k "$k" \
      --percent "$percent" --out "$exp_dir/kmeans"
  fi
  stage_end 0
fi

if stage_begin 1 "export units of ${subsets}"; then
  for subset in $subsets; do
    args=(--kind "$kind" --out "$exp_dir/$subset")
    [ "$kind" = kmeans ] && args+=(--layer "$layer" --km "$exp_dir/kmeans")
    run speechvq export-units "$model" "$data_dir/manifests/$subset.tsv" "${args[@]}"
  done
  stage_end 1
fi

if stage_begin 2 "BERT over units"; then
  # shellcheck disable=SC2086
  run speechvq pretrain-unit-bert --config "$bert_config" --units "$exp_dir/$train_subset" \
    --valid-units "$exp_dir/dev-other" --exp-dir "$exp_dir/bert" ${extra_set:+--set $extra_set}
  stage_end 2
fi

if stage_begin 3 "CTC on BERT features (${ctc_train_subset})"; then
  run speechvq finetune-ctc --config "$ctc_config" --init "$exp_dir/bert" \
    --train "$data_dir/manifests/$ctc_train_subset.tsv" --units "$exp_dir/$ctc_train_subset" \
    --valid "$data_dir/manifests/$ctc_valid_subset.tsv" --valid-units "$exp_dir/$ctc_valid_subset" \
    --exp-dir "$exp_dir/ctc"
  stage_end 3
fi

log "Done. Units in $exp_dir/<subset>/units.txt, BERT in $exp_dir/bert/best_model, CTC in $exp_dir/ctc/best_model"
