"""label/page.py: the labeling store, bad judgment files, and two people labeling through the page in
headless Chromium with the server killed mid-way."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import write_jsonl
from preftune.apps.label import LabelStore, load_items, read_judgments
from preftune.cli import main
from preftune.utils.errors import DataError

PAIRS = [{"prompt": f"Question {i}: what is {i} + {i}?", "response_a": f"It is {2 * i}.",
          "response_b": f"Maybe {2 * i + 1}?"} for i in range(10)]
CAL = [{"prompt": "What colour is the sky on a clear day?", "chosen": "Blue.", "rejected": "Green."}]


def test_store_records_resumes_and_mixes_calibration(tmp_path):
    items = load_items(str(write_jsonl(tmp_path / "p.jsonl", PAIRS)))
    cal = load_items(str(write_jsonl(tmp_path / "c.jsonl", CAL)), calibration=True)
    store = LabelStore(items, tmp_path / "j.jsonl", cal, calibration_rate=0.25)
    assert len(store.queue) == 13 and sum(it.calibration for it in store.queue) == 3  # one after every 3
    first = store.next_item("ann")
    store.record("ann", first["pair_id"], "A", "clearer")
    store.record("ann", first["pair_id"], "B")  # a resent click: the first judgment stands
    row = json.loads((tmp_path / "j.jsonl").read_text())
    assert row["preferred"] == row["left"] and row["choice"] == "A" and row["reason"] == "clearer"
    shown = (first["left"], first["right"])
    it = store.by_id[first["pair_id"]]
    assert shown == ((it.a, it.b) if row["left"] == "a" else (it.b, it.a))
    again = LabelStore(items, tmp_path / "j.jsonl", cal, calibration_rate=0.25)  # a restart
    assert again.next_item("ann")["done"] == 1 and again.next_item("ann")["pair_id"] != first["pair_id"]
    assert again.next_item("bob")["done"] == 0
    lefts = {store.next_item(f"user{k}")["left"] for k in range(12)}
    assert len(lefts) == 2  # the order differs between annotators


@pytest.mark.parametrize("line, problem", [
    ('{"pair_id": "nope", "annotator": "x", "preferred": "a", "left": "a", "calibration": false}', "pair_id: unknown"),
    ("not json", "json: invalid JSON"),  # the same strict reader as every data file
    ('{"pair_id": "P", "annotator": "x", "preferred": "left", "left": "a", "calibration": false}', "preferred:"),
    ('{"pair_id": "P", "annotator": "x", "preferred": "a", "left": "a"}', "calibration: missing"),
    ("DUP", "judged"),
    ('{"pair_id": "P", "annotator": "x", "annotator": "y", "preferred": "a", "left": "a", "calibration": false}',
     "duplicate key 'annotator'"),
    ('{"pair_id": "P", "annotator": "x", "preferred": "a", "left": "a", "calibration": false, "t": NaN}', "NaN"),
])
def test_bad_judgment_files_exit_2_with_one_line(tmp_path, capsys, line, problem):
    pairs = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    pid = load_items(str(pairs))[0].pair_id
    good = json.dumps({"pair_id": pid, "annotator": "x", "preferred": "a", "left": "a", "calibration": False})
    text = good + "\n" + (good if line == "DUP" else line.replace('"P"', json.dumps(pid))) + "\n"
    (tmp_path / "j.jsonl").write_text(text)
    out = tmp_path / "built.jsonl"
    rc = main(["data", "build", str(tmp_path / "j.jsonl"), "--pairs", str(pairs), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"{tmp_path / 'j.jsonl'}:2: ") and problem in err[0]
    assert not out.exists()
    with pytest.raises(DataError):
        read_judgments(tmp_path / "j.jsonl", {pid})


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path, port):
    proc = subprocess.Popen([sys.executable, "-m", "preftune", "label", str(tmp_path / "p.jsonl"), "--judgments",
                             str(tmp_path / "j.jsonl"), "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120  # a loaded machine imports torch slowly
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(proc.stderr.read())


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not _chromium() and not os.environ.get("PREFTUNE_REQUIRE_BROWSER"),
                    reason="Chromium is not installed (.ci/run installs it and sets PREFTUNE_REQUIRE_BROWSER)")
def test_two_annotators_label_through_the_page_across_a_server_kill(tmp_path):
    from playwright.sync_api import sync_playwright

    write_jsonl(tmp_path / "p.jsonl", PAIRS)
    port = _free_port()
    server = _start(tmp_path, port)
    shots = os.environ.get("PREFTUNE_SCREENSHOTS")
    errors = []
    base = f"http://127.0.0.1:{port}/"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=_chromium(), args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            ann, bob = browser.new_page(), browser.new_page()
            for page in (ann, bob):
                page.set_default_timeout(120_000)
                page.on("pageerror", lambda e: errors.append(str(e)))
            ann.goto(base)  # types her name, then clicks and keys
            ann.fill("#name", "ann")
            ann.click("#start")
            ann.wait_for_selector("text=ann: 0 of 10 judged")
            if shots:
                ann.screenshot(path=os.path.join(shots, "label_page.png"))
            ann.fill("#reason", "correct arithmetic")
            ann.click("#A")
            ann.wait_for_selector("text=ann: 1 of 10 judged")
            for k, key in enumerate("btab", start=2):
                ann.keyboard.press(key)
                ann.wait_for_selector(f"text=ann: {k} of 10 judged")
            bob.goto(base + "?annotator=bob")  # the name in the URL starts at once
            bob.wait_for_selector("text=bob: 0 of 10 judged")
            for k, key in enumerate("aab", start=1):
                bob.keyboard.press(key)
                bob.wait_for_selector(f"text=bob: {k} of 10 judged")
            before = (tmp_path / "j.jsonl").read_text().splitlines()
            assert len(before) == 8  # 5 + 3, each on disk before the page showed the next item
            server.send_signal(signal.SIGKILL)  # a crash mid-session
            server.wait()
            server = _start(tmp_path, port)
            ann.reload()
            ann.fill("#name", "ann")
            ann.keyboard.press("Enter")
            ann.wait_for_selector("text=ann: 5 of 10 judged")  # resumed where she stopped
            bob.reload()
            bob.wait_for_selector("text=bob: 3 of 10 judged")
            for k in range(6, 11):
                ann.keyboard.press("a" if k % 2 else "t")
                ann.wait_for_selector(f"text=ann: {k} of 10 judged" if k < 10 else "text=All done")
            for k in range(4, 11):
                bob.click("#B" if k % 3 else "#tie")
                bob.wait_for_selector(f"text=bob: {k} of 10 judged" if k < 10 else "text=All done")
            if shots:
                bob.screenshot(path=os.path.join(shots, "label_done.png"))
            browser.close()
    finally:
        server.kill()
    rows = read_judgments(tmp_path / "j.jsonl", {it.pair_id for it in load_items(str(tmp_path / "p.jsonl"))})
    assert len(rows) == 20 and {r["annotator"] for r in rows} == {"ann", "bob"}
    assert (tmp_path / "j.jsonl").read_text().splitlines()[:8] == before  # nothing rewritten
    assert rows[0]["reason"] == "correct arithmetic" and errors == []
    ties = {who: sum(r["preferred"] == "tie" for r in rows if r["annotator"] == who) for who in ("ann", "bob")}
    assert ties == {"ann": 4, "bob": 2}  # ann: t at items 3, 6, 8, 10; bob: tie button at items 6 and 9


def test_a_port_in_use_is_one_line_exit_2(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc = main(["label", str(write_jsonl(tmp_path / "p.jsonl", PAIRS)), "--judgments", str(tmp_path / "j.jsonl"),
                   "--port", str(port)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"127.0.0.1:{port}: --port: cannot listen there (Address already in use)"]
