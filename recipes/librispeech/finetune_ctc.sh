#!/usr/bin/env bash
# CTC fine-tuning of a pretrained model on each labelled budget, decoding with and without an LM,
# and a WER table. Needs prepare.sh (and its Libri-light sets for 10min/1h/10h) and pretrain.sh.
# With an LM, its weight and word bonus are tuned per budget on the validation subset (as the paper
# tunes them on dev-other) over the lm_weights x word_bonuses grid, then the test subsets are decoded
# with the best pair.
#
#   ./finetune_ctc.sh --init exp/pretrain_base --budgets "10min 1h"
#   ./finetune_ctc.sh --lm data/lm/4-gram.arpa --beam 50    # adds LM decoding
#   ./finetune_ctc.sh --lm data/lm/4-gram.arpa --lm-weights 2 --word-bonuses -1   # no tuning
#   ./finetune_ctc.sh --dry-run true
set -euo pipefail
cd "$(dirname "$0")"

stage=0
stop_stage=100
dry_run=false
init=exp/pretrain_base        # pretrained model / experiment dir, HF dir or fairseq .pt
budgets="10min 1h 10h 100h 960h"
data_dir=data
valid_subset=dev-other
test_subsets="test-clean test-other"
exp_prefix=exp/ctc
num_processes=1
lm=""                         # ARPA or KenLM binary for beam search (empty: no LM decoding)
lexicon=""                    # optional word list for lexicon-constrained search (e.g. librispeech-lexicon.txt)
lm_weights="1,1.5,2,2.5"      # alpha values tried on the validation subset (comma-separated)
word_bonuses="-1,0,1"         # beta values tried on the validation subset
beam=50
extra_set=""
. ../../tools/parse_options.sh || exit 1
. ../../tools/recipe_lib.sh
done_dir=$exp_prefix/.done

train_tsv() {  # the training manifest of a label budget
  case "$1" in
    10min|1h|10h) echo "$data_dir/librilight/$1.tsv" ;;
    100h) echo "$data_dir/manifests/train-clean-100.tsv" ;;
    960h) echo "$data_dir/manifests/train-960.tsv" ;;
    *) echo "unknown budget $1" >&2; return 1 ;;
  esac
}

if stage_begin 0 "fine-tune on ${budgets}"; then
  for budget in $budgets; do
    launch=(speechvq)
    [ "$num_processes" -gt 1 ] && launch=(accelerate launch --multi_gpu --num_processes "$num_processes" -m speechvq)
    # shellcheck disable=SC2086
    run "${launch[@]}" finetune-ctc --config "../../conf/finetune_${budget}.yaml" --init "$init" \
      --train "$(train_tsv "$budget")" --valid "$data_dir/manifests/$valid_subset.tsv" \
      --exp-dir "$exp_prefix/$budget" ${extra_set:+--set $extra_set}
  done
  stage_end 0
fi

if stage_begin 1 "decode ${test_subsets} (greedy${lm:+ and beam ${beam} with ${lm}, weights tuned on ${valid_subset}})"; then
  for budget in $budgets; do
    model=$exp_prefix/$budget/best_model
    lm_args=()
    if [ -n "$lm" ]; then
      lm_args=(--beam "$beam" --lm "$lm" ${lexicon:+--lexicon "$lexicon"})
      tune=$exp_prefix/$budget/decode_$valid_subset
      run mkdir -p "$tune"
      valid=$data_dir/manifests/$valid_subset
      if [ "$dry_run" = true ]; then
        run speechvq transcribe "$model" "$valid.tsv" --labels "$valid.wrd" "${lm_args[@]}" \
          --lm-weight "$lm_weights" --word-bonus="$word_bonuses" --out "$tune/lm.txt"
        best="--lm-weight ${lm_weights%%,*} --word-bonus=${word_bonuses%%,*}"
      else
        speechvq transcribe "$model" "$valid.tsv" --labels "$valid.wrd" "${lm_args[@]}" \
          --lm-weight "$lm_weights" --word-bonus="$word_bonuses" --out "$tune/lm.txt" > "$tune/lm_tuning.txt"
        best=$(sed -n 's/^best: //p' "$tune/lm_tuning.txt")
        log "$budget: $best (tuned on $valid_subset)"
      fi
      # shellcheck disable=SC2206
      lm_args+=($best)
    fi
    for subset in $test_subsets; do
      dir=$exp_prefix/$budget/decode_$subset
      run mkdir -p "$dir"
      ref=(--labels "$data_dir/manifests/$subset.wrd")
      tsv=$data_dir/manifests/$subset.tsv
      if [ "$dry_run" = true ]; then
        run speechvq transcribe "$model" "$tsv" "${ref[@]}" --out "$dir/greedy.txt"
        if [ -n "$lm" ]; then
          run speechvq transcribe "$model" "$tsv" "${ref[@]}" "${lm_args[@]}" --out "$dir/lm.txt"
        fi
      else
        speechvq transcribe "$model" "$tsv" "${ref[@]}" --out "$dir/greedy.txt" > "$dir/greedy.wer"
        if [ -n "$lm" ]; then
          speechvq transcribe "$model" "$tsv" "${ref[@]}" "${lm_args[@]}" --out "$dir/lm.txt" > "$dir/lm.wer"
        fi
      fi
    done
  done
  stage_end 1
fi

if stage_begin 2 "WER table"; then
  run python3 local/wer_table.py "$exp_prefix" --budgets $budgets --subsets $test_subsets
  stage_end 2
fi
