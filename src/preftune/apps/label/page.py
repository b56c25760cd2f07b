"""`preftune label PAIRS --judgments FILE`: a local page where people say which response is better.

The page (one HTML document with its own CSS and script, no CDN) shows a prompt and two
responses, left/right in an order drawn per (annotator, pair) so position bias cancels over
annotators, and records "A better" / "B better" / "tie" with an optional reason. Keys: a or 1
(left), b or 2 (right), t or 3 (tie). Several annotators work at once, each by name.
Known-answer calibration pairs (`--calibration FILE`, prompt/chosen/rejected with chosen the
known better one) are mixed in at `--calibration-rate`.

Every judgment is appended to the judgments JSONL and fsynced before the page gets its next
item, so a crash or a closed tab loses nothing; on reopening, each annotator continues with the
first item they have not judged. Records:
    {"pair_id", "annotator", "preferred": "a" | "b" | "tie", "left": "a" | "b", "choice": "A" | "B" |
     "tie" (as shown), "reason", "calibration": bool, "time"}
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from ...data.sources import read_jsonl_rows, read_table, text_field
from ...utils.errors import DataError
from ...utils.httpguard import QuietServer, Refused, check_host, check_post, parse_json, read_body

__all__ = ["LabelItem", "load_items", "read_judgments", "LabelStore", "make_label_server"]


@dataclass(frozen=True)
class LabelItem:
    pair_id: str
    prompt: str
    a: str
    b: str
    calibration: bool = False  # for calibration items, `a` is the known better response


def _pair_id(prompt: str, a: str, b: str) -> str:
    return hashlib.sha256(json.dumps([prompt, *sorted([a, b])]).encode()).hexdigest()[:12]


def load_items(path: str, *, calibration: bool = False) -> list[LabelItem]:
    """Pairs to label: prompt plus response_a/response_b (or chosen/rejected, shown unlabeled);
    an optional `id` names the pair. Calibration files need prompt/chosen/rejected."""
    file, rows = read_table(path, required=("prompt",), what="pairs")  # one line for a FIFO, a device...
    items, seen = [], {}
    for line, row in rows:
        keys = ("chosen", "rejected") if calibration or "response_a" not in row else ("response_a", "response_b")
        a, b = (text_field(file, line, row, key) for key in keys)
        pid = str(row.get("id") or _pair_id(row["prompt"], a, b))
        pid = f"cal-{pid}" if calibration else pid
        if pid in seen:
            raise DataError(str(file), line, "id", f"pair {pid} repeats line {seen[pid]}")
        seen[pid] = line
        items.append(LabelItem(pid, row["prompt"], a, b, calibration))
    return items


_FIELDS = {"pair_id": str, "annotator": str, "preferred": str, "left": str, "calibration": bool}


def read_judgments(path: str | Path, known: set[str] | None = None) -> list[dict]:
    """Validated judgments; one-line DataError for a malformed line, an unknown pair id (when
    `known` is given) or a second judgment of the same pair by the same annotator."""
    path = Path(path)
    rows, seen = [], {}
    for i, row in read_jsonl_rows(path):  # strict JSON, bounded lines, regular files only
        if not isinstance(row, dict):
            raise DataError(str(path), i, "line", "expected an object")
        for key, kind in _FIELDS.items():
            if not isinstance(row.get(key), kind):
                raise DataError(str(path), i, key, f"missing or not a {kind.__name__}")
        if row["preferred"] not in ("a", "b", "tie"):
            raise DataError(str(path), i, "preferred", f"{row['preferred']!r} is not one of a, b, tie")
        if known is not None and row["pair_id"] not in known:
            raise DataError(str(path), i, "pair_id", f"unknown pair {row['pair_id']!r} (not in the pairs file)")
        key = (row["annotator"], row["pair_id"])
        if key in seen:
            raise DataError(str(path), i, "pair_id", f"{row['annotator']!r} judged {row['pair_id']} already "
                            f"on line {seen[key]}")
        seen[key] = i
        rows.append(row)
    return rows


def _left(annotator: str, pair_id: str) -> str:
    """Which original response is shown on the left: a fair coin fixed per (annotator, pair)."""
    return "a" if hashlib.sha256(f"{annotator}|{pair_id}".encode()).digest()[0] % 2 == 0 else "b"


class LabelStore:
    """The queue per annotator and the append-only judgments file."""

    def __init__(self, items: list[LabelItem], judgments: Path, calibration: list[LabelItem] | None = None,
                 calibration_rate: float = 0.0):
        self.items, self.path, self.lock = items, Path(judgments), threading.Lock()
        self.by_id = {it.pair_id: it for it in items + (calibration or [])}
        self.queue = list(items)
        if calibration and calibration_rate > 0:  # one known-answer pair after every k real ones
            k, queue = max(1, round(1 / calibration_rate) - 1), []
            for i, it in enumerate(items):
                queue.append(it)
                if (i + 1) % k == 0:
                    queue.append(calibration[(i // k) % len(calibration)])
            self.queue = queue
        self.done: dict[str, set] = {}
        if self.path.is_file():
            for row in read_judgments(self.path, set(self.by_id)):
                self.done.setdefault(row["annotator"], set()).add(row["pair_id"])

    def next_item(self, annotator: str) -> dict:
        done = self.done.get(annotator, set())
        total = len(self.queue)
        for it in self.queue:
            if it.pair_id not in done:
                left = _left(annotator, it.pair_id)
                shown = (it.a, it.b) if left == "a" else (it.b, it.a)
                return {"pair_id": it.pair_id, "prompt": it.prompt, "left": shown[0], "right": shown[1],
                        "done": len(done), "total": total}
        return {"finished": True, "done": len(done), "total": total}

    def record(self, annotator: str, pair_id: str, choice: str, reason: str = "") -> None:
        if pair_id not in self.by_id:
            raise ValueError(f"unknown pair {pair_id!r}")
        if choice not in ("A", "B", "tie"):
            raise ValueError("choice must be A, B or tie")
        with self.lock:
            if pair_id in self.done.get(annotator, set()):
                return  # a double click or a resent request: the first judgment stands
            left = _left(annotator, pair_id)
            right = "b" if left == "a" else "a"
            row = {"pair_id": pair_id, "annotator": annotator,
                   "preferred": {"A": left, "B": right, "tie": "tie"}[choice], "left": left, "choice": choice,
                   "reason": reason, "calibration": self.by_id[pair_id].calibration,
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.done.setdefault(annotator, set()).add(pair_id)


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>preftune label</title><meta name="preftune-token" content="@TOKEN@"><style>
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222}
#prompt{background:#f4f4f4;padding:0.8em;white-space:pre-wrap;border-radius:6px}
.cols{display:flex;gap:1em;margin:1em 0}.cols>div{flex:1}.resp{border:2px solid #ccc;border-radius:6px;padding:0.8em;
white-space:pre-wrap;min-height:6em}button{font-size:1.05em;margin:0.6em 0.4em 0 0;padding:0.4em 1em}
#bar{color:#555}kbd{background:#eee;border:1px solid #bbb;border-radius:3px;padding:0 0.3em}
</style></head><body>
<h2>Which response is better?</h2>
<div id="who">Annotator: <input id="name" placeholder="your name"> <button id="start">Start</button></div>
<div id="work" hidden>
<div id="bar"></div><h3>Prompt</h3><div id="prompt"></div>
<div class="cols"><div><b>A</b><div class="resp" id="left"></div></div>
<div><b>B</b><div class="resp" id="right"></div></div></div>
<input id="reason" placeholder="reason (optional)" size="60"><br>
<button id="A">A is better <kbd>a</kbd></button><button id="B">B is better <kbd>b</kbd></button>
<button id="tie">Tie <kbd>t</kbd></button></div>
<div id="end" hidden><h3>All done, thank you.</h3></div>
<script>
const token = document.querySelector('meta[name="preftune-token"]').content;
let who = new URLSearchParams(location.search).get("annotator") || "", item = null, busy = false;
const $ = id => document.getElementById(id);
function show(next) {
  item = next;
  if (next.finished) { $("work").hidden = true; $("end").hidden = false; return; }
  $("bar").textContent = who + ": " + next.done + " of " + next.total + " judged";
  $("prompt").textContent = next.prompt; $("left").textContent = next.left; $("right").textContent = next.right;
  $("reason").value = "";
}
async function load() {
  const r = await fetch("/api/next?annotator=" + encodeURIComponent(who));
  show(await r.json());
}
async function judge(choice) {
  if (!item || item.finished || busy) return;
  busy = true;
  const r = await fetch("/api/judge", {method: "POST", headers: {"Content-Type": "application/json",
    "X-Preftune-Token": token},
    body: JSON.stringify({annotator: who, pair_id: item.pair_id, choice: choice, reason: $("reason").value})});
  if (r.ok) show(await r.json());
  busy = false;
}
function start() {
  who = who || $("name").value.trim();
  if (!who) return;
  $("who").hidden = true; $("work").hidden = false; load();
}
$("start").onclick = start;
for (const c of ["A", "B", "tie"]) $(c).onclick = () => judge(c);
document.addEventListener("keydown", e => {
  if (e.target.tagName === "INPUT") { if (e.key === "Enter" && e.target.id === "name") start(); return; }
  const k = e.key.toLowerCase();
  if (k === "a" || k === "1") judge("A"); else if (k === "b" || k === "2") judge("B");
  else if (k === "t" || k === "3") judge("tie");
});
if (who) start();
</script></body></html>"""


