#!/usr/bin/env bash
# mpirun (Open MPI or MPICH), one rank per GPU, on this machine or across hosts.
#
#   NP=2 launchers/mpirun.sh --config debug
#   NP=16 HOSTS=node0:8,node1:8 MASTER_ADDR=node0 launchers/mpirun.sh --config h100-multinode
#
# NP: ranks (default: the GPUs nvidia-smi lists, else 1). HOSTS: host:slots,... for mpirun.
# MASTER_ADDR (needed across hosts) and MASTER_PORT, and the NCCL_*, OMP_NUM_THREADS and
# DIST_LM_CACHE variables are passed to every rank. MPIRUN_ARGS: more mpirun arguments, e.g.
# "--mca btl_tcp_if_include ib0" or "--oversubscribe". PYTHON: the interpreter.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$([ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3)}"
command -v mpirun >/dev/null || { echo "error: mpirun not found; install Open MPI (apt-get install openmpi-bin) or MPICH" >&2; exit 2; }
gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
np="${NP:-$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 1)}"
source "$root/launchers/exit_status.sh"
pass=(MASTER_ADDR MASTER_PORT OMP_NUM_THREADS DIST_LM_CACHE DIST_LM_STATUS_FILE PYTHONPATH $(compgen -e | grep '^NCCL_' || true))

args=(-np "$np")
if mpirun --version 2>&1 | grep -q "Open MPI"; then
  [ "$(id -u)" -ne 0 ] || args+=(--allow-run-as-root)
  [ -z "${HOSTS:-}" ] || args+=(--host "$HOSTS")
  for v in "${pass[@]}"; do [ -z "${!v:-}" ] || args+=(-x "$v"); done
else  # MPICH and Intel MPI (Hydra)
  [ -z "${HOSTS:-}" ] || args+=(-hosts "$HOSTS")
  for v in "${pass[@]}"; do [ -z "${!v:-}" ] || args+=(-genv "$v" "${!v}"); done
fi
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of words on purpose
run_passing_status mpirun "${args[@]}" ${MPIRUN_ARGS:-} "$python" "$root/launchers/pretrain.py" "$@"
