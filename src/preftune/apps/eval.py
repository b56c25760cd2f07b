"""`preftune eval`: held-out accuracy, margins and KL of a finished run, or of the base model.

With a run, policy = the run's model and reference = what it trained against; with no run, the
base model itself ("before": policy == reference, so implicit-reward accuracy is undefined and
only raw log-prob accuracy is meaningful). The measurements are training/evaluate.py's.

Before and after on the same pairs: each pair's outcomes can be written out (`per_pair`) and a
result carries `paired`, the gain over a "before" with a bootstrap interval over pairs and
McNemar's exact test (core/stats.paired_gain). The before is a per-pair file of another eval
(`baseline`: a base-model eval, another run) or, by default for a run whose loss has a
reference, that reference's log-prob outcomes from the same forward passes: the reference is the
run's start, so one `eval --run` gives the paired gain with no second evaluation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..core.losses import build_loss
from ..core.stats import paired_gain
from ..core.step import SameAsPolicy, loss_kwargs
from ..data.batches import exact_layout
from ..data.prepare import load_data, pair_collator, prepare_pairs
from ..data.refcache import load_or_build, path_for, read, store
from ..models.generate import run_models
from ..models.loading import load_start, load_tokenizer, resolve_model_dir, weights_sha256
from ..models.rewards import build_reward
from ..training.checkpoint import file_digest, tokenizer_sha256
from ..training.evaluate import evaluate_pairs, is_main, kl_prompt_count, sample_metrics
from ..utils.errors import ConfigError, DataError
from ..utils.safeio import read_json

__all__ = ["run_eval", "format_eval", "paired_block", "read_per_pair"]


def run_eval(cfg, *, run_dir: str | None, data_path: str | list[str], reward: str | None = None,
             per_pair: list | None = None, baseline: list[dict] | None = None, baseline_name: str = "") -> dict:
    """Evaluate the run's policy (or the base model when `run_dir` is None) on one held-out
    file, or on several (then the result maps each path to its own result). `per_pair`, when
    given, receives each pair's outcomes and margins (with its file as "data"); `baseline`
    (rows of `read_per_pair`, from `baseline_name`) is the "before" of each result's `paired`."""
    paths = [data_path] if isinstance(data_path, str) else list(data_path)
    m, spec = cfg.model, build_loss(cfg.loss.name, cfg.loss.mix)
    if spec.kind.model == "score_head":
        raise ConfigError(str(run_dir), "loss.name", "this is a reward model (train-rm): its held-out accuracy is in "
                          "summary.json; score files with it through rm:RUN (preftune score, eval --reward)")
    all_records = [load_data(p, cfg.data) for p in paths]  # bad data fails here, before any weights load
    source = None
    if reward:
        source = build_reward(reward)
    model_dir = resolve_model_dir(m.name_or_path, allow_pickle_weights=m.allow_pickle_weights)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=m.trust_remote_code, revision=m.revision)
    base, _ = load_start(m, model_dir)  # with the run's SFT adapter merged, as training started
    ref_sha = None  # the reference's weights: the key under which its log-probs are cached
    if run_dir is None:
        policy, reference = base, SameAsPolicy()  # "before training": one forward per pair
        if cfg.eval.reuse_reference_logps:  # the weights a run started from them would record as its reference
            ref_sha = weights_sha256(base)
    else:
        policy, reference = run_models(cfg, run_dir, base)
        if spec.needs_reference:
            ref_info = read_json(Path(run_dir) / "reference.json")
            if not isinstance(ref_info, dict):
                raise DataError(Path(run_dir) / "reference.json", 1, "reference.json", "expected a JSON object")
            ref_sha = ref_info.get("weights_sha256")
    policy.eval()
    kwargs = loss_kwargs(cfg, spec)
    summary = Path(run_dir) / "summary.json" if run_dir is not None else None
    if "loss_state" in kwargs and summary is not None and summary.is_file():  # bco_pair: the run's final baseline
        saved = read_json(summary)
        if isinstance(saved, dict) and isinstance(saved.get("loss_state"), dict):
            kwargs["loss_state"].load_state_dict(saved["loss_state"])
    results = {}
    for path, records in zip(paths, all_records):
        pairs, stats = prepare_pairs(path, cfg, tokenizer, records)
        # packed rows with prefix sharing where they are exact on this model, as in training
        chosen, layout = exact_layout(cfg, spec.kind, policy,
                                       pairs[: max(cfg.eval.batch_size, 2)], tokenizer.pad_token_id, model_dir)
        collate, note, own, values, live_reference = pair_collator(chosen, tokenizer), None, None, None, None
        digest = file_digest(path) if ref_sha is not None else None
        cache = None if digest is None else path_for(reference_sha256=ref_sha, data_sha256=digest,
                                                     tokenizer_sha256=tokenizer_sha256(tokenizer), data_config=cfg.data)
        if cache is not None and run_dir is not None:
            if cfg.train.reference_cache:  # the run's own setting: read them, or compute them once and keep
                values, hit = load_or_build(cache, policy, reference, pairs, batch_size=cfg.eval.batch_size,
                                            collate=collate)
                note = "read from cache" if hit else "computed and cached"
            elif cfg.eval.reuse_reference_logps:
                values = read(cache, pairs)
                note = None if values is None else "read from cache"
                if values is None:  # computed live below, kept for the next eval on this file
                    live_reference = {}
            if values is not None:
                collate = pair_collator(chosen, tokenizer, values)
        elif cache is not None:
            own = {}  # the base model's log-probs are the reference's for any run trained from it
        rows: list[dict] = []
        result = {"run": run_dir or "(base model)", "data": path, "data_stats": stats.as_dict(), "layout": layout,
                  **evaluate_pairs(policy, reference, spec, pairs, loss_kwargs=kwargs,
                                   batch_size=cfg.eval.batch_size, pad_id=tokenizer.pad_token_id, collate=collate,
                                   policy_logps=own, reference_logps=live_reference, per_pair=rows)}
        paired = paired_block(rows, baseline, baseline_name, seed=cfg.train.seed)
        if paired is not None:
            result["paired"] = paired
        if per_pair is not None:
            per_pair.extend({"data": path, **r} for r in rows)
        if own and is_main():
            store(cache, own)
            note = "stored in the cache"
        if live_reference and is_main():  # the reference of every run started from the same weights
            store(cache, live_reference)
            note = "computed and stored in the cache"
        if note is not None:
            result["reference_logps"] = note
        e = cfg.eval
        if e.kl_prompts and isinstance(reference, SameAsPolicy) and source is None:
            # the base model against itself: KL is 0 by definition, and sampling it cost a toy eval minutes
            result.update({"kl": 0.0, "kl_stderr": 0.0, "kl_samples": 0,
                           "kl_note": "policy == reference: 0 by definition, not sampled"})
        elif e.kl_prompts:
            unique = list({tuple(p.prompt_ids): p.prompt_ids for p in pairs}.values())
            prompts = unique[: kl_prompt_count(e.kl_prompts, len(unique))]
            result.update(sample_metrics(policy, reference, tokenizer, prompts, n=e.kl_samples,
                                         max_new_tokens=e.max_new_tokens, seed=cfg.train.seed, reward=source))
        results[path] = result
    return results[paths[0]] if len(paths) == 1 else results


