"""The Python API with the objects a notebook already holds: a transformers model and tokenizer and
a `datasets.Dataset`, passed to `preftune.train` directly.

    python examples/notebook_api.py"""

import datasets
from _common import MODEL, OUT, PAIRS, STEPS
from transformers import AutoModelForCausalLM, AutoTokenizer

import preftune
from preftune.models.loading import resolve_model_dir

path = resolve_model_dir(MODEL)  # the packaged default is converted once into a model directory
model = AutoModelForCausalLM.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
train_dataset = datasets.Dataset.from_list(PAIRS[:12])
eval_dataset = datasets.Dataset.from_list(PAIRS[12:])

result = preftune.train(model=model, tokenizer=tokenizer, train_dataset=train_dataset, eval_dataset=eval_dataset,
                        config={"loss": {"name": "dpo", "beta": 0.1},
                                "train": {"max_steps": STEPS, "batch_size": 4},
                                "run": {"output_dir": str(OUT / "notebook"), "overwrite": True},
                                "diagnostics": {"probe_every": 0}})
print(f"run {result.run_dir}: {result.steps} steps, held-out accuracy "
      f"{result.summary['eval']['accuracy/implicit_reward']:.3f}")
