"""Iterative, online and synth on the tiny model: files per round, counts, resume, and the judge
path end to end against `preftune serve` on localhost (with failures injected)."""

import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler

import pytest

from conftest import build_model, send_json, serve_in_thread, write_jsonl
from preftune.apps.serve import ChatModel, make_server
from preftune.cli import main
from preftune.runs.online.rollouts import load_prompts
from preftune.utils.errors import DataError

PROMPTS = ["The movie was", "I hated", "What is the capital of France?", "Human: how do I bake bread?"]


def _prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _common(tmp_path, tiny_model_dir, out):
    return [f"model.name_or_path={tiny_model_dir}", f"online.prompts_path={_prompts(tmp_path)}",
            f"online.eval_prompts_path={_prompts(tmp_path)}", "online.reward=fn:conftest:length_reward",
            "online.max_new_tokens=6", "online.samples_per_prompt=3", "online.eval_samples=2", "model.lora_r=4",
            "train.lr=1e-2", "train.epochs=2", "diagnostics.probe_every=0", f"run.output_dir={tmp_path / out}",
            "data.max_length=64", "data.max_prompt_length=32"]


def test_iterative_rounds_write_their_files_refresh_the_reference_and_resume(tmp_path, tiny_model_dir, capsys):
    args = ["iterate", *_common(tmp_path, tiny_model_dir, "it"), "online.rounds=2", "online.refresh_reference=true"]
    assert main(args) == 0
    rounds = json.loads((tmp_path / "it" / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in (1, 2):
        rd = tmp_path / "it" / f"round-{r}"
        assert (rd / "pairs.jsonl").is_file() and (rd / "train" / "metrics.jsonl").is_file()
        assert (rd / "policy" / "model.safetensors").is_file()
        counts = json.loads((rd / "counts.json").read_text())
        assert counts["samples"] == 12 and counts["pairs"] + counts["ties"] == 4
        assert all(k in rounds[r] for k in ("reward", "kl_to_start", "pairs", "steps"))
    # round 2 starts from round 1's policy and, with refresh_reference, uses it as the reference
    ref = json.loads((tmp_path / "it" / "round-2" / "train" / "reference.json").read_text())
    assert rounds[2]["reference"] == rounds[1]["policy"] and ref["strategy"] == "adapters_off"
    pair = json.loads((tmp_path / "it" / "round-1" / "pairs.jsonl").read_text().splitlines()[0])
    assert pair["score_chosen"] > pair["score_rejected"]
    capsys.readouterr()
    assert main([*args, "online.rounds=3"]) == 0  # rounds 1-2 kept, only round 3 runs
    out = capsys.readouterr().out
    assert out.count("done before, kept") == 2 and "round 3:" in out


def test_without_refresh_the_reference_stays_the_starting_model(tmp_path, tiny_model_dir):
    assert main(["iterate", *_common(tmp_path, tiny_model_dir, "it"), "online.rounds=2"]) == 0
    ref = json.loads((tmp_path / "it" / "round-2" / "train" / "reference.json").read_text())
    assert ref["strategy"] == "frozen_copy" and ref["model"] == str(tiny_model_dir)
    # evaluating that round (eval, implicit:RUN) compares with the same reference it trained against
    from preftune.config import load_config
    from preftune.models.generate import run_models
    from preftune.models.loading import load_model, weights_sha256

    run = tmp_path / "it" / "round-2" / "train"
    cfg = load_config(run / "config.yaml")
    _, reference = run_models(cfg, run, load_model(cfg.model.name_or_path))
    assert weights_sha256(reference.model) == ref["weights_sha256"]


def test_online_mode_trains_on_fresh_pairs_each_step(tmp_path, tiny_model_dir):
    assert main(["online", *_common(tmp_path, tiny_model_dir, "on"), "train.max_steps=3",
                 "online.prompts_per_step=2"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["online/pairs"] >= 1 and r["online/samples"] == 6 for r in rows)
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # step 1: policy == reference
    assert (tmp_path / "on" / "model" / "adapter_model.safetensors").is_file()


def test_synth_writes_scored_pairs(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "synth.jsonl"
    assert main(["synth", str(_prompts(tmp_path)), "--reward", "fn:conftest:length_reward", "--out", str(out),
                 f"model.name_or_path={tiny_model_dir}", "online.max_new_tokens=6"]) == 0
    counts = json.loads(capsys.readouterr().out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert counts["pairs"] == len(rows) and counts["samples"] == 16
    assert all(len(r["chosen"]) > len(r["rejected"]) for r in rows)  # the length reward decided


def test_bad_prompt_files(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "x"}\n')
    with pytest.raises(DataError, match="p.jsonl:2: prompt"):
        load_prompts(str(bad))
    with pytest.raises(DataError, match="missing.txt:0: file: no such file"):
        load_prompts(str(tmp_path / "missing.txt"))


class _Flaky:
    """A proxy in front of `preftune serve` that answers every third request with HTTP 500."""

    def __init__(self, target):
        self.n, flaky = 0, self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                flaky.n += 1
                if flaky.n % 3 == 0:
                    data, code = b'{"error": "injected"}', 500
                else:
                    req = urllib.request.Request(target + "/chat/completions", data=body,
                                                 headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(req, timeout=30) as r:
                        data, code = r.read(), 200
                send_json(self, code, data)

        self.server, self.url = serve_in_thread(H)


def test_judge_path_trains_end_to_end_against_preftune_serve(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    judge_model = build_model(len(tokenizer), seed=3, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    server = make_server(ChatModel(judge_model, tokenizer, "judge", max_tokens_cap=128), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    flaky = _Flaky(f"http://127.0.0.1:{server.server_address[1]}/v1")
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    try:
        # the judge decides; a tiny length term breaks the ties a random judge produces
        ensemble = f"online.reward_ensemble=[[\"judge:{flaky.url}#judge\", 1.0], [\"fn:conftest:length_reward\", 0.01]]"
        args = ["iterate", *_common(tmp_path, tiny_model_dir, "judged"), "online.rounds=1", ensemble]
        assert main(args) == 0
        rounds = json.loads((tmp_path / "judged" / "rounds.json").read_text())
        assert rounds[1]["steps"] > 0 and rounds[1]["failed"] == 0  # every injected 500 was retried
        calls_before = flaky.n
        assert flaky.n >= 3
        (tmp_path / "judged" / "round-1" / "eval.json").unlink()  # redo the round: all verdicts are cached
        (tmp_path / "judged" / "round-0-eval.json").unlink()
        assert main(args) == 0
        assert flaky.n == calls_before
    finally:
        server.shutdown()
        flaky.server.shutdown()


def test_a_dead_judge_is_counted_and_skipped_without_crashing(tmp_path, tiny_model_dir, monkeypatch):
    args = ["iterate", *_common(tmp_path, tiny_model_dir, "dead"), "online.rounds=1", "online.judge_retries=1",
            "online.judge_backoff_s=0.01",
            "online.reward=judge:http://127.0.0.1:9/v1", "online.eval_prompts_path="]
    assert main(args) == 0
    counts = json.loads((tmp_path / "dead" / "round-1" / "counts.json").read_text())
    assert counts["failed"] == 12 and counts["pairs"] == 0


def test_message_prompts_make_conversational_pairs_that_the_round_trains_on(tmp_path, tiny_model_dir):
    """Chat-message prompts (as `preftune data arithmetic` writes them) give pairs whose prompt is
    a message list; the round's training reads them as conversational (it was forced to the
    text format and stopped at line 1)."""
    prompts = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS])
    args = [a for a in _common(tmp_path, tiny_model_dir, "chat") if not a.startswith("online.")]
    assert main(["iterate", *args, f"online.prompts_path={prompts}", "online.reward=fn:conftest:length_reward",
                 "online.max_new_tokens=6", "online.samples_per_prompt=3", "online.rounds=1"]) == 0
    first = json.loads((tmp_path / "chat" / "round-1" / "pairs.jsonl").read_text().splitlines()[0])
    assert isinstance(first["prompt"], list) and first["chosen"][0]["role"] == "assistant"
    assert json.loads((tmp_path / "chat" / "rounds.json").read_text())[-1]["steps"] > 0
