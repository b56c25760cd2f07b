"""`preftune serve MODEL_OR_RUN`: an OpenAI-compatible chat server on localhost.

Endpoints: GET /v1/models, POST /v1/chat/completions (non-streaming, n=1), GET /health.
`response_format` of type `json_schema` is honoured by constrained decoding for flat schemas:
an enum or a bounded integer property is chosen among its allowed values by the model's
log-probability of each value's text in context (greedy), a string property is generated up to
the closing quote. So even a small model answers a judge's schema with valid JSON, and the
judge client can be tested against a real server. Standard library HTTP only (see httpguard.py
for why, and for the Host / content-type / Content-Length checks every request passes); one
generation at a time. Work per request is capped so no request can hold the generation lock for
long: prompt + max_tokens within the model's context, max_tokens within the server's cap, at most
MAX_SCHEMA_PROPERTIES properties and MAX_SCHEMA_OPTIONS enum values / integer-range values per
schema; anything over is a 400 with a message. `--api-key` requires `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import json
import math
import secrets
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import torch

from ..config import load_config
from ..data import render
from ..models.generate import load_run_policy
from ..models.loading import load_model, load_tokenizer, resolve_model_dir
from ..models.sampler import sample
from ..utils.devices import place
from ..utils.httpguard import (
    QuietServer,
    Refused,
    check_bearer,
    check_host,
    check_post,
    parse_json,
    read_body,
)

__all__ = ["ChatModel", "make_server", "load_chat_model"]

MAX_BODY = 1 << 20
MAX_SCHEMA_PROPERTIES = 16
MAX_SCHEMA_OPTIONS = 128   # values scored for one schema (each is one forward pass)
MAX_SCHEMA_WORK = 1 << 16  # tokens all of a schema's forward passes may process together
STRING_TOKENS = 32         # what a string property may generate


class BadRequest(ValueError):
    pass


class ChatModel:
    def __init__(self, model, tokenizer, name: str, max_tokens_cap: int = 512):
        self.model, self.tokenizer, self.name, self.cap = model.eval(), tokenizer, name, max_tokens_cap
        self.lock = threading.Lock()

    def _prompt_ids(self, messages) -> list[int]:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages):
            raise BadRequest("messages must be a non-empty list of {role, content} objects")
        return render.prompt_ids(self.tokenizer, messages)  # exactly what training renders

    @torch.no_grad()
    def _generate(self, ids: list[int], *, max_tokens: int, temperature: float, top_p: float, seed: int | None,
                  stop_at: str | None = None) -> tuple[list[int], str]:
        tok = self.tokenizer
        # the one sampler (models/sampler.py) every other path samples through; a request without a
        # seed gets a fresh one, so only a seeded request repeats
        seed = secrets.randbits(62) if seed is None else seed
        greedy = temperature <= 0
        new = sample(self.model, [ids], n=1, max_new_tokens=max_tokens, seed=seed, eos_id=tok.eos_token_id,
                     pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, greedy=greedy,
                     temperature=1.0 if greedy else temperature, top_p=1.0 if greedy else top_p)[0].completion
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        text = tok.decode(new, skip_special_tokens=True)
        if stop_at and stop_at in text:
            text = text[: text.index(stop_at)]
        return new, text

    @torch.no_grad()
    def _logp(self, context: list[int], continuation: list[int]) -> float:
        ids = place(torch.tensor([context + continuation]), self.model)
        logits = self.model(input_ids=ids, use_cache=False).logits[0, len(context) - 1: -1].float()
        return torch.log_softmax(logits, -1).gather(1, ids[0, len(context):, None]).sum().item()

    def _constrained(self, ids: list[int], schema: dict) -> str:
        """Flat JSON object following `schema`'s properties in order (checked by _check_schema_budget)."""
        tok = self.tokenizer
        text = "{"
        for i, (key, rule) in enumerate(schema["properties"].items()):
            text += ("" if i == 0 else ", ") + json.dumps(key) + ": "
            options = _options(key, rule)
            if options is None:  # a string property
                context = ids + tok(text + '"', add_special_tokens=False)["input_ids"]
                _, value = self._generate(context, max_tokens=STRING_TOKENS, temperature=0.0, top_p=1.0, seed=None,
                                          stop_at='"')
                text += json.dumps(value.split("\n")[0].strip())
                continue
            context = ids + tok(text, add_special_tokens=False)["input_ids"]
            scores = [self._logp(context, tok(o, add_special_tokens=False)["input_ids"]) for o in options]
            text += options[max(range(len(options)), key=scores.__getitem__)]
        return text + "}"

    def _check_schema_budget(self, ids: list[int], schema: dict, context: int | None) -> None:
        """A schema's answer counts against the context and --max-tokens-cap like max_tokens does, and
        the forward passes that score its values against MAX_SCHEMA_WORK tokens: long enum values or
        keys escaped both (one request held the generation lock 85 s while another waited)."""
        props = schema.get("properties")
        if schema.get("type") != "object" or not isinstance(props, dict) or not props:
            raise BadRequest("json_schema: only flat object schemas with properties are supported")
        _check_schema_cost(props)
        n = lambda text: len(self.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        out, work = 1, 0
        for key, rule in props.items():
            out += n(json.dumps(key) + ": ") + 1
            options = _options(key, rule)
            if options is not None:
                lengths = [n(o) for o in options]
                work += sum(len(ids) + out + k for k in lengths)  # each value is one forward over the context
                out += max(lengths)
            else:
                work += len(ids) + out + STRING_TOKENS
                out += STRING_TOKENS
        if out > self.cap:
            raise BadRequest(f"json_schema: its answer may take {out} tokens, over this server's cap of {self.cap}")
        if context and len(ids) + out > context:
            raise BadRequest(f"prompt ({len(ids)} tokens) + the schema's answer ({out}) exceeds the model's "
                             f"context of {context} tokens")
        if work > MAX_SCHEMA_WORK:
            raise BadRequest(f"json_schema: scoring its values would process about {work} tokens (at most "
                             f"{MAX_SCHEMA_WORK}); shorten the prompt or narrow the schema")

    def chat(self, body: dict) -> dict:
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        if body.get("stream"):
            raise BadRequest("stream=true is not supported")
        if body.get("n", 1) != 1:
            raise BadRequest("only n=1 is supported")
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or min(256, self.cap)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= self.cap:
            raise BadRequest(f"max_tokens must be an integer in [1, {self.cap}]")
        temperature, top_p, seed = body.get("temperature", 1.0), body.get("top_p", 1.0), body.get("seed")
        if not _number(temperature) or not 0 <= temperature <= 2:
            raise BadRequest("temperature must be a number in [0, 2]")
        if not _number(top_p) or not 0 < top_p <= 1:
            raise BadRequest("top_p must be a number in (0, 1]")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32):
            raise BadRequest("seed must be an integer in [0, 2**32)")
        ids = self._prompt_ids(body.get("messages"))
        context = _context_length(self.model)
        if context and len(ids) + max_tokens > context:
            raise BadRequest(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                             f"context of {context} tokens")
        fmt = body.get("response_format") or {}
        if not isinstance(fmt, dict):
            raise BadRequest("response_format must be an object")
        schema = None
        if fmt.get("type") == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise BadRequest("response_format.json_schema.schema must be an object")
            self._check_schema_budget(ids, schema, context)  # before the lock: a refused request holds nothing
        with self.lock:
            if schema is not None:
                content, finish = self._constrained(ids, schema), "stop"
                n_new = len(self.tokenizer(content, add_special_tokens=False)["input_ids"])
            else:
                new, content = self._generate(ids, max_tokens=max_tokens, temperature=float(temperature),
                                              top_p=float(top_p), seed=seed)
                n_new, finish = len(new), "stop" if len(new) < max_tokens else "length"
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": [{"index": 0, "finish_reason": finish,
                                                 "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": n_new, "total_tokens": len(ids) + n_new}}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _context_length(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _options(key: str, rule: dict) -> list[str] | None:
    """The JSON texts a property may take (an enum, a bounded integer), None for a string property;
    anything else is a 400. The one reading of a rule, for the budget and for decoding alike."""
    if "enum" in rule:
        return [json.dumps(v) for v in rule["enum"]]
    if rule.get("type") == "integer" and "minimum" in rule and "maximum" in rule:
        return [str(v) for v in range(rule["minimum"], rule["maximum"] + 1)]
    if rule.get("type") == "string":
        return None
    raise BadRequest(f"json_schema: property {key!r} needs an enum, bounded integer or string type")


def _check_schema_cost(props: dict) -> None:
    """Refuse a schema whose constrained decoding would cost more than the caps allow."""
    if len(props) > MAX_SCHEMA_PROPERTIES:
        raise BadRequest(f"json_schema: at most {MAX_SCHEMA_PROPERTIES} properties")
    total = 0
    for key, rule in props.items():
        if not isinstance(rule, dict):
            raise BadRequest(f"json_schema: property {key!r} must be an object")
        if "enum" in rule:
            if not isinstance(rule["enum"], list) or not rule["enum"]:
                raise BadRequest(f"json_schema: property {key!r}: enum must be a non-empty list")
            total += len(rule["enum"])
        elif rule.get("type") == "integer" and "minimum" in rule and "maximum" in rule:
            lo, hi = rule["minimum"], rule["maximum"]
            if not (isinstance(lo, int) and isinstance(hi, int)) or isinstance(lo, bool) or isinstance(hi, bool) \
                    or hi < lo:
                raise BadRequest(f"json_schema: property {key!r}: minimum <= maximum must be integers")
            total += hi - lo + 1
        else:
            total += 1
        if total > MAX_SCHEMA_OPTIONS:
            raise BadRequest(f"json_schema: more than {MAX_SCHEMA_OPTIONS} enum/integer values to score "
                             "(narrow the ranges)")


def _handler(chat: ChatModel, api_key: str | None = None):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 60

        def log_message(self, *args):  # quiet; the caller logs what matters
            pass

        def _send(self, code: int, obj: dict):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if code >= 400:
                self.send_header("Connection", "close")  # the rest of a refused body is not read
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, message: str):
            self._send(code, {"error": {"message": message, "type": "invalid_request_error" if code < 500
                                        else "server_error"}})

        def _guard(self):
            check_host(self)
            check_bearer(self, api_key)

        def do_GET(self):  # noqa: N802 - the stdlib's name
            try:
                self._guard()
            except Refused as err:
                return self._error(err.status, err.message)
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": chat.name, "object": "model", "owned_by": "preftune"}]})
            elif self.path == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._error(404, "unknown path")

        def do_POST(self):  # noqa: N802
            try:
                self._guard()
                if self.path.rstrip("/") != "/v1/chat/completions":
                    raise Refused(404, "unknown path")
                check_post(self)
                body = parse_json(read_body(self, MAX_BODY))
                self._send(200, chat.chat(body))
            except Refused as err:
                self._error(err.status, err.message)
            except BadRequest as err:
                self._error(400, str(err))
            except Exception as err:  # noqa: BLE001 - answer 500 and keep serving
                self._error(500, f"{type(err).__name__}: {err}")

    return Handler


def make_server(chat: ChatModel, host: str = "127.0.0.1", port: int = 8000, *,
                api_key: str | None = None) -> QuietServer:
    """A server bound to (host, port); port 0 picks a free one (see `server.server_address`)."""
    return QuietServer((host, port), _handler(chat, api_key))


def load_chat_model(name_or_run: str, *, max_tokens_cap: int = 512) -> ChatModel:
    """A run directory (its model/: adapter or full model) or anything `model.name_or_path` takes."""
    run = Path(name_or_run)
    if (run / "config.yaml").is_file() and (run / "model").is_dir():
        cfg = load_config(run / "config.yaml", saved_run=True)
        base_dir = resolve_model_dir(cfg.model.name_or_path)
        model = load_run_policy(run, load_model(base_dir))
        return ChatModel(model, load_tokenizer(base_dir), run.name, max_tokens_cap)
    model_dir = resolve_model_dir(name_or_run)
    return ChatModel(load_model(model_dir), load_tokenizer(model_dir), Path(name_or_run).name, max_tokens_cap)
