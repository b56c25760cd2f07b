import dataclasses
import gzip
import json

import pytest

from conftest import HH_DEV, HH_TRAIN, PAIRS, needs_shared, write_jsonl
from preftune.data.sources import load_records
from preftune.utils.errors import DataError


def _err(tmp_path, rows, name="d.jsonl", **kw) -> DataError:
    path = write_jsonl(tmp_path / name, rows)
    with pytest.raises(DataError) as info:
        load_records(path, **kw)
    return info.value


def test_standard_format(tmp_path):
    recs = load_records(write_jsonl(tmp_path / "d.jsonl", PAIRS[:3]))
    assert [(r.prompt, r.chosen, r.rejected, r.line) for r in recs][0] == (
        "The movie was", " great and wonderful.", " slow and boring.", 1)
    assert [r.line for r in recs] == [1, 2, 3]


def test_blank_lines_keep_true_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n\n" + json.dumps(PAIRS[1]) + "\n")
    assert [r.line for r in load_records(path)] == [1, 3]


def test_hh_transcripts_split_at_last_assistant_turn(tmp_path):
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bake?\n\nAssistant: Yes, gladly.",
           "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bake?\n\nAssistant: No."}
    (rec,) = load_records(write_jsonl(tmp_path / "hh.jsonl", [row]))
    assert rec.prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bake?\n\nAssistant:"
    assert (rec.chosen, rec.rejected) == (" Yes, gladly.", " No.")


def test_implicit_prompt_is_the_shared_prefix_at_a_word_boundary(tmp_path):
    (rec,) = load_records(write_jsonl(tmp_path / "d.jsonl", [{"chosen": "The sky is blue", "rejected": "The sky is black"}]))
    assert (rec.prompt, rec.chosen, rec.rejected) == ("The sky is ", "blue", "black")


def test_conversational_with_and_without_prompt(tmp_path):
    u = {"role": "user", "content": "hi"}
    a, b = {"role": "assistant", "content": "hello"}, {"role": "assistant", "content": "go away"}
    (rec,) = load_records(write_jsonl(tmp_path / "c.jsonl", [{"prompt": [u], "chosen": [a], "rejected": [b]}]))
    assert rec.prompt == [u] and rec.chosen == [a]
    (rec,) = load_records(write_jsonl(tmp_path / "i.jsonl", [{"chosen": [u, a], "rejected": [u, b]}]))
    assert rec.prompt == [u] and rec.chosen == [a] and rec.rejected == [b]


def test_column_map(tmp_path):
    rows = [{"question": "Q?", "good": " yes", "bad": " no"}]
    (rec,) = load_records(write_jsonl(tmp_path / "d.jsonl", rows),
                          column_map={"question": "prompt", "good": "chosen", "bad": "rejected"})
    assert (rec.prompt, rec.chosen, rec.rejected) == ("Q?", " yes", " no")


def test_csv_json_parquet_and_dataset_dir(tmp_path):
    import datasets

    rows = PAIRS[:3]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("prompt,chosen,rejected\n" + "".join(f'"{r["prompt"]}","{r["chosen"]}","{r["rejected"]}"\n'
                                                             for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "dsdir"))
    for path in (csv_path, tmp_path / "d.json", tmp_path / "d.parquet", tmp_path / "dsdir"):
        recs = load_records(path)
        assert [r.chosen for r in recs] == [r["chosen"] for r in rows], path
    assert [r.line for r in load_records(csv_path)] == [2, 3, 4]  # line 1 is the header


def test_gzip_jsonl(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in PAIRS[:2]))
    assert len(load_records(path)) == 2


