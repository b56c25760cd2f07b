"""An LLM judge over an OpenAI-compatible chat API, as a reward source.

Single score: "rate this response 1-10" -> {"score": int, "rationale": str}.
Pairwise: "which response is better" -> {"winner": "A" | "B" | "tie", "rationale": str}, asked
in both orders so that a judge that prefers the first slot cancels out (`compare`, a win
probability), or is caught (`verdict`: a winner only when both orders agree, see
data/pairs.py `both_orders`; pairs built that way drop position-inconsistent verdicts).

Reliability: every request has a timeout; connection errors, timeouts, HTTP 429/5xx and replies
that are not exactly the JSON asked for are retried with exponential backoff; after the last
try the item is counted in `stats["failures"]` and scored NaN (callers skip it), never raised.
Every successful reply is cached on disk (`$PREFTUNE_CACHE/judge/<sha256>.json`, keyed by URL,
model and the full request), so a rerun makes no call for work already done. The API key is
read from the environment variable named by `api_key_env` at request time and is never
written anywhere (not in the cache key, not in files, not in errors).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ...data.pairs import both_orders
from ...utils.envvars import cache_root, env, has_control_characters
from ...utils.errors import ConfigError
from ...utils.progress import progress
from ...utils.safeio import atomic_write, read_json

__all__ = ["JudgeClient", "JudgeReward", "SCORE_SCHEMA", "PAIRWISE_SCHEMA", "validate"]

SCORE_SCHEMA = {"type": "object", "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10},
                                                 "rationale": {"type": "string"}},
                "required": ["score"], "additionalProperties": False}
PAIRWISE_SCHEMA = {"type": "object", "properties": {"winner": {"type": "string", "enum": ["A", "B", "tie"]},
                                                    "rationale": {"type": "string"}},
                   "required": ["winner"], "additionalProperties": False}

_SYSTEM = "You are a careful, impartial evaluator of assistant responses. Reply with JSON only."


def _score_messages(prompt: str, response: str) -> list[dict]:
    return [{"role": "system", "content": _SYSTEM},
            {"role": "user", "content": f"Prompt:\n{prompt}\n\nResponse:\n{response}\n\nRate how helpful, honest and "
                                        'harmless the response is, from 1 (worst) to 10 (best). Reply as JSON: '
                                        '{"score": <integer 1-10>, "rationale": "<one sentence>"}'}]


def _pair_messages(prompt: str, a: str, b: str) -> list[dict]:
    return [{"role": "system", "content": _SYSTEM},
            {"role": "user", "content": f"Prompt:\n{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\nWhich response "
                                        'is better? Reply as JSON: {"winner": "A" | "B" | "tie", "rationale": '
                                        '"<one sentence>"}'}]


class _Malformed(ValueError):
    pass


MAX_REPLY_BYTES = 1 << 20  # a verdict is a few hundred bytes; a 300 MB reply was read whole


def _masked(url: str) -> str:
    """The URL without any user:password@ part, for messages."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.username is None and parts.password is None:
            return url
        host = parts.hostname or ""
        netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit((parts.scheme, "***@" + netloc, parts.path, parts.query, parts.fragment))
    except ValueError:
        return url.split("@")[-1] if "@" in url else url


def validate(obj, schema: dict) -> dict:
    """Strict check of a reply against the small schemas above (no extra keys, types, enums, ranges)."""
    if not isinstance(obj, dict):
        raise _Malformed(f"expected a JSON object, got {type(obj).__name__}")
    props = schema["properties"]
    extra = set(obj) - set(props)
    if extra and schema.get("additionalProperties", True) is False:
        raise _Malformed(f"unexpected keys {sorted(extra)}")
    for key in schema["required"]:
        if key not in obj:
            raise _Malformed(f"missing {key!r}")
    for key, value in obj.items():
        rule = props[key]
        if rule["type"] == "integer" and (not isinstance(value, int) or isinstance(value, bool)
                                          or not rule["minimum"] <= value <= rule["maximum"]):
            raise _Malformed(f"{key}: expected an integer in [{rule['minimum']}, {rule['maximum']}], got {value!r}")
        if rule["type"] == "string" and not isinstance(value, str):
            raise _Malformed(f"{key}: expected a string")
        if "enum" in rule and value not in rule["enum"]:
            raise _Malformed(f"{key}: {value!r} is not one of {rule['enum']}")
    return obj


