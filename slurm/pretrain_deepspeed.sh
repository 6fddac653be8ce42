#!/usr/bin/env bash
# The deepspeed launcher under SLURM: a hostfile from the job's node list, then launchers/deepspeed.sh.
# Submit from the project's root:  sbatch slurm/pretrain_deepspeed.sh [CONFIG] [section.key=value ...]
# Across nodes the deepspeed launcher reaches the other nodes with pdsh (passwordless ssh);
# slurm/pretrain.sh needs neither.
#
#SBATCH --job-name=dist-lm-ds
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=dist-lm-ds-%j.out
set -uo pipefail
root="${DIST_LM_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$root" || exit 2
python="${PYTHON:-$([ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3)}"
source "$root/launchers/exit_status.sh"  # the exit statuses (launchers/deepspeed.sh passes rank 0's on)
config="${1:-auto}"; shift $(( $# > 0 ? 1 : 0 ))
run_name="${RUN_NAME:-${SLURM_JOB_NAME}-${SLURM_JOB_ID}}"
per_node="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"

hostfile="$root/hostfile-$SLURM_JOB_ID"
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$per_node/" > "$hostfile"
MASTER_ADDR="$(head -n 1 "$hostfile" | cut -d' ' -f1)"
MASTER_PORT="${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}"
export MASTER_ADDR MASTER_PORT HOSTFILE="$hostfile"
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): hostfile $hostfile: $(tr '\n' ' ' < "$hostfile")"

launchers/deepspeed.sh --config "$config" "run.name=$run_name" "$@" &
CLEANUP="$hostfile"
source "$root/slurm/stop_and_requeue.sh"
wait_and_requeue $! "$run_name"
