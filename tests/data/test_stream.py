"""data.streaming (data/stream.py, batches.StreamingSource): the same training as in memory, exact
resume, bounded reading, and bad rows deep in the file as one line."""

import json
import random

import pytest

from conftest import PAIRS, interrupt_after_checkpoint, weights_sha, write_jsonl
from preftune.cli import main
from preftune.config import load_config
from preftune.core.losses import build_loss
from preftune.data.batches import OfflineSource, StreamingSource
from preftune.data.sources import load_records
from preftune.data.stream import UP_FRONT, chunks, ordered, shuffle_buffer, stream_records
from preftune.training.train import train
from preftune.utils.errors import ConfigError, DataError


def _losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _args(tmp_path, model_dir, data, name, *extra):
    return [f"model.name_or_path={model_dir}", f"data.train_path={data}", f"run.output_dir={tmp_path / name}",
            "data.max_length=64", "data.max_prompt_length=32", "train.lr=1e-2", "model.lora_r=4", "model.lora_alpha=8",
            "train.batch_size=3", "diagnostics.probe_every=0", *extra]


def _pairs(n: int) -> list[dict]:
    """n distinct pairs of a few words (the tiny tokenizer's corpus words)."""
    words = ["great", "slow", "boring", "wonderful", "Paris", "bread", "ending", "acting"]
    rng = random.Random(n)
    return [{"prompt": f"Row {i}: the movie was", "chosen": " " + " ".join(rng.sample(words, 3)),
             "rejected": " " + " ".join(rng.sample(words, 2))} for i in range(n)]


# ---- the order ---------------------------------------------------------------------------------

def test_shuffle_buffer_is_a_seeded_permutation_like_datasets():
    items = list(range(100))
    a = list(shuffle_buffer(iter(items), 10, random.Random(1)))
    assert sorted(a) == items and a != items
    assert a == list(shuffle_buffer(iter(items), 10, random.Random(1)))  # a function of the seed alone
    assert list(shuffle_buffer(iter(items), 1, random.Random(1))) == items  # a buffer of one is file order
    # local: nothing leaves before the buffer has been filled behind it
    assert all(a.index(x) >= x - 10 for x in items)