@pytest.mark.parametrize("rows, line, field, problem", [
    ([PAIRS[0], {"prompt": "p", "chosen": " a"}], 2, "rejected", "missing"),
    ([PAIRS[0], {"prompt": "p", "chosen": "", "rejected": " b"}], 2, "chosen", "is empty"),
    ([PAIRS[0], {"prompt": "p", "chosen": 3, "rejected": " b"}], 2, "chosen", "expected a string, got int"),
    ([PAIRS[0], {"prompt": "p", "chosen": None, "rejected": " b"}], 2, "chosen", "is null"),
    ([PAIRS[0], PAIRS[1], '{"prompt": "p", "chosen": "a", '], 3, "json", "invalid JSON"),
    ([PAIRS[0], {"prompt": "p", "chosen": " same", "rejected": " same"}], 2, "rejected", "identical to chosen"),
    ([PAIRS[0], {"prompt": [{"role": "user", "content": "x"}], "chosen": " a", "rejected": " b"}], 2, "prompt",
     "format differs from line 1"),
    ([{"prompt": [{"speaker": "user", "text": "x"}], "chosen": [{"role": "assistant", "content": "a"}],
       "rejected": [{"role": "assistant", "content": "b"}]}], 1, "prompt[0].role", "missing"),
    ([{"chosen": "abc", "rejected": "xyz"}], 1, "prompt", "share no prefix"),
    ([["not", "an", "object"]], 1, "record", "expected an object"),
])
def test_bad_records_name_line_and_field(tmp_path, rows, line, field, problem):
    err = _err(tmp_path, rows)
    assert (err.line, err.field) == (line, field)
    assert problem in err.problem
    assert str(err).startswith(f"{tmp_path / 'd.jsonl'}:{line}: {field}: ")
    assert "\n" not in str(err)


def test_empty_file_and_missing_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="no records"):
        load_records(tmp_path / "e.jsonl")
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "absent.jsonl")


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(PAIRS[0]).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError) as info:
        load_records(path)
    assert (info.value.line, info.value.field) == (2, "encoding")


def test_allow_degenerate_keeps_identical_pairs(tmp_path):
    rows = [{"prompt": "p", "chosen": " same", "rejected": " same"}]
    assert len(load_records(write_jsonl(tmp_path / "d.jsonl", rows), allow_degenerate=True)) == 1


@needs_shared
def test_real_hh_harmless_files_load_completely():
    with pytest.raises(DataError) as info:  # four real replies are empty: refused unless asked
        load_records(HH_TRAIN)
    assert (info.value.line, info.value.field) == (87, "chosen")
    train = load_records(HH_TRAIN, allow_empty_completions=True)
    dev = load_records(HH_DEV, allow_empty_completions=True)
    assert (len(train), len(dev)) == (1800, 200)
    assert all(r.prompt.endswith("\n\nAssistant:") and r.chosen != r.rejected for r in train)
    assert sum(not r.chosen.strip() or not r.rejected.strip() for r in train) == 4


# ---- hub datasets by id --------------------------------------------------------------------

def test_hub_dataset_ids_are_told_apart_from_local_paths(tmp_path, monkeypatch):
    from preftune.data.sources import hub_dataset

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert hub_dataset("org/prefs") == ("org/prefs", "train", None)
    assert hub_dataset("org/prefs:test") == ("org/prefs", "test", None)
    assert hub_dataset("org/prefs:harmless:test") == ("org/prefs", "test", "harmless")  # a subset (config) too
    for local in ("org/prefs.jsonl", "org/prefs.csv.gz", "data/prefs", "a/b/c", "prefs", "/abs/x", "./org/x"):
        assert hub_dataset(local) is None, local
    with pytest.raises(DataError) as info:  # a mistyped local file keeps its local error
        load_records("org/prefs.jsonl")
    assert str(info.value) == "org/prefs.jsonl:0: file: no such file or directory"


def test_a_hub_subset_and_revision_reach_datasets(monkeypatch):
    """Hub datasets took no subset (config name) or revision (issue 33): org/name:config:split and
    data.revision are passed to datasets.load_dataset."""
    import datasets

    from preftune.config import load_config
    from preftune.data.prepare import load_data

    seen = {}

    def fake(name, config=None, *, split, revision=None):
        seen.update(name=name, config=config, split=split, revision=revision)
        return [{"prompt": "p", "chosen": " a", "rejected": " b"}]

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(datasets, "load_dataset", fake)
    records = load_data("org/prefs:harmless:test", load_config(None, ["data.revision=v1.2"]).data)
    assert len(records) == 1 and seen == {"name": "org/prefs", "config": "harmless", "split": "test", "revision": "v1.2"}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"the hub dataset 'org/prefs' \(config 'harmless', split 'test', revision "
                                        r"'v1.2'\) is not fetched"):
        load_data("org/prefs:harmless:test", load_config(None, ["data.revision=v1.2"]).data)


