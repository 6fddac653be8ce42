# Sourced by the launch templates (not a launcher itself), after they set $root and $python.
#
# First the table of exit statuses (dist_lm/train/exits.py) as EXIT_OK, EXIT_REQUEUE, ... variables.
eval "$(PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$python" -m dist_lm.train.exits --shell)" || exit 2
#
# Exit status 75 ($EXIT_REQUEUE) means "stopped on purpose after a checkpoint: run me again" (slurm/pretrain.sh
# requeues the job on it). torchrun, the deepspeed launcher and mpirun take a rank's non-zero exit
# for a failure: they end the other ranks and report their own status (torchrun: 1). So a template
# exports DIST_LM_STATUS_FILE: rank 0 writes its status there and every rank exits 0
# (dist_lm/train/preemption.py), and run_passing_status exits with that status.
#
# The file is made here, in the checkout (shared by the nodes of a multi-node job, as the code
# is), else under TMPDIR; it is removed when the template exits.
DIST_LM_STATUS_FILE="$(mktemp "$root/.dist-lm-status.XXXXXX" 2>/dev/null || mktemp "${TMPDIR:-/tmp}/dist-lm-status.XXXXXX")"
export DIST_LM_STATUS_FILE
trap 'rm -f "$DIST_LM_STATUS_FILE"' EXIT

# wait_for_exit PID: wait until the background process PID has ended and return its status. A
# trapped signal interrupts `wait`; this waits again (slurm/stop_and_requeue.sh uses it too).
wait_for_exit() {
  local code
  while true; do
    wait "$1"; code=$?
    kill -0 "$1" 2>/dev/null || return "$code"
  done
}

# passed_status CODE: the status the training means, given its launcher's exit status CODE: the one
# rank 0 left in DIST_LM_STATUS_FILE when the launcher exited 0, else CODE.
passed_status() {
  if [ "$1" -eq 0 ] && [ -s "$DIST_LM_STATUS_FILE" ]; then cat "$DIST_LM_STATUS_FILE"; else echo "$1"; fi
}

# run_passing_status COMMAND...: run COMMAND, pass TERM and INT on to it (as an exec would), and
# exit with its status, or with the status rank 0 left in DIST_LM_STATUS_FILE.
run_passing_status() {
  local status=0 child
  "$@" &
  child=$!
  # TERM for INT too: a script's background command ignores INT (python and torchrun with it).
  trap 'kill -TERM "$child" 2>/dev/null' TERM INT
  wait_for_exit "$child" || status=$?
  exit "$(passed_status "$status")"
}