def make_label_server(store: LabelStore, host: str = "127.0.0.1", port: int = 8765) -> QuietServer:
    """The labeling page and its two API calls. Every request must name this server in `Host`;
    a judgment must be a same-origin JSON POST carrying the per-session token from the page (a
    page on another site can neither read the token nor send that header without a preflight)."""
    token = secrets.token_hex(16)
    page = _PAGE.replace("@TOKEN@", token)

    class Handler(BaseHTTPRequestHandler):
        timeout = 30  # a client that stalls mid-request is disconnected, not held open for ever

        def log_message(self, *a):
            pass

        def _send(self, code, body, kind="application/json"):
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("X-Frame-Options", "DENY")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            try:
                check_host(self)
            except Refused as err:
                return self._send(err.status, {"error": err.message})
            url = urlparse(self.path)
            if url.path == "/":
                return self._send(200, page, "text/html; charset=utf-8")
            if url.path == "/api/next":
                who = (parse_qs(url.query).get("annotator") or [""])[0].strip()
                if not who:
                    return self._send(400, {"error": "annotator is required"})
                return self._send(200, store.next_item(who))
            self._send(404, {"error": "not found"})

        def do_POST(self):  # noqa: N802
            try:
                check_host(self)
                if urlparse(self.path).path != "/api/judge":
                    raise Refused(404, "not found")
                check_post(self)
                got = (self.headers.get("X-Preftune-Token") or "").encode("utf-8", "surrogateescape")
                if not hmac.compare_digest(got, token.encode()):  # bytes: a non-ASCII header got no answer at all
                    raise Refused(403, "missing or wrong session token (reload the page)")
                body = parse_json(read_body(self, 1 << 16))
                if not isinstance(body, dict):
                    raise Refused(400, "the body must be a JSON object")
                fields = [body.get(k) for k in ("annotator", "pair_id", "choice")]
                if not all(isinstance(f, str) for f in fields) or not isinstance(body.get("reason", ""), str):
                    raise Refused(400, "annotator, pair_id, choice (and reason) must be strings")
                who = fields[0].strip()
                if not who or len(who) > 200:
                    raise Refused(400, "annotator is required (at most 200 characters)")
                store.record(who, fields[1], fields[2], body.get("reason", "")[:2000])
                self._send(200, store.next_item(who))
            except Refused as err:
                self._send(err.status, {"error": err.message})
            except ValueError as err:
                self._send(400, {"error": str(err)})

    return QuietServer((host, port), Handler)
