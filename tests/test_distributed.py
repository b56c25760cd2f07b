"""Two CPU processes under Accelerate (DDP over gloo) equal one process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import PAIRS, write_jsonl

ACCELERATE = Path(sys.executable).with_name("accelerate")


@pytest.mark.skipif(not ACCELERATE.exists() or shutil.which("torchrun", path=str(ACCELERATE.parent)) is None,
                    reason="accelerate/torchrun not installed beside this python")
def test_two_processes_equal_one(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    held = write_jsonl(tmp_path / "held.jsonl", PAIRS[:7])  # odd: 4 + 3 over two processes, none twice
    common = [f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}", "train.epochs=2",
              f"data.eval_path={held}",
              "train.lr=1e-2", "model.lora_r=4", "data.max_length=64", "data.max_prompt_length=32"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # `--cpu` makes accelerate 1.15 start a single process; on a machine without GPUs the
    # multi-process launcher runs CPU processes that talk over gloo (DistributedType.MULTI_CPU)
    two = subprocess.run([str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "preftune", "train", *common,
                          "train.batch_size=2", f"run.output_dir={tmp_path / 'two'}"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run([sys.executable, "-m", "preftune", "train", *common, "train.batch_size=4",
                          f"run.output_dir={tmp_path / 'one'}"], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]

    def rows(run):
        return [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    a, b = rows("two"), rows("one")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert abs(x[key] - y[key]) < 1e-5, (key, x, y)
    ea, eb = (json.loads((tmp_path / run / "summary.json").read_text())["eval"] for run in ("two", "one"))
    assert ea["pairs"] == eb["pairs"] == 7
    for key in ("accuracy/implicit_reward", "rewards/margins", "logps/chosen", "perplexity/chosen"):
        # relative: perplexity is exp(mean nll) (~356 here); 4+3 rows vs 7 rows sum in another order
        assert abs(ea[key] - eb[key]) <= 1e-5 * max(1.0, abs(eb[key])), (key, ea, eb)
    wa = load_file(tmp_path / "two" / "model" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "one" / "model" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
