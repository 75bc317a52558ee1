#!/usr/bin/env bash
# The demo on a public-domain corpus: raw text -> documents -> tokenizer -> shards -> a pretrained tiny GPT
# -> Hugging Face and GGUF exports -> perplexity and generated text.
# Usage: tools/demo.sh [RUN_DIR]   (default runs/demo; configs/tiny.yaml reads runs/demo/shards)
set -euo pipefail
run=${1:-runs/demo}
scalelm prepare --demo --out "$run/docs" --overwrite
scalelm tokenizer train "$run/docs" --vocab-size 2000 --out "$run/tokenizer.model" --overwrite
scalelm shard "$run/docs" --tokenizer "$run/tokenizer.model" --out "$run/shards" --shard-size 1MB --val-fraction 0.05 --overwrite
scalelm inspect "$run/shards" --verify --tokenizer "$run/tokenizer.model" | grep -v '^  ok '
# A tiny GPT on those shards, as two local ranks (data parallel, ZeRO-1) over gloo; checkpoints in
# $run/tiny/checkpoints. The demo starts over each time; a real run resumes from its checkpoints.
rm -rf "$run/tiny"
scalelm pretrain --config "$(dirname "$0")/../configs/tiny.yaml" --nproc-per-node 2 \
  data.train="$run/shards" data.tokenizer="$run/tokenizer.model" log.dir="$run/tiny"
scalelm checkpoint consolidate "$run/tiny/checkpoints" --out "$run/tiny/model.safetensors"
# The model where it goes next: a Hugging Face folder and a GGUF file (each checked against scalelm's
# own forward), its perplexity on the validation split, and some text from it.
scalelm convert to-hf "$run/tiny/checkpoints" "$run/tiny/hf"
scalelm convert to-gguf "$run/tiny/checkpoints" "$run/tiny/model.gguf" --dtype f16
scalelm eval "$run/tiny/checkpoints" --data "$run/shards" --windows 64
scalelm generate "$run/tiny/hf" --prompt "KING HENRY:" --max-new-tokens 48 --seed 0
