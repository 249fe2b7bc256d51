#!/usr/bin/env bash
# docs/sparsify.md: our own small V3.2 model: stage 1, stage 2, then the T=512/k=64 comparison (ppl, passkey, kv)
set -euo pipefail
cd "$(dirname "$0")/.." && source .venv/bin/activate
M=runs/small-dense/final
T=512; K=64; TH=${TH:-2}
dsv32 sparsify --stage 1 --model $M --data runs/data-small --out runs/sparsify-small-s1 --seq-len $T --batch-size 8 \
    --topk $K --lr 1e-3 --warmup 10 --max-steps 150 --save-every 50 --threads $TH --no-progress
dsv32 sparsify --stage 2 --model $M --indexer runs/sparsify-small-s1/indexer.safetensors --data runs/data-small \
    --out runs/sparsify-small-s2 --seq-len $T --batch-size 8 --topk $K --lr 3e-4 --indexer-lr 3e-4 --warmup 10 \
    --max-steps 100 --save-every 50 --diag-every 10 --threads $TH --no-progress
E=runs/eval-small; mkdir -p $E
common="--context $T --data runs/data-small --tokenizer dsv32-small-8k --threads $TH"
dsv32 eval ppl --model $M $common --dense --beyond $K --num-seqs 40 --json $E/ppl-dense.json > /dev/null
dsv32 eval ppl --model $M $common --window $K --num-seqs 40 --json $E/ppl-window.json > /dev/null
dsv32 eval ppl --model $M $common --topk $K --random-indexer --recall --num-seqs 40 --json $E/ppl-random.json > /dev/null
dsv32 eval ppl --model $M $common --topk $K --indexer runs/sparsify-small-s1/indexer.safetensors --recall --num-seqs 40 \
    --json $E/ppl-s1.json > /dev/null
dsv32 eval ppl --model $M $common --topk $K --weights runs/sparsify-small-s2 --recall --num-seqs 40 --json $E/ppl-s2.json > /dev/null
dsv32 eval ppl --model $M $common --dense --beyond $K --weights runs/sparsify-small-s2 --num-seqs 40 --json $E/ppl-s2-dense.json > /dev/null
for task in passkey kv; do
  dsv32 eval passkey --model $M $common --task $task --num 20 --dense --json $E/$task-dense.json > /dev/null
  dsv32 eval passkey --model $M $common --task $task --num 20 --window $K --json $E/$task-window.json > /dev/null
  dsv32 eval passkey --model $M $common --task $task --num 20 --topk $K --random-indexer --json $E/$task-random.json > /dev/null
  dsv32 eval passkey --model $M $common --task $task --num 20 --topk $K --indexer runs/sparsify-small-s1/indexer.safetensors \
      --json $E/$task-s1.json > /dev/null
  dsv32 eval passkey --model $M $common --task $task --num 20 --topk $K --weights runs/sparsify-small-s2 --json $E/$task-s2.json > /dev/null
done
echo PIPELINE DONE
