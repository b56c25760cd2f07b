"""FSDP2 on two CPU processes (gloo) through the shipped Accelerate config equals one process;
sharded checkpoints resume bit-identically; the saved model loads with plain transformers/peft."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import PAIRS, kill_and_resume_trials, write_jsonl
from preftune.training.checkpoint import find_checkpoint
from preftune.utils.hashing import file_sha256
from preftune.utils.sharding import full_tensors, gather_objects, rank_and_world

ACCELERATE = Path(sys.executable).with_name("accelerate")
ROOT = Path(__file__).resolve().parents[2]
needs_launcher = pytest.mark.skipif(
    not ACCELERATE.exists() or shutil.which("torchrun", path=str(ACCELERATE.parent)) is None,
    reason="accelerate/torchrun not installed beside this python")


def _fsdp_config(tmp_path) -> Path:
    """configs/accelerate/fsdp.yaml as shipped, on 2 processes in float32 (CPU has no bf16 speed-up)."""
    cfg = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text())
    cfg.update(num_processes=2, mixed_precision="no")
    path = tmp_path / "fsdp2.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _common(tmp_path, model_dir, *extra) -> list[str]:
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    held = write_jsonl(tmp_path / "held.jsonl", PAIRS[:7])
    return [f"model.name_or_path={model_dir}", f"data.train_path={data}", f"data.eval_path={held}",
            "train.epochs=2", "model.lora_r=4", "data.max_length=64", "data.max_prompt_length=32", *extra]


def _env(tmp_path):
    # a cache of its own: reference log-probs computed here must not serve other tests' pairs
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PREFTUNE_CACHE": str(tmp_path / "cache")}


def _two_and_one(tmp_path, model_dir, *extra):
    common = _common(tmp_path, model_dir, *extra)
    two = subprocess.run([str(ACCELERATE), "launch", "--config_file", str(_fsdp_config(tmp_path)), "-m", "preftune",
                          "train", *common, "train.batch_size=2", f"run.output_dir={tmp_path / 'two'}"],
                         env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("run: ") == 1  # the closing line once, not once per process
    one = subprocess.run([sys.executable, "-m", "preftune", "train", *common, "train.batch_size=4",
                          f"run.output_dir={tmp_path / 'one'}"], env=_env(tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    return tmp_path / "two", tmp_path / "one"


def _assert_same_run(two: Path, one: Path, weights_file: str, state_share: float) -> dict:
    """Per-step loss, margins, log-probs and grad norm, held-out metrics and final weights agree
    within 1e-5; returns the max |difference| of each."""
    rows = [[json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] for run in (two, one)]
    assert len(rows[0]) == len(rows[1]) == 4
    worst = {}
    for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
        worst[key] = max(abs(x[key] - y[key]) for x, y in zip(*rows))
        assert worst[key] < 1e-5, (key, rows)
    assert min(r["grad_norm"] for r in rows[0]) > 0  # a norm over stale (pre-sharding) parameters is 0
    summaries = [json.loads((run / "summary.json").read_text()) for run in (two, one)]
    assert summaries[0]["distributed"]["type"] == "fsdp" and summaries[0]["distributed"]["processes"] == 2
    # wrapped by the model's own decoder-layer class (LlamaForCausalLM._no_split_modules), no hand list
    assert "LlamaDecoderLayer" in summaries[0]["distributed"]["sharded_modules"]
    # each process holds about half the weights (policy and frozen reference), gradients and Adam
    # moments of the one process; Accelerate keeps the tied embedding/head group gathered after a
    # forward (reshard_after_forward=False for that group), a large share of a tiny model
    one_mb, two_mb = summaries[1]["model_state_mb_per_process"][0], summaries[0]["model_state_mb_per_process"]
    assert all(0.4 * one_mb < mb < state_share * one_mb for mb in two_mb), (two_mb, one_mb)
    assert len(summaries[0]["peak_rss_mb_per_process"]) == 2
    for key in ("accuracy/implicit_reward", "rewards/margins", "logps/chosen"):
        assert abs(summaries[0]["eval"][key] - summaries[1]["eval"][key]) < 1e-5, key
    wa, wb = (load_file(run / "model" / weights_file) for run in (two, one))
    assert wa.keys() == wb.keys()
    worst["weights"] = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst["weights"] < 1e-5
    return worst


def _logps(model, tokenizer) -> torch.Tensor:
    ids = tokenizer([p["prompt"] + p["chosen"] for p in PAIRS], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**ids).logits[:, :-1].float()
    picked = logits.log_softmax(-1).gather(-1, ids["input_ids"][:, 1:, None])[..., 0]
    return (picked * ids["attention_mask"][:, 1:]).sum(-1)


@needs_launcher
def test_fsdp_lora_two_processes_equal_one(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    two, one = _two_and_one(tmp_path, tiny_model_dir, "train.lr=1e-2", "train.reference_cache=true")
    print("fsdp lora max |diff|:", _assert_same_run(two, one, "adapter_model.safetensors", state_share=0.75))
    # the adapter loads with plain peft on the user's base model and scores as the one-process one
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    scored = [_logps(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "model"),
                     tok) for run in (two, one)]
    assert (scored[0] - scored[1]).abs().max() < 1e-4


@pytest.mark.slow
@needs_launcher
def test_fsdp_full_finetuning_with_frozen_reference_equals_one(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    two, one = _two_and_one(tmp_path, tiny_model_dir, "model.lora=false", "train.lr=1e-3")
    print("fsdp full max |diff|:", _assert_same_run(two, one, "model.safetensors", state_share=0.65))
    assert json.loads((two / "summary.json").read_text())["reference"]["strategy"] == "frozen_copy"
    tok = AutoTokenizer.from_pretrained(two / "model")
    scored = [_logps(AutoModelForCausalLM.from_pretrained(run / "model"), tok) for run in (two, one)]
    assert (scored[0] - scored[1]).abs().max() < 1e-4
    assert (load_file(two / "model" / "model.safetensors").keys()
            == load_file(one / "model" / "model.safetensors").keys())  # tied embeddings written once


# preftune, with each file a checkpoint writes held for 0.3 s after it is written: the kill lands
# inside a write, not between writes (a tiny model's checkpoint is written in a few milliseconds)
_SLOW_SAVES = """
import sys, time
import safetensors.torch as st
real = st.save_file
def slow(tensors, filename, *a, **k):
    real(tensors, filename, *a, **k)
    if "/checkpoints/.tmp-" in str(filename):
        time.sleep(0.3)
