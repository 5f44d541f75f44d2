#!/usr/bin/env bash
# The embedded end-to-end demo on a CPU: synthesize a speech corpus with espeak-ng, pretrain a
# wav2vec 2.0 model, export discrete units (quantizer codes and k-means) with their PNMI against
# the synthesizer's phone alignments, pretrain a BERT over units, fine-tune CTC from the pretrained
# model and from scratch on the same labels, decode, and print a results table.
#
#   recipes/toy/run.sh              # the demo
#   recipes/toy/run.sh --quick      # a few updates per stage: checks the pipeline (CI)
#   recipes/toy/run.sh --stage 4    # from fine-tuning on (stages leave .done markers)
#
# Outputs: recipes/toy/data/ (corpus, manifests) and recipes/toy/exp/ (models, units, results.md).
set -euo pipefail
cd "$(dirname "$0")"

args=()
for a in "$@"; do  # accept a bare --quick
  if [ "$a" = --quick ]; then args+=(--quick true); else args+=("$a"); fi
done
set -- ${args[@]+"${args[@]}"}

stage=0
stop_stage=100
dry_run=false
quick=false
hours=0.3                     # synthetic corpus size
speakers=12
pretrain_steps=800
k=50                          # k-means clusters
layer=1                       # Transformer block whose features are clustered
bert_steps=200
ctc_steps=400
data_dir=""                   # default data (data_quick with --quick)
exp_dir=""                    # default exp (exp_quick with --quick)
. ../../tools/parse_options.sh || exit 1
. ../../tools/recipe_lib.sh
if [ "$quick" = true ]; then
  hours=0.02; speakers=6; pretrain_steps=30; k=8; bert_steps=10; ctc_steps=20
  data_dir=${data_dir:-data_quick}; exp_dir=${exp_dir:-exp_quick}
fi
data_dir=${data_dir:-data}
exp_dir=${exp_dir:-exp}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # tiny models: one thread per process is fastest
done_dir=$exp_dir/.done
m=$data_dir/manifests

if stage_begin 0 "synthesize ${hours} h of speech -> ${data_dir}"; then
  run speechvq synth-corpus --out "$data_dir/corpus" --hours "$hours" --num-speakers "$speakers" --seed 0
  run speechvq prepare-librispeech "$data_dir/corpus" --out "$m"
  stage_end 0
fi

if stage_begin 1 "pretrain tiny for ${pretrain_steps} updates"; then
  run speechvq pretrain --config ../../conf/pretrain_tiny.yaml --exp-dir "$exp_dir/pretrain" \
    --set data.train="$m/train.tsv" data.valid="$m/dev.tsv" train.max_steps="$pretrain_steps" \
          train.valid_interval="$pretrain_steps" train.progress_bar=false
  run speechvq plot "$exp_dir/pretrain"
  stage_end 1
fi

if stage_begin 2 "units: quantizer codes and k-means (k=${k}, layer ${layer}), PNMI"; then
  model=$exp_dir/pretrain/best_model
  run speechvq export-units "$model" "$m/test.tsv" --kind codes --joint --out "$exp_dir/units/codes"
  run speechvq fit-kmeans "$model" "$m/train.tsv" --layer "$layer" --k "$k" --out "$exp_dir/units/km"
  run speechvq export-units "$model" "$m/test.tsv" --kind kmeans --layer "$layer" --km "$exp_dir/units/km" \
    --out "$exp_dir/units/kmeans"
  for kind in codes kmeans; do
    run speechvq unit-quality "$exp_dir/units/$kind" "$data_dir/corpus" --json "$exp_dir/units/$kind/quality.json"
  done
  stage_end 2
fi

if stage_begin 3 "BERT over units for ${bert_steps} updates"; then
  run speechvq export-units "$exp_dir/pretrain/best_model" "$m/train.tsv" --kind codes --joint \
    --out "$exp_dir/units/train_codes"
  run speechvq pretrain-unit-bert --config ../../conf/unit_bert_tiny.yaml --units "$exp_dir/units/train_codes" \
    --exp-dir "$exp_dir/unit_bert" --set train.max_steps="$bert_steps" schedule.warmup_steps=1 \
      train.progress_bar=false
  stage_end 3
fi

if stage_begin 4 "CTC fine-tuning for ${ctc_steps} updates, from the pretrained model and from scratch"; then
  # tiny at 400 updates: lr 5e-4 and both blocks copied (validation CER 0.80 from the pretrained
  # model; the config's lr 2e-3 for small stays at 1.00, with or without re-initialising a block)
  for init in pretrained scratch; do
    from=$exp_dir/pretrain
    [ "$init" = scratch ] && from=none
    run speechvq finetune-ctc --config ../../conf/finetune_small_cpu.yaml --init "$from" \
      --train "$m/train.tsv" --valid "$m/dev.tsv" --exp-dir "$exp_dir/ctc_$init" \
      --set model.preset=tiny model.reinit_layers=0 optim.lr=5e-4 train.max_steps="$ctc_steps" \
            train.valid_interval="$ctc_steps" train.progress_bar=false
  done
  stage_end 4
fi

if stage_begin 5 "decode the test set"; then
  for init in pretrained scratch; do
    if [ "$dry_run" = true ]; then
      run speechvq transcribe "$exp_dir/ctc_$init/best_model" "$m/test.tsv" --labels "$m/test.wrd" \
        --out "$exp_dir/ctc_$init/test.hyp"
    else
      speechvq transcribe "$exp_dir/ctc_$init/best_model" "$m/test.tsv" --labels "$m/test.wrd" \
        --out "$exp_dir/ctc_$init/test.hyp" > "$exp_dir/ctc_$init/test.wer"
    fi
  done
  stage_end 5
fi

if stage_begin 6 "results table -> ${exp_dir}/results.md"; then
  run python3 local/results.py "$exp_dir"
  stage_end 6
fi
