#!/usr/bin/env bash
# The demo pipeline on a public-domain corpus: raw text -> documents -> tokenizer -> shards.
# Usage: tools/demo.sh [RUN_DIR]   (default runs/demo; configs/tiny.yaml reads runs/demo/shards)
set -euo pipefail
run=${1:-runs/demo}
scalelm prepare --demo --out "$run/docs" --overwrite
scalelm tokenizer train "$run/docs" --vocab-size 8000 --out "$run/tokenizer.model" --overwrite
scalelm shard "$run/docs" --tokenizer "$run/tokenizer.model" --out "$run/shards" --shard-size 1MB --val-fraction 0.05 --overwrite
scalelm inspect "$run/shards" --verify --tokenizer "$run/tokenizer.model" | grep -v '^  ok '
