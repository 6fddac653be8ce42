#!/usr/bin/env bash
# The deepspeed launcher, with a hostfile it writes from a node list or one you give.
#
#   launchers/deepspeed.sh --config h100-80gb                                   # this node
#   HOSTS="node0 node1" GPUS_PER_NODE=8 launchers/deepspeed.sh --config h100-multinode
#   HOSTFILE=my_hostfile launchers/deepspeed.sh --config h100-multinode
#
# A hostfile has one line per node: "<host> slots=<ranks on it>". Across nodes the deepspeed
# launcher reaches the other nodes with pdsh (passwordless ssh). On a CPU machine, where the
# launcher would count NUMA nodes instead of GPUs, give GPUS_PER_NODE (the ranks to start).
# MASTER_PORT: default 29500. PYTHON: the interpreter (default: the project's .venv, else python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$([ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3)}"
gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
per_node="${GPUS_PER_NODE:-$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 1)}"
launcher=("$python" -m deepspeed.launcher.runner --master_port "${MASTER_PORT:-29500}")
source "$root/launchers/exit_status.sh"

if [ -n "${HOSTFILE:-}" ]; then
  [ -r "$HOSTFILE" ] || { echo "error: HOSTFILE=$HOSTFILE is not a readable file" >&2; exit 2; }
  hostfile="$HOSTFILE"
elif [ -n "${HOSTS:-}" ]; then
  hostfile="$(mktemp "${TMPDIR:-/tmp}/dist-lm-hostfile.XXXXXX")"
  for host in $HOSTS; do echo "$host slots=$per_node"; done > "$hostfile"
  echo "hostfile $hostfile:"; sed 's/^/  /' "$hostfile"
else
  run_passing_status "${launcher[@]}" --num_gpus "$per_node" "$root/launchers/pretrain.py" "$@"
fi
nodes=$(grep -cvE '^\s*(#|$)' "$hostfile")
if [ "$nodes" -gt 1 ]; then
  command -v pdsh >/dev/null || { echo "error: the deepspeed launcher reaches other nodes with pdsh; install it (apt-get install pdsh) or use launchers/torchrun.sh" >&2; exit 2; }
  : "${MASTER_ADDR:?set MASTER_ADDR to the first node of the hostfile}"
  launcher+=(--master_addr "$MASTER_ADDR")
else
  # One node: the launcher starts the ranks here, but would still ssh to the host to check it
  # and to ask its address; neither is needed.
  launcher+=(--no_ssh_check --master_addr "${MASTER_ADDR:-127.0.0.1}")
fi
if [ "${gpus:-0}" -gt 0 ]; then  # a hostfile line for this machine must not ask for more GPUs than it has
  while read -r host slots; do
    case "$host" in localhost|127.0.0.1|"$(hostname)"|"$(hostname -s)")
      [ "${slots#slots=}" -le "$gpus" ] || { echo "error: $hostfile gives $host ${slots#slots=} slots but it has $gpus GPUs" >&2; exit 2; };;
    esac
  done < <(grep -vE '^\s*(#|$)' "$hostfile")
fi
run_passing_status "${launcher[@]}" --hostfile "$hostfile" "$root/launchers/pretrain.py" "$@"
