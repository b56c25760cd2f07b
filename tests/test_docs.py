"""The docs cannot drift: the reference pages equal what the code generates, every registered
loss, format, reward source, health check and verb is documented, the README is a front door
(≤ 12 KB) whose links resolve."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generate():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_reference_pages_are_what_the_code_generates():
    gen = _generate()
    for name, make in gen.PAGES.items():
        assert (ROOT / "docs" / "reference" / name).read_text() == make().rstrip() + "\n", \
            f"docs/reference/{name} is stale: run python docs/generate.py"


def test_the_method_table_lists_every_loss_with_how_it_is_tested():
    """docs/reference/methods.md (checked against the code above) has a row per registered loss,
    each tested by hand or against TRL; the oracle names it reads are registered losses that
    their oracle file really runs (each named again outside its ORACLE literal)."""
    import ast

    from preftune.core.losses import LOSSES

    gen = _generate()
    kinds, page = gen.test_kinds(ROOT), gen.methods_page()
    assert set(kinds) == set(LOSSES) and [n for n, k in kinds.items() if not k] == []
    for name in LOSSES:
        assert f"| `{name}` | {LOSSES[name].kind.name} |" in page, name
    for path in sorted((ROOT / "tests" / "oracle").glob("test_*.py")):
        text = path.read_text()
        literal = next((n for n in ast.parse(text).body if isinstance(n, ast.Assign)
                        and any(getattr(t, "id", "") == "ORACLE" for t in n.targets)), None)
        assert literal is not None, f"{path.name}: no ORACLE literal"
        rest = text.replace(ast.get_source_segment(text, literal), "")
        for name in ast.literal_eval(literal.value):
            assert name in LOSSES and f'"{name}"' in rest, (path.name, name)
    assert len(LOSSES) >= 30


def test_every_registered_name_and_verb_is_in_the_docs():
    from preftune.cli import _parser
    from preftune.config import Config
    from preftune.core.diagnostics import CHECKS
    from preftune.core.losses import KINDS, LOSSES
    from preftune.data.sources import FORMATS
    from preftune.models.rewards import REWARD_KINDS

    gen = _generate()
    registries, cli, config = gen.registries_page(), gen.cli_page(), gen.config_page()
    for name in [*LOSSES, *FORMATS, *REWARD_KINDS, *CHECKS]:
        assert f"`{name}`" in registries, name
    for kind in KINDS.values():  # each kind's row, and its page says how to add one
        assert f"| {kind.name} | {kind.data} | `preftune {kind.command}` |" in registries, kind.name
    extending = (ROOT / "docs" / "extending.md").read_text()
    for owner in ("kinds.py", "register_loss", "REWARD_KINDS", "FORMATS", "BatchSource"):
        assert owner in extending, owner
    for path, _ in gen._walk(_parser(), []):
        if path:
            assert f"## `preftune {' '.join(path)}`" in cli, path
    import dataclasses

    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            assert f"`{section.name}.{f.name}`" in config


def test_the_readme_is_a_front_door_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert links and all((ROOT / link).exists() for link in links if not link.startswith("http")), links


def _api_sections() -> dict[str, str]:
    """{name as imported from preftune: the object path its ::: directive renders} of the API page."""
    page = (ROOT / "docs" / "reference" / "api.md").read_text()
    return {name: target for target, name in
            re.findall(r'^::: ([\w.]+)\n    options:\n(?:      .*\n)*?      heading: "preftune\.(\w+)"', page, re.M)}


def test_every_public_name_has_its_section_in_the_api_reference():
    """Each name of preftune.__all__ is a ::: directive headed `preftune.NAME` on docs/reference/api.md
    (mkdocstrings renders it from the docstrings), aimed at the very object `preftune.NAME` is."""
    import importlib

    import preftune

    sections = _api_sections()
    assert [name for name in preftune.__all__ if name not in sections] == []
    for name, target in sections.items():
        module, _, attr = target.rpartition(".")
        assert getattr(importlib.import_module(module), attr) is getattr(preftune, name), (name, target)