st.save_file = slow
from preftune.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@needs_launcher
def test_fsdp_sigkill_during_checkpoint_write_then_resume_is_bit_identical(tmp_path, tiny_model_dir):
    args = _common(tmp_path, tiny_model_dir, "train.lr=1e-2", "train.batch_size=2", "train.checkpoint_every=1",
                   "model.lora_dropout=0.1", "train.epochs=3")  # dropout: each process's RNG matters
    # 8 pairs, 2 per process: 2 steps per epoch, 6 steps, a checkpoint after each but the last: 5 writes
    slow_saves = tmp_path / "slow_saves.py"
    slow_saves.write_text(_SLOW_SAVES)
    launch = [str(ACCELERATE), "launch", "--config_file", str(_fsdp_config(tmp_path)), str(slow_saves)]
    outcomes = kill_and_resume_trials(tmp_path, "train", args, trials=6, seed=11, launch=launch, at_save=5)
    assert all(mid == "mid-save" for *_, mid in outcomes), outcomes  # every kill landed inside a write
    print("fsdp kill-at-save outcomes:", outcomes)
    assert all(same for same, *_ in outcomes), outcomes


def _rewrite_state(ckpt: Path, **changes) -> None:
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, **changes}))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["state.json"] = {"sha256": file_sha256(ckpt / "state.json"), "size": (ckpt / "state.json").stat().st_size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_resume_with_another_number_of_processes_is_one_line_exit_2(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    args = _common(tmp_path, tiny_model_dir, "train.checkpoint_every=1", "train.batch_size=4", "train.max_steps=2",
                   f"run.output_dir={run}")
    done = subprocess.run([sys.executable, "-m", "preftune", "train", *args], env=_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (run / "summary.json").unlink()  # as if killed before the end
    ckpt = find_checkpoint(run, log=lambda _: None).path
    state = json.loads((ckpt / "state.json").read_text())
    assert state["world_size"] == 1
    assert set(load_file(ckpt / "rng.safetensors")) == {"torch_cpu.0"}
    assert len(json.loads((ckpt / "rng.json").read_text())["ranks"]) == 1
    _rewrite_state(ckpt, world_size=2)
    resumed = subprocess.run([sys.executable, "-m", "preftune", "resume", str(run)], env=_env(tmp_path), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 2, resumed.stderr
    lines = resumed.stderr.strip().splitlines()
    assert len(lines) == 1 and "written by 2 process(es), resumed by 1" in lines[0] and str(ckpt) in lines[0]


def test_single_process_helpers_pass_tensors_through():
    t = {"a": torch.arange(6.0).view(2, 3)[:, 1:]}  # a non-contiguous view comes back contiguous
    out = full_tensors(t)
    assert out["a"].is_contiguous() and torch.equal(out["a"], t["a"])
    assert rank_and_world() == (0, 1)
    assert gather_objects({"x": 1}) == [{"x": 1}]
