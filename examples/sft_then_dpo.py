"""The pipeline DPO assumes: supervised fine-tuning on the chosen replies first, then DPO from that
adapter (its reference is the SFT model).

    python examples/sft_then_dpo.py"""

import json

from _common import MODEL, OUT, PAIRS, STEPS

from preftune import load_config, train
from preftune.runs.sft import run_sft

OUT.mkdir(parents=True, exist_ok=True)
demos, pairs = OUT / "demos.jsonl", OUT / "pairs.jsonl"
demos.write_text("".join(json.dumps({"prompt": p["prompt"], "completion": p["chosen"]}) + "\n" for p in PAIRS))
pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
common = [f"train.max_steps={STEPS}", "train.batch_size=4", "run.overwrite=true", "diagnostics.probe_every=0"]

sft = run_sft(load_config(None, ["loss.name=nll", f"model.name_or_path={MODEL}", f"data.train_path={demos}",
                                 f"run.output_dir={OUT / 'sft'}", *common]))
dpo = train(load_config(None, [f"model.name_or_path={MODEL}", f"model.adapter_name_or_path={sft.run_dir / 'model'}",
                               f"data.train_path={pairs}", f"run.output_dir={OUT / 'sft-dpo'}", *common]))
print(f"sft: {sft.steps} steps, final NLL/token {sft.summary['final']['nll/token']:.3f}; "
      f"dpo from it: {dpo.steps} steps, final margin {dpo.summary['final']['rewards/margins']:.3f}")
