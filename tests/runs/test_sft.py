"""`preftune sft`: the NLL of completion tokens only, on the one loop; formats, packing, resume,
and SFT -> DPO (the SFT model becomes the start and the reference)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import PAIRS, interrupt_after_checkpoint, weights_sha, write_jsonl
from preftune.cli import main
from preftune.config import load_config
from preftune.core.losses import LOSSES
from preftune.data.collate import collate_sequences
from preftune.data.render import completion_ids, prompt_ids
from preftune.models.loading import load_model
from preftune.runs.sft import load_sft_records, run_sft
from preftune.training.train import train
from preftune.utils.errors import ConfigError, DataError

DEMOS = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS]
MESSAGES = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p["prompt"]},
                          {"role": "assistant", "content": p["chosen"]}]} for p in PAIRS]


def _cfg(tmp_path, model_dir, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "demos.jsonl", DEMOS)
    return load_config(None, [f"model.name_or_path={model_dir}", f"data.train_path={data}", "loss.name=nll",
                              f"run.output_dir={tmp_path / 'run'}", "train.lr=1e-2", *extra])


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_first_step_is_the_token_mean_nll_of_completions_only(tmp_path, tiny_model_dir, tokenizer):
    """Step 1 (one micro-batch of all 8 demonstrations) equals -sum log p / number of completion
    tokens computed by hand on padded rows; prompt tokens are not counted."""
    result = run_sft(_cfg(tmp_path, tiny_model_dir, "train.batch_size=8", "train.max_steps=1",
                          "model.lora_dropout=0.0"))
    row = _rows(result.run_dir)[0]
    eos = tokenizer.eos_token_id
    prompts = [prompt_ids(tokenizer, d["prompt"]) for d in DEMOS]
    comps = [completion_ids(tokenizer, d["prompt"], d["completion"], eos=eos) for d in DEMOS]
    batch = collate_sequences(prompts, comps, tokenizer.pad_token_id)
    model = load_model(str(tiny_model_dir)).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets, mask = batch["input_ids"][:, 1:], batch["completion_mask"][:, 1:].bool()
    token_logps = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
    expected = -(token_logps[mask]).sum() / mask.sum()
    assert row["tokens"] == sum(len(c) for c in comps) == int(mask.sum())
    assert row["loss"] == pytest.approx(float(expected), abs=1e-5)
    assert row["nll/token"] == pytest.approx(float(expected), abs=1e-5)


def test_packed_rows_train_exactly_like_padded_rows(tmp_path, tiny_model_dir):
    packed = run_sft(_cfg(tmp_path / "a", tiny_model_dir, "data.layout=packed", "train.epochs=2"))
    padded = run_sft(_cfg(tmp_path / "b", tiny_model_dir, "data.layout=padded", "train.epochs=2"))
    assert packed.summary["layout"]["layout"] == "packed" and padded.summary["layout"]["layout"] == "padded"
    a, b = _rows(packed.run_dir), _rows(padded.run_dir)
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)


def test_held_out_nll_before_and_after(tmp_path, tiny_model_dir):
    held = write_jsonl(tmp_path / "held.jsonl", MESSAGES)
    result = run_sft(_cfg(tmp_path, tiny_model_dir, f"data.eval_path={held}", "train.epochs=4"))
    ev = result.summary["eval"]
    assert ev["examples"] == 8 and ev["tokens"] > 0
    assert ev["nll/token"] < ev["nll/token_before"]  # the same answers, in a chat template: learned
    assert ev["nll/token_change"] == pytest.approx(ev["nll/token"] - ev["nll/token_before"])
    assert ev["perplexity"] == pytest.approx(torch.tensor(ev["nll/token"]).exp().item(), rel=1e-5)


def test_interrupted_then_resumed_is_bit_identical(tmp_path, tiny_model_dir, monkeypatch):
    def cfg(name):
        return _cfg(tmp_path, tiny_model_dir, f"run.output_dir={tmp_path / name}", "train.checkpoint_every=1",
                    "train.epochs=3", "model.lora_dropout=0.1")

    full = run_sft(cfg("full"))
    interrupt_after_checkpoint(monkeypatch, 3, lambda: run_sft(cfg("cut")))
    assert main(["resume", str(tmp_path / "cut")]) == 0  # the CLI dispatches an SFT run to run_sft
    resumed = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert resumed["resumed_from"].endswith("step-00000003")
    assert weights_sha(tmp_path / "cut") == weights_sha(full.run_dir)
    assert _rows(tmp_path / "cut") == _rows(full.run_dir)


def test_formats_messages_prompt_completion_and_the_chosen_side_of_pairs(tmp_path):
    d = load_config(None, []).data
    demos, kind = load_sft_records(str(write_jsonl(tmp_path / "d.jsonl", DEMOS)), d)
    assert kind == "demonstrations" and demos[0].completion == DEMOS[0]["completion"] and demos[0].label
    msgs, _ = load_sft_records(str(write_jsonl(tmp_path / "m.jsonl", MESSAGES)), d)
    assert [m["role"] for m in msgs[0].prompt] == ["system", "user"]
    assert msgs[0].completion == [MESSAGES[0]["messages"][-1]]
    resp, _ = load_sft_records(str(write_jsonl(tmp_path / "r.jsonl", [{"prompt": "a", "response": " b"}])), d)
    assert resp[0].completion == " b"
    chosen, kind = load_sft_records(str(write_jsonl(tmp_path / "p.jsonl", PAIRS)), d)
    assert kind == "chosen side of pairs" and [r.completion for r in chosen] == [p["chosen"] for p in PAIRS]


@pytest.mark.parametrize("row, field", [
    ({"prompt": "a", "completion": " b", "label": False}, "label"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ({"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "user", "content": "x"}]},
     "completion[0].role"),
    ({"prompt": "a", "completion": 3}, "completion"),
])
def test_bad_demonstrations_name_line_and_field(tmp_path, row, field):
    good = MESSAGES[0] if "messages" in row else DEMOS[0] if isinstance(row["prompt"], str) else \
        {"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])  # the second record is the bad one
    with pytest.raises(DataError) as err:
        load_sft_records(str(path), load_config(None, []).data)
    assert f"{path}:2" in str(err.value) and field in str(err.value), str(err.value)


def test_cli_sft_then_dpo_from_the_sft_adapter(tmp_path, tiny_model_dir, capsys):
    """SFT -> DPO: the DPO run starts from the SFT adapter, and its reference.json names it."""
    demos, held = write_jsonl(tmp_path / "d.jsonl", DEMOS), write_jsonl(tmp_path / "h.jsonl", MESSAGES)
    pairs = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    assert main(["sft", f"model.name_or_path={tiny_model_dir}", f"data.train_path={demos}",
                 f"data.eval_path={held}", f"run.output_dir={tmp_path / 'sft'}", "train.lr=1e-2"]) == 0
    out = capsys.readouterr().out
    assert "held-out (8 examples" in out and "NLL/token" in out and "model.adapter_name_or_path=" in out
    sft_model = tmp_path / "sft" / "model"
    assert main(["train", f"model.name_or_path={tiny_model_dir}", f"data.train_path={pairs}",
                 f"model.adapter_name_or_path={sft_model}", f"run.output_dir={tmp_path / 'dpo'}"]) == 0
    reference = json.loads((tmp_path / "dpo" / "reference.json").read_text())
    assert reference["adapter"] == str(sft_model) and reference["adapter_merged"] is True


def test_refusals(tmp_path, tiny_model_dir, capsys):
    pairs = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    with pytest.raises(ConfigError, match="preftune sft"):  # nll needs demonstrations through the SFT source
        train(load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.train_path={pairs}",
                                 "loss.name=nll", f"run.output_dir={tmp_path / 'x'}"]))
    with pytest.raises(ConfigError, match="not a supervised loss"):
        run_sft(load_config(None, [f"data.train_path={pairs}", "loss.name=sigmoid"]))
    assert LOSSES["nll"].kind.name == "demonstrations" and not LOSSES["nll"].needs_reference
    rc = main(["sft", f"model.name_or_path={tiny_model_dir}", f"run.output_dir={tmp_path / 'y'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "data.train_path" in err[0], err
