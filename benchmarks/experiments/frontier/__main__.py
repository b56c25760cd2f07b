"""Reward vs KL(policy || reference) frontier on controlled sentiment (the DPO paper's Fig. 2, left), on CPU.

    PYTHONPATH=src python -m benchmarks.experiments.frontier [--out runs/frontier] [--model M]
    PYTHONPATH=src python -m benchmarks.experiments.frontier --small   # the reduced grid (~30 min on 2 cores)
    PYTHONPATH=src python -m benchmarks.experiments.frontier --quick --model TINY_DIR   # smoke test

Task: the demo's (preftune.apps.demo): `demo_prompts()` gives 96 train and 24 held-out movie-review
openings; the reward is `sentiment` (VADER compound score in [-1, 1]). Start (= reference, KL 0):
the default model (SmolLM2-135M-Instruct) unless `--model`. Training recipe for every trained
point, as benchmarks/experiments/iterative_sentiment/run.sh: LoRA r16 on q/k/v/o, lr 5e-4, 2 epochs,
batch 8, seed 0, prompts cut to 32 tokens and pairs to 96.

Methods, every one driven through the `preftune` CLI in its own process:

- shared preference file: round 1 of `preftune iterate` samples 4 continuations (32 new tokens,
  temperature 1) of each train prompt from the start model, scores them with the reward and keeps
  best-vs-worst pairs (margin >= 0.1); that round-1/pairs.jsonl is the ONE file every DPO and IPO
  point trains on;
- DPO (loss sigmoid) at beta 0.05, 0.1, 0.3, 1 and IPO (loss ipo, summed log-ratios, target margin
  1/(2 beta)) at beta 0.1, 0.5, 1, 5: `preftune sweep` one beta per call (so each point has its own
  wall-clock). DPO at beta 0.1 is not trained again: iterate's round 1 is that very run (same
  pairs, same recipe and seed), so its point serves both lines;
- iterative DPO: rounds 1..3 of `preftune iterate` (each round samples the previous round's
  policy; the reference stays the start model), run as `online.rounds=1`, then 2, then 3 (a
  finished round is kept), so each round's wall-clock is measured; its own per-round eval is
  switched off, every round is measured like the DPO points instead;
- best-of-N, N in 1, 2, 4, 8, 16: `preftune bon --eval` on the held-out prompts, 16 samples per
  prompt from the start model, best of the first N (one nested sample set);
- `--dpo-lrs 1e-3,2e-3`: extra DPO lines, the grid's betas on the same pairs with only the learning
  rate changed ("DPO lr=X"), for budgets where the recipe's rate leaves the policies near KL 0.

Measurement. DPO, IPO and iterative points: `preftune eval --run RUN --reward sentiment` on the 24
held-out prompts, 4 samples each from the policy and from the start model, 32 new tokens, seed 0:
mean reward with a 95% bootstrap interval over prompts (of the per-prompt means), and
KL(policy || start) as the Monte-Carlo mean over the policy's samples of the summed token
log-ratio (nats per sample, with its standard error). The held-out file given to eval is one
fixed probe pair per held-out prompt (" I loved it." over " I hated it."): only its prompts
matter for the reward and KL; its pair accuracy is kept as a side number. The base point is the
start model's samples from those same evals (reward/reference; every eval draws them with the
same seed, so they agree, and the spread across evals is recorded as a check).
Where the methods differ: best-of-N uses 16 samples per held-out prompt (not 4), drawn with
`preftune bon`'s sampler, and its KL is the analytic log N - (N-1)/N, an upper bound on the true
KL (Beirami et al. 2024), not a measurement. Wall-clock: each point's own process(es); DPO/IPO
points exclude the shared pair sampling (recorded once as `pairs_s`), the beta-0.1 point and the
iterative rounds include it (round r: rounds 1..r cumulatively, plus its eval); best-of-N is one
call for every N.

Writes results.json (every point: method, setting, reward, reward_ci95, kl, wall_s), frontier.png
and verdict.md (written from the numbers: which method reaches the highest reward in each KL band)
beside this file; with --quick, into the output directory instead. Intermediate runs, logs and
finished points go under --out; a rerun keeps finished points (delete --out to start over).

Expected time (full run, default model, 2 otherwise idle CPU cores): about 45 minutes, estimated
(not measured on idle cores) from ~4 samples/s at 32 tokens and preftune's ~1 pair/s at 256 tokens
(benchmarks/speed_vs_trl): 3 iterative rounds ~ 4.5 min each (96 x 4 samples ~ 1.6 min, ~24
training steps on ~95 pairs ~ 2 min, merge), 7 DPO/IPO sweep points ~ 3.5 min each (training and
their eval), 3 evals of the rounds ~ 1.2 min each (2 x 96 samples and the KL forward), and
best-of-16 on 24 prompts ~ 2 min. README's iterate run of the same recipe (3 rounds, with its own
per-round eval) took about 20 minutes on shared cores. `--quick` (8 train and 4 held-out prompts,
8 new tokens, 1 epoch, 2 DPO betas of which one is iterate's round 1, 1 IPO beta, N up to 4, 1
round) takes about 10 minutes with the default model; with a tiny random model (`--model DIR --reward fn:conftest:length_reward`
and tests/ on PYTHONPATH, since VADER scores random text 0) about 4 minutes on loaded cores, and
its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from benchmarks.experiments.hh_cli import preftune_logged

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]

SETTINGS = {
    "full": dict(train_prompts=96, heldout_prompts=24, samples_per_prompt=4, eval_samples=4, tokens=32, epochs=2,
                 dpo_betas=[0.05, 0.1, 0.3, 1.0], ipo_betas=[0.1, 0.5, 1.0, 5.0], bon_ns=[1, 2, 4, 8, 16], rounds=3),
    # what fits in ~30 minutes of a 2-core CPU: half the prompts, 2 betas per loss (DPO 0.1 is iterate's
    # round 1), N up to 8, 2 rounds
    "small": dict(train_prompts=48, heldout_prompts=16, samples_per_prompt=4, eval_samples=4, tokens=24, epochs=2,
                  dpo_betas=[0.1, 0.5], ipo_betas=[0.5, 2.0], bon_ns=[1, 2, 4, 8], rounds=2),
    "quick": dict(train_prompts=8, heldout_prompts=4, samples_per_prompt=4, eval_samples=2, tokens=8, epochs=1,
                  dpo_betas=[0.1, 1.0], ipo_betas=[0.5], bon_ns=[1, 2, 4], rounds=1),
}
LR, ITERATE_BETA = 5e-4, 0.1
PROBE = (" I loved it.", " I hated it.")  # the fixed held-out probe pair (only its prompt matters for sampling)
KL_BANDS = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, math.inf]


def _recipe(s: dict, model: str, reward: str) -> list[str]:
    return [f"model.name_or_path={model}", "model.lora_target_modules=[q_proj, k_proj, v_proj, o_proj]",
            "data.max_length=96", "data.max_prompt_length=32", f"train.lr={LR}", f"train.epochs={s['epochs']}",
            "train.batch_size=8", "train.seed=0", "diagnostics.probe_every=0", f"online.reward={reward}",
            f"online.samples_per_prompt={s['samples_per_prompt']}", f"online.max_new_tokens={s['tokens']}",
            "online.min_margin=0.1"]


def _preftune(args: list[str], log: Path) -> float:
    """Run `python -m preftune ARGS` (hh_cli.preftune_logged); returns the wall-clock in seconds;
    a failure stops the experiment with the log's tail."""
    code, wall = preftune_logged(args, log)
    if code:
        sys.exit(f"preftune {args[0]} failed ({code}); {log}:\n{log.read_text()[-3000:]}")
    return wall


