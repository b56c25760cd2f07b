"""qlora.py: bitsandbytes stays out of every run that did not ask for QLoRA, and a 4-bit layer
computes the same way in eval and in training on every CPU (AVX512-BF16 ones included)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import PAIRS, write_jsonl

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes not installed (pip install 'preftune[qlora]')")
PREFTUNE = str(Path(sys.executable).with_name("preftune"))


def test_hide_and_allow_bitsandbytes_are_the_import_system_s_answers():
    from preftune.models import qlora

    was = sys.modules.pop("bitsandbytes", "absent")
    try:
        qlora.hide_bitsandbytes()
        assert importlib.util.find_spec("bitsandbytes") is None  # how peft and transformers ask
        with pytest.raises(ImportError):
            import bitsandbytes  # noqa: F401
        qlora.allow_bitsandbytes()
        assert "bitsandbytes" not in sys.modules
    finally:
        if was != "absent":
            sys.modules["bitsandbytes"] = was


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([PREFTUNE, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def _train_args(tmp_path: Path, model_dir: Path, name: str, *extra: str) -> list[str]:
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    return ["train", f"model.name_or_path={model_dir}", f"data.train_path={data}", "train.max_steps=2",
            "train.batch_size=4", f"run.output_dir={tmp_path / name}", *extra]


@needs_bnb
def test_a_run_without_qlora_never_imports_bitsandbytes_and_prints_nothing_of_it(tmp_path, qlora_model_dir):
    """The CPU notice ("Failed to load CPU gemm_4bit_forward from kernels-community") came with peft's
    import of bitsandbytes on AVX512-BF16 CPUs, in every command that loaded a model; the import
    itself is what this checks, so the test means the same on every CPU."""
    probe = tmp_path / "probe.py"
    probe.write_text("import sys, atexit\nfrom preftune.cli import main\n"
                     "atexit.register(lambda: print('BNB', 'bitsandbytes' in sys.modules and "
                     "sys.modules['bitsandbytes'] is not None, file=sys.stderr))\n"
                     "raise SystemExit(main(sys.argv[1:]))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(probe), *_train_args(tmp_path, qlora_model_dir, "plain")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "BNB False" in done.stderr
    assert "bitsandbytes" not in done.stderr.replace("BNB False", "") and "kernels" not in done.stderr


@needs_bnb
def test_a_qlora_run_from_the_cli_trains_and_is_quiet(tmp_path, qlora_model_dir):
    done = _run(_train_args(tmp_path, qlora_model_dir, "q", "model.load_in_4bit=true"), tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kernels-community" not in done.stderr
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["quantization"] == "4bit-nf4"


@needs_bnb
def test_a_4bit_layer_computes_the_same_in_eval_and_training_and_passes_gradients(qlora_model_dir):
    """On AVX512-BF16 CPUs bitsandbytes repacked a layer into a bf16, inference-only layout the
    first time it ran in eval mode without gradients; afterwards training forwards took that layout
    too, with no gradient to the layer's input (measured: input-gradient norm 6272 -> 741) and
    logits 4.5e-3 away from training mode. With keep_one_cpu_path both modes are one computation."""
    from preftune.config import load_config
    from preftune.models.loading import load_start

    model, _ = load_start(load_config(None, ["model.load_in_4bit=true"]).model, str(qlora_model_dir))
    ids = torch.arange(3, 40).unsqueeze(0)

    def train_mode_forward():
        model.train()
        x = model.model.embed_tokens(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=x).logits
        return logits.detach(), torch.autograd.grad(logits.square().mean(), x)[0]

    logits_before, grad_before = train_mode_forward()
    model.eval()
    with torch.no_grad():
        logits_eval = model(ids).logits
    logits_after, grad_after = train_mode_forward()
    assert torch.equal(logits_eval, logits_before)
    assert torch.equal(logits_after, logits_before) and torch.equal(grad_after, grad_before)
    assert grad_before.norm() > 0
