"""report.py: a self-contained page from run files, checked in headless Chromium."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from preftune.errors import ConfigError
from preftune.report import read_run, write_report


def _fake_run(path, *, slope=1.0, health=None):
    path.mkdir(parents=True)
    rows = []
    for s in range(1, 41):
        row = {"step": s, "loss": 0.69 - 0.01 * s * slope, "rewards/chosen": 0.01 * s, "rewards/rejected": -0.02 * s,
               "rewards/margins": 0.03 * s * slope, "rewards/accuracies": min(1.0, 0.5 + 0.02 * s),
               "logps/chosen": -50 + 0.1 * s, "logps/rejected": -60 - 0.2 * s, "lengths/chosen": 30.0,
               "lengths/rejected": 28.0, "health": []}
        if s % 10 == 0:
            row.update({"probe/kl": 0.2 * s * slope, "probe/sample_length": 20 + s * slope,
                        "probe/reference_length": 21.0, "probe/eval_accuracy": 0.5 + 0.005 * s})
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.yaml").write_text("loss:\n  name: sigmoid\n  beta: 0.1\n")
    (path / "summary.json").write_text(json.dumps({"steps": 40, "health": health or {}, "final": rows[-1],
                                                   "eval": {"accuracy/implicit_reward": 0.7}, "elapsed_s": 12.5}))
    per_prompt = [{"prompt": f"p{i}", "policy": 0.1 * i, "reference": 0.05 * i} for i in range(6)]
    (path / "eval.json").write_text(json.dumps({"per_prompt": per_prompt}))
    return path


def test_report_is_self_contained_and_holds_every_plot(tmp_path):
    a = _fake_run(tmp_path / "a", health={"kl_drift": 30})
    b = _fake_run(tmp_path / "b", slope=2.0)
    out = write_report([str(a), str(b)], tmp_path / "out" / "report.html")
    page = out.read_text()
    for name in ("loss_margin", "rewards", "logps", "accuracy", "kl", "lengths", "per_prompt_0", "per_prompt_1"):
        assert f'id="plot-{name}"' in page, name
        assert (out.parent / f"report-{name}.png").stat().st_size > 5000
    assert "<script" not in page and "<link" not in page and " src=" not in page  # nothing fetched
    assert "kl_drift" in page and "beta: 0.1" in page and page.count("<svg") == 8
    assert not list(out.parent.glob(".tmp-*"))


def test_report_of_a_directory_without_metrics_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="metrics.jsonl"):
        read_run(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "preftune", "report", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not _chromium() and not os.environ.get("PREFTUNE_REQUIRE_BROWSER"),
                    reason="Chromium is not installed (.ci/run installs it and sets PREFTUNE_REQUIRE_BROWSER)")
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    a = _fake_run(tmp_path / "a", health={"margin_explosion": 12})
    b = _fake_run(tmp_path / "b", slope=2.0)
    out = write_report([str(a), str(b)], tmp_path / "report.html", png=False)
    shots = os.environ.get("PREFTUNE_SCREENSHOTS")
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(out.as_uri())
        figures = page.query_selector_all("figure.plot")
        assert len(figures) == 8
        for i, fig in enumerate(figures):
            path = tmp_path / f"plot{i}.png"
            fig.screenshot(path=str(path))
            img = Image.open(path).convert("RGB")
            w, h = img.size
            assert w > 300 and h > 150, (i, img.size)
            pixels = list(img.getdata())
            inked = sum(1 for px in pixels if sum(px) < 600) / len(pixels)  # not near-white
            assert inked > 0.02, (i, inked)  # axes, lines, text were painted
            assert len(set(pixels)) > 20, i  # more than a flat fill
        if shots:
            page.screenshot(path=os.path.join(shots, "report_page.png"), full_page=True)
        browser.close()
    assert errors == []