def _rel(path: Path) -> str:
    """A path as results.json keeps it: relative to the repository when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _cached(path: Path, make) -> dict:
    """A finished step's record from disk, else make it and keep it (so a rerun resumes)."""
    if path.is_file():
        return json.loads(path.read_text())
    record = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def _read_eval(dest: Path, s: dict) -> dict:
    """The frontier's numbers from an eval result (`preftune eval --out`, or a sweep point's eval.json)."""
    from preftune.core.stats import bootstrap_ci

    e = json.loads(dest.read_text())
    per_prompt = e.get("per_prompt") or []
    pol = [r["policy"] for r in per_prompt if math.isfinite(r["policy"])]
    ref = [r["reference"] for r in per_prompt if math.isfinite(r["reference"])]
    return {"reward": e["reward/policy"], "reward_ci95": list(bootstrap_ci(pol)) if pol else None,
            "kl": e["kl"], "kl_stderr": e["kl_stderr"], "prompts": len(per_prompt),
            "samples_per_prompt": s["eval_samples"], "win_rate_vs_reference": e.get("win_rate"),
            "probe_pair_accuracy": e.get("accuracy/implicit_reward"),
            "reference_reward": e["reward/reference"], "reference_ci95": list(bootstrap_ci(ref)) if ref else None,
            "eval_file": _rel(dest)}