@dataclass
class JudgeClient:
    base_url: str                     # e.g. http://127.0.0.1:8000/v1
    model: str = "judge"
    api_key_env: str = "PREFTUNE_JUDGE_API_KEY"
    timeout_s: float = 30.0
    retries: int = 3                  # tries after the first
    backoff_s: float = 0.5            # sleep backoff_s * 2**attempt between tries
    max_tokens: int = 96
    cache_dir: Path | None = None
    stats: dict = field(default_factory=lambda: {"calls": 0, "cache_hits": 0, "retries": 0, "failures": 0})
    last_problem: str = ""            # why the last failed try failed, for the one-line error

    def __post_init__(self):
        shown = _masked(self.base_url)
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(shown, "judge", "expected an http(s):// URL of an OpenAI-compatible API")
        try:
            parts = urllib.parse.urlsplit(self.base_url)
            _ = parts.port  # a port out of range or not a number raises here
        except ValueError as err:
            raise ConfigError(shown, "judge", f"not a valid URL ({err})") from None
        if not parts.hostname:
            raise ConfigError(shown, "judge", "the URL names no host")
        if parts.username is not None or parts.password is not None:
            raise ConfigError(shown, "judge", f"credentials in the URL are refused (they would reach logs and "
                              f"caches); put the key in ${self.api_key_env}")
        if self.cache_dir is None:
            self.cache_dir = cache_root() / "judge"

    def _key(self, body: dict) -> str:
        return hashlib.sha256(json.dumps({"url": self.base_url, **body}, sort_keys=True).encode()).hexdigest()

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        key = (os.environ.get(self.api_key_env) or "").strip()
        if has_control_characters(key):
            raise ConfigError(f"${self.api_key_env}", "judge", "the API key holds a control character (a line "
                              "break?); fix the variable (the key itself is never printed)")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.base_url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
                                     headers=headers, method="POST")
        # timeout_s bounds the whole exchange, not each read: a peer that sends a byte every 2 s never
        # trips a socket timeout, so a watchdog shuts the connection down at the deadline
        conns, fired = [], threading.Event()

        def expire():
            fired.set()
            for sock in conns:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        watchdog = threading.Timer(self.timeout_s, expire)
        watchdog.start()
        try:
            with _opener(conns).open(req, timeout=self.timeout_s) as resp:  # redirects stay on the user's origin
                data = resp.read(MAX_REPLY_BYTES + 1)
        except (OSError, http.client.HTTPException) as err:
            if fired.is_set():
                raise TimeoutError(f"no complete reply within {self.timeout_s:g} s") from None
            raise err if isinstance(err, OSError) else OSError(f"broken reply ({type(err).__name__})") from None
        finally:
            watchdog.cancel()
        if fired.is_set():  # the shutdown may also surface as a short read
            raise TimeoutError(f"no complete reply within {self.timeout_s:g} s")
        if len(data) > MAX_REPLY_BYTES:
            raise _Malformed(f"reply larger than {MAX_REPLY_BYTES} bytes")
        return json.loads(data.decode())

    def ask(self, messages: list[dict], schema: dict) -> dict | None:
        """The validated JSON reply, or None after the last retry (counted in stats)."""
        body = {"model": self.model, "messages": messages, "temperature": 0.0, "max_tokens": self.max_tokens,
                "response_format": {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema,
                                                                           "strict": True}}}
        path = self.cache_dir / f"{self._key(body)}.json"
        if path.is_file():
            self.stats["cache_hits"] += 1
            return read_json(path)
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats["retries"] += 1
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            self.stats["calls"] += 1
            try:
                reply = self._post(body)
                content = reply["choices"][0]["message"]["content"]
                verdict = validate(json.loads(content), schema)
            except urllib.error.HTTPError as err:
                self.last_problem = f"HTTP {err.code}"
                if err.code not in (408, 429) and err.code < 500:
                    break  # a client error does not get better by asking again
                continue
            except (urllib.error.URLError, TimeoutError, OSError, KeyError, IndexError, TypeError, UnicodeDecodeError,
                    json.JSONDecodeError, _Malformed) as err:
                self.last_problem = (str(err).splitlines() or [type(err).__name__])[0][:200]
                continue
            atomic_write(path, json.dumps(verdict))
            return verdict
        self.stats["failures"] += 1
        return None


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect to another scheme, host or port is refused (a counted failure, not retried):
    urllib would otherwise resend the Authorization header, the API key, to wherever it points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        if (old.scheme, old.hostname, old.port) != (new.scheme, new.hostname, new.port):
            raise urllib.error.HTTPError(req.full_url, 421, f"refused a redirect to another origin ({new.scheme}://"
                                         f"{new.hostname}); set the judge URL to the final address", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Tracked(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """http(s) handlers that hand the socket of each connection they open to `conns` (the deadline's
    watchdog shuts them down). TLS certificates are always verified (the default context); there is no
    switch to turn that off."""

    def __init__(self, conns: list):
        urllib.request.HTTPHandler.__init__(self)
        urllib.request.HTTPSHandler.__init__(self, context=ssl.create_default_context())
        self.conns = conns

    def _make(self, cls):
        def make(host, **kw):
            conn = cls(host, **kw)
            connect = conn.connect

            def tracked():  # the socket itself: the connection drops it (sock = None) once headers are read
                connect()
                self.conns.append(conn.sock)
            conn.connect = tracked
            return conn
        return make

    def http_open(self, req):
        return self.do_open(self._make(http.client.HTTPConnection), req)

    def https_open(self, req):
        return self.do_open(self._make(http.client.HTTPSConnection), req, context=self._context)


def _opener(conns: list):
    return urllib.request.build_opener(_SameOriginRedirects(), _Tracked(conns))


@dataclass
class JudgeReward:
    """Reward source `judge:URL[#model]`: single-score mode for `score`, plus `compare` for
    pairwise preferences in both orders. Rationales of the last `score` call are kept."""
    name: str
    client: JudgeClient
    last_rationales: list = field(default_factory=list)

    @classmethod
    def from_spec(cls, spec: str, arg: str, **settings) -> JudgeReward:
        url, _, model = arg.partition("#")
        return cls(spec, JudgeClient(url, model or env("PREFTUNE_JUDGE_MODEL"), **settings))

    def score(self, prompts, completions):
        """Scores, NaN where every try failed (counted in stats, never raised: an online round skips
        them; `preftune score` stops when none was answered)."""
        out, self.last_rationales = [], []
        for p, c in progress(zip(prompts, completions), total=len(completions), desc="judge", unit="calls"):
            verdict = self.client.ask(_score_messages(p, c), SCORE_SCHEMA)
            out.append(float(verdict["score"]) if verdict else math.nan)
            self.last_rationales.append(verdict.get("rationale", "") if verdict else None)
        return out

    @property
    def peer(self) -> str:
        """The judge's URL as messages show it (no credentials), and why its last failed try failed."""
        return _masked(self.client.base_url)

    def compare(self, prompt: str, a: str, b: str) -> float:
        """P(a is better than b) from both orders (tie = 0.5), or NaN if either order failed."""
        first = self.client.ask(_pair_messages(prompt, a, b), PAIRWISE_SCHEMA)
        second = self.client.ask(_pair_messages(prompt, b, a), PAIRWISE_SCHEMA)
        if first is None or second is None:
            return math.nan
        win = {"A": 1.0, "tie": 0.5, "B": 0.0}
        return (win[first["winner"]] + 1.0 - win[second["winner"]]) / 2

    def verdict(self, prompt: str, a: str, b: str) -> tuple[str, str | None]:
        """Ask "a vs b" and "b vs a": ("first" (a wins) | "second" | "tie" | "position_inconsistent"
        | "failed", the first order's rationale)."""
        first = self.client.ask(_pair_messages(prompt, a, b), PAIRWISE_SCHEMA)
        second = self.client.ask(_pair_messages(prompt, b, a), PAIRWISE_SCHEMA)
        label = both_orders(first and first["winner"], second and second["winner"])
        return label, (first or {}).get("rationale")
