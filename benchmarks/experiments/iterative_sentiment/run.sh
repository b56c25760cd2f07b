#!/usr/bin/env bash
# Iterative DPO on the controlled-sentiment task (the demo's prompts and VADER reward), 3 rounds.
# Prints each round's held-out reward and KL to the starting model; writes runs/iterative_sentiment/.
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=${OUT:-runs/iterative_sentiment}
mkdir -p "$OUT"
.venv/bin/python -c "
from preftune.apps.demo import demo_prompts
train, held = demo_prompts()
open('$OUT/train_prompts.txt', 'w').write('\n'.join(train) + '\n')
open('$OUT/heldout_prompts.txt', 'w').write('\n'.join(held) + '\n')"
.venv/bin/preftune iterate online.prompts_path="$OUT/train_prompts.txt" \
  online.eval_prompts_path="$OUT/heldout_prompts.txt" online.reward=sentiment online.rounds="${ROUNDS:-3}" \
  online.samples_per_prompt=4 online.max_new_tokens=32 online.eval_samples=6 online.min_margin=0.1 \
  model.lora_target_modules='[q_proj, k_proj, v_proj, o_proj]' data.max_length=96 data.max_prompt_length=32 \
  train.lr=5e-4 train.epochs=2 train.batch_size=8 train.seed=0 diagnostics.probe_every=0 \
  run.output_dir="$OUT/run"
