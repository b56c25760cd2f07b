"""Both local servers under hostile HTTP (issue 16): DNS-rebinding Hosts, cross-origin and
non-JSON POSTs, forged label judgments, malformed Content-Length, oversized or over-costly
requests. Each case sends raw bytes on a socket and asserts the status, a one-line JSON error,
that the server still answers the next request, that nothing was appended to the judgments
file, and that no traceback reached stderr."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from conftest import build_model
from preftune.apps.label import LabelItem, LabelStore, make_label_server
from preftune.apps.serve import ChatModel, make_server


def _raw(port: int, data: bytes, *, shut: bool = False, timeout: float = 10.0) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
                length = [int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length:")]
                if length and len(body) >= length[0]:
                    break
        except (ConnectionResetError, TimeoutError):
            pass
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def _req(method: str, path: str, port: int, *, host: str | None = None, headers: dict | None = None,
         body: bytes = b"", length: str | None = "auto") -> bytes:
    lines = [f"{method} {path} HTTP/1.1"]
    if host is not False:
        lines.append(f"Host: {host or f'127.0.0.1:{port}'}")
    for k, v in (headers or {}).items():
        for value in (v if isinstance(v, list) else [v]):
            lines.append(f"{k}: {value}")
    if length == "auto":
        lines.append(f"Content-Length: {len(body)}")
    elif length is not None:
        lines.append(f"Content-Length: {length}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@pytest.fixture(scope="module")
def label_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("label") / "judgments.jsonl"
    store = LabelStore([LabelItem("p1", "prompt", "a", "b", False), LabelItem("p2", "prompt2", "c", "d", False)], path)
    server = make_label_server(store, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    status, page = _raw(port, _req("GET", "/", port))
    token = page.decode().split('name="preftune-token" content="')[1].split('"')[0]
    yield port, token, path
    server.shutdown()
    server.server_close()


def _judge(token: str, **body) -> tuple[dict, bytes]:
    data = json.dumps({"annotator": "eve", "pair_id": "p1", "choice": "A", **body}).encode()
    return {"Content-Type": "application/json", "X-Preftune-Token": token}, data


def _label_cases(port: int, token: str) -> dict:
    ok_headers, ok_body = _judge(token)
    j = dict(ok_headers)
    return {
        "host-rebinding-get": (_req("GET", "/", port, host="evil.example"), 421),
        "host-rebinding-post": (_req("POST", "/api/judge", port, host="evil.example:80", headers=j, body=ok_body), 421),
        "host-missing": (_req("GET", "/api/next?annotator=x", port, host=False), 421),
        "host-twice": (_req("GET", "/", port, headers={"Host": "evil.example"}), 421),
        "text-plain-post": (_req("POST", "/api/judge", port, headers={**j, "Content-Type": "text/plain"}, body=ok_body), 415),
        "form-post": (_req("POST", "/api/judge", port, headers={**j, "Content-Type": "application/x-www-form-urlencoded"},
                           body=b"annotator=eve&pair_id=p1&choice=A"), 415),
        "no-content-type": (_req("POST", "/api/judge", port, headers={"X-Preftune-Token": token}, body=ok_body), 415),
        "cross-origin": (_req("POST", "/api/judge", port, headers={**j, "Origin": "http://evil.example"}, body=ok_body), 403),
        "origin-null": (_req("POST", "/api/judge", port, headers={**j, "Origin": "null"}, body=ok_body), 403),
        "origin-other-port": (_req("POST", "/api/judge", port, headers={**j, "Origin": "http://127.0.0.1:1"}, body=ok_body), 403),
        "no-token": (_req("POST", "/api/judge", port, headers={"Content-Type": "application/json"}, body=ok_body), 403),
        "wrong-token": (_req("POST", "/api/judge", port, headers={**j, "X-Preftune-Token": "0" * 32}, body=ok_body), 403),
        "negative-length": (_req("POST", "/api/judge", port, headers=j, body=ok_body, length="-1"), 400),
        "non-numeric-length": (_req("POST", "/api/judge", port, headers=j, body=ok_body, length="ten"), 400),
        "plus-length": (_req("POST", "/api/judge", port, headers=j, body=ok_body, length=f"+{len(ok_body)}"), 400),
        "duplicate-length": (_req("POST", "/api/judge", port, headers={**j, "Content-Length": str(len(ok_body))},
                                  body=ok_body), 400),
        "huge-length": (_req("POST", "/api/judge", port, headers=j, body=b"{}", length=str(1 << 40)), 413),
        "missing-length": (_req("POST", "/api/judge", port, headers=j, body=b"", length=None), 411),
        "chunked": (_req("POST", "/api/judge", port, headers={**j, "Transfer-Encoding": "chunked"}, body=b"0\r\n\r\n",
                         length=None), 411),
        "truncated-body": (_req("POST", "/api/judge", port, headers=j, body=ok_body[:10], length=str(len(ok_body))), 400),
        "invalid-json": (_req("POST", "/api/judge", port, headers=j, body=b"{annotator: eve}"), 400),
        "deep-json": (_req("POST", "/api/judge", port, headers=j, body=b"[" * 5000 + b"]" * 5000), 400),
        "nan-json": (_req("POST", "/api/judge", port, headers=j, body=b'{"annotator": NaN}'), 400),
        "duplicate-keys": (_req("POST", "/api/judge", port, headers=j,
                                body=b'{"annotator": "a", "annotator": "b", "pair_id": "p1", "choice": "A"}'), 400),
        "body-is-list": (_req("POST", "/api/judge", port, headers=j, body=b"[]"), 400),
        "annotator-number": (_req("POST", "/api/judge", port, headers=j, body=_judge(token, annotator=5)[1]), 400),
        "annotator-blank": (_req("POST", "/api/judge", port, headers=j, body=_judge(token, annotator="  ")[1]), 400),
        "unknown-pair": (_req("POST", "/api/judge", port, headers=j, body=_judge(token, pair_id="nope")[1]), 400),
        "bad-choice": (_req("POST", "/api/judge", port, headers=j, body=_judge(token, choice="C")[1]), 400),
        "reason-object": (_req("POST", "/api/judge", port, headers=j, body=_judge(token, reason={"x": 1})[1]), 400),
        "unknown-path": (_req("POST", "/api/other", port, headers=j, body=ok_body), 404),
    }


LABEL_CASES = ["host-rebinding-get", "host-rebinding-post", "host-missing", "host-twice", "text-plain-post", "form-post",
               "no-content-type", "cross-origin", "origin-null", "origin-other-port", "no-token", "wrong-token",
               "negative-length", "non-numeric-length", "plus-length", "duplicate-length", "huge-length",
               "missing-length", "chunked", "truncated-body", "invalid-json", "deep-json", "nan-json",
               "duplicate-keys", "body-is-list", "annotator-number", "annotator-blank", "unknown-pair", "bad-choice",
               "reason-object", "unknown-path"]


@pytest.mark.parametrize("case", LABEL_CASES)
def test_label_server_refuses(case, label_server, capsys):
    port, token, path = label_server
    request, expected = _label_cases(port, token)[case]
    before = path.read_bytes() if path.exists() else None
    status, body = _raw(port, request, shut=case == "truncated-body")
    assert status == expected, (status, body)
    assert list(json.loads(body)) == ["error"] and "\n" not in body.decode().strip()
    assert (path.read_bytes() if path.exists() else None) == before
    assert _raw(port, _req("GET", "/api/next?annotator=someone", port))[0] == 200  # still serving
    assert "Traceback" not in capsys.readouterr().err


def test_label_server_takes_a_same_origin_judgment_with_its_token(label_server):
    port, token, path = label_server
    headers, body = _judge(token, annotator="ok-user")
    status, reply = _raw(port, _req("POST", "/api/judge", port, headers={**headers, "Origin": f"http://127.0.0.1:{port}"},
                                    body=body))
    assert status == 200 and json.loads(reply)["done"] == 1
    assert json.loads(path.read_text().splitlines()[-1])["annotator"] == "ok-user"


@pytest.fixture(scope="module")
def chat_server(tokenizer):
    chat = ChatModel(build_model(len(tokenizer), eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id),
                     tokenizer, "tiny", max_tokens_cap=16)
    servers = [make_server(chat, "127.0.0.1", 0), make_server(chat, "127.0.0.1", 0, api_key="sk-local")]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield [s.server_address[1] for s in servers]
    for s in servers:
        s.shutdown()
        s.server_close()


def _chat(**over) -> bytes:
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                       "temperature": 0, **over}).encode()


def _schema(props: dict) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": props}}}}


J = {"Content-Type": "application/json"}
SERVE_CASES = {
    "host-rebinding": (lambda p: _req("POST", "/v1/chat/completions", p, host="evil.example", headers=J, body=_chat()), 421),
    "host-rebinding-get": (lambda p: _req("GET", "/v1/models", p, host="attacker.test:8000"), 421),
    "text-plain": (lambda p: _req("POST", "/v1/chat/completions", p, headers={"Content-Type": "text/plain"},
                                  body=_chat()), 415),
    "cross-origin": (lambda p: _req("POST", "/v1/chat/completions", p, headers={**J, "Origin": "https://evil.example"},
                                    body=_chat()), 403),
    "negative-length": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J, body=_chat(), length="-5"), 400),
    "non-numeric-length": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J, body=_chat(), length="x1"), 400),
    "over-cap-length": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J, body=b"{}", length=str(1 << 30)), 413),
    "missing-length": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J, body=b"", length=None), 411),
    "invalid-json": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J, body=b"{'a': 1}"), 400),
    "deep-json": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J, body=b'{"a":' * 3000 + b"1" + b"}" * 3000), 400),
    "max-tokens-huge": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J, body=_chat(max_tokens=10**9)), 400),
    "max-tokens-bool": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J, body=_chat(max_tokens=True)), 400),
    "temperature-text": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J, body=_chat(temperature="hot")), 400),
    "top-p-zero": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J, body=_chat(top_p=0)), 400),
    "seed-negative": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J, body=_chat(seed=-1)), 400),
    "n-two": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J, body=_chat(n=2)), 400),
    "stream": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J, body=_chat(stream=True)), 400),
    "no-messages": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J, body=_chat(messages=[])), 400),
    "message-content-list": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J,
                                            body=_chat(messages=[{"role": "user", "content": [1]}])), 400),
    "format-string": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J, body=_chat(response_format="json")), 400),
    "schema-int-range": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J,
                                        body=_chat(**_schema({"score": {"type": "integer", "minimum": 0,
                                                                        "maximum": 5000}}))), 400),
    "schema-enum-huge": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J,
                                        body=_chat(**_schema({"w": {"enum": list(range(1000))}}))), 400),
    "schema-many-props": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J,
                                         body=_chat(**_schema({f"k{i}": {"type": "string"} for i in range(40)}))), 400),
    "schema-float-bounds": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J,
                                           body=_chat(**_schema({"s": {"type": "integer", "minimum": 0.5,
                                                                       "maximum": 1e9}}))), 400),
    "schema-int-unbounded": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J,
                                            body=_chat(**_schema({"s": {"type": "integer"}}))), 400),
    "schema-long-enum-values": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J,
                                               body=_chat(**_schema({"w": {"enum": ["word " * 400, "b"]}}))), 400),
    "schema-long-key": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J,
                                       body=_chat(**_schema({"k" * 5000: {"enum": ["a", "b"]}}))), 400),
    "schema-work": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J,
                                   body=_chat(messages=[{"role": "user", "content": "word " * 400}],
                                              **_schema({"s": {"type": "integer", "minimum": 0, "maximum": 120}}))),
                    400),
    "over-context": (lambda p: _req("POST", "/v1/chat/completions", p, headers=J,
                                    body=_chat(messages=[{"role": "user", "content": "word " * 3000}])), 400),
    "unknown-path": (lambda p: _req("POST", "/v1/completions", p, headers=J, body=_chat()), 404),
}


@pytest.mark.parametrize("case", sorted(SERVE_CASES))
def test_serve_refuses(case, chat_server, capsys):
    port = chat_server[0]
    start = time.monotonic()
    status, body = _raw(port, SERVE_CASES[case][0](port))
    assert status == SERVE_CASES[case][1], (status, body)
    assert time.monotonic() - start < 5  # refused before any costly work
    assert list(json.loads(body)) == ["error"] and json.loads(body)["error"]["message"]
    assert _raw(port, _req("GET", "/health", port))[0] == 200
    assert "Traceback" not in capsys.readouterr().err


def test_serve_api_key(chat_server):
    port = chat_server[1]
    assert _raw(port, _req("GET", "/v1/models", port))[0] == 401
    assert _raw(port, _req("GET", "/v1/models", port, headers={"Authorization": "Bearer wrong"}))[0] == 401
    assert _raw(port, _req("POST", "/v1/chat/completions", port, headers=J, body=_chat()))[0] == 401
    auth = {"Authorization": "Bearer sk-local"}
    assert _raw(port, _req("GET", "/v1/models", port, headers=auth))[0] == 200
    status, body = _raw(port, _req("POST", "/v1/chat/completions", port, headers={**J, **auth}, body=_chat()))
    assert status == 200 and json.loads(body)["choices"][0]["message"]["role"] == "assistant"


def test_a_small_schema_within_the_caps_still_answers(chat_server):
    port = chat_server[0]
    body = _chat(**_schema({"score": {"type": "integer", "minimum": 1, "maximum": 10}}))
    status, reply = _raw(port, _req("POST", "/v1/chat/completions", port, headers=J, body=body))
    assert status == 200 and 1 <= json.loads(json.loads(reply)["choices"][0]["message"]["content"])["score"] <= 10


def test_bearer_scheme_is_case_insensitive_and_a_non_ascii_key_is_answered(chat_server):
    """RFC 9110: the auth scheme is case-insensitive ('bearer KEY' was refused); a header with
    non-ASCII bytes made compare_digest raise, and the client got no response at all."""
    port = chat_server[1]
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert _raw(port, _req("GET", "/v1/models", port, headers={"Authorization": f"{scheme} sk-local"}))[0] == 200
    raw = _req("GET", "/v1/models", port).replace(b"Connection: close", "Authorization: Bearer sk-é\r\nConnection: close"
                                                                            .encode("latin-1"))
    assert _raw(port, raw)[0] == 401


def test_the_label_server_answers_a_non_ascii_token_and_drops_a_stalled_client(label_server):
    port, token, path = label_server
    before = path.read_bytes() if path.exists() else b""
    raw = _req("POST", "/api/judge", port, headers={**J, "X-Preftune-Token": "x"}, body=b"{}")
    raw = raw.replace(b"X-Preftune-Token: x", "X-Preftune-Token: é".encode("latin-1"))
    assert _raw(port, raw)[0] == 403
    assert (path.read_bytes() if path.exists() else b"") == before
    # a stalled client is dropped after the handler's timeout (30 s; stdlib applies it to the socket)
    handler = make_label_server(LabelStore([LabelItem("p", "q", "a", "b", False)], path.with_name("other.jsonl")),
                                "127.0.0.1", 0)
    try:
        assert handler.RequestHandlerClass.timeout == 30
    finally:
        handler.server_close()