def paired_block(rows: list[dict], baseline: list[dict] | None = None, baseline_name: str = "", *,
                 seed: int = 0) -> dict | None:
    """The gain of this evaluation over a "before" on the same pairs (None when there is none).

    Before = the `baseline` rows matched by (line, pair key), or without them the reference's
    log-prob outcomes in `rows` (a run with a reference; nothing for a base model or a
    reference-free loss). `gain`: implicit-reward outcome after vs the before's implicit-reward
    outcome, or its log-prob outcome where that is undefined (a base model, the reference) —
    the quality benchmark's gain; `logp_gain`: raw log-prob outcome after vs before (did the
    policy itself come to prefer the chosen replies). Each is `paired_gain`'s dict."""
    if baseline is None:
        if not rows or rows[0]["reference_logp_correct"] is None:
            return None
        matched = [(r, {"implicit_correct": None, "logp_correct": r["reference_logp_correct"]}) for r in rows]
        out = {"before": "the run's reference (its start), same forward passes", "pairs": len(matched), "unmatched": 0}
    else:
        index = {(b["line"], b["pair"]): b for b in baseline}
        matched = [(r, index[r["line"], r["pair"]]) for r in rows if (r["line"], r["pair"]) in index]
        if not matched:
            raise ConfigError("command line", "--baseline", f"{baseline_name}: none of its pairs is among the "
                              f"{len(rows)} evaluated (another file, tokenizer or data settings?)")
        out = {"before": baseline_name, "pairs": len(matched), "unmatched": len(rows) - len(matched)}
    if matched[0][0]["implicit_correct"] is not None:
        before = [b["logp_correct"] if b["implicit_correct"] is None else b["implicit_correct"] for _, b in matched]
        was = "implicit-reward" if matched[0][1]["implicit_correct"] is not None else "log-prob"
        out["gain"] = {"compares": f"implicit-reward accuracy after vs {was} accuracy before",
                       **paired_gain(before, [r["implicit_correct"] for r, _ in matched], seed=seed)}
    out["logp_gain"] = {"compares": "log-prob accuracy after vs log-prob accuracy before",
                        **paired_gain([b["logp_correct"] for _, b in matched], [r["logp_correct"] for r, _ in matched],
                                      seed=seed)}
    return out


