"""`preftune export`: a merged model computes what the adapter on its base computes, an adapter
export names the user's base, the model card says how the model was made, and bad input is one
line with exit 2 and nothing written."""

import json
import shutil

import pytest
import torch
import yaml

from conftest import PAIRS, write_jsonl
from preftune.apps.export import _code, export_run
from preftune.cli import main
from preftune.config import load_config
from preftune.training.train import train
from preftune.utils.errors import ConfigError
from preftune.utils.version import __version__

COMMON = ["data.max_length=64", "data.max_prompt_length=32", "model.lora_r=4", "model.lora_alpha=8",
          "diagnostics.probe_every=0"]


def _train(root, model_dir, *extra):
    data = write_jsonl(root / "pairs.jsonl", PAIRS)
    heldout = write_jsonl(root / "heldout.jsonl", PAIRS[:4])
    return train(load_config(None, [f"model.name_or_path={model_dir}", f"data.train_path={data}",
                                    f"data.eval_path={heldout}", *COMMON, *extra])).run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("export")
    # a large lr so the adapter moves the model far from its base (a merge that did nothing shows)
    return _train(root, tiny_model_dir, f"run.output_dir={root / 'run'}", "train.lr=3e-2", "train.epochs=3",
                  "loss.beta=0.25", "run.name=tiny-dpo")


def _logps(model, model_dir, data):
    from transformers import AutoTokenizer

    from preftune.core.logprobs import completion_logps
    from preftune.data import collate_pairs, load_records, tokenize_records

    tok = AutoTokenizer.from_pretrained(model_dir)
    pairs, _ = tokenize_records(load_records(data), tok, max_length=64, max_prompt_length=32)
    with torch.no_grad():
        return completion_logps(model.eval(), collate_pairs(pairs, tok.pad_token_id))[0]  # (2B,)


def test_merged_export_computes_what_the_adapter_on_its_base_computes(lora_run, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert export_run(lora_run, out, merge=True).kind == "merged"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= \
        {p.name for p in out.iterdir()}
    assert not list(out.glob("adapter_*")) and not list(out.glob("*.bin"))
    data = lora_run.parent / "pairs.jsonl"
    merged = _logps(AutoModelForCausalLM.from_pretrained(out), out, data)  # plain transformers, no peft
    on_base = _logps(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                               lora_run / "model"), lora_run / "model", data)
    base = _logps(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_model_dir, data)
    assert (merged - on_base).abs().max().item() < 1e-4
    assert (base - on_base).abs().max().item() > 1e-2  # the adapter matters: exporting the bare base would fail


def test_adapter_export_names_the_users_base_not_the_loaded_directory(lora_run, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = shutil.copytree(lora_run, tmp_path / "run")
    # what a run on the packaged default records: the cached conversion it loaded, not the user's name
    saved = json.loads((run / "model" / "adapter_config.json").read_text())
    saved["base_model_name_or_path"] = str(tmp_path / ".cache" / "preftune" / "models" / "tiny-0123")
    (run / "model" / "adapter_config.json").write_text(json.dumps(saved))
    out = tmp_path / "adapter"
    assert export_run(run, out).kind == "adapter"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == load_config(run / "config.yaml").model.name_or_path
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), out)
    data = lora_run.parent / "pairs.jsonl"
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_run / "model")
    assert torch.equal(_logps(model, out, data), _logps(on_base, lora_run / "model", data))


def test_model_card_names_base_data_counts_loss_and_held_out_metrics(lora_run, tiny_model_dir, tmp_path):
    out = tmp_path / "merged"
    export_run(lora_run, out)
    card = (out / "README.md").read_text()
    summary = json.loads((lora_run / "summary.json").read_text())
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "peft" and "preftune" in meta["tags"]
    for text in (f"`{tiny_model_dir}`", f"`{lora_run.parent / 'pairs.jsonl'}`", "pairs 8",
                 f"`{lora_run.parent / 'heldout.jsonl'}`: 4 pairs", "loss `sigmoid`", "beta 0.25", "lr 0.03",
                 "r 4, alpha 8", "`q_proj, v_proj`", "`tiny-dpo`", f"preftune {__version__}",
                 "`accuracy/implicit_reward`: ", "## Health checks"):
        assert text in card, text
    assert f"{summary['eval']['logps/chosen']:.4g}" in card
    assert "<" not in card  # nothing from the run is written as HTML


def test_card_text_from_the_config_is_a_literal_code_span():
    assert _code("a.jsonl") == "`a.jsonl`"
    assert _code("<img src=x>") == "`<img src=x>`"  # inside a code span Markdown renders no HTML
    assert _code("a`b") == "``a`b``" and _code("`x") == "`` `x ``"
    assert _code("two\nlines") == "`two lines`"


