#!/usr/bin/env bash
# LibriSpeech data preparation: download (or use a local copy), verify, manifests + labels for
# every split, and the Libri-light limited-resource label sets (10 min / 1 h / 10 h) when present.
#
#   ./prepare.sh                                   # all stages
#   ./prepare.sh --stage 1 --stop-stage 1          # one stage
#   ./prepare.sh --dl-dir /data/corpora            # where LibriSpeech/ is (or goes)
#   ./prepare.sh --dry-run true                    # print the commands only
#
# Outputs: data/manifests/<split>.{tsv,ltr,wrd}, data/manifests/dict.ltr.txt,
#          data/librilight/{10min,1h,10h}.{tsv,ltr,wrd}
set -euo pipefail
cd "$(dirname "$0")"

stage=0
stop_stage=100
dry_run=false
dl_dir=$PWD/download          # holds LibriSpeech/ (downloaded here if missing)
subsets="dev-clean dev-other test-clean test-other train-clean-100 train-clean-360 train-other-500"
mirror=""                     # base URL of a LibriSpeech mirror (default: openslr.org)
checksums=""                  # md5sum.txt to verify against (default: the published table)
librilight_dir=""             # librispeech_finetuning/ of Libri-light, if you have it
validate=true                 # check every manifest for unreadable/bad audio
data_dir=data
. ../../tools/parse_options.sh || exit 1
. ../../tools/recipe_lib.sh
done_dir=$data_dir/.done

if stage_begin 0 "download and verify ${subsets}"; then
  for subset in $subsets; do
    if [ -d "$dl_dir/LibriSpeech/$subset" ]; then
      log "  $dl_dir/LibriSpeech/$subset exists, not downloading"
      continue
    fi
    args=(--subset "$subset" --out "$dl_dir")
    [ -n "$mirror" ] && args+=(--mirror "$mirror")
    [ -n "$checksums" ] && args+=(--checksums "$checksums")
    run speechvq download-librispeech "${args[@]}"
  done
  stage_end 0
fi

if stage_begin 1 "manifests and labels for every split"; then
  splits=()
  for subset in $subsets; do
    if [ -d "$dl_dir/LibriSpeech/$subset" ] || [ "$dry_run" = true ]; then
      splits+=("$subset")
    fi
  done
  run speechvq prepare-librispeech "$dl_dir/LibriSpeech" --out "$data_dir/manifests" --splits "${splits[@]}"
  stage_end 1
fi

if stage_begin 2 "validate the manifests"; then
  if [ "$validate" = true ]; then
    for subset in $subsets; do
      tsv=$data_dir/manifests/$subset.tsv
      if [ -f "$tsv" ] || [ "$dry_run" = true ]; then
        run speechvq validate "$tsv"
      fi
    done
  fi
  stage_end 2
fi

if stage_begin 3 "Libri-light limited-resource sets (10min, 1h, 10h)"; then
  if [ -n "$librilight_dir" ]; then
    run python3 local/make_librilight_sets.py "$librilight_dir" --out "$data_dir/librilight"
  else
    log "  no --librilight-dir given: skipping the limited-resource sets"
  fi
  stage_end 3
fi

log "Done. Manifests in $data_dir/manifests"
