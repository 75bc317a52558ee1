#!/usr/bin/env bash
# Alignment and a task head on top of tools/demo_sft.sh, on pairs and labels made from the demo corpus's plays:
# 1. DPO: each conversation's real reply preferred to it with two neighbouring words swapped -> preference shards ->
#    the chat model finetuned on them as two local ranks, its reference scored first -> on held-out pairs, how often
#    the model finds the real reply the likelier, before and after, and the policy's reward accuracy.
# 2. A classifier: speeches of six plays labelled with their play -> the pretrained model with a score head ->
#    held-out accuracy (chance is one in six), macro-F1 and the confusion matrix.
# Usage: tools/demo_align.sh [RUN_DIR]   (default runs/demo, where tools/demo.sh and tools/demo_sft.sh left their models)
set -euo pipefail
run=${1:-runs/demo}
configs="$(dirname "$0")/../configs"
scalelm prepare --demo-pairs --out "$run/pairs-jsonl"
scalelm shard --preference "$run/pairs-jsonl" --tokenizer "$run/tokenizer.model" --out "$run/pairs" --seq-len 128 \
  --val-fraction 0.1 --overwrite
echo "== before DPO: the chat model on held-out pairs"
scalelm eval "$run/sft/checkpoints" --data "$run/pairs" --batch-size 1   # one pair a window: every held-out pair
# DPO with an RPO term (sft_weight): on its own, DPO lowers the chosen replies' log-probs too, if less than the others
rm -rf "$run/dpo"
scalelm finetune --config "$configs/dpo-tiny.yaml" --nproc-per-node 2 data.train="$run/pairs" \
  train.init_from="$run/sft/checkpoints" log.dir="$run/dpo" finetune.dpo.sft_weight=1.0
echo "== after DPO"
scalelm eval "$run/dpo/checkpoints" --data "$run/pairs" --batch-size 1

scalelm prepare --demo-labels --out "$run/passages"
scalelm shard --labels "$run/passages" --tokenizer "$run/tokenizer.model" --out "$run/labelled" --seq-len 128 \
  --val-fraction 0.1 --overwrite
rm -rf "$run/classify"
scalelm finetune --config "$configs/classify-tiny.yaml" --nproc-per-node 2 data.train="$run/labelled" \
  train.init_from="$run/tiny/checkpoints" log.dir="$run/classify"
echo "== the classifier on held-out speeches"
scalelm eval "$run/classify/checkpoints" --data "$run/labelled" --batch-size 1
