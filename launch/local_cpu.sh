#!/usr/bin/env bash
# Several goosejax processes on this machine, CPU only: a rehearsal of a multi-host run.
#
#   launch/local_cpu.sh [--dry-run] NUM_PROCESSES DEVICES_PER_PROCESS -- --config tiny --run-dir runs/mp mesh.fsdp=-1
#
# --dry-run prints each process's exact command (environment included) and runs nothing.
# Each process gets DEVICES_PER_PROCESS fake CPU devices; they meet at 127.0.0.1:$PORT
# (default 12355) and exchange data through gloo. Logs: RUN_DIR/process_<i>.log; process 0
# also prints to the terminal. Stops every process if one fails.
set -euo pipefail
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
if [[ $# -lt 3 || "$3" != "--" ]]; then
  echo "usage: $0 [--dry-run] NUM_PROCESSES DEVICES_PER_PROCESS -- goosejax-train-arguments..." >&2
  exit 2
fi
num_processes=$1 devices=$2
for count in "NUM_PROCESSES=$num_processes" "DEVICES_PER_PROCESS=$devices"; do
  if [[ ! "${count#*=}" =~ ^[1-9][0-9]{0,3}$ ]]; then
    echo "$0: ${count%%=*} '${count#*=}': expected a whole number from 1 to 9999" >&2
    exit 2
  fi
done
shift 3
run_dir=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --run-dir) run_dir="${args[$((i + 1))]:-}" ;;
    --run-dir=*) run_dir="${args[$i]#--run-dir=}" ;;
  esac
done
if [[ -z "$run_dir" || "$run_dir" == -* ]]; then
  echo "$0: pass --run-dir DIRECTORY among the goosejax train arguments" >&2
  exit 2
fi
port=${PORT:-12355}
process_command() {  # sets `cmd` to process $1's command line; the real run and --dry-run share it
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$devices"
       goosejax train "${args[@]}" --coordinator-address "127.0.0.1:$port"
       --num-processes "$num_processes" --process-id "$1" --no-progress-bar)
}
if ((dry_run)); then
  for ((i = 0; i < num_processes; i++)); do
    process_command "$i"
    echo "$(printf '%q ' "${cmd[@]}")> $(printf '%q' "$run_dir/process_$i.log") 2>&1 &"
  done
  exit 0
fi
mkdir -p "$run_dir"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
for ((i = 0; i < num_processes; i++)); do
  process_command "$i"
  "${cmd[@]}" > "$run_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -f "$run_dir/process_0.log" --pid "${pids[0]}" &
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
