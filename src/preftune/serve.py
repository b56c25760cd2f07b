"""`preftune serve MODEL_OR_RUN`: an OpenAI-compatible chat server on localhost.

Endpoints: GET /v1/models, POST /v1/chat/completions (non-streaming, n=1), GET /health.
`response_format` of type `json_schema` is honoured by constrained decoding for flat schemas:
an enum or a bounded integer property is chosen among its allowed values by the model's
log-probability of each value's text in context (greedy), a string property is generated up to
the closing quote. So even a small model answers a judge's schema with valid JSON, and the
judge client can be tested against a real server. Standard library HTTP only; one generation at
a time; request bodies over 1 MB and max_tokens over the server's cap are refused with 400.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

__all__ = ["ChatModel", "make_server", "load_chat_model"]

MAX_BODY = 1 << 20


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
        tok = self.tokenizer
        if tok.chat_template:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok("\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:")["input_ids"]

    @torch.no_grad()
    def _generate(self, ids: list[int], *, max_tokens: int, temperature: float, top_p: float, seed: int | None,
                  stop_at: str | None = None) -> tuple[list[int], str]:
        tok = self.tokenizer
        if seed is not None:
            torch.manual_seed(seed)
        sample = temperature > 0
        out = self.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  do_sample=sample, temperature=temperature if sample else None,
                                  top_p=top_p if sample else None, top_k=None, max_new_tokens=max_tokens,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[0, len(ids):].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        text = tok.decode(new, skip_special_tokens=True)
        if stop_at and stop_at in text:
            text = text[: text.index(stop_at)]
        return new, text

    @torch.no_grad()
    def _logp(self, context: list[int], continuation: list[int]) -> float:
        ids = torch.tensor([context + continuation])
        logits = self.model(input_ids=ids, use_cache=False).logits[0, len(context) - 1: -1].float()
        return torch.log_softmax(logits, -1).gather(1, torch.tensor(continuation)[:, None]).sum().item()

    def _constrained(self, ids: list[int], schema: dict) -> str:
        """Flat JSON object following `schema`'s properties in order."""
        tok, props = self.tokenizer, schema.get("properties")
        if schema.get("type") != "object" or not isinstance(props, dict) or not props:
            raise BadRequest("json_schema: only flat object schemas with properties are supported")
        text = "{"
        for i, (key, rule) in enumerate(props.items()):
            text += ("" if i == 0 else ", ") + json.dumps(key) + ": "
            if "enum" in rule:
                options = [json.dumps(v) for v in rule["enum"]]
            elif rule.get("type") == "integer" and "minimum" in rule and "maximum" in rule:
                options = [str(v) for v in range(int(rule["minimum"]), int(rule["maximum"]) + 1)]
            elif rule.get("type") == "string":
                context = ids + tok(text + '"', add_special_tokens=False)["input_ids"]
                _, value = self._generate(context, max_tokens=32, temperature=0.0, top_p=1.0, seed=None, stop_at='"')
                text += json.dumps(value.split("\n")[0].strip())
                continue
            else:
                raise BadRequest(f"json_schema: property {key!r} needs an enum, bounded integer or string type")
            context = ids + tok(text, add_special_tokens=False)["input_ids"]
            scores = [self._logp(context, tok(o, add_special_tokens=False)["input_ids"]) for o in options]
            text += options[max(range(len(options)), key=scores.__getitem__)]
        return text + "}"

    def chat(self, body: dict) -> dict:
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        if body.get("stream"):
            raise BadRequest("stream=true is not supported")
        if body.get("n", 1) != 1:
            raise BadRequest("only n=1 is supported")
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or min(256, self.cap)
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= self.cap:
            raise BadRequest(f"max_tokens must be an integer in [1, {self.cap}]")
        temperature, top_p = float(body.get("temperature", 1.0)), float(body.get("top_p", 1.0))
        ids = self._prompt_ids(body.get("messages"))
        fmt = body.get("response_format") or {}
        with self.lock:
            if fmt.get("type") == "json_schema":
                schema = (fmt.get("json_schema") or {}).get("schema")
                if not isinstance(schema, dict):
                    raise BadRequest("response_format.json_schema.schema must be an object")
                content, finish = self._constrained(ids, schema), "stop"
                n_new = len(self.tokenizer(content, add_special_tokens=False)["input_ids"])
            else:
                new, content = self._generate(ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                              seed=body.get("seed"))
                n_new, finish = len(new), "stop" if len(new) < max_tokens else "length"
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": [{"index": 0, "finish_reason": finish,
                                                 "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": n_new, "total_tokens": len(ids) + n_new}}


def _handler(chat: ChatModel):
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
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, message: str):
            self._send(code, {"error": {"message": message, "type": "invalid_request_error" if code < 500
                                        else "server_error"}})

        def do_GET(self):  # noqa: N802 - the stdlib's name
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": chat.name, "object": "model", "owned_by": "preftune"}]})
            elif self.path == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._error(404, f"unknown path {self.path}")

        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._error(404, f"unknown path {self.path}")
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self._error(400, f"request body over {MAX_BODY} bytes")
            try:
                body = json.loads(self.rfile.read(length) or b"null")
                self._send(200, chat.chat(body))
            except (json.JSONDecodeError, BadRequest) as err:
                self._error(400, str(err))
            except Exception as err:  # noqa: BLE001 - answer 500 and keep serving
                self._error(500, f"{type(err).__name__}: {err}")

    return Handler


def make_server(chat: ChatModel, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server bound to (host, port); port 0 picks a free one (see `server.server_address`)."""
    return ThreadingHTTPServer((host, port), _handler(chat))


def load_chat_model(name_or_run: str, *, max_tokens_cap: int = 512) -> ChatModel:
    """A run directory (its model/: adapter or full model) or anything `model.name_or_path` takes."""
    from .models import load_model, load_tokenizer, resolve_model_dir

    run = Path(name_or_run)
    if (run / "config.yaml").is_file() and (run / "model").is_dir():
        from .config import load_config
        from .evaluate import load_run_policy

        cfg = load_config(run / "config.yaml")
        base_dir = resolve_model_dir(cfg.model.name_or_path)
        model = load_run_policy(run, load_model(base_dir))
        return ChatModel(model, load_tokenizer(base_dir), run.name, max_tokens_cap)
    model_dir = resolve_model_dir(name_or_run)
    return ChatModel(load_model(model_dir), load_tokenizer(model_dir), Path(name_or_run).name, max_tokens_cap)
