#!/usr/bin/env bash
# Issue 3 acceptance: every loss trains on the default model on TruthfulQA, with held-out pair
# accuracy before and after, plus peak memory of full fine-tuning with and without a reference.
# Usage: bash benchmarks/experiments/loss_family/run.sh [OUT_DIR]   (about 30 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=${1:-runs/loss_family}
TQA=../shared/data/truthfulqa
P=.venv/bin/preftune
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
common=(data.train_path="$TQA/TruthfulQA.visible.csv[:500]" data.eval_path="$TQA/TruthfulQA.visible.csv[500:]"
        data.max_length=128 data.max_prompt_length=96 train.batch_size=8 train.max_steps=40 train.lr=5e-4
        run.overwrite=true eval.batch_size=16)
# before: the base model; simpo and orpo rewards are beta * average logp, so their "before" accuracy is meaningful too
$P eval --data "$TQA/TruthfulQA.visible.csv[500:]" --out "$OUT/before_dpo.json" eval.kl_prompts=0 >/dev/null
$P eval --data "$TQA/TruthfulQA.visible.csv[500:]" --out "$OUT/before_simpo.json" eval.kl_prompts=0 \
    loss.name=simpo loss.beta=2.0 >/dev/null
$P train "${common[@]}" loss.name=sigmoid run.output_dir="$OUT/sigmoid"
$P train "${common[@]}" loss.name=ipo run.output_dir="$OUT/ipo"
$P train "${common[@]}" loss.name=simpo loss.beta=2.0 loss.simpo_gamma=0.5 run.output_dir="$OUT/simpo"
$P train "${common[@]}" loss.name=orpo loss.beta=0.1 run.output_dir="$OUT/orpo"
$P train "${common[@]}" loss.name=kto data.train_path="$TQA/truth_labels.visible.jsonl" data.drop_eval_prompts=true \
    data.max_records=2000 loss.kto_auto_weights=true run.output_dir="$OUT/kto"
# memory: full fine-tuning (no LoRA), DPO holds a frozen reference copy, SimPO/ORPO hold none
for loss in sigmoid simpo orpo; do
  $P train "${common[@]}" model.lora=false loss.name=$loss train.max_steps=3 train.lr=1e-6 \
      data.eval_path= run.output_dir="$OUT/mem_$loss" > /dev/null
done
.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for name in ("sigmoid", "ipo", "simpo", "orpo", "kto"):
    s = json.loads((out / name / "summary.json").read_text())
    before = json.loads((out / ("before_simpo.json" if name in ("simpo", "orpo") else "before_dpo.json")).read_text())
    e = s["eval"]
    rows.append(f"{name:8s} steps {s['steps']:3d}  logp-acc {before['accuracy/logp']:.3f} -> {e['accuracy/logp']:.3f}"
                f"  implicit-acc {before['accuracy/implicit_reward']:.3f} -> {e['accuracy/implicit_reward']:.3f}"
                f"  margin {e['rewards/margins']:+.3f}  {s['pairs_per_s']:.2f} pairs/s")
mem = {n: json.loads((out / f"mem_{n}" / "summary.json").read_text())["peak_rss_mb"] for n in ("sigmoid", "simpo", "orpo")}
rows.append("peak RSS, full fine-tuning: " + ", ".join(f"{n} {v:.0f} MB" for n, v in mem.items())
            + f"; simpo/dpo {mem['simpo'] / mem['sigmoid']:.3f}, orpo/dpo {mem['orpo'] / mem['sigmoid']:.3f}")
text = "\n".join(rows)
print(text)
(out / "results.txt").write_text(text + "\n")
PY
