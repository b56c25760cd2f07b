"""The arguments of every command, declared without importing what the commands run (torch,
transformers): `preftune --help`, `VERB --help`, `--version` and a mistyped verb answer from the
parser alone (cli/__init__.py imports a handler's module only when its command runs)."""

from __future__ import annotations

from ..config import RM_SPLITS, Config, opt_in_keys
from ..models import REWARD_SYNTAX
from .common import _config_args, _number, _output_file, _overrides

_REWARDS = " | ".join(REWARD_SYNTAX.values())  # models/__init__.py owns the reward kinds


def _resume_args(p):
    p.add_argument("run_dir")
    p.add_argument("-c", "--config", help="YAML config (default: the run's config.yaml)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even if the data, tokenizer or training settings changed")
    _overrides(p)


def _eval_args(p):
    p.add_argument("--run", help="run directory written by `preftune train` (omit to evaluate the base model)")
    p.add_argument("--data", required=True, nargs="+", help="held-out preference file(s)")
    p.add_argument("--reward", help="score fresh policy and reference samples with this reward source "
                   f"({_REWARDS})")
    p.add_argument("-c", "--config", help="YAML config (default: the run's config.yaml)")
    p.add_argument("--out", type=_output_file, help="also write the JSON result here")
    p.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    p.add_argument("--per-pair", type=_output_file, metavar="FILE",
                   help="also write each pair's outcome and margins here (JSONL), the --baseline of a later eval")
    p.add_argument("--baseline", metavar="PER_PAIR_FILE",
                   help="the --per-pair file of the 'before' eval (e.g. the base model): the result's paired gain "
                   "(bootstrap over pairs, McNemar) is over it; default for a run with a reference: that reference")
    _overrides(p)


def _demo_args(p):
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a tiny version for smoke tests")
    _overrides(p, "model.name_or_path=... (e.g. gemma3-270m after `preftune models fetch`), "
                  "train.lr=... (default 5e-4, tuned on the default model)")


def _export_args(p):
    p.add_argument("run_dir", help="a finished run directory (config.yaml, summary.json, model/)")
    p.add_argument("--out", required=True, help="the directory to write (model files and README.md)")
    p.add_argument("--merge", action="store_true", help="merge the LoRA adapter into the base: a plain "
                   "transformers model (default: the adapter, on the base named in config.yaml)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--push-to-hub", metavar="REPO", help="then upload --out to this Hugging Face repo (needs the "
                   "hub and a token; checked before anything is written)")
    _overrides(p, f"only the opt-ins a run's saved config cannot give: {_opt_in_forms()}")


def _opt_in_forms() -> str:
    """`key=true` for an opt-in switch, `key=VALUE` for an opt-in setting (sampling.vllm_python)."""
    cfg = Config()
    return ", ".join(f"{k}=true" if isinstance(getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]), bool)
                     else f"{k}=VALUE" for k in opt_in_keys())


def _sweep_args(p):
    p.add_argument("-c", "--config", help="YAML config for every point (run.output_dir holds the grid)")
    p.add_argument("--beta", required=True, help="comma-separated, e.g. 0.05,0.1,0.5")
    p.add_argument("--lr", required=True, help="comma-separated, e.g. 1e-4,5e-4")
    p.add_argument("--warmup", help="comma-separated warmup ratios (default: the config's)")
    p.add_argument("--reward", help="score fresh samples with this reward source (else: held-out margin)")
    _overrides(p)


def _train_rm_args(p):
    _config_args(p, "YAML config (data.*, model.*, train.*; loss.rm_margin, loss.rm_center_coef)",
                 "section.key=value, e.g. data.train_path=pairs.jsonl data.eval_path=held.jsonl")
    p.add_argument("--ensemble", type=_number(int, 1, 64), default=1, help="train K members (RUN/member-<k>); rm:RUN is their mean")
    p.add_argument("--split", choices=RM_SPLITS, default="disjoint",
                   help="members train on disjoint slices of the file, or on all of it with different seeds")
    p.add_argument("--disagreement-penalty", type=_number(float, 0, 1e6), default=0.0,
                   help="rm:RUN of an ensemble scores mean - this x the members' spread (saved in ensemble.json)")


def _arithmetic_args(p):
    p.add_argument("out_dir", help="writes train.jsonl and heldout.jsonl (prompt, answer) here")
    p.add_argument("--train", type=_number(int, 1, 10**6), default=256, help="training problems")
    p.add_argument("--heldout", type=_number(int, 1, 10**6), default=64, help="held-out problems (disjoint by construction)")
    p.add_argument("--ops", default="+-", help="operators among + - * (default: +-)")
    p.add_argument("--max-operand", type=_number(int, 2, 10**9), default=30, help="operands in [2, N]")
    p.add_argument("--seed", type=_number(int, 0, 2**32 - 1), default=0)


def _synth_args(p):
    p.add_argument("prompts", help=".txt (one per line) or a file with a prompt column")
    p.add_argument("--reward", required=True, help=_REWARDS)
    p.add_argument("--out", type=_output_file, required=True, help="JSONL: prompt, chosen, rejected, scores (and rationales)")
    _config_args(p, "YAML config", "section.key=value (model.name_or_path, online.samples_per_prompt...)")


