"""DPO on your own preference file, then held-out evaluation and an export to share.

    python examples/dpo_own_data.py

The same as `preftune train` / `preftune eval --run` / `preftune export` on the command line."""

import json

from _common import MODEL, OUT, PAIRS, STEPS

from preftune import load_config, train
from preftune.apps.eval import run_eval
from preftune.apps.export import export_run

OUT.mkdir(parents=True, exist_ok=True)
data, held = OUT / "pairs.jsonl", OUT / "heldout.jsonl"
data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS[:12]))
held.write_text("".join(json.dumps(p) + "\n" for p in PAIRS[12:]))

cfg = load_config(None, [f"model.name_or_path={MODEL}", f"data.train_path={data}", f"data.eval_path={held}",
                         f"train.max_steps={STEPS}", "train.batch_size=4", f"run.output_dir={OUT / 'dpo'}",
                         "run.overwrite=true", "diagnostics.probe_every=0"])
result = train(cfg)
ev = run_eval(cfg, run_dir=str(result.run_dir), data_path=str(held))
export = export_run(result.run_dir, OUT / "dpo-export", overwrite=True)
print(f"trained {result.steps} steps; held-out implicit-reward accuracy {ev['accuracy/implicit_reward']:.3f}; "
      f"export: {export.out} ({export.kind})")
