"""zoo.py: packaged GGUF models by name; parts concatenated once and checked against SHA256SUMS."""

import hashlib

import pytest

from preftune.models import zoo
from preftune.utils.errors import ConfigError


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """A packaged model in three part packages plus a main package with SHA256SUMS."""
    chunks = [b"GGUF" + bytes(range(50)), bytes(range(200, 250)), b"tail"]
    dirs = {}
    for i, data in enumerate(chunks):
        d = tmp_path / f"part{i}"
        (d / "data").mkdir(parents=True)
        (d / "data" / f"m.gguf.part0{i}").write_bytes(data)
        dirs[f"pkg_part{i}"] = d
    main = tmp_path / "main"
    (main / "data").mkdir(parents=True)
    digest = hashlib.sha256(b"".join(chunks)).hexdigest()
    (main / "data" / "SHA256SUMS").write_text(f"{digest}  m.gguf\n")
    dirs["pkg_main"] = main
    entry = zoo.Packaged("fake", ("fake==1",), "pkg_main", "m.gguf",
                         tuple((f"pkg_part{i}", f"m.gguf.part0{i}") for i in range(3)))
    monkeypatch.setitem(zoo.ZOO, "fake", entry)
    monkeypatch.setattr(zoo, "_package_dir", lambda name: dirs.get(name))
    return tmp_path, b"".join(chunks), dirs


def test_parts_are_concatenated_once_and_verified(fake_parts):
    tmp_path, whole, _ = fake_parts
    path = zoo.gguf_path("fake", tmp_path / "cache")
    assert path.read_bytes() == whole and path.parent == tmp_path / "cache" / "gguf"
    assert zoo.gguf_path("fake", tmp_path / "cache") == path  # reused, not rebuilt


def test_a_corrupt_part_is_refused_and_leaves_nothing(fake_parts):
    tmp_path, _, dirs = fake_parts
    (dirs["pkg_part1"] / "data" / "m.gguf.part01").write_bytes(b"tampered")
    with pytest.raises(ConfigError, match="does not match SHA256SUMS"):
        zoo.gguf_path("fake", tmp_path / "cache")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_a_missing_package_says_how_to_fetch_it(fake_parts, monkeypatch):
    tmp_path, _, _ = fake_parts
    monkeypatch.setattr(zoo, "_package_dir", lambda name: None)
    with pytest.raises(ConfigError, match="run `preftune models fetch fake`"):
        zoo.gguf_path("fake", tmp_path / "cache")


def test_fetch_refuses_an_unknown_name():
    with pytest.raises(ConfigError, match="unknown model 'nope'; known: smollm2-135m-instruct, gemma3-270m"):
        zoo.fetch("nope")


def test_gemma_is_never_a_default():
    from preftune.config import ModelConfig

    assert ModelConfig().name_or_path == "smollm2-135m-instruct"
    assert "Gemma Terms of Use" in zoo.ZOO["gemma3-270m"].licence
    assert len(zoo.ZOO["gemma3-270m"].wheels) == 5
