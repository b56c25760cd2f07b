"""Shared fixtures: a tiny byte-level tokenizer and a tiny random Llama, built from config.

Nothing here touches the network (HF_HUB_OFFLINE=1) or the real model, so unit tests run in
seconds. `tiny_model_dir` is an ordinary HF model directory (safetensors + tokenizer files).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

SHARED = Path(__file__).resolve().parents[2] / "shared"
HH_TRAIN = SHARED / "data" / "hh-rlhf-harmless-base" / "train.jsonl.gz"
HH_DEV = SHARED / "data" / "hh-rlhf-harmless-base" / "dev.jsonl.gz"
needs_shared = pytest.mark.skipif(not HH_TRAIN.is_file(), reason="../shared/data is absent")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The movie was great and the acting was wonderful.",
    "I hated the ending; the plot was slow and boring.",
    "Human: how do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt.",
    "What is the capital of France? Paris is the capital.",
] * 20


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = CHATML
    return fast


def build_model(vocab_size: int, *, seed: int = 0, eos_id: int = 2, pad_id: int = 0, hidden: int = 32):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    model = build_model(len(tokenizer), eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def qlora_model_dir(tmp_path_factory, tokenizer) -> Path:
    """The tiny Llama at widths that bitsandbytes really blocks: every linear layer's inputs are a
    multiple of its 64-value block (128, 256) and its outputs of 32 (k/v 64, q/o 128, mlp 256), the
    shapes its AVX512-BF16 CPU path requires; the 32-wide tiny model is one partial block."""
    path = tmp_path_factory.mktemp("qlora-llama")
    model = build_model(len(tokenizer), eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, hidden=128)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _bitsandbytes_visible():
    """A test that runs the CLI in-process hides bitsandbytes (qlora.hide_bitsandbytes) from the
    whole pytest process; give it back so a later QLoRA test sees the package as installed."""
    yield
    from preftune.models.qlora import allow_bitsandbytes

    allow_bitsandbytes()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never write conversion caches into the user's home during tests."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "preftune-cache"))


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def one_step_run(root: Path, model_dir) -> tuple[Path, Path]:
    """A finished one-step DPO run on PAIRS with `model_dir` under `root`: (run directory, pairs file)."""
    from preftune.config import load_config
    from preftune.training.train import train

    pairs = write_jsonl(root / "pairs.jsonl", PAIRS)
    run = train(load_config(None, [f"model.name_or_path={model_dir}", f"data.train_path={pairs}",
                                   "train.max_steps=1", "train.batch_size=4", "diagnostics.probe_every=0",
                                   f"run.output_dir={root / 'run'}"])).run_dir
    return run, pairs


def metrics_rows(run_dir) -> list[dict]:
    """The run's metrics.jsonl, one dict per logged step."""
    import json

    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def tiny_pairs_config(tmp_path: Path, model_dir, name: str = "run", *extra: str, batch_size: int = 4, epochs: int = 4):
    """A DPO config on PAIRS (written once under tmp_path) with the tiny model, LoRA r4 and lr 1e-2;
    `extra` dotlist entries come last, so they override these."""
    from preftune.config import load_config

    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        write_jsonl(data, PAIRS)
    return load_config(None, [f"model.name_or_path={model_dir}", f"data.train_path={data}",
                              f"run.output_dir={tmp_path / name}", "data.max_length=64", "data.max_prompt_length=32",
                              "train.lr=1e-2", "model.lora_r=4", "model.lora_alpha=8", f"train.batch_size={batch_size}",
                              f"train.epochs={epochs}", *extra])


PAIRS = [
    {"prompt": "The movie was", "chosen": " great and wonderful.", "rejected": " slow and boring."},
    {"prompt": "I hated", "chosen": " nothing about it.", "rejected": " the ending."},
    {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " Bread."},
    {"prompt": "Human: how do I bake bread?", "chosen": " Mix flour and water.", "rejected": " I hate bread."},
] * 2


def length_reward(prompts, completions):
    """A reward source for tests (`fn:conftest:length_reward`): characters in the completion."""
    return [float(len(c)) for c in completions]


def scaled_length_reward(prompts, completions):
    """length_reward's order on another scale (ensemble disagreement tests): 100 * characters + 5."""
    return [100.0 * len(c) + 5 for c in completions]


def half_failed_reward(prompts, completions):
    """10 * characters, but NaN (a failed score) for the first completion."""
    return [float("nan")] + [10.0 * len(c) for c in completions[1:]]


def constant_reward(prompts, completions):
    return [1.0 for _ in completions]


def wrong_count_reward(prompts, completions):
    return [0.0]