def test_chunks_are_dataloader_batches():
    assert list(chunks(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]


# ---- readers -------------------------------------------------------------------------------------

def test_streamed_records_equal_loaded_records_for_jsonl_csv_parquet(tmp_path):
    import datasets

    rows = _pairs(600)
    paths = [write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "d.csv", tmp_path / "d.parquet"]
    datasets.Dataset.from_list(rows).to_csv(str(paths[1]), index=False)
    datasets.Dataset.from_list(rows).to_parquet(str(paths[2]))
    d = load_config(None, []).data
    for path in paths:
        assert list(stream_records(str(path), d)) == load_records(path), path
    assert [r.line for r in stream_records(f"{paths[0]}[5:8]", d)] == [6, 7, 8]  # a slice, read lazily


def test_streamed_csv_and_gzip_errors_name_the_line_reached(tmp_path):
    """Decoded as read, a bad byte or a truncated archive deep in a file is found where it is."""
    import gzip

    d = load_config(None, []).data
    good = "".join(f"p{i},c{i},r{i}\n" for i in range(300)).encode()
    (tmp_path / "d.csv").write_bytes(b"prompt,chosen,rejected\n" + good + b"p,\xff\xfe,r\n")
    with pytest.raises(DataError, match=r"d\.csv:302: encoding: not UTF-8"):
        list(stream_records(str(tmp_path / "d.csv"), d))
    body = gzip.compress("".join(json.dumps(r) + "\n" for r in _pairs(3000)).encode())
    (tmp_path / "d.jsonl.gz").write_bytes(body[: len(body) // 2])
    with pytest.raises(DataError, match=r"d\.jsonl\.gz:\d+: gzip: compressed stream is truncated"):
        list(stream_records(str(tmp_path / "d.jsonl.gz"), d))


def test_stream_refuses_what_it_cannot_read_lazily(tmp_path):
    d = load_config(None, []).data
    (tmp_path / "d.json").write_text(json.dumps(PAIRS))
    with pytest.raises(DataError, match=r"d\.json:0: data\.streaming: .*write it as \.jsonl"):
        list(stream_records(str(tmp_path / "d.json"), d))
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    with pytest.raises(DataError, match="counted from the end"):
        list(stream_records(f"{data}[-2:]", d))


# ---- settings ------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, key", [
    ([], "data.streaming: needs train.max_steps > 0"),
    (["train.max_steps=3", "train.reference_cache=true"], "train.reference_cache: cannot cache a streamed file"),
    (["train.max_steps=3", "loss.name=nll"], "data.streaming: streams preference files"),
])
def test_streaming_refusals_are_one_line(extra, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.streaming=true", *extra])
    assert str(info.value).startswith(f"command line: {key}") and "\n" not in str(info.value)


# ---- training ------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [[], ["data.layout=padded"], ["loss.name=kto", "data.paired_to_unpaired=true"]])
def test_streamed_run_equals_the_in_memory_run_in_file_order(tmp_path, tiny_model_dir, extra):
    """10 pairs, batch 3, 2 epochs: 4 micro-batches per epoch, the last of each short, as in memory.
    Packed rows with prefix sharing (the default), padded rows, and KTO's unpaired examples."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS + PAIRS[:2])
    common = ["train.epochs=2", "train.shuffle=false", *extra]
    memory = train(load_config(None, _args(tmp_path, tiny_model_dir, data, "memory", *common)))
    streamed = train(load_config(None, _args(tmp_path, tiny_model_dir, data, "streamed", *common, "data.streaming=true",
                                             f"train.max_steps={memory.steps}")))
    assert streamed.steps == memory.steps == (8 if "loss.name=kto" not in extra else 14)
    assert _losses(streamed.run_dir) == _losses(memory.run_dir)  # every step, exactly
    assert weights_sha(streamed.run_dir) == weights_sha(memory.run_dir)
    assert [json.loads(x)["epoch"] for x in (streamed.run_dir / "metrics.jsonl").read_text().splitlines()] == \
        [json.loads(x)["epoch"] for x in (memory.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert streamed.summary["data"]["streaming"]["passes"] == 2


def test_the_stream_ends_after_train_epochs_passes(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    result = train(load_config(None, _args(tmp_path, tiny_model_dir, data, "run", "data.streaming=true",
                                           "train.max_steps=50")))
    assert result.steps == 3  # 8 pairs, batch 3, one pass
    assert "the stream ended after 1 pass(es) (3 micro-batches), before train.max_steps=50" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [[], ["data.drop_overlong=true"]])
def test_streamed_resume_is_bit_identical(tmp_path, tiny_model_dir, monkeypatch, extra):
    """Shuffle buffer of 4 over 20 pairs, 2 passes of 7 micro-batches; cut after step 9 (in pass
    2), resumed: the same losses and weights as the uninterrupted streamed run. Without drops the
    skipped micro-batches are counted in records; with data.drop_overlong they are re-tokenized."""
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(20))
    d = load_config(None, ["data.shuffle_buffer=4"]).data
    shuffled = [r.line for r in ordered(stream_records(str(data), d), seed=42, pass_index=1, buffer=4)]
    assert sorted(shuffled) == list(range(1, 21)) and shuffled != sorted(shuffled)  # the order really is shuffled
    common = ["data.streaming=true", "data.shuffle_buffer=4", "train.epochs=2", "train.max_steps=14",
              "train.checkpoint_every=3", *extra]
    full = train(load_config(None, _args(tmp_path, tiny_model_dir, data, "full", *common)))
    assert full.steps == 14
    cut = lambda: train(load_config(None, _args(tmp_path, tiny_model_dir, data, "cut", *common)))  # noqa: E731
    interrupt_after_checkpoint(monkeypatch, 9, cut)
    monkeypatch.undo()
    resumed = train(load_config(None, _args(tmp_path, tiny_model_dir, data, "cut", *common)), resume=True)
    assert resumed.summary["resumed_from"].endswith("step-00000009")
    assert _losses(resumed.run_dir) == _losses(full.run_dir)
    assert weights_sha(resumed.run_dir) == weights_sha(full.run_dir)


def test_a_large_file_is_not_read_whole_before_step_1(tmp_path, tiny_model_dir):
    """20,000 pairs, buffer 64, one step of batch 3: the stream read the buffer and a micro-batch,
    and tokenized the up-front records and one micro-batch, nothing more."""
    data = write_jsonl(tmp_path / "big.jsonl", _pairs(20_000))
    cfg = load_config(None, _args(tmp_path, tiny_model_dir, data, "run", "data.streaming=true",
                                  "data.shuffle_buffer=64", "train.max_steps=1"))
    source = OfflineSource.load(cfg, build_loss(cfg.loss.name))
    assert isinstance(source, StreamingSource)
    train(cfg, source=source)
    assert source.read[0] <= 64 + 3  # the buffer filled, then one record read per record emitted
    assert source.tokenized == UP_FRONT + 3
    assert source.stats["streaming"]["records_read"] == source.read[0]


def test_a_bad_row_deep_in_the_file_stops_the_run_in_one_line_exit_2(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Past the up-front records (20 here, UP_FRONT in a run) a bad row fails when training reaches
    it: one line naming file, line and field, exit 2; the checkpoints written before it remain
    (resumable once it is fixed), and no model/ or summary.json is written."""
    monkeypatch.setattr("preftune.data.batches.UP_FRONT", 20)
    rows = _pairs(40)
    rows[30] = {**rows[30], "chosen": ""}  # line 31, in micro-batch 11 (batch 3)
    data = write_jsonl(tmp_path / "deep.jsonl", rows)
    run_dir = tmp_path / "run"
    rc = main(["train", *_args(tmp_path, tiny_model_dir, data, "run", "data.streaming=true", "train.shuffle=false",
                               "train.max_steps=100", "train.checkpoint_every=4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith(f"{data}:31: chosen: is empty"), err
    assert "pass 1 after 10 micro-batches" in err[0] and "preftune resume" in err[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]
    assert len(_losses(run_dir)) == 10 and not (run_dir / "model").exists() and not (run_dir / "summary.json").exists()
    # fixed in place, the run resumes from its newest checkpoint to the end of the pass
    rows[30]["chosen"] = " fixed"
    write_jsonl(data, rows)
    assert main(["resume", str(run_dir), "--allow-config-change"]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 14


def test_a_bad_row_among_the_first_records_fails_before_the_model_loads(tmp_path, capsys):
    rows = _pairs(50)
    rows[40] = {"prompt": "p", "chosen": 3, "rejected": " no"}
    data = write_jsonl(tmp_path / "early.jsonl", rows)
    rc = main(["train", f"data.train_path={data}", f"run.output_dir={tmp_path / 'run'}", "data.streaming=true",
               "train.max_steps=5", "model.name_or_path=/nonexistent/model"])  # never reached
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"{data}:41: chosen: expected a string, got int"]
    assert not (tmp_path / "run").exists()
