"""report.py: a self-contained page from run files, checked in headless Chromium."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from preftune.apps.report import read_run, write_report
from preftune.utils.errors import ConfigError


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


def _report_cli(run, capsys):
    from preftune.cli import main

    rc = main(["report", str(run), "--no-png"])
    return rc, capsys.readouterr().err.strip().splitlines()


HOSTILE = ['<script>window.__pwned=1;alert(1)</script>', '"><img src=x onerror="window.__pwned=2">',
           "</style><svg onload=window.__pwned=3>", "javascript:window.__pwned=4", "\u202e<b>rlo</b>",
           "</pre><iframe srcdoc='<script>parent.__pwned=5</script>'></iframe>"]


def _hostile_run(root):
    """A shared run directory whose every free-text field carries markup."""
    name = root / HOSTILE[1].replace("/", "_")
    run = _fake_run(name, health={h: 3 for h in HOSTILE})
    summary = json.loads((run / "summary.json").read_text())
    summary.update({"steps": 40, "stopped_early": {"check": HOSTILE[0], "step": 3}, "loss": HOSTILE[2],
                    "preftune_version": HOSTILE[5]})
    (run / "summary.json").write_text(json.dumps(summary))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows[-1]["health"] = HOSTILE
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.yaml").write_text("\n".join(f"# {h}" for h in HOSTILE))
    return run


@pytest.mark.skipif(not _chromium() and not os.environ.get("PREFTUNE_REQUIRE_BROWSER"),
                    reason="Chromium is not installed (.ci/run installs it and sets PREFTUNE_REQUIRE_BROWSER)")
def test_hostile_strings_in_run_files_never_become_markup(tmp_path):
    from playwright.sync_api import sync_playwright

    out = write_report([str(_hostile_run(tmp_path))], tmp_path / "report.html", png=False)
    page_text = out.read_text()
    assert "<script" not in page_text and "<img" not in page_text and "<iframe" not in page_text
    dialogs = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(out.as_uri())
        page.wait_for_timeout(300)
        assert page.evaluate("window.__pwned === undefined")
        assert page.query_selector_all("script, img, iframe, [onerror], [onload]") == []
        body = page.inner_text("body")
        browser.close()
    assert dialogs == []
    assert HOSTILE[0] in body and "onerror" in body  # shown as text, not run


@pytest.mark.parametrize("summary, field", [
    ([1, 2], "summary"), ({"final": "x"}, "final"), ({"health": {"kl_drift": "soon"}}, "health"),
    ({"stopped_early": {"check": 3, "step": 1}}, "stopped_early"), ({"steps": "many"}, "steps"),
    ({"eval": {"accuracy/implicit_reward": "high"}}, "eval"), ({"elapsed_s": [1]}, "elapsed_s"),
])
def test_malformed_summary_is_one_line_exit_2(tmp_path, capsys, summary, field):
    run = _fake_run(tmp_path / "r")
    (run / "summary.json").write_text(json.dumps(summary))
    rc, lines = _report_cli(run, capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"{run / 'summary.json'}:1: {field}:"), lines
    assert not (run / "report.html").exists()


@pytest.mark.parametrize("content, field", [
    ('{"step": 1}\n[1]\n', "record"), ('{"step": "one"}\n', "step"), ('{"loss": {"a": 1}}\n', "loss"),
    ('{"health": "kl"}\n', "health"), ('{"step": 1}\n{"step": 2, "loss": NaN}\n', "json"),
])
def test_malformed_metrics_is_one_line_exit_2(tmp_path, capsys, content, field):
    run = _fake_run(tmp_path / "r")
    (run / "metrics.jsonl").write_text(content)
    rc, lines = _report_cli(run, capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert f": {field}:" in lines[0] and lines[0].startswith(str(run / "metrics.jsonl")), lines


def test_malformed_eval_json_is_one_line_exit_2(tmp_path, capsys):
    run = _fake_run(tmp_path / "r")
    (run / "eval.json").write_text(json.dumps({"per_prompt": [{"policy": "<b>", "reference": 1}]}))
    rc, lines = _report_cli(run, capsys)
    assert rc == 2 and lines[0].startswith(f"{run / 'eval.json'}:1: per_prompt:")


def _inert_in_chromium(page_path) -> tuple[bool, int]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        page.on("dialog", lambda d: d.dismiss())
        page.goto(page_path.as_uri())
        page.wait_for_timeout(300)
        ran = page.evaluate("window.__pwned !== undefined")
        injected = len(page.query_selector_all("script, img, iframe"))
        browser.close()
    return ran, injected


@pytest.mark.skipif(not _chromium() and not os.environ.get("PREFTUNE_REQUIRE_BROWSER"),
                    reason="Chromium is not installed (.ci/run installs it and sets PREFTUNE_REQUIRE_BROWSER)")
def test_markup_in_numeric_summary_fields_is_refused_never_run(tmp_path):
    """summary.json's numbers went into the page as they were (stored XSS from a shared run
    directory): now a non-number there is refused; if a page were written, it must be inert."""
    from preftune.utils.errors import DataError

    run = _fake_run(tmp_path / "r")
    summary = json.loads((run / "summary.json").read_text())
    summary["steps"] = '<img src=x onerror="window.__pwned=1">'
    summary["final"]["loss"] = "<script>window.__pwned=2</script>"
    (run / "summary.json").write_text(json.dumps(summary))
    try:
        out = write_report([str(run)], tmp_path / "report.html", png=False)
    except DataError as err:
        assert str(err).startswith(f"{run / 'summary.json'}:1: final: malformed")
        assert not (tmp_path / "report.html").exists()
        return
    assert _inert_in_chromium(out) == (False, 0)


def test_grpo_runs_and_experiment_directories_are_shown(tmp_path, capsys):
    from preftune.cli import main

    run = tmp_path / "grpo"
    run.mkdir()
    rows = [{"step": s, "loss": 0.01, "reward/mean": 0.1 * s, "health": []} for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({"steps": 5, "health": {}, "final": rows[-1], "elapsed_s": 3.0,
                                                  "eval": {"reward/gain": 0.555, "reward/gain_ci95": [0.46, 0.64]}}))
    exp = tmp_path / "dpo_vs_grpo"
    exp.mkdir()
    (exp / "results.json").write_text(json.dumps({
        "command": "run.py <b>bold</b>",
        "grpo": {"reward/policy": 0.625, "reward/gain_ci95": [0.46, 0.64], "note": "<script>alert(1)</script>"},
        "offline_dpo": {"reward/policy": 0.2, "rounds": [{"round": 1}]}}))
    (exp / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (exp / "verdict.md").write_text("GRPO wins <img src=x onerror=alert(1)>\n")
    out = write_report([str(run)], tmp_path / "r.html", experiments=[str(exp)])
    page = out.read_text()
    assert 'id="plot-rollouts"' in page and "held-out reward gain" in page and "0.555" in page
    assert "Experiment: dpo_vs_grpo" in page and "<td>0.625</td>" in page and "<td>[0.46, 0.64]</td>" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "run.py &lt;b&gt;bold&lt;/b&gt;" in page
    assert page.count('src="data:image/png;base64,') == 1 and "<img src=x" not in page
    # an experiment alone is a page too; a directory without results.json is one line, exit 2
    assert main(["report", "--experiment", str(exp), "--no-png"]) == 0 and (exp / "report.html").is_file()
    capsys.readouterr()
    assert main(["report", "--experiment", str(tmp_path), "--no-png"]) == 2
    assert "not an experiment directory" in capsys.readouterr().err
    assert main(["report"]) == 2


def test_reward_model_and_sft_runs_get_calibration_and_nll_plots(tmp_path):
    rm = _fake_run(tmp_path / "rm")
    summary = json.loads((rm / "summary.json").read_text())
    summary["eval"]["calibration"] = {"ece": 0.04, "bins": [
        {"lo": 0.5, "hi": 0.55, "confidence": 0.52, "accuracy": 0.5, "pairs": 10},
        {"lo": 0.9, "hi": 0.95, "confidence": 0.93, "accuracy": 0.88, "pairs": 25},
        {"lo": 0.95, "hi": 1.0, "confidence": "<b>x</b>", "accuracy": 1.0, "pairs": 3}]}  # a malformed bin: skipped
    (rm / "summary.json").write_text(json.dumps(summary))
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 - 0.1 * s, "nll/token": 3.0 - 0.1 * s,
                                                           "health": []}) + "\n" for s in range(1, 6)))
    page = write_report([str(rm), str(sft)], tmp_path / "out" / "report.html").read_text()
    assert 'id="plot-calibration"' in page and 'id="plot-nll"' in page and "ECE 0.040" in page
    assert "<b>x</b>" not in page
    plain = write_report([str(_fake_run(tmp_path / "plain"))], tmp_path / "o2" / "report.html").read_text()
    assert 'id="plot-calibration"' not in plain and 'id="plot-nll"' not in plain


def test_a_run_named_with_math_markup_is_drawn_as_text(tmp_path):
    """Matplotlib parsed `$...$` in a run's name (from its directory) as mathtext: `$x^$` was a
    parse error and the report an internal error (exit 1)."""
    run = _fake_run(tmp_path / "$x^$ run")
    out = write_report([str(run)], tmp_path / "r.html")
    assert "$x^$ run" in out.read_text()


def test_ema_is_tensorboards_debiased_average():
    """weight 0.6: 1.0, (0.6*0.4 + 0)/(1 - 0.6**2) = 0.375, (0.6*0.24)/(1 - 0.6**3) = 0.18367"""
    from preftune.apps.report import ema

    assert ema([1.0, 0.0, 0.0]) == pytest.approx([1.0, 0.375, 0.183673], abs=1e-6)
    assert ema([2.0] * 4) == pytest.approx([2.0] * 4)


def test_a_short_run_draws_markers_smoothing_and_eval_figures(tmp_path):
    """An 8-step run has one probe point (its KL, length and held-out accuracy plots were empty
    axes) and an eval.json: single points are markers, per-step series a faint raw line under an
    EMA stated on the axis, eval figures stars at the last step."""
    from preftune.apps.report import _figures, read_run

    run = _fake_run(tmp_path / "r")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][:8]
    rows[-1].update({"probe/kl": 0.4, "probe/sample_length": 21.0, "probe/reference_length": 20.0,
                     "probe/eval_accuracy": 0.6})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "eval.json").write_text(json.dumps({"kl": 0.5, "accuracy/implicit_reward": 0.75}))
    figs = dict(_figures([read_run(str(run))]))
    kl = figs["kl"].axes[0]
    assert [ln.get_marker() for ln in kl.lines] == ["o", "*"]  # the probe point, the eval's KL
    assert [ln.get_ydata()[0] for ln in kl.lines] == [0.4, 0.5]
    loss = figs["loss_margin"].axes[0]
    assert "EMA 0.6" in loss.get_ylabel() and len(loss.lines) == 2 and loss.lines[0].get_alpha() == 0.25
    stars = [ln for ln in figs["accuracy"].axes[0].lines if ln.get_marker() == "*"]
    assert sorted(ln.get_ydata()[0] for ln in stars) == [0.7, 0.75]  # summary.json's eval and eval.json's


def test_the_summary_table_shows_the_eval_s_kl_with_its_error_and_says_where_it_is_from(tmp_path):
    """The table showed the last probe's KL (-0.067 on a toy run) while eval.json said otherwise."""
    run = _fake_run(tmp_path / "r")
    page = write_report([str(run)], tmp_path / "a.html").read_text()
    assert "8 (probe, step 40)" in page  # no eval with a KL: the probe's, marked as such
    (run / "eval.json").write_text(json.dumps({"kl": 0.41, "kl_stderr": 0.12, "kl_samples": 8}))
    page = write_report([str(run)], tmp_path / "b.html").read_text()
    assert "0.41 ± 0.12 (eval.json, 8 samples)" in page
