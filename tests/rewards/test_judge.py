"""The judge client against `preftune serve` (tiny model) and against a faulty fake server."""

import json
import math
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler

import pytest

from conftest import build_model, send_json, serve_in_thread
from preftune.rewards.judge import PAIRWISE_SCHEMA, SCORE_SCHEMA, JudgeClient, JudgeReward, validate
from preftune.serve import ChatModel, make_server


@pytest.fixture
def served(tokenizer):
    """`preftune serve` on an ephemeral localhost port with the tiny model; stopped afterwards."""
    model = build_model(len(tokenizer), eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    server = make_server(ChatModel(model, tokenizer, "tiny", max_tokens_cap=128), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_serve_speaks_the_openai_chat_api(served):
    assert _get(served + "/models")["data"][0]["id"] == "tiny"
    code, reply = _post(served + "/chat/completions", {"model": "tiny", "max_tokens": 8, "seed": 1,
                                                       "messages": [{"role": "user", "content": "The movie was"}]})
    assert code == 200 and reply["object"] == "chat.completion"
    assert isinstance(reply["choices"][0]["message"]["content"], str) and reply["usage"]["completion_tokens"] <= 8
    body = {"messages": [{"role": "user", "content": "rate"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "v", "schema": SCORE_SCHEMA}}}
    code, reply = _post(served + "/chat/completions", body)
    verdict = validate(json.loads(reply["choices"][0]["message"]["content"]), SCORE_SCHEMA)
    assert code == 200 and 1 <= verdict["score"] <= 10  # a random tiny model, constrained to the schema
    assert _post(served + "/chat/completions", {"messages": "hi"})[0] == 400
    assert _post(served + "/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6})[0] == 400
    assert _post(served + "/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True})[0] == 400
    assert _post(served.replace("/v1", "") + "/nope", {})[0] == 404


def test_judge_scores_through_the_server_and_a_rerun_makes_zero_calls(served, tmp_path):
    first = JudgeReward("judge", JudgeClient(served, "tiny", cache_dir=tmp_path / "cache"))
    scores = first.score(["q1", "q2", "q3"], ["a", "b", "c"])
    assert all(1 <= s <= 10 for s in scores) and first.client.stats["calls"] == 3
    assert all(isinstance(r, str) for r in first.last_rationales)
    p = first.compare("q", "a", "b")
    assert p in (0.0, 0.5, 1.0)
    again = JudgeReward("judge", JudgeClient(served, "tiny", cache_dir=tmp_path / "cache"))
    assert again.score(["q1", "q2", "q3"], ["a", "b", "c"]) == scores and again.compare("q", "a", "b") == p
    assert again.client.stats["calls"] == 0 and again.client.stats["cache_hits"] == 5


class _Fake:
    """A scripted OpenAI-compatible server: each request pops the next behaviour."""

    def __init__(self, script):
        self.script, self.seen = list(script), []
        fake = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.seen.append({"auth": self.headers.get("Authorization"), "body": body})
                kind = fake.script.pop(0) if fake.script else "ok"
                if kind == "sleep":
                    time.sleep(0.6)
                    kind = "ok"
                if kind == "500":
                    return self._reply(500, {"error": "boom"})
                if kind == "400":
                    return self._reply(400, {"error": "bad"})
                content = {"ok": json.dumps({"score": 7, "rationale": "fine"}), "malformed": "score: seven",
                           "extra": json.dumps({"score": 7, "mood": "x"}), "range": json.dumps({"score": 11}),
                           "A": json.dumps({"winner": "A"}), "prefer_good": None}[kind]
                if kind == "prefer_good":
                    text = body["messages"][-1]["content"]
                    content = json.dumps({"winner": "A" if text.index("good") < text.index("Response B") else "B"})
                self._reply(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})

            def _reply(self, code, obj):
                send_json(self, code, json.dumps(obj).encode())

        self.server, self.url = serve_in_thread(H)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _client(fake, tmp_path, **kw):
    return JudgeClient(fake.url, "m", cache_dir=tmp_path / "c", backoff_s=0.01, timeout_s=0.3, **kw)


def test_http_500_malformed_json_and_timeouts_are_retried_then_succeed(tmp_path):
    fake = _Fake(["500", "malformed", "sleep", "extra", "range", "ok"])
    try:
        client = _client(fake, tmp_path, retries=5)
        assert client.ask([{"role": "user", "content": "x"}], SCORE_SCHEMA) == {"score": 7, "rationale": "fine"}
        assert client.stats == {"calls": 6, "cache_hits": 0, "retries": 5, "failures": 0}
    finally:
        fake.close()


def test_failures_are_counted_and_scored_nan_never_raised(tmp_path):
    fake = _Fake(["500"] * 4 + ["400"] + ["ok"])
    try:
        judge = JudgeReward("judge", _client(fake, tmp_path, retries=3))
        scores = judge.score(["p1", "p2", "p3"], ["a", "b", "c"])
        assert math.isnan(scores[0]) and math.isnan(scores[1]) and scores[2] == 7.0  # 4x500, then 400 (no retry)
        assert judge.client.stats["failures"] == 2 and judge.last_rationales[:2] == [None, None]
        assert len(fake.seen) == 6
        rerun = JudgeReward("judge", _client(fake, tmp_path, retries=0))
        rerun.score(["p3"], ["c"])
        assert rerun.client.stats["calls"] == 0  # only successes are cached; failures are asked again
    finally:
        fake.close()


def test_both_orders_cancel_position_bias(tmp_path):
    fake = _Fake(["A", "A", "prefer_good", "prefer_good"])
    try:
        judge = JudgeReward("judge", _client(fake, tmp_path))
        assert judge.compare("q", "x", "y") == 0.5  # always "A": no preference survives the swap
        assert judge.compare("q", "a good answer", "a bad answer") == 1.0
    finally:
        fake.close()


def test_api_key_is_sent_and_never_written(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_JUDGE_API_KEY", "sk-secret-123")
    fake = _Fake(["ok"])
    try:
        client = _client(fake, tmp_path)
        client.ask([{"role": "user", "content": "x"}], SCORE_SCHEMA)
        assert fake.seen[0]["auth"] == "Bearer sk-secret-123"
        written = "".join(p.read_text() + p.name for p in (tmp_path / "c").rglob("*") if p.is_file())
        assert written and "sk-secret-123" not in written
    finally:
        fake.close()


def test_strict_validation():
    assert validate({"winner": "tie"}, PAIRWISE_SCHEMA) == {"winner": "tie"}
    for bad in ({"winner": "C"}, {}, {"winner": "A", "x": 1}, ["A"]):
        with pytest.raises(ValueError):
            validate(bad, PAIRWISE_SCHEMA)
    with pytest.raises(ValueError):
        validate({"score": True}, SCORE_SCHEMA)


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_origin_never_carries_the_api_key(tmp_path, monkeypatch, code):
    """The judge's URL answers with a redirect to another port (another origin): the client refuses
    it as a counted failure, so the key never reaches the other server."""
    from http.server import BaseHTTPRequestHandler

    elsewhere = []

    class Thief(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):  # noqa: N802
            elsewhere.append(self.headers.get("Authorization"))
            send_json(self, 200, b"{}")

        do_POST = do_GET  # noqa: N815

    thief, thief_url = serve_in_thread(Thief)

    class Redirect(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(code)
            self.send_header("Location", thief_url + "/chat/completions")
            self.send_header("Content-Length", "0")
            self.end_headers()

    server, url = serve_in_thread(Redirect)
    monkeypatch.setenv("PREFTUNE_JUDGE_API_KEY", "sk-secret-123")
    try:
        client = JudgeClient(url, "m", cache_dir=tmp_path / "c", backoff_s=0.01, timeout_s=2, retries=2)
        assert client.ask([{"role": "user", "content": "x"}], {"type": "object", "properties": {}}) is None
        assert elsewhere == []
        assert client.stats["failures"] == 1 and client.stats["calls"] == 1  # refused, not retried
    finally:
        for s in (server, thief):
            s.shutdown()
            s.server_close()
