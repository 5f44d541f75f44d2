#!/usr/bin/env bash
# The vq-wav2vec pipeline: units -> BERT over units -> CTC on BERT features, against CTC on the
# raw units (the same head on the BERT's unit embeddings alone), with a WER table.
#
#   # vq-wav2vec, as in the paper (section 5): Gumbel codes, one joint id per frame, BERT base
#   ./pretrain.sh --model vq_wav2vec_gumbel --num-processes 8
#   ./bert_units.sh --model exp/pretrain_vq_wav2vec_gumbel/best_model --kind codes --joint true
#   # k-means units of any model's layer (wav2vec 2.0 block 6, vq-wav2vec's context = layer 1)
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
test_subsets="test-clean test-other"
layer=6                      # kmeans: the layer clustered (vq-wav2vec: 1 = the context network)
k=500
percent=10                   # of the training frames used to fit k-means
kind=kmeans                  # kmeans | codes (the quantizer's own codes)
joint=false                  # codes: one joint id per frame (vq-wav2vec's BERT input), not g0-g1 pairs
bert_config=../../conf/unit_bert_base.yaml
ctc_config=../../conf/finetune_units_small_cpu.yaml   # CTC head on BERT features (scale it up for LibriSpeech)
ctc_train_subset=$train_subset                    # labelled subset the CTC head trains on
ctc_valid_subset=dev-other
exp_dir=exp/units
extra_set=""                 # more --set overrides of the BERT
ctc_extra_set=""             # more --set overrides of both CTC runs
. ../../tools/parse_options.sh || exit 1
. ../../tools/recipe_lib.sh
done_dir=$exp_dir/.done
subsets=$(echo "$train_subset $ctc_train_subset $ctc_valid_subset $test_subsets" | tr ' ' '\n' | awk '!seen[$0]++' | tr '\n' ' ')

if stage_begin 0 "fit k-means (k=${k}) on layer ${layer}"; then
  if [ "$kind" = kmeans ]; then
    run speechvq fit-kmeans "$model" "$data_dir/manifests/$train_subset.tsv" --layer "$layer" --k "$k" \
      --percent "$percent" --out "$exp_dir/kmeans"
  fi
  stage_end 0
fi

if stage_begin 1 "export ${kind} units of ${subsets}"; then
  for subset in $subsets; do
    args=(--kind "$kind" --out "$exp_dir/$subset")
    [ "$kind" = kmeans ] && args+=(--layer "$layer" --km "$exp_dir/kmeans")
    [ "$kind" = codes ] && [ "$joint" = true ] && args+=(--joint)
    run speechvq export-units "$model" "$data_dir/manifests/$subset.tsv" "${args[@]}"
  done
  stage_end 1
fi

if stage_begin 2 "BERT over units"; then
  # shellcheck disable=SC2086
  run speechvq pretrain-unit-bert --config "$bert_config" --units "$exp_dir/$train_subset" \
    --valid-units "$exp_dir/$ctc_valid_subset" --exp-dir "$exp_dir/bert" ${extra_set:+--set $extra_set}
  stage_end 2
fi

if stage_begin 3 "CTC (${ctc_train_subset}) on BERT features, and on the raw units"; then
  for feats in bert units; do
    layer_set=""
    [ "$feats" = units ] && layer_set=model.layer=0   # the BERT's unit embeddings, no context
    # shellcheck disable=SC2086
    run speechvq finetune-ctc --config "$ctc_config" --init "$exp_dir/bert" \
      --train "$data_dir/manifests/$ctc_train_subset.tsv" --units "$exp_dir/$ctc_train_subset" \
      --valid "$data_dir/manifests/$ctc_valid_subset.tsv" --valid-units "$exp_dir/$ctc_valid_subset" \
      --exp-dir "$exp_dir/ctc_$feats" ${layer_set:+--set $layer_set} $ctc_extra_set
  done
  stage_end 3
fi

if stage_begin 4 "decode ${test_subsets} greedily -> ${exp_dir}/wer_table.md"; then
  for feats in bert units; do
    for subset in $test_subsets; do
      out=$exp_dir/ctc_$feats/decode_$subset
      run mkdir -p "$out"
      decode=(speechvq transcribe "$exp_dir/ctc_$feats/best_model" "$exp_dir/$subset"
              --labels "$data_dir/manifests/$subset.wrd" --out "$out/greedy.txt")
      if [ "$dry_run" = true ]; then
        run "${decode[@]}"
      else
        echo "+ ${decode[*]} > $out/greedy.wer" >&2
        "${decode[@]}" > "$out/greedy.wer"
      fi
    done
  done
  # shellcheck disable=SC2086
  run python3 local/wer_table.py "$exp_dir" --budgets ctc_bert ctc_units --subsets $test_subsets
  stage_end 4
fi

log "Done. Units in $exp_dir/<subset>/, BERT in $exp_dir/bert/best_model, CTC in $exp_dir/ctc_{bert,units}/best_model, WERs in $exp_dir/wer_table.md"
