"""GRPO on a verifiable task: arithmetic problems, reward 1 when the answer's last integer is right.

    python examples/grpo_arithmetic.py"""

import json

from _common import MODEL, OUT, STEPS

from preftune import load_config
from preftune.models.rewards.verifiable import arithmetic_problems
from preftune.runs.online.grpo import run_grpo

OUT.mkdir(parents=True, exist_ok=True)
train_file, held_file = OUT / "arith-train.jsonl", OUT / "arith-heldout.jsonl"
for path, split, n in ((train_file, "train", 64), (held_file, "heldout", 8)):
    path.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_problems(n, split=split, seed=0)))

cfg = load_config(None, [f"model.name_or_path={MODEL}", "loss.name=grpo", "online.reward=arithmetic",
                         f"online.prompts_path={train_file}", f"online.eval_prompts_path={held_file}",
                         "online.samples_per_prompt=4", "online.prompts_per_step=2", "online.max_new_tokens=16",
                         f"train.max_steps={STEPS}", f"run.output_dir={OUT / 'grpo'}", "run.overwrite=true",
                         "diagnostics.probe_every=0"])
result = run_grpo(cfg)
print(f"grpo: {result.steps} steps; mean reward of the last step {result.summary['final']['reward/mean']:.3f}")
