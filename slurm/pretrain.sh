#!/usr/bin/env bash
# Submit from the project's root:  sbatch slurm/pretrain.sh [CONFIG] [section.key=value ...]
#   CONFIG: a preset, a YAML file, or auto (the default: the plan for the allocated GPUs). Options on sbatch's command line override
#   the #SBATCH lines below, e.g. sbatch --nodes=4 slurm/pretrain.sh h100-multinode.
#
#SBATCH --job-name=dist-lm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8          # one task per GPU (LAUNCH=srun, the default); 1 with LAUNCH=torchrun
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120          # 120 s before the time limit: checkpoint, then requeue
#SBATCH --requeue
#SBATCH --open-mode=append           # a requeued job appends to the same log
#SBATCH --output=dist-lm-%j.out
#
# The run is named after the job (RUN_NAME, default <job name>-<job id>), so a requeued job, which
# keeps its id, continues from the newest checkpoint of the same run directory.
# LAUNCH=srun (default): srun starts one pretrain.py per GPU. LAUNCH=torchrun: one torchrun per node,
# starting GPUS_PER_NODE ranks (default: the GPUs SLURM gives the node).
set -uo pipefail
root="${DIST_LM_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$root" || exit 2
python="${PYTHON:-$([ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3)}"
config="${1:-auto}"; shift $(( $# > 0 ? 1 : 0 ))
run_name="${RUN_NAME:-${SLURM_JOB_NAME}-${SLURM_JOB_ID}}"

# The first node of the allocation hosts the rendezvous.
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT="${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}"
export MASTER_ADDR MASTER_PORT
# Networking, by fabric (uncomment what yours needs):
#   InfiniBand:  export NCCL_IB_HCA=mlx5 NCCL_SOCKET_IFNAME=ib0
#   Ethernet:    export NCCL_IB_DISABLE=1 NCCL_SOCKET_IFNAME=eth0
#   debugging:   export NCCL_DEBUG=INFO

echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $config, run $run_name, master $MASTER_ADDR:$MASTER_PORT"
args=(--config "$config" "run.name=$run_name" "$@")
source "$root/launchers/exit_status.sh"  # rank 0 leaves its exit status (75: requeue) in a file
if [ "${LAUNCH:-srun}" = torchrun ]; then
  per_node="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "exec '$python' -m torch.distributed.run \
    --nnodes $SLURM_JOB_NUM_NODES --node_rank \$SLURM_NODEID --nproc_per_node $per_node \
    --master_addr $MASTER_ADDR --master_port $MASTER_PORT launchers/pretrain.py $(printf '%q ' "${args[@]}")" &
else
  srun --kill-on-bad-exit=0 "$python" launchers/pretrain.py "${args[@]}" &
fi
source "$root/slurm/stop_and_requeue.sh"
wait_and_requeue $! "$run_name"
