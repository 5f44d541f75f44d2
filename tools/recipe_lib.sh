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
