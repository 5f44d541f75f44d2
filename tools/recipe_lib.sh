#!/usr/bin/env bash
# Helpers shared by the recipes: logging, dry runs and stage markers. Source it, then use:
#     log "message"
#     run cmd args...            # prints the command; executes it unless dry_run=true
#     stage_begin N "title"      # true if stage N is selected and not yet done
#     stage_end N                # marks stage N done (skipped in dry runs)
# Expects: stage, stop_stage, dry_run, and done_dir (where the .done markers go).

log() {
  local fname=${BASH_SOURCE[1]##*/}
  echo -e "$(date '+%Y-%m-%d %H:%M:%S') (${fname}:${BASH_LINENO[0]}:${FUNCNAME[1]:-main}) $*" >&2
}

run() {
  echo "+ $*" >&2
  if [ "${dry_run:-false}" != true ]; then
    "$@"
  fi
}

stage_begin() {
  local n=$1 title=$2
  if [ "$stage" -gt "$n" ] || [ "$stop_stage" -lt "$n" ]; then
    return 1
  fi
  if [ -f "$done_dir/.stage$n.done" ] && [ "${dry_run:-false}" != true ]; then
    log "Stage $n: $title (already done; remove $done_dir/.stage$n.done to redo)"
    return 1
  fi
  log "Stage $n: $title"
  return 0
}

stage_end() {
  if [ "${dry_run:-false}" != true ]; then
    mkdir -p "$done_dir"
    touch "$done_dir/.stage$1.done"
  fi
}

# Jobs run side by side (e.g. two fine-tunings of one thread each on a 2-core machine):
#     run_bg LOG cmd args...     # prints the command; starts it in the background, output to LOG
#     wait_bg                    # waits for every run_bg job; on a failure, shows its log and fails
bg_pids=()
bg_logs=()

run_bg() {
  local out=$1
  shift
  echo "+ $* > $out" >&2
  if [ "${dry_run:-false}" != true ]; then
    mkdir -p "$(dirname "$out")"
    "$@" > "$out" 2>&1 &
    bg_pids+=($!)
    bg_logs+=("$out")
  fi
}

wait_bg() {
  local i failed=0
  for i in "${!bg_pids[@]}"; do
    if ! wait "${bg_pids[$i]}"; then
      log "failed: see ${bg_logs[$i]}; its end:"
      tail -n 20 "${bg_logs[$i]}" >&2
      failed=1
    fi
  done
  bg_pids=()
  bg_logs=()
  return $failed
}