def _measure(run: Path, out: Path, name: str, s: dict, reward: str) -> dict:
    """`preftune eval` of one trained run on the held-out prompts (the same settings `sweep` gets)."""
    dest = out / "evals" / f"{name}.json"
    wall = _preftune(["eval", "--run", str(run), "--data", str(out / "heldout_pairs.jsonl"), "--reward", reward,
                      "--out", str(dest), *_eval_overrides(s)], out / "logs" / f"eval-{name}.log")
    return {"eval_s": round(wall, 1), **_read_eval(dest, s)}


def _eval_overrides(s: dict) -> list[str]:
    return [f"eval.kl_prompts={s['heldout_prompts']}", f"eval.kl_samples={s['eval_samples']}",
            f"eval.max_new_tokens={s['tokens']}"]


def write_inputs(out: Path, s: dict) -> None:
    from preftune.apps.demo import demo_prompts

    train, held = demo_prompts()
    train, held = train[: s["train_prompts"]], held[: s["heldout_prompts"]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_prompts.txt").write_text("\n".join(train) + "\n")
    (out / "heldout_prompts.txt").write_text("\n".join(held) + "\n")
    (out / "heldout_pairs.jsonl").write_text("".join(
        json.dumps({"prompt": p, "chosen": PROBE[0], "rejected": PROBE[1]}) + "\n" for p in held))


def iterative(out: Path, s: dict, model: str, reward: str) -> list[dict]:
    """Rounds 1..R of `preftune iterate`, one more round per call; each round measured by eval."""
    points, spent = [], 0.0
    for r in range(1, s["rounds"] + 1):
        def run_round(r=r):
            wall = _preftune(["iterate", *_recipe(s, model, reward), f"online.prompts_path={out / 'train_prompts.txt'}",
                              f"online.rounds={r}", "loss.name=sigmoid", f"loss.beta={ITERATE_BETA}",
                              f"run.output_dir={out / 'iterate'}"], out / "logs" / f"iterate-round{r}.log")
            counts = json.loads((out / "iterate" / f"round-{r}" / "counts.json").read_text())
            if not (out / "iterate" / f"round-{r}" / "train").is_dir():
                sys.exit(f"iterate round {r} made no pairs ({counts}); nothing was trained")
            return {"iterate_s": round(wall, 1), "pairs": counts["pairs"], "ties": counts["ties"],
                    "train_reward_mean": counts.get("reward_mean"),
                    "run": _rel(out / "iterate" / f"round-{r}" / "train"),
                    **_measure(out / "iterate" / f"round-{r}" / "train", out, f"iterate-round{r}", s, reward)}
        p = _cached(out / "points" / f"iterate-round{r}.json", run_round)
        spent += p["iterate_s"]
        points.append({"method": "iterative DPO", "setting": f"round {r}", "wall_s": round(spent + p["eval_s"], 1),
                       **p})
    return points


def sweep(out: Path, s: dict, model: str, reward: str, loss: str, betas: list[float], round1: dict | None,
          lr: float = LR) -> list[dict]:
    """One DPO/IPO point per beta on the shared pairs file (iterate's round 1), via `preftune sweep`;
    at another `lr` than the recipe's, a separate line ("DPO lr=X") under its own directory."""
    method = {"sigmoid": "DPO", "ipo": "IPO"}[loss] + ("" if lr == LR else f" lr={lr:g}")
    tag = "" if lr == LR else f"-lr{lr:g}"
    points = []
    for beta in betas:
        if loss == "sigmoid" and beta == ITERATE_BETA and lr == LR:  # the same run as iterative round 1
            points.append({**round1, "method": method, "setting": f"beta={beta:g}",
                           "note": "the same run as iterative DPO round 1"})
            continue

        def run_point(beta=beta):
            root = out / f"{loss}{tag}"
            wall = _preftune(["sweep", "--beta", f"{beta:g}", "--lr", f"{lr:g}", "--reward", reward,
                              *_recipe(s, model, reward), f"loss.name={loss}",
                              f"data.train_path={out / 'iterate' / 'round-1' / 'pairs.jsonl'}",
                              f"data.eval_path={out / 'heldout_pairs.jsonl'}", *_eval_overrides(s),
                              f"run.output_dir={root}"], out / "logs" / f"sweep-{loss}{tag}-beta{beta:g}.log")
            (run,) = sorted(root.glob(f"beta{beta:g}-lr*"))
            # sweep's eval.json is `preftune eval` of the point with the same --reward and eval.* settings
            return {"wall_s": round(wall, 1), "run": _rel(run), **_read_eval(run / "eval.json", s)}
        p = _cached(out / "points" / f"{loss}{tag}-beta{beta:g}.json", run_point)
        points.append({"method": method, "setting": f"beta={beta:g}", **p})
    return points


def best_of_n(out: Path, s: dict, model: str, reward: str) -> list[dict]:
    """The best-of-n curve from one `preftune bon --eval` call: max(ns) samples per held-out prompt."""
    def run_bon():
        dest = out / "bon.json"
        wall = _preftune(["bon", str(out / "heldout_prompts.txt"), "--reward", reward,
                          "--eval", ",".join(map(str, s["bon_ns"])), "--eval-out", str(dest),
                          f"model.name_or_path={model}", f"online.max_new_tokens={s['tokens']}", "train.seed=0"],
                         out / "logs" / "bon.log")
        return {"wall_s": round(wall, 1), **json.loads(dest.read_text())}
    b = _cached(out / "points" / "bon.json", run_bon)
    return [{"method": "best-of-N", "setting": f"N={row['n']}", "reward": row["reward"], "reward_ci95": row["reward_ci95"],
             "kl": row["kl_bound"], "kl_kind": "analytic bound log N - (N-1)/N", "wall_s": b["wall_s"],
             "prompts": row["prompts"], "samples_per_prompt": b["samples_per_prompt"],
             "note": f"one call draws {b['samples_per_prompt']} samples per prompt for every N"}
            for row in b["eval"]["curve"]]


def base_point(measured: list[dict]) -> tuple[dict, list[float]]:
    """The start model's point (KL 0) from the evals' reference samples, and their spread across evals."""
    refs = [p["reference_reward"] for p in measured]
    first = measured[0]
    return ({"method": "base (reference)", "setting": "start model", "reward": first["reference_reward"],
             "reward_ci95": first["reference_ci95"], "kl": 0.0, "kl_stderr": 0.0, "kl_kind": "by definition", "wall_s": 0.0,
             "prompts": first["prompts"], "samples_per_prompt": first["samples_per_prompt"],
             "note": "the reference samples of the evals (same seed in each)"}, [min(refs), max(refs)])


_ORDER = ("method", "setting", "reward", "reward_ci95", "kl", "kl_stderr", "wall_s", "prompts", "samples_per_prompt")


def _row(p: dict) -> dict:
    p = {"kl_kind": "Monte-Carlo on policy samples", **p}
    return {**{k: p[k] for k in _ORDER if k in p}, **{k: v for k, v in p.items() if k not in _ORDER}}


# ---- figure and verdict -----------------------------------------------------------------

STYLE = {"base (reference)": ("k", "*"), "DPO": ("tab:blue", "o"), "IPO": ("tab:orange", "s"),
         "best-of-N": ("tab:green", "^"), "iterative DPO": ("tab:red", "D")}
EXTRA_COLORS = ["tab:purple", "tab:brown", "tab:pink", "tab:olive"]  # the --dpo-lrs lines, in order


def plot(points: list[dict], dest: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    extra = sorted({p["method"] for p in points} - set(STYLE))
    styles = {**STYLE, **{m: (c, "v") for m, c in zip(extra, EXTRA_COLORS)}}
    for method, (color, marker) in styles.items():
        pts = [p for p in points if p["method"] == method]
        if not pts:
            continue
        if method not in ("best-of-N", "iterative DPO"):
            pts = sorted(pts, key=lambda p: p["kl"])
        xs, ys = [p["kl"] for p in pts], [p["reward"] for p in pts]
        yerr = [[y - (p["reward_ci95"] or [y, y])[0] for p, y in zip(pts, ys)],
                [(p["reward_ci95"] or [y, y])[1] - y for p, y in zip(pts, ys)]]
        xerr = [1.96 * p.get("kl_stderr", 0.0) for p in pts]
        ax.errorbar(xs, ys, yerr=yerr, xerr=xerr, color=color, marker=marker, ms=7 if marker != "*" else 14,
                    ls="-" if method != "base (reference)" else "none", lw=1.2, capsize=3, alpha=0.9,
                    label=method + (" (KL: analytic bound)" if method == "best-of-N" else ""))
        for p, x, y in zip(pts, xs, ys):
            if method != "base (reference)":
                ax.annotate(p["setting"].replace("beta=", "β=").replace("round ", "r"), (x, y), fontsize=7,
                            textcoords="offset points", xytext=(4, 4), color=color)
    ax.set(xlabel="KL(policy || reference), nats per sample", ylabel="mean held-out reward (95% CI over prompts)",
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(dest, dpi=120)
    plt.close(fig)


def _band(kl: float) -> int:
    kl = max(kl, 0.0)  # a Monte-Carlo estimate near 0 can come out slightly negative
    return next(i for i in range(len(KL_BANDS) - 1) if KL_BANDS[i] <= kl < KL_BANDS[i + 1])


def _fmt_point(p: dict) -> str:
    ci = p.get("reward_ci95")
    return (f"{p['method']} {p['setting']}: reward {p['reward']:.3f}"
            + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + f" at KL {p['kl']:.2f}")


def _overlap(a: dict, b: dict) -> bool | None:
    if not a.get("reward_ci95") or not b.get("reward_ci95"):
        return None
    return a["reward_ci95"][0] <= b["reward_ci95"][1] and b["reward_ci95"][0] <= a["reward_ci95"][1]


def frontier_points(points: list[dict]) -> list[dict]:
    """Points no other point beats on both axes (at most the KL and at least the reward, one strictly)."""
    def beaten(p):
        kl = max(p["kl"], 0.0)  # Monte-Carlo estimates near 0 can be slightly negative: 0 for this
        return any(q is not p and max(q["kl"], 0.0) <= kl and q["reward"] >= p["reward"]
                   and (max(q["kl"], 0.0) < kl or q["reward"] > p["reward"]) for q in points)
    return sorted((p for p in points if not beaten(p)), key=lambda p: p["kl"])


def verdict(points: list[dict], meta: dict) -> str:
    """verdict.md, every sentence computed from `points`."""
    lines = ["# Reward vs KL frontier on controlled sentiment", "",
             f"Written by `python -m benchmarks.experiments.frontier` from results.json ({meta['mode']} settings, "
             f"model `{meta['model']}`, reward `{meta['reward']}`, {meta['heldout_prompts']} held-out prompts, "
             f"{meta['tokens']} new tokens). Rewards: mean over held-out prompts with a 95% bootstrap interval; "
             "KL in nats per sample (Monte-Carlo for trained policies, the analytic upper bound for best-of-N).", "",
             "## Highest reward in each KL band", "",
             "| KL band (nats) | best | reward [95% CI] | KL | runner-up (another method) | intervals overlap |",
             "|---|---|---|---|---|---|"]
    trained = [p for p in points if p["method"] != "base (reference)"]
    for i in range(len(KL_BANDS) - 1):
        inside = sorted((p for p in trained if _band(p["kl"]) == i), key=lambda p: -p["reward"])
        if not inside:
            continue
        best = inside[0]
        other = next((p for p in inside if p["method"] != best["method"]), None)
        ci = best.get("reward_ci95")
        lines.append(
            f"| [{KL_BANDS[i]:g}, {KL_BANDS[i + 1]:g}) | {best['method']} {best['setting']} | {best['reward']:.3f}"
            + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + f" | {best['kl']:.2f} | "
            + (f"{other['method']} {other['setting']} ({other['reward']:.3f})" if other else "none") + " | "
            + ({True: "yes: not a clear win", False: "no", None: "n/a"}[_overlap(best, other)] if other else "n/a")
            + " |")
    base = next(p for p in points if p["method"] == "base (reference)")
    top = max(trained, key=lambda p: p["reward"]) if trained else base
    lines += ["", "## Summary", "",
              f"- Base (reference) model: reward {base['reward']:.3f}; its reward across the {meta['evals']} evals' reference "
              f"samples spans {meta['reference_spread'][0]:.3f} .. {meta['reference_spread'][1]:.3f} "
              "(the same seed each time, so these should agree).",
              f"- Highest reward overall: {_fmt_point(top)} ({top['reward'] - base['reward']:+.3f} over the base).",
              "- Frontier (no other point has at most its KL and at least its reward): "
              + "; ".join(f"{p['method']} {p['setting']} ({p['kl']:.2f}, {p['reward']:.3f})"
                          for p in frontier_points(points)) + "."]
    for method in sorted({p["method"] for p in points if p["method"].split()[0] in ("DPO", "IPO")}):
        pts = sorted((p for p in points if p["method"] == method), key=lambda p: float(p["setting"].split("=")[1]))
        if len(pts) > 1:
            kls = [p["kl"] for p in pts]
            falls = all(a > b for a, b in zip(kls, kls[1:]))
            flat = not falls and all(abs(a - b) < 0.005 for a, b in zip(kls, kls[1:]))
            lines.append(f"- {method}: KL by beta " + ", ".join(f"{p['setting']} -> {p['kl']:.2f}" for p in pts)
                         + ("; KL falls as beta rises, as it should." if falls else
                            "; KL does not change with beta at this budget." if flat else
                            "; KL does not fall monotonically as beta rises."))
    rounds = [p for p in points if p["method"] == "iterative DPO"]
    if len(rounds) > 1:
        lines.append("- Iterative DPO by round: " + ", ".join(
            f"{p['setting']}: reward {p['reward']:.3f}, KL {p['kl']:.2f}" for p in rounds) + ".")
    bon = [p for p in points if p["method"] == "best-of-N"]
    if bon:
        last = bon[-1]
        lines.append(f"- Best-of-N N={bon[0]['setting'][2:]} ({bon[0]['reward']:.3f}) and the base point "
                     f"({base['reward']:.3f}) both sample the start model ({bon[0]['samples_per_prompt']} vs "
                     f"{base['samples_per_prompt']} samples per prompt); their gap is sampling noise.")
        lines.append(f"- Best-of-N: {last['setting']} reaches reward {last['reward']:.3f} at KL <= {last['kl']:.2f}; "
                     "its KL is an upper bound, so its true points lie at or left of those drawn.")
    slow = max(trained, key=lambda p: p.get("wall_s", 0.0), default=None)
    if slow:
        lines.append(f"- Wall-clock: the slowest point is {slow['method']} {slow['setting']} ({slow['wall_s']:.0f} s); "
                     f"the last invocation took {meta['elapsed_s']:.0f} s (points finished by earlier invocations are reused; "
                     f"the points' own wall-clocks are in results.json).")
    if meta["mode"] == "quick":
        lines += ["", "These are --quick smoke-test settings: the numbers show the pipeline runs, not a result."]
    return "\n".join(lines) + "\n"


def write_outputs(dest: Path, points: list[dict], meta: dict, extra: dict, *, title: str) -> None:
    """results.json (one entry per point: a row in `preftune report --experiment`), frontier.png, verdict.md."""
    results = {"command": " ".join(["python -m benchmarks.experiments.frontier", *sys.argv[1:]]),
               **{f"{p['method']} {p['setting']}": p for p in points}, "settings": {**meta, **extra}}
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(points, dest / "frontier.png", f"controlled sentiment: {title}")
    (dest / "verdict.md").write_text(verdict(points, meta))


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.experiments.frontier", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke-test budget; results go to --out, not beside the script")
    ap.add_argument("--small", action="store_true", help="a reduced grid that fits ~30 minutes on 2 cores "
                    "(results beside the script, marked mode=small)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="start model (a zoo name or a model directory)")
    ap.add_argument("--reward", default="sentiment", help="reward source (default sentiment; others for smoke tests)")
    ap.add_argument("--out", help="working directory (default runs/frontier, or runs/frontier-quick with --quick)")
    ap.add_argument("--dpo-lrs", default="", help="comma-separated learning rates: extra DPO lines (the grid's "
                    "betas, same pairs and recipe, only lr changed) that train further from the reference")
    a = ap.parse_args()
    mode = "quick" if a.quick else "small" if a.small else "full"
    s = SETTINGS[mode]
    out = (ROOT / (a.out or f"runs/frontier{'' if mode == 'full' else '-' + mode}")).resolve()
    results_dir = out if a.quick else HERE
    t0 = time.perf_counter()
    write_inputs(out, s)
    print(f"frontier ({mode}): working in {out}", flush=True)
    rounds = iterative(out, s, a.model, a.reward)
    print(f"iterative DPO: {len(rounds)} round(s) done", flush=True)
    dpo = sweep(out, s, a.model, a.reward, "sigmoid", s["dpo_betas"], rounds[0])
    ipo = sweep(out, s, a.model, a.reward, "ipo", s["ipo_betas"], rounds[0])
    for lr in [float(x) for x in a.dpo_lrs.split(",") if x.strip()]:
        dpo += sweep(out, s, a.model, a.reward, "sigmoid", s["dpo_betas"], None, lr=lr)
    print("DPO and IPO sweeps done", flush=True)
    bon = best_of_n(out, s, a.model, a.reward)
    measured = rounds + [p for p in dpo + ipo if "note" not in p]
    base, spread = base_point(measured)
    points = [_row(p) for p in [base, *dpo, *ipo, *bon, *rounds]]
    pairs = json.loads((out / "iterate" / "round-1" / "counts.json").read_text())
    meta = {"mode": mode, "model": a.model, "reward": a.reward, "heldout_prompts": s["heldout_prompts"],
            "tokens": s["tokens"], "evals": len(measured), "reference_spread": spread,
            "elapsed_s": time.perf_counter() - t0}
    extra = {"lr": LR, "shared_pairs": {**pairs, "pairs_s": rounds[0]["iterate_s"], "file": "iterate/round-1/pairs.jsonl"}}
    write_outputs(results_dir, points, {**s, **meta}, extra, title=f"reward vs KL ({mode}, {Path(a.model).name})")
    print((results_dir / "verdict.md").read_text())
    print(f"wrote {results_dir / 'results.json'}, frontier.png, verdict.md", flush=True)


if __name__ == "__main__":
    main()
