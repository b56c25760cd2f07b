"""Hostile inputs outside the original corpus (issue 16): decoder failures, pathological JSON and
YAML, file-system oddities (FIFOs, devices, directories, dangling links), values the libraries
reject, wrong-shaped structured settings, malformed run files, and usage errors, across verbs.

Every case runs the real CLI in-process under a 20 s alarm and asserts: exit code 2, exactly one
line on stderr, no traceback, the expected location/field in that line, and every regular file
under the case's directory byte-identical afterwards (nothing half-written, nothing created).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
from pathlib import Path

import pytest

from conftest import PAIRS
from preftune.cli import main

GOOD = json.dumps(PAIRS[0])
MSG = [{"role": "user", "content": "hi"}]
A = [{"role": "assistant", "content": "a"}]


def _row(**kw) -> str:
    return json.dumps({"prompt": "p", "chosen": " a", "rejected": " b", **kw})


def _raw(prompt='"p"', chosen='" a"', rejected='" b"') -> str:
    return f'{{"prompt": {prompt}, "chosen": {chosen}, "rejected": {rejected}}}'


def _gz(lines: list[str]) -> bytes:
    return gzip.compress("".join(x + "\n" for x in lines).encode())


# ---- data files: name -> (file name, content bytes | callable(dir), expected "line: field" fragment) ----
def _fifo(d: Path, name: str) -> None:
    os.mkfifo(d / name)


def _link(target: str):
    return lambda d, name: os.symlink(target, d / name)


def _mkdir(d: Path, name: str) -> None:
    (d / name).mkdir()


DATA = {
    "gz-random-bytes": ("d.jsonl.gz", b"\x1f\x8b\x08\x00garbage" * 10, ":1: gzip: compressed stream is corrupt"),
    "gz-truncated": ("d.jsonl.gz", _gz([GOOD] * 200)[:60], "gzip: compressed stream is truncated"),
    "gz-not-gzip": ("d.jsonl.gz", (GOOD + "\n").encode(), ":1: gzip:"),
    "gz-json-corrupt": ("d.json.gz", b"\x1f\x8bnot really", "gzip:"),
    "deep-json-line": ("d.jsonl", b"[" * 200_000 + b"\n", ":1: json:"),
    "deep-json-moderate": ("d.jsonl", ("[" * 100 + "]" * 100 + "\n").encode(), ":1: json: nested deeper than"),
    "deep-json-file": ("d.json", b"[" * 200_000, ":1: json:"),
    "huge-integer": ("d.jsonl", _raw(prompt="1" * 5000).encode() + b"\n", ":1: json:"),
    "nan-literal": ("d.jsonl", _raw(prompt="NaN").encode() + b"\n", ":1: json: NaN is not a number"),
    "infinity-literal": ("d.jsonl", _raw(chosen="-Infinity").encode() + b"\n", ":1: json: -Infinity"),
    "duplicate-key": ("d.jsonl", b'{"prompt": "p", "prompt": "q", "chosen": " a", "rejected": " b"}\n',
                      ":1: json: duplicate key 'prompt'"),
    "duplicate-key-json-file": ("d.json", b'[{"prompt": "p", "chosen": " a", "chosen": " c", "rejected": " b"}]',
                                ":1: json: duplicate key 'chosen'"),
    "lone-surrogate-prompt": ("d.jsonl", (GOOD + "\n" + _raw(prompt='"x\\ud800y"') + "\n").encode(),
                              ":2: prompt: contains an unpaired surrogate"),
    "lone-surrogate-chosen": ("d.jsonl", (_raw(chosen='" \\udfff"') + "\n").encode(), ":1: chosen: contains an unpaired"),
    "lone-surrogate-message": ("d.jsonl", (json.dumps({"prompt": MSG, "chosen": A, "rejected": A})
                                           .replace('"a"', '"\\ud83d"', 1) + "\n").encode(),
                               ":1: chosen[0].content: contains an unpaired"),
    "bom-first-line": ("d.jsonl", b"\xef\xbb\xbf" + GOOD.encode() + b"\n", ":1: json:"),
    "binary-file": ("d.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", ":1: encoding: not UTF-8"),
    "nul-bytes-jsonl": ("d.jsonl", b"\x00\x00\x00\n", ":1: json:"),
    "record-is-string": ("d.jsonl", b'"hello"\n', ":1: record: expected an object, got str"),
    "record-is-null": ("d.jsonl", b"null\n", ":1: record: expected an object, got NoneType"),
    "record-is-number": ("d.jsonl", b"42\n", ":1: record:"),
    "empty-object": ("d.jsonl", b"{}\n", ":1:"),
    "chosen-is-dict": ("d.jsonl", (_raw(chosen='{"text": "a"}') + "\n").encode(), ":1: chosen:"),
    "chosen-is-bool": ("d.jsonl", (_raw(chosen="true") + "\n").encode(), ":1: chosen:"),
    "prompt-is-number": ("d.jsonl", (_raw(prompt="3.5") + "\n").encode(), ":1: prompt:"),
    "whitespace-prompt": ("d.jsonl", (_raw(prompt='"   "') + "\n").encode(), ":1: prompt: is empty"),
    "content-is-list": ("d.jsonl", (json.dumps({"prompt": [{"role": "user", "content": [{"type": "text"}]}],
                                                "chosen": A, "rejected": A}) + "\n").encode(),
                        ":1: prompt[0].content: expected a string"),
    "unknown-role": ("d.jsonl", (json.dumps({"prompt": [{"role": "wizard", "content": "x"}], "chosen": A,
                                             "rejected": A}) + "\n").encode(), ":1: prompt[0].role:"),
    "message-not-object": ("d.jsonl", (json.dumps({"prompt": ["hi"], "chosen": A, "rejected": A}) + "\n").encode(),
                           ":1: prompt[0]: expected a message object"),
    "chosen-empty-list": ("d.jsonl", (json.dumps({"prompt": MSG, "chosen": [], "rejected": A}) + "\n").encode(),
                          ":1: chosen: expected a non-empty list"),
    "line-over-cap": ("d.jsonl", b'{"prompt": "' + b"x" * (16 * 1024 * 1024 + 10) + b'"}\n',
                      ":1: line: longer than"),
    "json-bad-utf8": ("d.json", b'[{"prompt": "\xff"}]', ":1: encoding: not UTF-8"),
    "json-truncated": ("d.json", b'[{"prompt": "p", "chosen"', "json: invalid JSON"),
    "json-list-of-numbers": ("d.json", b"[1, 2]", ":1: record:"),
    "json-object-top": ("d.json", b'{"rows": []}', ":1: json: expected a list"),
    "json-empty-list": ("d.json", b"[]", ":1: file: no records"),
    "json-deep-inside-list": ("d.json", ("[" + "[" * 80 + "]" * 80 + "]").encode(), "json: nested deeper than"),
    "csv-oversized-field": ("d.csv", b'prompt,chosen,rejected\n"' + b"x" * 200_000 + b'", a, b\n', ":2: csv:"),
    "csv-extra-cells": ("d.csv", b"prompt,chosen,rejected\np, a, b, c, d\n", ":2: csv: 2 more cells"),
    "csv-bad-utf8": ("d.csv", b"prompt,chosen,rejected\n\xff,a,b\n", "encoding: not UTF-8"),
    "csv-header-only": ("d.csv", b"prompt,chosen,rejected\n", ":1: file: no records"),
    "csv-empty-cell": ("d.csv", b"prompt,chosen,rejected\np,,b\n", ":2: chosen: is empty"),
    "csv-unclosed-quote": ("d.csv", b'prompt,chosen,rejected\n"p, a, b\n', ":"),
    "csv-gz-corrupt": ("d.csv.gz", b"\x1f\x8b\x08\x00zz", "gzip:"),
    "truthfulqa-no-wrong": ("d.csv", b"Question,Best Answer,Incorrect Answers\nq,a, ; \n", ":2: Incorrect Answers:"),
    "truth-labels-bad-verdict": ("d.jsonl", (json.dumps({"prompt": "Q: q\nA: a\nTrue:", "completion": " maybe"})
                                             + "\n").encode(), None),
    "unpaired-label-two": ("d.jsonl", b'{"prompt": "p", "completion": " a", "label": 2}\n', None),
    "fifo": ("d.jsonl", _fifo, ":0: file: is a FIFO"),
    "char-device": ("d.jsonl", _link("/dev/zero"), ":0: file: is a device"),
    "dangling-symlink": ("d.jsonl", _link("/nonexistent/x.jsonl"), ":0: file: a dangling symlink"),
    "directory-named-jsonl": ("d.jsonl", _mkdir, ":1: dataset: not a saved HF dataset"),
    "parquet-garbage": ("d.parquet", b"PAR1 this is not parquet", ":1: parquet: unreadable"),
    "parquet-empty": ("d.parquet", b"", ":1: parquet: unreadable"),
    "symlink-loop": ("d.jsonl", lambda d, name: os.symlink(name, d / name), ":0: file:"),
}


def _digest(root: Path) -> dict:
    """sha256 of every regular file under root (FIFOs, devices and links are not read)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file():
            out[str(path)] = "special"
            continue
        out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _run(argv: list[str], root: Path, capsys, expected: str | None, rc: int = 2) -> str:
    def _hang(*_):
        raise TimeoutError("case hung for 20 s")

    before = _digest(root)
    old = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(20)
    try:
        got = main(argv)
    except SystemExit as exit_:  # argparse's usage errors exit from inside the parser
        got = exit_.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert got == rc, (got, err)
    assert len(lines) == 1, lines
    if expected:
        assert expected in lines[0], (expected, lines[0])
    assert _digest(root) == before
    return lines[0]


