#!/usr/bin/env bash
# Run a jaxlm command as N cooperating processes on this machine, to try multi-host code paths
# (and to test them) without a cluster. Each process gets LOCAL_DEVICES CPU devices.
#
#   tools/launch_local.sh [--dry-run] N train --config=configs/tiny.py --workdir=runs/mh
#
# Process 0 writes to this terminal; process i > 0 writes to $LOG_DIR/process_i.log. When one
# process fails, the others are stopped and its exit code is returned.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [--dry-run] N <jaxlm command and flags>" >&2
  exit 2
fi
n=$1; shift
jaxlm=${JAXLM:-jaxlm}
devices=${LOCAL_DEVICES:-1}
log_dir=${LOG_DIR:-$(mktemp -d -t jaxlm-launch-XXXXXX)}
timeout=${DISTRIBUTED_TIMEOUT:-120}
port=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

args=$(printf ' %q' "$@")
# The caller's XLA_FLAGS stay (compiler options can change the last bits of a result), with the
# device count added.
xla_flags=$(printf '%q' "${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices")
commands=()
for ((i = 0; i < n; i++)); do
  commands+=("exec env JAX_PLATFORMS=cpu XLA_FLAGS=$xla_flags $jaxlm$args --coordinator=127.0.0.1:$port --num_processes=$n --process_id=$i --distributed_timeout=$timeout")
done
if ((dry_run)); then
  printf '%s\n' "${commands[@]}"
  exit 0
fi

pids=()
for ((i = 0; i < n; i++)); do
  if ((i == 0)); then
    bash -c "${commands[$i]}" &
  else
    bash -c "${commands[$i]}" >"$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
[[ $n -gt 1 ]] && echo "launch_local: processes 1..$((n - 1)) log to $log_dir" >&2

# Poll instead of `wait -n`: a failed process stops the others at once, whichever it is.
status=0
running=("${pids[@]}")
while ((${#running[@]})); do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
    elif wait "$pid"; then
      :
    else
      status=$?
    fi
  done
  if ((status)); then
    kill "${still[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    break
  fi
  running=("${still[@]}")
  ((${#running[@]})) && sleep 0.2
done
exit $status
