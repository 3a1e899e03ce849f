#!/usr/bin/env bash
# speed-train on a non-SLURM cluster or a single node: torchrun starts one process per GPU and
# Lightning detects the ranks from its environment (no subprocess relaunch).
#
#   scripts/torchrun.sh +experiment=speed24_bos                          # this node, all GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 scripts/torchrun.sh +experiment=speed24_bos
#   NPROC=2 ACCELERATOR=cpu scripts/torchrun.sh model=tiny_llama ...      # 2 CPU ranks (gloo)
#   DRY_RUN=1 NNODES=2 NPROC=8 scripts/torchrun.sh +experiment=speed24_bos   # print only
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC=${NPROC:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l) || echo 1)}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}   # e.g. PYTHON=.venv/bin/python (an interpreter with speed_train installed)
ACCELERATOR=${ACCELERATOR:-}
# CPU ranks share the cores: one OpenMP thread each (2 ranks x 2 threads on 2 cores ran ~30x slower)
if [[ "$ACCELERATOR" == cpu ]]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
# One run folder for every rank (Hydra's timestamped default would differ between processes).
RUN_DIR=${RUN_DIR:-outputs/torchrun-$(date +%Y%m%d-%H%M%S)}

EXTRA=("hydra.run.dir=$RUN_DIR" "trainer.num_nodes=$NNODES" "trainer.devices=$NPROC")
[[ -n "$ACCELERATOR" ]] && EXTRA+=("trainer.accelerator=$ACCELERATOR")

CMD=("$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC"
     --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT"
     -m speed_train "${EXTRA[@]}" "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
