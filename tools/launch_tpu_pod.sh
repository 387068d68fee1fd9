#!/usr/bin/env bash
# Run a jaxlm command on every worker of a Cloud TPU VM pod slice, through `gcloud ... ssh
# --worker=all`. Every worker runs the same command; jax.distributed finds the other workers from
# the TPU VM environment itself, so no coordinator flags are passed (see jaxlm/distributed.py).
#
#   TPU_NAME=my-v5p ZONE=us-east5-a tools/launch_tpu_pod.sh [--dry-run] [--setup] <jaxlm args...>
#   TPU_NAME=my-v5p ZONE=us-east5-a tools/launch_tpu_pod.sh train \
#       --config=configs/llama2_7b.py --workdir=/mnt/shared/runs/7b
#
# Environment:
#   TPU_NAME    the TPU VM name (required)
#   ZONE        its zone (required)
#   PROJECT     the Google Cloud project (optional; default: gcloud's configured project)
#   JAXLM_DIR   the jaxlm checkout on the workers (default ~/jaxlm; a leading ~/ is the remote home)
#   JAXLM_REPO  --setup only: the git URL to clone (default: this checkout's `origin` remote)
#   PYTHON      --setup only: the workers' Python, 3.11 or newer (default python3)
#
# --setup first runs, on every worker: clone JAXLM_REPO into JAXLM_DIR unless it is already a git
# checkout (an existing checkout is left as it is, not pulled), create JAXLM_DIR/.venv with PYTHON
# unless it exists, and `pip install -e ".[tpu]" "jax[tpu]"` into it (jaxlm, and jax with the
# libtpu release that jax pins). It is safe to run again. --dry-run prints the gcloud command
# lines (one per line, ready to paste) and runs nothing. The run lasts as long as the ssh
# sessions: for long runs, launch from a machine that stays up (or inside tmux/screen).
set -euo pipefail

me=$(basename "$0")
usage="usage: TPU_NAME=NAME ZONE=ZONE $me [--dry-run] [--setup] <jaxlm command and flags>"
dry_run=0
setup=0
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --setup) setup=1; shift ;;
    -h | --help) echo "$usage"; exit 0 ;;
    *) break ;;
  esac
done
if (($# == 0 && !setup)); then
  echo "$usage" >&2
  exit 2
fi
for var in TPU_NAME ZONE; do
  if [[ -z "${!var:-}" ]]; then
    echo "$me: error: environment variable $var is not set ($usage)" >&2
    exit 2
  fi
done
jaxlm_dir=${JAXLM_DIR:-"~/jaxlm"}
python=${PYTHON:-python3}

# Quote a string for a POSIX shell: as it is when it only has safe characters, else in single
# quotes. Used for the printed command lines and for paths in the remote command.
shell_quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
# A path for the remote shell: a leading ~/ stays unquoted so that the remote shell expands it.
remote_path() {
  if [[ "$1" == "~" ]]; then
    printf '~'
  elif [[ "$1" == "~/"* ]]; then
    printf '~/%s' "$(shell_quote "${1#"~/"}")"
  else
    shell_quote "$1"
  fi
}

dir=$(remote_path "$jaxlm_dir")
gcloud_cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--zone=$ZONE")
if [[ -n "${PROJECT:-}" ]]; then gcloud_cmd+=("--project=$PROJECT"); fi
gcloud_cmd+=(--worker=all)

remote_commands=()
if ((setup)); then
  repo=${JAXLM_REPO:-}
  if [[ -z "$repo" ]]; then
    repo=$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || true)
  fi
  if [[ -z "$repo" ]]; then
    echo "$me: error: --setup needs JAXLM_REPO (the git URL to clone on the workers); this checkout has no origin remote" >&2
    exit 2
  fi
  remote_commands+=("{ test -d $dir/.git || git clone $(shell_quote "$repo") $dir; } && cd $dir && { test -x .venv/bin/python || $(shell_quote "$python") -m venv .venv; } && .venv/bin/pip install -e \".[tpu]\" \"jax[tpu]\"")
fi
if (($#)); then
  remote_commands+=("cd $dir && .venv/bin/jaxlm$(printf ' %q' "$@")")
fi

for remote in "${remote_commands[@]}"; do
  cmd=("${gcloud_cmd[@]}" "--command=$remote")
  if ((dry_run)); then
    line=""
    for word in "${cmd[@]}"; do
      if [[ "$word" =~ ^(--[a-z-]+=)(.*)$ ]]; then
        line+=" ${BASH_REMATCH[1]}$(shell_quote "${BASH_REMATCH[2]}")"
      else
        line+=" $(shell_quote "$word")"
      fi
    done
    printf '%s\n' "${line# }"
  else
    "${cmd[@]}"
  fi
done
