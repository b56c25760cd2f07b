"""Issue 18 item 5: the DPO recipe on HH in TRL's DPOTrainer at equal steps and at equal wall-clock.

    PYTHONPATH=src python -m benchmarks.quality.peer_trl [--pairs 160] [--dev 200]

preftune's side is a point of the quality benchmark (`python -m benchmarks.quality`: the sigmoid recipe,
one epoch over the first --pairs HH training pairs, evaluated on the first --dev dev pairs; its
own working directory, the base-model evaluation reused from the benchmark's). This script then
trains TRL 1.16's DPOTrainer twice on the same work and evaluates both with the same `preftune
eval` call as the point (same dev pairs, same KL sampling):

- equal steps: as many optimizer steps as preftune took (one epoch of the recipe);
- equal time: as many steps as TRL completes in preftune's training-loop seconds, at TRL's
  per-step time measured in the equal-steps run (a user with that budget would plan that many
  steps: the schedule, warmup included, is laid over them), on the first pairs of the same order.

What is identical: the token ids (preftune's tokenization of the pairs: the chat rendering and
the 256/192 cut, handed to TRL pre-tokenized so that neither tool re-renders or re-truncates), the
order (preftune's epoch-0 permutation for seed 0, and a sequential sampler in TRL), the LoRA
initial weights (same seed, same `apply_lora`), lr, beta, batch 4, cosine schedule with the same
number of warmup steps, AdamW without weight decay, grad-norm clip 1, fp32. TRL runs with
gradient checkpointing OFF (its default is on; off is its faster setting at 256 tokens and memory
is no issue here) and precomputes nothing. Times: the training loop only (preftune's
summary.json `elapsed_s`; TRL's `trainer.train()`), model loading excluded on both sides.
Per-step losses of the equal-steps run are compared with preftune's metrics.jsonl (the first 5
steps should agree to ~1e-5; later steps drift apart by float order).

The TRL adapter is saved as a run directory preftune can read (model/ plus the point's
config.yaml) and evaluated by `preftune eval --run`. Writes peer_trl.json and peer_trl.md beside
this script. TRL is a benchmark dependency only. Budget: TRL is ~3-4x slower per step here, so
the default 160 pairs (40 steps) costs about 5x preftune's training time in all (~1 hour on
these 2 cores); the quality benchmark's 400-pair point would cost ~2.5 hours.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from benchmarks.experiments.hh_cli import HH, preftune_logged, python_logged

from .points import base_eval, dataset_inputs, eval_args, run_point  # the benchmark this one extends
from .settings import SETTINGS, newcombe

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def warmup_steps(ratio: float, steps: int) -> int:
    """preftune's warmup length (train.py: int(ratio * total)); TRL is given the same number."""
    return int(ratio * steps)