@pytest.mark.parametrize("case", sorted(DATA))
def test_hostile_data_file(case, tmp_path, capsys):
    name, content, expected = DATA[case]
    d = tmp_path / "in"
    d.mkdir()
    if callable(content):
        content(d, name)
    else:
        (d / name).write_bytes(content)
    line = _run(["validate-data", str(d / name)], tmp_path, capsys, expected)
    assert line.startswith(str(d / name))


def test_whole_file_cap_for_json_and_csv(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PREFTUNE_MAX_FILE_BYTES", "64")
    for name, body in (("d.json", "[" + ",".join([GOOD] * 4) + "]"), ("d.csv", "prompt,chosen,rejected\n" + "p,a,b\n" * 20)):
        (tmp_path / name).write_text(body)
        _run(["validate-data", str(tmp_path / name)], tmp_path, capsys, f"{tmp_path / name}:0: file: larger than 64 bytes")


def _parquet(path: Path, rows: int, width: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # one value per column, repeated: dictionary-encoded and compressed, a few KB on disk
    pq.write_table(pa.table({k: [c * width] * rows for k, c in (("prompt", "p"), ("chosen", "c"), ("rejected", "r"))}),
                   path)


@pytest.mark.parametrize("name,make,expected", [
    # 4 MB of JSON in a few KB of gzip, under a 1 MB cap on what a file may expand to
    ("bomb.json.gz", lambda p: p.write_bytes(gzip.compress(("[" + ",".join([GOOD] * 60_000) + "]").encode())),
     ":1: gzip: expands past 1048576 bytes"),
    ("bomb.csv.gz", lambda p: p.write_bytes(gzip.compress(b"prompt,chosen,rejected\n" + b"p,a,b\n" * 400_000)),
     "gzip: expands past 1048576 bytes"),
    ("blank.jsonl.gz", lambda p: p.write_bytes(gzip.compress(b"\n" * 3_000_000)), "gzip: expands past 1048576 bytes"),
    ("bomb.parquet", lambda p: _parquet(p, 2_000, 1_000), ":257: parquet: expands past 1048576 bytes (2000 rows"),
])
def test_compressed_files_are_capped_on_what_they_expand_to(name, make, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PREFTUNE_MAX_FILE_BYTES", str(1 << 20))
    make(tmp_path / name)
    assert (tmp_path / name).stat().st_size < 200_000
    _run(["validate-data", str(tmp_path / name)], tmp_path, capsys, expected)


# ---- configuration files ----
CONFIG_FILES = {
    "duplicate-section": ("train:\n  lr: 0.1\ntrain:\n  lr: 0.2\n", ":3: <yaml>: invalid YAML: duplicate key 'train'"),
    "duplicate-key": ("train:\n  lr: 0.1\n  lr: 0.2\n", ":3: <yaml>: invalid YAML: duplicate key 'lr'"),
    "alias-bomb-in-list": ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                           "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
                           "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\ntrain:\n  report_to: *e\n",
                           "<yaml>: aliases expand to more than"),
    "recursive-alias": ("train:\n  report_to: &r [*r]\n", "<yaml>:"),
    "non-utf8": (b"train:\n  lr: \xff\xfe\n", "encoding: not UTF-8"),
    "top-level-list": ("- train\n- lr\n", "<top>: expected a mapping"),
    "top-level-scalar": ("42\n", "<top>: expected a mapping"),
    "tab-indent": ("train:\n\tlr: 0.1\n", "<yaml>: invalid YAML"),
    "section-is-list": ("train: [1, 2]\n", "train: expected a mapping"),
    "deep-nesting": ("train:\n  report_to: " + "[" * 100 + "]" * 100 + "\n", "nested deeper than"),
    "unclosed-quote": ('train:\n  lr: "0.1\n', "<yaml>: invalid YAML"),
    "list-as-key": ("? [a, b]\n: 1\n", ":1: <yaml>: invalid YAML: a list used as a key"),
    "list-as-key-in-section": ("train:\n  ? [a]\n  : 1\n", ":2: <yaml>: invalid YAML: a list used as a key"),
    "python-tag": ("train:\n  lr: !!python/object:os.system ['true']\n", "<yaml>: invalid YAML"),
    "lr-inf": ("train:\n  lr: .inf\n", "train.lr: must be a number in (0, 3.4e+38]"),
    "beta-inf": ("loss:\n  beta: .inf\n", "loss.beta:"),
    "threshold-nan": ("diagnostics:\n  kl_max: .nan\n", "diagnostics.kl_max: must be a finite number"),
    "seed-negative": ("train:\n  seed: -1\n", "train.seed: must be >= 0"),
    "seed-huge": ("train:\n  seed: 1099511627776\n", "train.seed: 1099511627776 is out of range"),
    "batch-huge": ("train:\n  batch_size: 1000000000000000000000000000000\n", "train.batch_size:"),
    "mix-weight-nan": ("loss:\n  mix: [[sigmoid, .nan]]\n", "loss.mix[0]:"),
    "mix-weight-bool": ("loss:\n  mix: [[sigmoid, true]]\n", "loss.mix[0]:"),
    "mix-name-list": ("loss:\n  mix: [[[sigmoid], 1.0]]\n", "loss.mix[0]:"),
    "targets-numbers": ("model:\n  lora_target_modules: [1, 2]\n", "model.lora_target_modules: expected a list of names"),
    "targets-empty": ("model:\n  lora_target_modules: []\n", "model.lora_target_modules: is empty"),
    "report-to-nested": ("train:\n  report_to: [[tensorboard]]\n", "train.report_to: expected a list of names"),
    "column-map-values": ("data:\n  column_map: {q: 1}\n", "data.column_map: expected source: target names"),
    "ensemble-shape": ("online:\n  reward_ensemble: [[sentiment]]\n", "online.reward_ensemble[0]:"),
    "ensemble-weight-inf": ("online:\n  reward_ensemble: [[sentiment, .inf]]\n", "online.reward_ensemble[0]:"),
    "penalty-negative": ("online:\n  length_penalty: -1\n", "online.length_penalty: must be >= 0"),
    "format-registry-typo": ("data:\n  format: truthfulq\n", "data.format: 'truthfulq' is not one of"),
    "stop-on-number": ("diagnostics:\n  stop_on: [3]\n", "diagnostics.stop_on: expected a list of names"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_FILES))
def test_hostile_config_file(case, tmp_path, capsys):
    text, expected = CONFIG_FILES[case]
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    line = _run(["train", "-c", str(cfg), f"run.output_dir={tmp_path / 'run'}"], tmp_path, capsys, expected)
    assert line.startswith(str(cfg))
    assert not (tmp_path / "run").exists()


def test_every_registered_format_is_accepted_by_config():
    from preftune.config import load_config
    from preftune.data.sources import FORMATS, UNPAIRED_FORMATS

    for name in [*FORMATS, *UNPAIRED_FORMATS]:
        assert load_config(None, [f"data.format={name}"]).data.format == name


CONFIG_PATHS = {
    "fifo": (_fifo, "<file>: is a FIFO"),
    "directory": (_mkdir, "<file>: is a directory"),
    "device": (_link("/dev/zero"), "<file>: is a device"),
    "dangling": (_link("/nonexistent.yaml"), "<file>: no such config file"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_PATHS))
def test_config_path_that_is_not_a_file(case, tmp_path, capsys):
    make, expected = CONFIG_PATHS[case]
    make(tmp_path, "c.yaml")
    _run(["train", "-c", str(tmp_path / "c.yaml")], tmp_path, capsys, expected)


def test_config_over_the_size_cap(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PREFTUNE_MAX_FILE_BYTES", "32")
    (tmp_path / "c.yaml").write_text("train:\n  lr: 0.0001\n" + "# padding\n" * 10)
    _run(["train", "-c", str(tmp_path / "c.yaml")], tmp_path, capsys, "<file>: larger than 32 bytes")


OVERRIDES = {
    "lr-negative": (["train.lr=-1"], "command line: train.lr:"),
    "lr-inf": (["train.lr=.inf"], "command line: train.lr:"),
    "seed-float": (["train.seed=1.5"], "command line: train.seed: expected int"),
    "seed-negative": (["train.seed=-5"], "command line: train.seed: must be >= 0"),
    "mix-scalar": (["loss.mix=5"], "command line: loss.mix: expected list"),
    "mix-short": (["loss.mix=[[sigmoid]]"], "command line: loss.mix[0]:"),
    "mix-unknown": (["loss.mix=[[sigmoidd, 1.0]]"], "command line: loss.mix[0]:"),
    "targets-mapping": (["model.lora_target_modules={a: 1}"], "command line: model.lora_target_modules:"),
    "report-to-int": (["train.report_to=3"], "command line: train.report_to: expected list"),
    "column-map-list": (["data.column_map=[a]"], "command line: data.column_map: expected dict"),
    "format-unknown": (["data.format=xml"], "command line: data.format: 'xml' is not one of"),
    "scheduler-typo": (["train.scheduler=cosin"], "(did you mean 'cosine'?)"),
    "dtype-unknown": (["model.dtype=float16"], "command line: model.dtype:"),
    "eval-batch-zero": (["eval.batch_size=0"], "command line: eval.batch_size: must be >= 1"),
    "top-p-two": (["online.top_p=2"], "command line: online.top_p:"),
    "warmup-one": (["train.warmup_ratio=1"], "command line: train.warmup_ratio:"),
    "stop-on-unknown": (["diagnostics.stop_on=[nope]"], "command line: diagnostics.stop_on[0]: unknown check"),
    "no-dot": (["lr=1"], ""),
    "value-too-long": (["data.train_path=" + "x" * 70000], "command line: data.train_path: value longer than"),
    "alias-in-override": (["train.report_to=&a [*a]"], "command line: train.report_to: expected list"),
    "length-growth-one": (["diagnostics.length_growth=1"], "command line: diagnostics.length_growth: must be > 1"),
    "label-smoothing-negative": (["loss.label_smoothing=-0.1"], "command line: loss.label_smoothing:"),
    "weight-decay-negative": (["train.weight_decay=-1"], "command line: train.weight_decay:"),
    "grad-norm-inf": (["train.max_grad_norm=.inf"], "command line: train.max_grad_norm: must be a finite number"),
    "desirable-zero": (["loss.desirable_weight=0"], "command line: loss.desirable_weight: must be > 0"),
    "temperature-zero": (["online.temperature=0"], "command line: online.temperature: must be > 0"),
    "grad-accum-zero": (["train.grad_accum=0"], "command line: train.grad_accum: must be >= 1"),
    "keep-last-zero": (["train.keep_last=0"], "command line: train.keep_last: must be >= 1"),
    "lora-r-huge": (["model.lora_r=99999999999"], "command line: model.lora_r:"),
    "max-length-one": (["data.max_length=1"], "command line: data.max_length: must be >= 2"),
    "bool-as-word": (["model.lora=maybe"], "command line: model.lora: expected bool"),
}


@pytest.mark.parametrize("case", sorted(OVERRIDES))
def test_hostile_override(case, tmp_path, capsys):
    overrides, expected = OVERRIDES[case]
    _run(["train", *overrides, f"run.output_dir={tmp_path / 'run'}"], tmp_path, capsys, expected)
    assert not (tmp_path / "run").exists()


# ---- other verbs and their file arguments ----
def _pairs(d: Path) -> Path:
    (d / "p.jsonl").write_text(GOOD + "\n")
    return d / "p.jsonl"


VERBS = {
    "unknown-verb": (lambda d: ["trian"], "invalid choice: 'trian'"),
    "unknown-flag": (lambda d: ["train", "--bogus"], "unrecognized arguments: --bogus"),
    "stray-word": (lambda d: ["advise", str(_pairs(d)), "--memory-gb", "2", "stray"], "unrecognized arguments: stray"),
    "sweep-bad-beta": (lambda d: ["sweep", "--beta", "abc", "--lr", "1e-4"], "--beta: expected comma-separated numbers"),
    "eval-no-data": (lambda d: ["eval"], "the following arguments are required: --data"),
    "build-bad-votes": (lambda d: ["data", "build", "j", "--pairs", "p", "--out", "o", "--min-votes", "x"],
                        "argument --min-votes: expected a whole number, got 'x'"),
    "eval-run-missing": (lambda d: ["eval", "--run", str(d / "nope"), "--data", str(_pairs(d))],
                         "config.yaml: not a run directory"),
    "resume-no-config": (lambda d: ["resume", str(d)], "config.yaml: not found"),
    "resume-bad-yaml": (lambda d: ((d / "config.yaml").write_text("train: [\n"), ["resume", str(d)])[1],
                        "config.yaml:2: <yaml>: invalid YAML"),
    "resume-dup-yaml": (lambda d: ((d / "config.yaml").write_text("run:\n  a: 1\nrun:\n  a: 2\n"), ["resume", str(d)])[1],
                        "duplicate key 'run'"),
    "validate-directory": (lambda d: ["validate-data", str(d)], "dataset: not a saved HF dataset"),
    "inspect-fifo": (lambda d: (os.mkfifo(d / "f.jsonl"), ["data", "inspect", str(d / "f.jsonl")])[1], "is a FIFO"),
    "advise-corrupt-gz": (lambda d: ((d / "x.jsonl.gz").write_bytes(b"\x1f\x8bxx"),
                                     ["advise", str(d / "x.jsonl.gz")])[1], "gzip:"),
    "score-missing": (lambda d: ["score", str(d / "none.jsonl"), "--reward", "sentiment", "--out", str(d / "o.jsonl")],
                      "none.jsonl:"),
    "agree-malformed": (lambda d: ((d / "j.jsonl").write_text("{not json\n"), ["data", "agree", str(d / "j.jsonl")])[1],
                        "j.jsonl:1:"),
    "build-out-under-file": (lambda d: ((d / "j.jsonl").write_text(""), (d / "f").write_text("x"),
                                        ["data", "build", str(d / "j.jsonl"), "--pairs", str(_pairs(d)),
                                         "--out", str(d / "f" / "o.jsonl")])[2], ""),
    "label-pairs-fifo": (lambda d: (os.mkfifo(d / "p.jsonl"), ["label", str(d / "p.jsonl"), "--judgments",
                                                                str(d / "j.jsonl")])[1], "is a FIFO"),
    "synth-prompts-missing": (lambda d: ["synth", str(d / "none.txt"), "--reward", "sentiment", "--out",
                                         str(d / "o.jsonl")], "none.txt"),
    "iterate-prompts-fifo": (lambda d: (os.mkfifo(d / "p.txt"), ["iterate", f"online.prompts_path={d / 'p.txt'}",
                                                                 f"run.output_dir={d / 'run'}"])[1], "p.txt"),
    "report-missing-dir": (lambda d: ["report", str(d / "none")], "none"),
}


@pytest.mark.parametrize("case", sorted(VERBS))
def test_hostile_verb_input(case, tmp_path, capsys):
    make, expected = VERBS[case]
    d = tmp_path / "w"
    d.mkdir()
    argv = make(d)
    _run(argv, tmp_path, capsys, expected)


def test_debug_flag_shows_the_traceback_of_an_internal_error(monkeypatch, capsys):
    import preftune.cli

    def boom(args):
        raise KeyError("surprise")

    monkeypatch.setattr(preftune.cli, "_run", boom)
    assert main(["validate-data", "x.jsonl"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("preftune: internal error: KeyError: 'surprise' (rerun with --debug")
    with pytest.raises(KeyError):
        main(["--debug", "validate-data", "x.jsonl"])


def test_os_errors_anywhere_are_one_line_exit_2(monkeypatch, capsys):
    import errno

    import preftune.cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/run/metrics.jsonl")

    monkeypatch.setattr(preftune.cli, "_run", full)
    assert main(["validate-data", "x.jsonl"]) == 2
    assert capsys.readouterr().err.strip() == "/data/run/metrics.jsonl: file: no space left on the device"


# ---- a run directory's own files (issue 36): data, read with the same bounded, regular-file-only reader ----
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    from conftest import one_step_run

    return one_step_run(tmp_path_factory.mktemp("hostile-run"), tiny_model_dir)


def _replace(path: Path, make) -> None:
    path.unlink(missing_ok=True)
    make(path)


def _model_dir(run: Path, d: Path, config: dict) -> None:
    """d/m: a model directory with the run's tokenizer, an empty weights file and this config."""
    import shutil

    (d / "m").mkdir()
    for f in (run / "model").glob("tok*"):
        shutil.copy(f, d / "m" / f.name)
    (d / "m" / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                     "num_attention_heads": 4, **config}))
    (d / "m" / "model.safetensors").write_bytes(b"")


def _unfinished(run: Path) -> None:
    (run / "summary.json").unlink()


RUN_FILES = {
    "export-summary-fifo": (lambda r, d: (_replace(r / "summary.json", os.mkfifo),
                                          ["export", str(r), "--out", str(d / "x")])[1], "summary.json: is a FIFO"),
    "resume-summary-fifo": (lambda r, d: (_replace(r / "summary.json", os.mkfifo), ["resume", str(r)])[1],
                            "summary.json: is a FIFO"),
    "eval-reference-fifo": (lambda r, d: (_replace(r / "reference.json", os.mkfifo),
                                          ["eval", "--run", str(r), "--data", str(_pairs(d))])[1],
                            "reference.json: is a FIFO"),
    "eval-reference-list": (lambda r, d: ((r / "reference.json").write_text("[]"),
                                          ["eval", "--run", str(r), "--data", str(_pairs(d))])[1],
                            "reference.json: expected a JSON object"),
    "resume-lock-symlink": (lambda r, d: (_unfinished(r), (d / "victim.txt").write_text("keep me\n"),
                                          os.symlink(d / "victim.txt", r / ".preftune.lock"),
                                          ["resume", str(r)])[3], ".preftune.lock: cannot be used as the run's lock"),
    "resume-lock-fifo": (lambda r, d: (_unfinished(r), os.mkfifo(r / ".preftune.lock"), ["resume", str(r)])[2],
                         ".preftune.lock: is not a regular file"),
    "rm-ensemble-not-a-list": (lambda r, d: ((d / "ens").mkdir(), (d / "ens" / "ensemble.json").write_text(
        '{"members": 3}'), ["score", str(_pairs(d)), "--reward", f"rm:{d / 'ens'}", "--out", str(d / "o.jsonl")])[2],
        "ensemble.json:1: members: expected a non-empty list"),
    "rm-ensemble-escapes": (lambda r, d: ((d / "ens").mkdir(), (d / "ens" / "ensemble.json").write_text(
        '{"members": ["../../etc"]}'), ["score", str(_pairs(d)), "--reward", f"rm:{d / 'ens'}", "--out",
                                        str(d / "o.jsonl")])[2], "members: expected a non-empty list"),
    "export-model-symlink": (lambda r, d: ((d / "secret.txt").write_text("token\n"),
                                           os.symlink(d / "secret.txt", r / "model" / "notes.txt"),
                                           ["export", str(r), "--out", str(d / "x")])[2],
                             "notes.txt: model: is a symlink"),
    "report-experiment-png-symlink": (lambda r, d: ((d / "exp").mkdir(), (d / "exp" / "results.json").write_text("{}"),
                                                    (d / "secret.txt").write_text("token\n"),
                                                    os.symlink(d / "secret.txt", d / "exp" / "plot.png"),
                                                    ["report", "--experiment", str(d / "exp"), "--out",
                                                     str(d / "r.html"), "--no-png"])[4], "plot.png:0: png: is a symlink"),
    "model-config-100k-layers": (lambda r, d: (_model_dir(r, d, {"num_hidden_layers": 100_000, "hidden_size": 576,
                                                                  "intermediate_size": 1536, "vocab_size": 49152}),
                                               ["eval", "--data", str(_pairs(d)), f"model.name_or_path={d / 'm'}"])[1],
                                 "config.json: model.name_or_path: declares about 3.98e+11 parameters"),
    "model-without-tokenizer": (lambda r, d: (_model_dir(r, d, {}), [p.unlink() for p in (d / "m").glob("tok*")],
                                              ["eval", "--data", str(_pairs(d)), f"model.name_or_path={d / 'm'}"])[2],
                                "model.name_or_path: no usable tokenizer"),
    "model-config-invalid-json": (lambda r, d: ((d / "m").mkdir(), (d / "m" / "config.json").write_text("{oops"),
                                                (d / "m" / "model.safetensors").write_bytes(b""),
                                                ["eval", "--data", str(_pairs(d)), f"model.name_or_path={d / 'm'}"])[3],
                                  "config.json:1: config.json: invalid JSON"),
}


@pytest.mark.parametrize("case", sorted(RUN_FILES))
def test_hostile_run_file(case, finished_run, tmp_path, capsys):
    import shutil

    make, expected = RUN_FILES[case]
    run = shutil.copytree(finished_run[0], tmp_path / "run")
    d = tmp_path / "w"
    d.mkdir()
    argv = make(run, d)
    _run(argv, tmp_path, capsys, expected)