def _bon_args(p):
    p.add_argument("prompts", help=".txt (one per line) or a file with a prompt column")
    p.add_argument("--reward", required=True, help=_REWARDS)
    p.add_argument("--policy", help="model or finished run directory to sample from (default: model.name_or_path)")
    p.add_argument("-n", type=_number(int, 1, 4096), help="samples per prompt (default: online.samples_per_prompt; with --eval, its "
                   "largest n)")
    p.add_argument("--out", type=_output_file, help="JSONL: prompt, completion, score, n (the best of the n samples)")
    p.add_argument("--keep-all", action="store_true", help="also write every candidate and its score per row")
    p.add_argument("--pairs", type=_output_file, help="JSONL preference pairs from the same candidates (online.pairing)")
    p.add_argument("--eval", help="comma-separated n, e.g. 1,2,4,8: mean best-of-n reward from one set of samples, "
                   "with 95%% bootstrap intervals and the analytic KL bound")
    p.add_argument("--eval-out", type=_output_file, help="also write the JSON result here")
    _overrides(p, "section.key=value (model.*, online.* sampling, train.seed)")


def _serve_args(p):
    p.add_argument("model", help="run directory, local HF dir, .gguf, hub id, or smollm2-135m-instruct")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_number(int, 0, 65535), default=8000)
    p.add_argument("--max-tokens-cap", type=_number(int, 1, 1 << 16), default=512)
    p.add_argument("--api-key",
                   help="require Authorization: Bearer KEY (default: $PREFTUNE_SERVE_API_KEY; none = open on localhost)")


def _label_args(p):
    p.add_argument("pairs", help="prompt + response_a/response_b (or chosen/rejected, shown unlabeled)")
    p.add_argument("--judgments", type=_output_file, required=True, help="JSONL the judgments are appended to")
    p.add_argument("--calibration", help="known-answer pairs (prompt/chosen/rejected) to mix in")
    p.add_argument("--calibration-rate", type=_number(float, 0, 0.99), default=0.1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_number(int, 0, 65535), default=8765)


def _report_args(p):
    p.add_argument("run_dirs", nargs="*")
    p.add_argument("--experiment", action="append", default=[],
                   help="an experiment directory (results.json, PNGs, verdict.md), e.g. "
                        "benchmarks/experiments/dpo_vs_grpo; repeatable")
    p.add_argument("--out", type=_output_file, help="HTML path (default: FIRST_RUN/report.html); PNGs are written beside it")
    p.add_argument("--no-png", action="store_true", help="skip the PNG files")


def _inspect_args(p):
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print the full JSON instead of the summary")
    _overrides(p, "data.* and model.* settings (the tokenizer comes from the model)")


def _balance_args(p):
    p.add_argument("path", help="preference file (any supported format)")
    p.add_argument("--out", type=_output_file, required=True, help="balanced pairs as JSONL (prompt, chosen, rejected)")
    p.add_argument("--seed", type=_number(int, 0, 2**32 - 1), default=0, help="which pairs of the larger group are dropped")
    _overrides(p, "data.* and model.* settings (lengths are tokens of the model's tokenizer)")


def _advise_args(p):
    p.add_argument("path")
    p.add_argument("--memory-gb", type=_number(float, 0, 1e6, lo_open=True), help="memory available for training (default: no limit)")
    p.add_argument("--json", action="store_true", help="print the advice (settings, memory, evidence, budget) as JSON")
    p.add_argument("--method", choices=("ppo", "rloo", "reinforce_pp", "grpo"),
                   help="PATH is a prompts file for this online method: the expected peak memory of its policy, "
                        "reference, reward model and critic (online.*, ppo.* and model.* settings apply)")
    _overrides(p, "data.* and model.* settings (model.lora decides the reference cost)")


def _judgments_args(p, build: bool):
    p.add_argument("judgments")
    p.add_argument("--pairs", required=build, help="the labeled pairs file (checks every pair id)")
    p.add_argument("--calibration", help="the calibration pairs file, if one was used")
    if not build:
        p.add_argument("--judge", help="judge:URL[#model]: also ask this judge about every labelled pair (both "
                       "orders) and report its agreement and Cohen's kappa with the people's majority (needs --pairs)")
    if build:
        p.add_argument("--out", type=_output_file, required=True)
        p.add_argument("--min-votes", type=_number(int, 1, 10**6), default=2)
        p.add_argument("--min-agreement", type=_number(float, 0, 0.99), default=0.5, help="winner's share of all votes must exceed this")
        p.add_argument("--min-margin", type=_number(int, 0, 10**6), default=1, help="winner's votes minus loser's")


def _sft_pairs_args(p):
    p.add_argument("path", help="prompt/response (or prompt/completion) file")
    p.add_argument("--out", type=_output_file, required=True)
    p.add_argument("--reward", help="keep a pair only where this reward source prefers the human response")
    _overrides(p, "model.* and online.* settings (sampling)")


def _score_args(p):
    p.add_argument("path")
    p.add_argument("--reward", required=True)
    p.add_argument("--out", type=_output_file, required=True)
    _overrides(p, "online.judge_timeout_s / judge_retries / judge_backoff_s for a judge:URL reward")


def _validate_args(p):
    p.add_argument("path")
    _overrides(p, "data.* settings, e.g. data.format=hh")