def test_hub_dataset_offline_is_one_line_naming_path_and_setting():
    with pytest.raises(DataError) as info:  # conftest sets HF_HUB_OFFLINE=1
        load_records("org/prefs:test", field="data.eval_path")
    assert str(info.value).startswith("org/prefs:test:0: data.eval_path: not a local file, and HF_HUB_OFFLINE is set")


def test_hub_dataset_rows_are_read_through_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config=None, *, split, revision=None):
        calls.append((name, split))
        if name == "org/missing":
            raise ConnectionError("Couldn't reach 'org/missing' on the Hub (LocalEntryNotFoundError)")
        return PAIRS[:3]

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    recs = load_records("org/prefs:test[:2]")
    assert calls == [("org/prefs", "test")] and [r.chosen for r in recs] == [p["chosen"] for p in PAIRS[:2]]
    with pytest.raises(DataError) as info:
        load_records("org/missing", field="data.train_path")
    assert str(info.value).startswith("org/missing:0: data.train_path: not a local file, and the hub dataset "
                                      "'org/missing' (split 'train') cannot be loaded: Couldn't reach")


def test_a_missing_column_lists_the_columns_found_and_the_column_map_to_use(tmp_path):
    """`chosen: missing` alone left users guessing which names are expected (issue 33)."""
    import pytest

    from preftune.data import load_records
    from preftune.utils.errors import DataError

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "p", "chosen_response": " a", "rejected_response": " b"}\n')
    with pytest.raises(DataError) as err:
        load_records(path)
    assert str(err.value) == (f"{path}:1: chosen: missing (the record has: prompt, chosen_response, "
                              "rejected_response; map a column with data.column_map='{chosen_response: chosen}')")


def test_a_saved_dataset_dict_is_read_by_split(tmp_path):
    """A `save_to_disk` DatasetDict folder was refused; DIR:SPLIT reads one split, DIR alone one
    with a single split, and anything else names the splits there are."""
    import datasets
    import pytest

    from preftune.data import load_records
    from preftune.utils.errors import DataError

    rows = {"prompt": ["p1", "p2"], "chosen": [" a", " c"], "rejected": [" b", " d"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "test": datasets.Dataset.from_dict({k: v[:1] for k, v in rows.items()})}
                         ).save_to_disk(str(tmp_path / "dd"))
    assert [r.prompt for r in load_records(f"{tmp_path / 'dd'}:train")] == ["p1", "p2"]
    assert [r.prompt for r in load_records(f"{tmp_path / 'dd'}:test")] == ["p1"]
    with pytest.raises(DataError, match=r"holds several splits: train, test; name one as .*dd:SPLIT"):
        load_records(tmp_path / "dd")
    with pytest.raises(DataError, match=r"has no split 'dev': train, test"):
        load_records(f"{tmp_path / 'dd'}:dev")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "one"))
    assert len(load_records(tmp_path / "one")) == 2


def test_a_chat_template_that_refuses_a_record_is_one_line_naming_it(tokenizer):
    """Mistral's and Gemma's templates `raise_exception` on roles they do not take: that was an
    internal error (exit 1); it names the record and its roles."""
    import copy

    import pytest

    from preftune.data import tokenize_records
    from preftune.data.records import PreferenceRecord
    from preftune.utils.errors import DataError

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    record = PreferenceRecord([{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}],
                              [{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}],
                              "d.jsonl", 7)
    with pytest.raises(DataError, match=r"^d.jsonl:7: prompt: the model's chat template refused this record "
                                        r"\(roles system, user\): System role not supported$"):
        tokenize_records([record], tok, max_length=64, max_prompt_length=32)


def test_the_file_suffixes_are_one_table(tmp_path):
    """READERS owns the suffixes: the reader, the error message and the config help all read it."""
    from preftune.config import DataConfig
    from preftune.data.sources import FILE_KINDS, READERS

    bad = tmp_path / "pairs.tsv"
    bad.write_text("x\n")
    with pytest.raises(DataError, match="unknown extension") as err:
        load_records(str(bad))
    assert all(s in str(err.value) for s in READERS) and all(s in FILE_KINDS for s in READERS)
    help_text = next(f.metadata["help"] for f in dataclasses.fields(DataConfig) if f.name == "train_path")
    assert FILE_KINDS in help_text
