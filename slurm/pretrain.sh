#!/bin/bash
# Pretrain (or finetune) on a SLURM cluster: N nodes x G GPUs, one task per GPU, every task one scalelm rank.
#
#   sbatch [sbatch options] slurm/pretrain.sh --config CFG [key=value ...]
#   sbatch --nodes=16 --job-name=gpt3-6.7b slurm/pretrain.sh --config configs/gpt3-6.7b.yaml parallel.tensor=8
#   sbatch --nodes=2 slurm/pretrain.sh finetune --config configs/sft-gpt3-1.3b.yaml train.init_from=...
#   sbatch --nodes=2 slurm/pretrain.sh generate CKPT --prompts p.jsonl --out samples.jsonl parallel.tensor=8
#
# Options given to sbatch override the #SBATCH lines below. Everything after the script's name goes to
# `scalelm pretrain` unchanged, or to `scalelm finetune` or `scalelm generate` when the first word names it.
# slurm/README.md explains each setting, the logs and preemption.
#
# ---- what to set ---------------------------------------------------------------------------------
#SBATCH --job-name=scalelm
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
PYTHON=${SCALELM_PYTHON:-python}   # a Python with scalelm installed, at the same path on every node
# NCCL over InfiniBand is found on its own; on Ethernet-only clusters name the interface:
# export NCCL_SOCKET_IFNAME=eth0
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead peer ends the job, not a hang
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron's TP/SP communication overlap needs it
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# ---------------------------------------------------------------------------------------------------

set -uo pipefail
stage=pretrain
if [ "${1:-}" = pretrain ] || [ "${1:-}" = finetune ] || [ "${1:-}" = generate ]; then
  stage=$1
  shift
fi
if [ $# -eq 0 ]; then
  echo "usage: sbatch [sbatch options] slurm/pretrain.sh [finetune] --config CFG [key=value ...]" >&2
  echo "       sbatch [sbatch options] slurm/pretrain.sh generate CKPT --prompts FILE --out FILE [key=value ...]" >&2
  exit 2
fi

# Rank 0's host and a port every task derives from the job id: no two jobs on a node share one.
# Each task's rank comes from SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), never from the shell
# sbatch was run in: a RANK or WORLD_SIZE left there would make every task a rank 0 of its own.
unset RANK WORLD_SIZE LOCAL_RANK

# What a run checks before its ranks start (the config, the data against it, the tokenizer, the checkpoints), once,
# here: a bad input ends the job with one line, not one from each rank and srun's report of them.
"$PYTHON" -m scalelm "$stage" --preflight "$SLURM_NTASKS" "$@" || exit $?

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}  # a port given in the environment is kept
export MASTER_ADDR MASTER_PORT
echo "scalelm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES node(s): $SLURM_JOB_NODELIST," \
     "$SLURM_NTASKS ranks, rank 0 at $MASTER_ADDR:$MASTER_PORT, $(date -Is)"

# Before the time limit (or on `scancel --batch --signal=USR1 JOB`) SLURM signals this script: every
# rank is asked to stop (SIGTERM: each saves a checkpoint after its current step and exits 143), and
# once they have, the job puts itself back in the queue. Its next run resumes from that checkpoint
# (train.resume=auto). A preempted job is requeued by SLURM itself; the ranks save on its SIGTERM.
requeue() {
  echo "scalelm: USR1 at $(date -Is): checkpoint, then requeue"
  scancel --signal=TERM "$SLURM_JOB_ID"
  wait "$srun_pid"
  scontrol requeue "$SLURM_JOB_ID" || echo "scalelm: could not requeue the job; resubmit it to resume"
}

# One task per GPU: each task is one rank (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) and gets
# SLURM's signals directly, with no launcher in between.
srun --kill-on-bad-exit=1 "$PYTHON" -m scalelm "$stage" "$@" &
srun_pid=$!
trap requeue USR1
wait "$srun_pid"  # returns early when USR1 arrives; the trap then waits for the ranks itself
wait "$srun_pid"
status=$?
echo "scalelm: ranks exited with status $status at $(date -Is)"
exit "$status"
