"""`preftune train-rm`: the Bradley-Terry loss on the one loop, the saved reward model that
`rm:` loads (scoring the very tokens it was trained on), calibration, ensembles, and `rm:RUN`
driving `preftune iterate` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import PAIRS, write_jsonl
from preftune.cli import main
from preftune.config import load_config
from preftune.core.losses import LOSSES
from preftune.core.losses.reward import bradley_terry_loss
from preftune.core.stats import reliability
from preftune.models.rewards import Ensemble, build_reward
from preftune.runs.rm import run_train_rm
from preftune.utils.errors import ConfigError


def _args(tmp_path, model_dir, out="rm", *extra):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    return [f"model.name_or_path={model_dir}", f"data.train_path={pairs}", f"data.eval_path={pairs}",
            f"run.output_dir={tmp_path / out}", "train.lr=1e-2", "train.epochs=5", "model.lora_r=4", *extra]


def test_bradley_terry_by_hand():
    rc, rr = torch.tensor([2.0, 0.0], requires_grad=True), torch.tensor([1.0, 0.5])
    out = bradley_terry_loss(rc, rr, None, None)
    assert out.losses.tolist() == pytest.approx([math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5))])
    out.losses.sum().backward()
    assert rc.grad.tolist() == pytest.approx([-1 / (1 + math.e), -1 / (1 + math.exp(-0.5))])  # -sigmoid(-d)
    with_margin = bradley_terry_loss(rc.detach(), rr, None, None, rm_margin=1.0).losses
    assert with_margin[0].item() == pytest.approx(math.log(2))  # d - m = 0
    centred = bradley_terry_loss(rc.detach(), rr, None, None, rm_center_coef=0.1).losses
    assert (centred - out.losses.detach()).tolist() == pytest.approx([0.1 * 9.0, 0.1 * 0.25])
    assert LOSSES["bt"].kind.name == "reward_model" and LOSSES["bt"].kind.data == "pairs" and not LOSSES["bt"].needs_reference


def test_reliability_bins_and_ece():
    # two confident right (p = 0.88), one confident wrong, one tie
    cal = reliability([2.0, 2.0, -2.0, 0.0], bins=10)
    p = 1 / (1 + math.exp(-2.0))
    top = next(b for b in cal["bins"] if b["lo"] <= p < b["hi"])
    assert top["pairs"] == 3 and top["accuracy"] == pytest.approx(2 / 3) and top["confidence"] == pytest.approx(p)
    tie = next(b for b in cal["bins"] if b["lo"] == 0.5)
    assert tie["pairs"] == 1 and tie["accuracy"] == 0.5
    assert cal["ece"] == pytest.approx(3 / 4 * abs(p - 2 / 3))


def test_train_rm_learns_the_pairs_and_rm_scores_what_it_trained_on(tmp_path, tiny_model_dir, capsys):
    assert main(["train-rm", *_args(tmp_path, tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "held-out pair accuracy" in out and "ECE" in out
    run = tmp_path / "rm"
    summary = json.loads((run / "summary.json").read_text())
    ev = summary["eval"]
    assert summary["loss"] == "bt" and summary["layout"]["layout"] == "padded"
    assert ev["accuracy/implicit_reward"] == 1.0 and "perplexity/chosen" not in ev
    assert sum(b["pairs"] for b in ev["calibration"]["bins"]) == ev["pairs"] == len(PAIRS)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] and not any("probe/sample_length" in r for r in rows)
    assert "scores/chosen" in rows[0] and "logps/chosen" not in rows[0]  # log-prob health checks never see scores
    assert main(["eval", "--run", str(run), "--data", str(tmp_path / "pairs.jsonl")]) == 2
    assert "rm:RUN" in capsys.readouterr().err
    # the saved directory is a plain HF classifier; rm:RUN scores the same margins the run measured
    rm = build_reward(f"rm:{run}")
    prompts = [p["prompt"] for p in PAIRS]
    margins = [c - r for c, r in zip(rm.score(prompts, [p["chosen"] for p in PAIRS]),
                                     rm.score(prompts, [p["rejected"] for p in PAIRS]))]
    assert sum(margins) / len(margins) == pytest.approx(ev["rewards/margins"], abs=1e-4)


def test_ensemble_members_on_disjoint_slices_and_rm_of_the_ensemble(tmp_path, tiny_model_dir):
    cfg = load_config(None, ["loss.name=bt", *_args(tmp_path, tiny_model_dir, "ens")])
    out = run_train_rm(cfg, ensemble=2, split="disjoint", disagreement_penalty=0.5)
    run = tmp_path / "ens"
    info = json.loads((run / "ensemble.json").read_text())
    assert info["members"] == ["member-0/reward_model", "member-1/reward_model"]
    slices = [(run / f"member-{k}" / "config.yaml").read_text() for k in range(2)]
    assert "pairs.jsonl[0:4]" in slices[0] and "pairs.jsonl[4:8]" in slices[1]
    assert all(json.loads((run / f"member-{k}" / "summary.json").read_text())["data"]["pairs"] == 4 for k in range(2))
    e = out["ensemble_eval"]
    assert e["pairs"] == len(PAIRS) and 0.0 <= e["disagreement"] <= 1.0 and e["margin_spread_mean"] >= 0.0
    source = build_reward(f"rm:{run}")
    assert isinstance(source, Ensemble) and len(source.members) == 2 and source.disagreement_penalty == 0.5
    # members score at the lengths they trained at (the held-out figures above come through them)
    assert [(m.max_length, m.max_prompt_length) for m in source.members] == \
        [(cfg.data.max_length, cfg.data.max_prompt_length)] * 2


def test_rm_run_drives_iterate_end_to_end(tmp_path, tiny_model_dir):
    assert main(["train-rm", *_args(tmp_path, tiny_model_dir)]) == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(p["prompt"] for p in PAIRS[:4]) + "\n")
    args = ["iterate", f"model.name_or_path={tiny_model_dir}", f"online.prompts_path={prompts}",
            f"online.eval_prompts_path={prompts}", f"online.reward=rm:{tmp_path / 'rm'}", "online.max_new_tokens=6", "online.samples_per_prompt=3",
            "online.eval_samples=2", "model.lora_r=4", "train.lr=1e-2", "online.rounds=1",
            "diagnostics.probe_every=0", f"run.output_dir={tmp_path / 'it'}", "data.max_length=64",
            "data.max_prompt_length=32"]
    assert main(args) == 0
    rounds = json.loads((tmp_path / "it" / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1] and all(math.isfinite(r["reward"]) for r in rounds)
    counts = json.loads((tmp_path / "it" / "round-1" / "counts.json").read_text())
    assert counts["failed"] == 0 and counts["pairs"] > 0  # every sample scored by the reward model


def test_refusals(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(ConfigError, match="not a reward-model loss"):
        run_train_rm(load_config(None, ["data.train_path=x.jsonl", "loss.name=ipo"]))
    with pytest.raises(ConfigError, match="ensemble"):
        run_train_rm(load_config(None, ["data.train_path=x.jsonl", "loss.name=bt"]), ensemble=0)
    rc = main(["train-rm", *_args(tmp_path, tiny_model_dir, "q", "model.load_in_4bit=true")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "load_in_4bit" in err[0], err
    rc = main(["train", *_args(tmp_path, tiny_model_dir, "m"), "loss.mix=[[sigmoid, 1.0], [bt, 1.0]]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "reward model" in err[-1], err


def test_export_of_a_reward_model_run_is_the_merged_classifier(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from preftune.apps.export import export_run

    assert main(["train-rm", *_args(tmp_path, tiny_model_dir)]) == 0
    result = export_run(tmp_path / "rm", tmp_path / "out", merge=True)
    assert result.kind == "reward model" and "reward model" in (tmp_path / "out" / "README.md").read_text()
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert model.config.num_labels == 1


def test_rm_of_a_run_cuts_long_pairs_as_training_did(tmp_path, tiny_model_dir):
    """Pairs longer than data.max_length: training kept the prompt's last max_prompt_length tokens
    and the completions' first ones; rm:RUN scores the same tokens (not the text's last tokens)."""
    from preftune.data.render import completion_ids, prompt_ids

    run_train_rm(load_config(None, _args(tmp_path, tiny_model_dir, "rm", "data.max_length=5",
                                         "data.max_prompt_length=2", "train.epochs=1")))
    run = tmp_path / "rm"
    rm = build_reward(f"rm:{run}")
    assert (rm.max_length, rm.max_prompt_length) == (5, 2)
    # the lengths live in the reward model's own directory: loading it directly (as an ensemble's
    # members and an export are loaded) cuts the same way
    assert json.loads((run / "reward_model" / "preftune_scoring.json").read_text()) == \
        {"max_length": 5, "max_prompt_length": 2}
    direct = build_reward(f"rm:{run / 'reward_model'}")
    assert (direct.max_length, direct.max_prompt_length) == (5, 2)
    tok = rm.tokenizer
    for side in ("chosen", "rejected"):  # every side of PAIRS overflows 5 tokens, so the pair cut is the side's
        assert all(len(prompt_ids(tok, p["prompt"])) + len(completion_ids(tok, p["prompt"], p[side],
                                                                          eos=tok.eos_token_id)) > 5 for p in PAIRS)
    ev = json.loads((run / "summary.json").read_text())["eval"]
    prompts = [p["prompt"] for p in PAIRS]
    margins = [c - r for c, r in zip(rm.score(prompts, [p["chosen"] for p in PAIRS]),
                                     rm.score(prompts, [p["rejected"] for p in PAIRS]))]
    assert sum(margins) / len(margins) == pytest.approx(ev["rewards/margins"], abs=1e-4)
