#!/usr/bin/env bash
# Parse --name value / --name=value command-line options into shell variables.
#
# Source it after setting the defaults:
#     stage=0
#     stop_stage=100
#     dl_dir=$PWD/download
#     . ../../tools/parse_options.sh || exit 1
#
# Only variables that already exist can be set (a typo is an error, not a silent new variable);
# dashes in option names become underscores (--stop-stage sets stop_stage). --help lists the
# variables with their current values. Positional arguments are left in "$@".

# the options are the variables assigned at the start of a line above the line that sources us
_po_script=$0
[ -r "$_po_script" ] || _po_script=$(basename "$0")  # recipes cd to their own directory first
_po_names=$(sed -n '/parse_options\.sh/q;s/^\([a-z_][a-z0-9_]*\)=.*/\1/p' "$_po_script" 2>/dev/null || true)

_po_usage() {
  echo "Usage: $0 [options]" >&2
  echo "Options (current values):" >&2
  local name
  for name in ${_po_names:-}; do
    printf '  --%s %q\n' "${name//_/-}" "${!name}" >&2
  done
}

_po_positional=()
while [ $# -gt 0 ]; do
  case "$1" in
    --help|-h)
      _po_usage
      exit 0
      ;;
    --*=*)
      _po_name="${1%%=*}"
      _po_value="${1#*=}"
      shift
      ;;
    --*)
      _po_name="$1"
      if [ $# -lt 2 ]; then
        echo "$0: option $1 needs a value" >&2
        exit 2
      fi
      _po_value="$2"
      shift 2
      ;;
    *)
      _po_positional+=("$1")
      shift
      continue
      ;;
  esac
  _po_name="${_po_name#--}"
  _po_name="${_po_name//-/_}"
  if [ -z "${!_po_name+set}" ]; then
    echo "$0: unknown option --${_po_name//_/-}" >&2
    exit 2
  fi
  printf -v "$_po_name" '%s' "$_po_value"
done
set -- ${_po_positional[@]+"${_po_positional[@]}"}
unset _po_name _po_value _po_positional _po_names _po_script
