#!/usr/bin/env bash
# RL from rewards on top of tools/demo_sft.sh: prompts made from the demo corpus's plays (a speech, and the name of
# the speaker who answers it) -> prompt shards -> GRPO of the chat model as two local ranks, each step sampling 8
# replies to each of 4 prompts with the model as it is and rewarding those in a required format, one line of 6 to
# 12 words ending in . ! or ? (the built-in format reward, configs/grpo-tiny.yaml) -> the reward's mean at the
# first steps and the last, and a reply to one prompt before and after.
# Usage: tools/demo_rl.sh [RUN_DIR]   (default runs/demo, where tools/demo_sft.sh left its chat model)
set -euo pipefail
run=${1:-runs/demo}
config="$(dirname "$0")/../configs/grpo-tiny.yaml"
scalelm prepare --demo-prompts --out "$run/prompts-jsonl"
scalelm shard --prompts "$run/prompts-jsonl" --tokenizer "$run/tokenizer.model" --out "$run/prompts" --val-fraction 0.05 \
  --overwrite
reply() {
  scalelm generate "$1" --chat --system "Hamlet. You are Horatio." --prompt "Hamlet: What hour now?" \
    --max-new-tokens 32 --temperature 0
}
echo "== before RL: the chat model's reply"
reply "$run/sft/checkpoints"
rm -rf "$run/grpo"
scalelm finetune --config "$config" --nproc-per-node 2 data.train="$run/prompts" train.init_from="$run/sft/checkpoints" \
  log.dir="$run/grpo"
echo "== the reward (the share of replies in the format), the first 5 rollouts against the last 5"
python - "$run/grpo" <<'PY'
import sys

from scalelm.train.log import read_records

rewards = [r["reward_mean"] for r in read_records(sys.argv[1]) if "reward_mean" in r]
print(f"steps 1-5 {sum(rewards[:5]) / 5:.3f}, steps {len(rewards) - 4}-{len(rewards)} {sum(rewards[-5:]) / 5:.3f}")
PY
echo "== after RL"
reply "$run/grpo/checkpoints"
