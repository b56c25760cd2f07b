"""RELIABILITY.md D1: no unsafe deserialization or code execution anywhere in the package."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "preftune"


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            yield node, owner, name


def test_no_unsafe_loads_or_exec_in_the_package():
    problems = []
    files = sorted(SRC.rglob("*.py"))
    assert len(files) >= 15
    for path in files:
        tree = ast.parse(path.read_text())
        for node, owner, name in _calls(tree):
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{path.name}:{node.lineno}"
            if owner == "pickle" and name in {"load", "loads"}:
                problems.append(f"{where} pickle.{name}")
            if owner == "torch" and name == "load":
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    problems.append(f"{where} torch.load without weights_only=True")
            if owner in {"np", "numpy"} and name == "load" and "allow_pickle" in kw:
                problems.append(f"{where} np.load(allow_pickle=...)")
            if owner == "yaml" and name in {"load", "unsafe_load", "full_load"}:
                problems.append(f"{where} yaml.{name}")
            if name in {"eval", "exec"} and isinstance(node.func, ast.Name):  # not model.eval()
                problems.append(f"{where} {name}()")
            rc = kw.get("trust_remote_code")
            if isinstance(rc, ast.Constant) and rc.value is True:
                problems.append(f"{where} trust_remote_code=True")
    assert problems == []


def test_every_transformers_from_pretrained_passes_trust_remote_code():
    """D4: passed explicitly, so there is never an interactive prompt (peft's loader takes none)."""
    seen = 0
    for path in sorted(SRC.rglob("*.py")):
        for node, owner, name in _calls(ast.parse(path.read_text())):
            if name == "from_pretrained" and owner != "PeftModel":
                seen += 1
                assert "trust_remote_code" in {k.arg for k in node.keywords}, f"{path.name}:{node.lineno}"
    assert seen >= 4


def test_torch_floor_is_at_or_above_2_10():
    text = (SRC.parents[1] / "pyproject.toml").read_text()
    assert '"torch>=2.10,<3"' in text  # a range (tests/test_packaging.py); the exact pin is in constraints.txt


class _Payload:
    """Unpickling this runs `Path(marker).touch()`: proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_eval_run_refuses_a_pickle_adapter_without_the_opt_in(tmp_path, tiny_model_dir, capsys):
    """Issue 16 (5): a shared run whose adapter is adapter_model.bin never unpickles it."""
    import json
    import pickle

    from conftest import PAIRS, write_jsonl
    from preftune.cli import main

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    run = tmp_path / "run"
    assert main(["train", f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}", f"run.output_dir={run}",
                 "train.max_steps=1", "data.max_length=64", "data.max_prompt_length=32", "model.lora_r=4"]) == 0
    (run / "model" / "adapter_model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    (run / "model" / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{run / 'model'}: adapter: no adapter_model.safetensors"), err
    assert "model.allow_pickle_weights=true" in err[0]
    assert not marker.exists()
    assert json.loads((run / "summary.json").read_text())["steps"] == 1


# ---- opt-ins come from the command line, never from a run directory's saved files ------------

import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402


def _exit(argv: list[str], capsys) -> tuple[int, list[str]]:
    from preftune.cli import main

    rc = main(argv)
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_model_dir):
    """A finished run whose config.yaml was edited to opt in by itself: its base now ships pickle
    weights only (allow_pickle_weights: true) or asks for its own code (trust_remote_code: true)."""
    from transformers import AutoModelForCausalLM

    from conftest import one_step_run

    root = tmp_path_factory.mktemp("planted")
    run, pairs = one_step_run(root, tiny_model_dir)
    pickle_base = shutil.copytree(tiny_model_dir, root / "pickle-base")
    (pickle_base / "model.safetensors").unlink()
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict(), pickle_base / "pytorch_model.bin")
    remote_base = root / "remote-base"
    shutil.copytree(tiny_model_dir, remote_base)
    config = json.loads((remote_base / "config.json").read_text())
    (remote_base / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    runs = {}
    for name, base, key in (("pickle", pickle_base, "allow_pickle_weights"), ("remote", remote_base, "trust_remote_code")):
        d = shutil.copytree(run, root / name)
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        cfg["model"].update({"name_or_path": str(base), key: True})
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        runs[name] = d
    return {**runs, "pairs": str(pairs), "root": root}


@pytest.mark.parametrize("kind,key", [("pickle", "allow_pickle_weights"), ("remote", "trust_remote_code")])
def test_a_run_s_config_cannot_opt_in_for_eval_export_or_bon(planted, kind, key, capsys, tmp_path):
    run = str(planted[kind])
    for argv in (["eval", "--run", run, "--data", planted["pairs"]],
                 ["export", run, "--out", str(tmp_path / "x"), "--merge"],
                 ["bon", planted["pairs"], "--policy", run, "--reward", "fn:conftest:length_reward",
                  "--out", str(tmp_path / "b.jsonl"), "-n", "2", "online.max_new_tokens=2"]):
        rc, err = _exit(argv, capsys)
        assert rc == 2 and len(err) == 1 and f"model.{key}=true" in err[0], (argv[0], rc, err)
    assert not (tmp_path / "x").exists() and not (tmp_path / "b.jsonl").exists()
    if kind == "pickle":  # the same opt-in given on the command line is honoured
        rc, _ = _exit(["eval", "--run", run, "--data", planted["pairs"], f"model.{key}=true"], capsys)
        assert rc == 0


def test_resume_and_serve_of_a_planted_run_do_not_opt_in(planted, capsys):
    from preftune.apps.serve import load_chat_model
    from preftune.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="allow_pickle_weights=true"):
        load_chat_model(str(planted["pickle"]))
    unfinished = shutil.copytree(planted["pickle"], planted["root"] / "unfinished")
    (unfinished / "summary.json").unlink()
    shutil.rmtree(unfinished / "model")
    rc, err = _exit(["resume", str(unfinished)], capsys)
    assert rc == 2 and len(err) == 1 and "allow_pickle_weights=true" in err[0], err