_OUTCOMES = (0.0, 0.5, 1.0)


def read_per_pair(path: str) -> list[dict]:
    """The rows of a per-pair file written by `preftune eval --per-pair`, checked where they are read."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError("command line", "--baseline", f"cannot read {path}: {e.strerror or e}") from None
    rows = []
    for k, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, k, "json", f"not JSON ({e.msg}); expected a per-pair file of `preftune eval "
                            "--per-pair`") from None
        if not isinstance(row, dict):
            raise DataError(path, k, "row", "expected a JSON object")
        for field, ok in (("line", lambda v: isinstance(v, int)), ("pair", lambda v: isinstance(v, str)),
                          ("logp_correct", lambda v: v in _OUTCOMES),
                          ("implicit_correct", lambda v: v is None or v in _OUTCOMES)):
            if field not in row or isinstance(row[field], bool) or not ok(row[field]):
                raise DataError(path, k, field, f"missing or not valid ({row.get(field)!r}); expected a per-pair "
                                "file of `preftune eval --per-pair`")
        rows.append(row)
    if not rows:
        raise DataError(path, 1, "file", "no rows")
    return rows


def _paired_lines(p: dict) -> list[str]:
    lines = []
    for key, label in (("gain", "gain, paired"), ("logp_gain", "log-prob gain, paired")):
        if key in p:
            g = p[key]
            lines.append(f"  {label:<25} {g['gain']:+.3f} [{g['gain_ci95'][0]:+.3f}, {g['gain_ci95'][1]:+.3f}]  "
                         f"McNemar p={g['mcnemar_p']:.3g} ({g['gained']} gained, {g['lost']} lost; "
                         f"{g['before']:.3f} -> {g['after']:.3f})")
    unmatched = f", {p['unmatched']} evaluated pairs not in it" if p["unmatched"] else ""
    lines.append(f"  (before: {p['before']}; {p['pairs']} pairs{unmatched}; 95% bootstrap over pairs)")
    return lines


def format_eval(result: dict) -> str:
    """A compact table of one evaluation (or of each file of several)."""
    if "pairs" not in result:  # several files: path -> result
        return "\n\n".join(format_eval(r) for r in result.values())

    def acc(key):
        lo, hi = result[f"{key}_ci95"]
        return f"{result[key]:.3f}  [{lo:.3f}, {hi:.3f}]"

    implicit = "undefined (policy == reference)" if result.get("accuracy/implicit_reward_undefined") \
        else acc("accuracy/implicit_reward")
    lines = [f"{result['data']}: {result['pairs']} pairs, {result['run']}",
             f"  implicit-reward accuracy   {implicit}",
             f"  log-prob accuracy          {acc('accuracy/logp')}",
             f"  margin {result['rewards/margins']:.4f}   chosen perplexity {result['perplexity/chosen']:.3f}"]
    if "kl_note" in result:
        lines.append(f"  KL(policy || reference)    0 ({result['kl_note']})")
    elif "kl" in result:
        lo, hi = result.get("kl_ci95") or (result["kl"], result["kl"])
        lines.append(f"  KL(policy || reference)    {result['kl']:.3f} nats [{lo:.3f}, {hi:.3f}] (95%, "
                     f"{result['kl_samples']} samples)")
    if "paired" in result:
        lines += _paired_lines(result["paired"])
    if "win_rate" in result:
        ci = result.get("win_rate/ci95")
        within = f" [{ci[0]:.3f}, {ci[1]:.3f}] over prompts" if ci and all(map(math.isfinite, ci)) else ""
        lines.append(f"  win rate vs reference      {result['win_rate']:.3f}{within} ({result['reward/source']})")
    return "\n".join(lines)