def test_full_fine_tuning_exports_the_model_directory(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    run = _train(tmp_path, tiny_model_dir, f"run.output_dir={tmp_path / 'run'}", "model.lora=false",
                 "train.lr=1e-3", "train.max_steps=1")
    out = tmp_path / "out"
    assert export_run(run, out, merge=True).kind == "full"  # nothing to merge
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(run / "model").state_dict()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    assert "Full fine-tuning" in (out / "README.md").read_text()


def _one_line_exit_2(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_export_exit_codes_and_bad_runs(lora_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(lora_run), "--out", str(out), "--merge"]) == 0
    assert str(out) in capsys.readouterr().out
    assert "no such run directory" in _one_line_exit_2(capsys, ["export", str(tmp_path / "nope"), "--out", "x"])
    (tmp_path / "empty").mkdir()
    assert "config.yaml" in _one_line_exit_2(capsys, ["export", str(tmp_path / "empty"), "--out", str(tmp_path / "x")])
    unfinished = shutil.copytree(lora_run, tmp_path / "unfinished")
    (unfinished / "summary.json").unlink()
    assert "summary.json" in _one_line_exit_2(capsys, ["export", str(unfinished), "--out", str(tmp_path / "x")])
    no_model = shutil.copytree(lora_run, tmp_path / "no_model")
    shutil.rmtree(no_model / "model")
    assert "model" in _one_line_exit_2(capsys, ["export", str(no_model), "--out", str(tmp_path / "x")])
    line = _one_line_exit_2(capsys, ["export", str(lora_run), "--out", str(out)])  # exists, not empty
    assert line.startswith(f"{out}: --out: already exists") and (out / "model.safetensors").is_file()
    assert main(["export", str(lora_run), "--out", str(out), "--overwrite"]) == 0  # merged -> adapter
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    assert "overlaps the run" in _one_line_exit_2(capsys, ["export", str(lora_run), "--out", str(lora_run / "x")])
    assert not (tmp_path / "x").exists() and not (lora_run / "x").exists()


def test_push_to_hub_offline_or_unreachable_is_one_line_and_writes_nothing(lora_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    line = _one_line_exit_2(capsys, ["export", str(lora_run), "--out", str(out), "--push-to-hub", "me/tiny"])
    assert line.startswith("me/tiny: --push-to-hub: HF_HUB_OFFLINE is set")  # conftest sets it
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    line = _one_line_exit_2(capsys, ["export", str(lora_run), "--out", str(out), "--push-to-hub", "me/tiny"])
    assert "unreachable" in line
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_merge_refuses_a_4bit_run_and_a_changed_base(lora_run, tiny_model_dir, tmp_path, capsys):
    qlora = shutil.copytree(lora_run, tmp_path / "qlora")
    cfg = yaml.safe_load((qlora / "config.yaml").read_text())
    cfg["model"]["load_in_4bit"] = True
    (qlora / "config.yaml").write_text(yaml.safe_dump(cfg))
    line = _one_line_exit_2(capsys, ["export", str(qlora), "--out", str(tmp_path / "q"), "--merge"])
    assert "model.load_in_4bit" in line and "without --merge" in line
    # a base directory whose weights changed since the run started: refused, not merged into
    from transformers import AutoModelForCausalLM

    changed = tmp_path / "changed"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)
    model.save_pretrained(changed)
    shutil.copy(tiny_model_dir / "tokenizer.json", changed)
    moved = shutil.copytree(lora_run, tmp_path / "moved")
    cfg = yaml.safe_load((moved / "config.yaml").read_text())
    cfg["model"]["name_or_path"] = str(changed)
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    line = _one_line_exit_2(capsys, ["export", str(moved), "--out", str(tmp_path / "m"), "--merge"])
    assert "model.name_or_path" in line and "sha256" in line
    assert not (tmp_path / "q").exists() and not (tmp_path / "m").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_failed_export_leaves_nothing(lora_run, tmp_path, monkeypatch):
    import preftune.apps.export as export

    def broken(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "model_card", broken)
    with pytest.raises(ConfigError, match=r"out: --out: not written: no space left on the device"):
        export_run(lora_run, tmp_path / "out", merge=True)
    assert list(tmp_path.iterdir()) == []


def test_a_default_model_export_names_a_base_other_tools_can_load(lora_run, tmp_path):
    """The adapter of a run on the packaged default model named `smollm2-135m-instruct` as its base,
    which only preftune can load; the card was PEFT's placeholder. Now: the hub id the GGUF was
    quantized from, valid hub metadata (huggingface_hub parses it), the quantization difference
    said in words, and files readable by all (0644 under the usual umask)."""
    from huggingface_hub import ModelCard

    run = shutil.copytree(lora_run, tmp_path / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["name_or_path"] = "smollm2-135m-instruct"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert export_run(run, out).kind == "adapter"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = ModelCard((out / "README.md").read_text())
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
    assert card.data.base_model_relation == "adapter" and card.data.library_name == "peft"
    assert "export with `--merge`" in card.text and "from_pretrained(\"HuggingFaceTB/SmolLM2-135M-Instruct\")" in card.text
    import os

    mask = os.umask(0)
    os.umask(mask)
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {f.name: 0o666 & ~mask for f in out.iterdir()}


def test_card_precision_says_bf16_from_what_the_run_recorded():
    from preftune.apps.export import _bf16

    assert _bf16("auto", {"autocast_bf16": True}) is True  # auto on a GPU: the run recorded bf16
    assert _bf16("auto", {"autocast_bf16": False}) is False
    assert (_bf16(True, {}), _bf16(False, {}), _bf16("auto", {})) == (True, False, False)  # older runs: the setting
