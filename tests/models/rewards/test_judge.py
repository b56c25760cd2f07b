"""The judge client against `preftune serve` (tiny model) and against a faulty fake server."""

import json
import math
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler

import pytest

from conftest import build_model, send_json, serve_in_thread
from preftune.apps.serve import ChatModel, make_server
from preftune.models.rewards.judge import PAIRWISE_SCHEMA, SCORE_SCHEMA, JudgeClient, JudgeReward, validate


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


# ---- hostile peers (issue 36): bounded time and size, secrets never printed ----------------------

def _raw_peer(behaviour):
    """A loopback TCP peer that reads the request and then runs `behaviour(conn)`."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(65536)
            threading.Thread(target=behaviour, args=(conn, stop), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/v1", lambda: (stop.set(), listener.close())


def _drip(conn, stop):
    """A valid status line and headers, then one byte of body every 0.2 s, for ever."""
    try:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        while not stop.wait(0.2):
            conn.sendall(b" ")
    except OSError:
        pass


def _huge(conn, stop):
    body = b'{"choices": [{"message": {"content": "' + b"x" * (3 << 20) + b'"}}]}'
    try:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    except OSError:
        pass


def test_a_drip_feeding_judge_ends_within_its_timeout(tmp_path):
    """A socket timeout never trips on a peer that sends a byte every 0.2 s (it stalled a call for
    46 s and then crashed with IncompleteRead); timeout_s now bounds the whole exchange."""
    url, close = _raw_peer(_drip)
    try:
        judge = JudgeReward("judge", JudgeClient(url, "m", cache_dir=tmp_path, timeout_s=0.5, retries=1,
                                                  backoff_s=0.01))
        start = time.monotonic()
        assert math.isnan(judge.score(["p"], ["c"])[0])
        assert time.monotonic() - start < 3 and judge.client.stats["calls"] == 2
        assert judge.client.last_problem == "no complete reply within 0.5 s"
    finally:
        close()


def test_a_huge_judge_reply_is_not_read_whole_and_the_cli_says_so_in_one_line(tmp_path, capsys):
    from preftune.cli import main

    url, close = _raw_peer(_huge)
    try:
        data = tmp_path / "c.jsonl"
        data.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
        rc = main(["score", str(data), "--reward", f"judge:{url}", "--out", str(tmp_path / "o.jsonl")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "reply larger than 1048576 bytes" in err[-1], err
        assert url.split("/v1")[0].split("//")[1] in err[-1] and not (tmp_path / "o.jsonl").exists()
    finally:
        close()


@pytest.mark.parametrize("url,problem", [
    ("http://user:s3cret@127.0.0.1:9/v1", "credentials in the URL are refused"),
    ("http://[::1/v1", "not a valid URL"),
    ("http://127.0.0.1:99999/v1", "not a valid URL"),
    ("http:///v1", "the URL names no host"),
])
def test_bad_judge_urls_are_one_line_and_never_echo_a_password(url, problem, capsys, tmp_path):
    from preftune.cli import main

    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    rc = main(["score", str(data), "--reward", f"judge:{url}", "--out", str(tmp_path / "o.jsonl")])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and problem in err[0], err
    assert "s3cret" not in captured.err + captured.out


def test_an_api_key_with_a_line_break_is_refused_without_printing_it(tmp_path, monkeypatch, capsys):
    from preftune.cli import main

    fake = _Fake(["ok"])
    monkeypatch.setenv("PREFTUNE_JUDGE_API_KEY", "sk-abc\r\nX-Injected: 1")
    try:
        data = tmp_path / "c.jsonl"
        data.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
        rc = main(["score", str(data), "--reward", f"judge:{fake.url}", "--out", str(tmp_path / "o.jsonl")])
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "$PREFTUNE_JUDGE_API_KEY" in err[0] and "control character" in err[0]
        assert "sk-abc" not in captured.err + captured.out and not fake.seen
    finally:
        fake.close()


def test_preftune_score_against_a_drip_feeding_judge_is_one_line_in_bounded_time(tmp_path, capsys):
    from preftune.cli import main

    url, close = _raw_peer(_drip)
    try:
        data = tmp_path / "c.jsonl"
        data.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
        start = time.monotonic()
        rc = main(["score", str(data), "--reward", f"judge:{url}", "--out", str(tmp_path / "o.jsonl"),
                   "online.judge_timeout_s=0.5", "online.judge_retries=1", "online.judge_backoff_s=0.01"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "no complete reply within 0.5 s" in err[0], err
        assert time.monotonic() - start < 5 and not (tmp_path / "o.jsonl").exists()
    finally:
        close()