def equal_time_steps(budget_s: float, trl_s_per_step: float, max_steps: int) -> int:
    """Steps TRL completes in `budget_s` at its measured per-step time (at least 1, at most one epoch)."""
    return max(1, min(max_steps, int(budget_s // trl_s_per_step)))


def preftune_order(n: int, seed: int) -> list[int]:
    """The order preftune's first epoch visits n examples (checkpoint.EpochSampler)."""
    from preftune.data.order import EpochSampler

    sampler = EpochSampler(n, seed)
    sampler.position(0)
    return list(iter(sampler))


# ---- the TRL worker (its own process) -------------------------------------------------------

def worker(run: Path, steps: int, dest: Path) -> dict:
    """Train TRL on the point's pairs for `steps` steps; save the adapter as a preftune run dir."""
    from accelerate.utils import set_seed
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl import DPOConfig, DPOTrainer

    from preftune.config import load_config
    from preftune.data.prepare import prepare_pairs
    from preftune.models.loading import apply_lora, load_model, load_tokenizer, resolve_model_dir

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):  # already preftune's token ids
            return dataset

        def _get_train_sampler(self, *args, **kwargs):  # the order given (preftune's permutation)
            return SequentialSampler(self.train_dataset)

    cfg = load_config(run / "config.yaml")
    t, m = cfg.train, cfg.model
    model_dir = resolve_model_dir(m.name_or_path)
    tokenizer = load_tokenizer(model_dir)
    examples, _ = prepare_pairs(cfg.data.train_path, cfg, tokenizer)
    order = preftune_order(len(examples), t.seed)[: steps * t.batch_size]
    rows = [{"prompt_ids": list(examples[i].prompt_ids), "chosen_ids": list(examples[i].chosen_ids),
             "rejected_ids": list(examples[i].rejected_ids)} for i in order]
    set_seed(t.seed)  # as train.py: seed, load, then LoRA -> the same initial adapter weights
    model = apply_lora(load_model(model_dir), r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout,
                       target_modules=m.lora_target_modules)
    args = DPOConfig(output_dir=str(dest / "trl-out"), per_device_train_batch_size=t.batch_size, learning_rate=t.lr,
                     beta=cfg.loss.beta, max_steps=steps, lr_scheduler_type=t.scheduler,
                     warmup_steps=warmup_steps(t.warmup_ratio, steps), max_length=None, bf16=False,
                     gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[], seed=t.seed,
                     use_cpu=True, max_grad_norm=t.max_grad_norm, weight_decay=t.weight_decay,
                     dataloader_num_workers=0, disable_tqdm=True)
    trainer = PreTokenized(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    (dest / "run" / "model").mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest / "run" / "model"))  # adapter_model.safetensors + adapter_config.json
    shutil.copy(run / "config.yaml", dest / "run" / "config.yaml")  # eval reads the base model and data settings
    logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    return {"steps": steps, "train_s": round(elapsed, 2), "s_per_step": round(elapsed / steps, 3),
            "losses": [h["loss"] for h in logs], "pairs": len(rows)}


def _trl(run: Path, steps: int, dest: Path) -> dict:
    dest.mkdir(parents=True, exist_ok=True)
    log = dest / "train.log"
    code, _ = python_logged(["-m", "benchmarks.quality.peer_trl", "--worker", str(run), str(steps), str(dest)],
                            log)
    if code:
        sys.exit(f"TRL worker failed ({code}): see {log}")
    return json.loads((dest / "worker.json").read_text())


def _eval(dest: Path, data: dict, s: dict) -> dict:
    code, wall = preftune_logged(eval_args(dest / "run", data, dest / "eval.json", s), dest / "eval.log")
    if code:
        sys.exit(f"preftune eval of {dest / 'run'} failed ({code}): see {dest / 'eval.log'}")
    return json.loads((dest / "eval.json").read_text())


def _row(name: str, e: dict, base: dict, steps: int, train_s: float, pairs: int) -> dict:
    imp, ci = e["accuracy/implicit_reward"], e["accuracy/implicit_reward_ci95"]
    gain, gain_ci = newcombe(imp, ci, base["logp_acc"], base["logp_acc_ci95"])
    return {"trainer": name, "steps": steps, "pairs": pairs, "train_s": train_s, "implicit_acc": imp,
            "implicit_acc_ci95": ci, "gain": round(gain, 4), "gain_ci95": [round(x, 4) for x in gain_ci],
            "logp_acc": e["accuracy/logp"], "margin": e["rewards/margins"], "kl": e.get("kl"),
            "kl_stderr": e.get("kl_stderr")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality.peer_trl", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/quality-peer", help="working directory of this comparison")
    ap.add_argument("--base-out", default="runs/quality",
                    help="the quality benchmark's directory: its base-model evaluation of the same dev pairs is reused")
    ap.add_argument("--pairs", type=int, default=160, help="HH training pairs (one epoch of the recipe: pairs / 4 steps)")
    ap.add_argument("--dev", type=int, default=200, help="HH dev pairs")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--worker", nargs=3, metavar=("RUN", "STEPS", "DEST"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        run, steps, dest = Path(a.worker[0]), int(a.worker[1]), Path(a.worker[2])
        (dest / "worker.json").write_text(json.dumps(worker(run, steps, dest), indent=1) + "\n")
        return 0
    if not (HH / "train.jsonl.gz").is_file():
        print(f"peer_trl skipped: the shared HH data is absent ({HH})")
        return 0
    out, base_out = (ROOT / a.out).resolve(), (ROOT / a.base_out).resolve()
    s = {**SETTINGS["full"], "hh_pairs": a.pairs, "hh_dev": a.dev}
    data = dataset_inputs("hh", out, s)
    t0 = time.perf_counter()
    base = base_eval(data, base_out, s, a.model)  # kept from the quality benchmark when it has this dev slice
    print(f"preftune, the sigmoid recipe on {a.pairs} HH pairs ...", flush=True)
    point = run_point(data, "sigmoid", out, s, a.model)
    if "error" in point or "error" in base:
        sys.exit(f"peer_trl: {point.get('error') or base.get('error')}")
    run = ROOT / point["run"]
    summary = json.loads((run / "summary.json").read_text())
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps, budget = summary["steps"], summary["elapsed_s"]
    rows = [_row("preftune", json.loads((ROOT / point["eval_file"]).read_text()), base, steps, budget,
                 summary["data"]["pairs"])]
    print(f"TRL, equal steps ({steps}) ...", flush=True)
    same = _trl(run, steps, out / "trl" / "equal-steps")
    rows.append(_row("trl equal steps", _eval(out / "trl" / "equal-steps", data, s), base, steps,
                     same["train_s"], same["pairs"]))
    n = equal_time_steps(budget, same["s_per_step"], steps)
    print(f"TRL, equal time ({budget:.0f} s -> {n} steps at {same['s_per_step']:.2f} s/step) ...", flush=True)
    timed = _trl(run, n, out / "trl" / "equal-time")
    rows.append(_row("trl equal time", _eval(out / "trl" / "equal-time", data, s), base, n,
                     timed["train_s"], timed["pairs"]))
    ours = [r["loss"] for r in metrics if "loss" in r][: len(same["losses"])]
    diffs = [abs(x - y) for x, y in zip(ours, same["losses"])]
    result = {"command": " ".join(["python -m benchmarks.quality.peer_trl", *(argv if argv is not None else sys.argv[1:])]),
              "model": a.model, "train_pairs": a.pairs, "base_logp_acc": base["logp_acc"],
              "base_logp_acc_ci95": base["logp_acc_ci95"], "dev_pairs": base["dev_pairs"], "rows": rows,
              "trl_seconds_over_preftune_equal_steps": round(same["train_s"] / budget, 2),
              "loss_agreement": {"first5_max_abs_diff": max(diffs[:5]) if diffs else None,
                                 "all_max_abs_diff": max(diffs) if diffs else None, "steps_compared": len(diffs)},
              "trl_losses": same["losses"], "elapsed_s": round(time.perf_counter() - t0, 1)}
    (HERE / "peer_trl.json").write_text(json.dumps(result, indent=1) + "\n")
    (HERE / "peer_trl.md").write_text(table(result) + "\n")
    print(table(result))
    return 0


def table(result: dict) -> str:
    lines = ["| trainer | steps | pairs | train s | implicit acc [95% CI] | gain over base log-prob acc [95% CI] | KL nats |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        (lo, hi), (glo, ghi) = r["implicit_acc_ci95"], r["gain_ci95"]
        kl = "" if r["kl"] is None else f"{r['kl']:.2f}"
        lines.append(f"| {r['trainer']} | {r['steps']} | {r['pairs']} | {r['train_s']:.0f} | {r['implicit_acc']:.3f} "
                     f"[{lo:.3f}, {hi:.3f}] | {r['gain']:+.3f} [{glo:+.3f}, {ghi:+.3f}] | {kl} |")
    agree = result["loss_agreement"]["first5_max_abs_diff"]
    lines.append(f"\nHH harmless, {result['train_pairs']} training pairs, {result['dev_pairs']} dev pairs; base model "
                 f"log-prob accuracy {result['base_logp_acc']:.3f}. TRL took {result['trl_seconds_over_preftune_equal_steps']}x "
                 f"preftune's training seconds for the same steps; per-step loss |difference| over the first 5 steps "
                 f"{'n/a' if agree is None else f'{agree:.1e}'}. Command: `{result['command']}`.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
