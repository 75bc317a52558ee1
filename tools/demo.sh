#!/usr/bin/env bash
# The demo on a public-domain corpus: raw text -> documents -> tokenizer -> shards -> a pretrained tiny GPT.
# Usage: tools/demo.sh [RUN_DIR]   (default runs/demo; configs/tiny.yaml reads runs/demo/shards)
set -euo pipefail
run=${1:-runs/demo}
scalelm prepare --demo --out "$run/docs" --overwrite
scalelm tokenizer train "$run/docs" --vocab-size 8000 --out "$run/tokenizer.model" --overwrite
scalelm shard "$run/docs" --tokenizer "$run/tokenizer.model" --out "$run/shards" --shard-size 1MB --val-fraction 0.05 --overwrite
scalelm inspect "$run/shards" --verify --tokenizer "$run/tokenizer.model" | grep -v '^  ok '
# A tiny GPT on those shards, as two local ranks (data parallel, ZeRO-1) over gloo; checkpoints in
# $run/tiny/checkpoints. The demo starts over each time; a real run resumes from its checkpoints.
rm -rf "$run/tiny"
scalelm pretrain --config "$(dirname "$0")/../configs/tiny.yaml" --nproc-per-node 2 \
  data.train="$run/shards" data.tokenizer="$run/tokenizer.model" log.dir="$run/tiny"
scalelm checkpoint consolidate "$run/tiny/checkpoints" --out "$run/tiny/model.safetensors"