def serve_in_thread(handler):
    """A stdlib HTTP server on a free localhost port, serving `handler` from a daemon thread.
    Returns (server, base URL ending in /v1); call server.shutdown() when done."""
    import threading
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def send_json(handler, code: int, data: bytes) -> None:
    handler.send_response(code)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class PairwiseJudge:
    """A fake OpenAI-compatible pairwise judge on localhost: `decide(a, b)` -> "A" | "B" | "tie"
    names the winner of "Response A: a, Response B: b". Logs every (a, b) it was shown in `shown`."""

    def __init__(self, decide):
        import json
        from http.server import BaseHTTPRequestHandler

        self.shown = []
        fake = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][-1]["content"]
                a = text.split("\n\nResponse A:\n", 1)[1].split("\n\nResponse B:\n", 1)[0]
                b = text.split("\n\nResponse B:\n", 1)[1].rsplit("\n\nWhich response is better?", 1)[0]
                fake.shown.append((a, b))
                verdict = json.dumps({"winner": decide(a, b), "rationale": "r"})
                send_json(self, 200, json.dumps({"choices": [{"message": {"role": "assistant",
                                                                          "content": verdict}}]}).encode())

        self.server, self.url = serve_in_thread(H)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# ---- the SIGKILL harness (offline and online runs) -------------------------------------------

def weights_sha(run_dir) -> str:
    """sha256 over a run's saved adapter tensors (names and bytes), in name order."""
    from safetensors.torch import load_file

    tensors = load_file(run_dir / "model" / "adapter_model.safetensors")
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + tensors[name].numpy().tobytes())
    return digest.hexdigest()


def _cli(*args, launch=(), **kw):
    """`preftune ARGS`, or `LAUNCH ARGS` when given (e.g. `accelerate launch ... -m preftune`)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [*launch, *args] if launch else [sys.executable, "-m", "preftune", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, cwd=Path(__file__).parent, start_new_session=True, **kw)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (read from /proc: torchrun starts its workers in sessions of their own,
    so a process-group kill would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill(proc) -> None:
    """SIGKILL the run and every process it started, as a power cut would."""
    for pid in [*_descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _wait_for(path, proc, timeout=300.0) -> float:
    start = time.monotonic()
    while not path.exists():
        assert proc.poll() is None or path.exists(), proc.stderr.read()
        assert time.monotonic() - start < timeout
        time.sleep(0.02)
    return time.monotonic()


def _wait_for_save(root: Path, proc, nth: int, timeout=300.0) -> None:
    """Return as soon as the `nth` (0-based) checkpoint write has begun (its temp dir exists)."""
    seen, start = set(), time.monotonic()
    while time.monotonic() - start < timeout and proc.poll() is None:
        temps = {p.name for p in root.glob(".tmp-*")} if root.is_dir() else set()
        if temps - seen:
            seen |= temps
            if len(seen) > nth:
                return
        time.sleep(0.001)


def kill_and_resume_trials(tmp_path, command: str, args: list[str], trials: int, seed: int = 0,
                           launch=(), at_save: int = 0) -> list:
    """SIGKILL a CLI run (`preftune COMMAND ARGS`, under `launch` when given) at a random moment of
    its training (saves included) or, with `at_save=N`, as soon as one of the run's N checkpoint
    writes (a random one) has begun; `preftune resume` it; compare the final weights with an
    uninterrupted run's."""
    ref = _cli(command, *args, f"run.output_dir={tmp_path / 'ref'}", launch=launch)
    began = _wait_for(tmp_path / "ref" / "config.yaml", ref)  # written just before step 1
    ended = _wait_for(tmp_path / "ref" / "summary.json", ref)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    window, expected = ended - began, weights_sha(tmp_path / "ref")
    rng, outcomes = random.Random(seed), []
    for i in range(trials):
        run = tmp_path / f"trial{i}"
        proc = _cli(command, *args, f"run.output_dir={run}", launch=launch)
        _wait_for(run / "config.yaml", proc)
        if at_save:
            _wait_for_save(run / "checkpoints", proc, nth=rng.randrange(at_save))
        else:
            time.sleep(rng.uniform(0.0, window))
        _kill(proc)
        root = run / "checkpoints"
        at_kill = (sorted(p.name for p in root.glob("step-*"))[-1:] or ["none"])[0] if root.exists() else "none"
        mid_save = root.exists() and any(root.glob(".tmp-*"))
        # killed after its last write (summary.json): a finished run is refused (exit 2; a launcher
        # reports its worker's failure as 1), not retrained
        finished = (run / "summary.json").exists()
        resumed = _cli("resume", str(run), launch=launch)
        rc = resumed.wait(timeout=300)
        assert rc == (0 if not finished else 1 if launch else 2), resumed.stderr.read()
        outcomes.append((weights_sha(run) == expected, at_kill, "mid-save" if mid_save else ""))
    return outcomes


def vowel_reward(prompts, completions):
    """A reward with spread on a random tiny model (`fn:conftest:vowel_reward`): vowels in the completion."""
    return [float(sum(ch in "aeiou" for ch in c)) for c in completions]


def interrupt_after_checkpoint(monkeypatch, step: int, run) -> None:
    """Call `run()` with train's save_checkpoint stopping the run right after it wrote the
    checkpoint of `step` (an in-process stand-in for a kill between two steps)."""
    import sys

    train_module = sys.modules["preftune.training.train"]
    real = train_module.save_checkpoint

    class Stop(Exception):
        pass

    def save_then_stop(run_dir, **kw):
        path = real(run_dir, **kw)
        if kw["step"] == step:
            raise Stop
        return path

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_stop)
    try:
        run()
    except Stop:
        pass
    else:
        raise AssertionError(f"the run never wrote the checkpoint of step {step}")
    finally:
        monkeypatch.undo()
