#!/usr/bin/env bash
# torchrun on one node or many; arguments after the script go to launchers/pretrain.py.
#
#   launchers/torchrun.sh --config h100-80gb [section.key=value ...]          # this node, all its GPUs
#   NNODES=4 NODE_RANK=0..3 MASTER_ADDR=node0 launchers/torchrun.sh --config h100-multinode
#
# NPROC_PER_NODE: ranks per node (default: the GPUs nvidia-smi lists, else 1 on a CPU machine).
# MASTER_PORT: the rendezvous port on MASTER_ADDR (default 29500). PYTHON: the interpreter
# (default: the project's .venv, else python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$([ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3)}"
gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
nproc="${NPROC_PER_NODE:-$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 1)}"
nnodes="${NNODES:-1}"
source "$root/launchers/exit_status.sh"

if [ "$nnodes" -eq 1 ]; then
  # --standalone: a local rendezvous on a free port, so several jobs can share a machine.
  run_passing_status "$python" -m torch.distributed.run --standalone --nproc_per_node "$nproc" "$root/launchers/pretrain.py" "$@"
fi
: "${NODE_RANK:?set NODE_RANK (0 on the first node) for a multi-node run}"
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node for a multi-node run}"
run_passing_status "$python" -m torch.distributed.run --nnodes "$nnodes" --node_rank "$NODE_RANK" --nproc_per_node "$nproc" \
  --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" "$root/launchers/pretrain.py" "$@"
