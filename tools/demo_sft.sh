#!/usr/bin/env bash
# Chat SFT on top of tools/demo.sh: conversations made from the demo corpus's plays -> chat shards -> the
# pretrained tiny model finetuned on them as two local ranks -> on held-out conversations, the loss and the
# next-token accuracy of the assistant turns, and a reply to a prompt, before finetuning and after.
# Usage: tools/demo_sft.sh [RUN_DIR]   (default runs/demo, where tools/demo.sh left its model)
set -euo pipefail
run=${1:-runs/demo}
config="$(dirname "$0")/../configs/sft-tiny.yaml"
scalelm prepare --demo-chat --out "$run/conversations"
scalelm shard --chat "$run/conversations" --tokenizer "$run/tokenizer.model" --out "$run/chat" --seq-len 128 \
  --val-fraction 0.05 --overwrite
reply() {
  scalelm generate "$1" --chat --system "Hamlet. You are Horatio." --prompt "Hamlet: What hour now?" \
    --max-new-tokens 48 --temperature 0
}
echo "== before finetuning: the pretrained model on held-out conversations"
scalelm eval "$run/tiny/checkpoints" --data "$run/chat" --windows 64
reply "$run/tiny/checkpoints"
rm -rf "$run/sft"
scalelm finetune --config "$config" --nproc-per-node 2 data.train="$run/chat" train.init_from="$run/tiny/checkpoints" \
  log.dir="$run/sft"
echo "== after finetuning"
scalelm eval "$run/sft/checkpoints" --data "$run/chat" --windows 64
reply "$run/sft/checkpoints"
