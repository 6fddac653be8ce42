# Sourced by slurm/pretrain.sh and slurm/pretrain_deepspeed.sh (not a job script itself), after
# launchers/exit_status.sh.
#
# wait_and_requeue PID RUN_NAME: wait for the training launched in the background as PID. USR1 (from
# --signal, or scancel --signal=USR1 --batch) and TERM reaching the batch script are passed to this
# job's training processes only (a torchrun agent or the deepspeed launcher would die of USR1); they
# agree to stop, save a checkpoint and exit with status 75 (or, when DIST_LM_STATUS_FILE is set, as
# launchers/exit_status.sh does, exit 0 and leave the 75 in that file), and then the job requeues
# itself. Exits the script with the training's status (0 after a requeue).

# The training processes are found by their command line, the one thing that reaches every node
# under each launcher (the deepspeed launcher's pdsh passes no SLURM_JOB_ID): python
# launchers/pretrain.py with this job's run.name. Another job of the same user on a shared node
# has another run name (the default one holds the job id; two jobs given one RUN_NAME would share a
# run directory, whose lock refuses the second) and is left alone.
_forward_stop() {
  local name
  name="$(printf '%s' "$2" | sed 's/[][\.*^$+?(){}|/]/\\&/g')"  # as a literal in pkill's regex
  echo "$1 received: asking the training processes of run $2 to checkpoint and stop"
  srun --overlap --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \
    pkill -USR1 -f "^[^ ]*python[^ ]* (-u )?[^ ]*launchers/pretrain.py( .*)? run\.name=$name( |\$)" || true
}

wait_and_requeue() {
  local step=$1 status=0
  STOP_RUN_NAME=$2
  trap '_forward_stop USR1 "$STOP_RUN_NAME"' USR1
  trap '_forward_stop TERM "$STOP_RUN_NAME"' TERM
  wait_for_exit "$step" || status=$?
  [ -z "${CLEANUP:-}" ] || rm -f $CLEANUP
  status="$(passed_status "$status")"
  if [ "$status" -eq "$EXIT_REQUEUE" ]; then  # (launchers/exit_status.sh reads it from dist_lm/train/exits.py)
    echo "stopped with a checkpoint: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" && exit 0  # the job runs again; this attempt did what it should
  fi
  exit "$status"
}
