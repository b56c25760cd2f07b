"""`python -m benchmarks.experiments.frontier` (benchmarks/experiments/frontier/__main__.py): its
outputs from given points (no training), and `preftune report --experiment` on them."""

from __future__ import annotations

import json

from benchmarks.experiments.frontier import __main__ as frontier
from preftune.apps.report import write_report
from preftune.cli import main


def _point(method, setting, reward, kl, ci=0.05, **extra):
    return {"method": method, "setting": setting, "reward": reward, "reward_ci95": [reward - ci, reward + ci],
            "kl": kl, "kl_stderr": 0.1, "wall_s": 10.0, "prompts": 24, "samples_per_prompt": 4, **extra}


POINTS = [
    _point("base (reference)", "start model", 0.20, 0.0),
    _point("DPO", "beta=0.1", 0.40, 1.5), _point("DPO", "beta=1", 0.30, 0.3),
    _point("IPO", "beta=0.5", 0.45, 1.2, ci=0.2), _point("IPO", "beta=5", 0.22, -0.01),
    _point("best-of-N", "N=1", 0.21, 0.0, samples_per_prompt=16), _point("best-of-N", "N=4", 0.50, 0.636),
    _point("iterative DPO", "round 1", 0.40, 1.5), _point("iterative DPO", "round 2", 0.70, 3.0),
]
META = {"mode": "full", "model": "m", "reward": "sentiment", "heldout_prompts": 24, "tokens": 32, "evals": 3,
        "reference_spread": [0.2, 0.2], "elapsed_s": 100.0}


def test_outputs_verdict_from_the_numbers_and_report(tmp_path):
    points = [frontier._row(p) for p in POINTS]
    frontier.write_outputs(tmp_path, points, META, {"lr": 5e-4}, title="test")
    results = json.loads((tmp_path / "results.json").read_text())
    assert {k for k, v in results.items() if isinstance(v, dict) and "method" in v} == \
        {f"{p['method']} {p['setting']}" for p in POINTS}
    assert results["best-of-N N=4"]["kl_kind"] == "Monte-Carlo on policy samples"  # _row's default when not given
    assert (tmp_path / "frontier.png").stat().st_size > 10_000

    verdict = (tmp_path / "verdict.md").read_text()
    rows = {line.split(" | ")[0]: line for line in verdict.splitlines() if line.startswith("| [")}
    assert list(rows) == ["| [0, 0.5)", "| [0.5, 1)", "| [1, 2)", "| [2, 4)"]
    # IPO beta=5's KL of -0.01 (a Monte-Carlo estimate) falls in the first band
    assert "| DPO beta=1 | 0.300" in rows["| [0, 0.5)"] and "IPO beta=5 (0.220) | yes: not a clear win" in rows["| [0, 0.5)"]
    assert "| best-of-N N=4 |" in rows["| [0.5, 1)"] and rows["| [0.5, 1)"].endswith("| none | n/a |")
    assert "| IPO beta=0.5 |" in rows["| [1, 2)"] and "DPO beta=0.1 (0.400) | yes" in rows["| [1, 2)"]
    assert "| iterative DPO round 2 |" in rows["| [2, 4)"]
    best = [f"{p['method']} {p['setting']}" for p in frontier.frontier_points(points)]
    assert best == ["IPO beta=5", "DPO beta=1", "best-of-N N=4", "iterative DPO round 2"]
    assert "KL falls as beta rises, as it should" in verdict  # DPO: 1.5 at beta 0.1, 0.3 at beta 1
    assert "+0.500 over the base" in verdict

    out = write_report([], tmp_path / "report.html", png=False, experiments=[str(tmp_path)])
    page = out.read_text()
    assert page.count("<tr><th>") == len(POINTS) + 2  # header, a row per point, settings
    assert 'alt="frontier.png"' in page and "Highest reward in each KL band" in page
    assert main(["report", "--experiment", str(tmp_path), "--no-png"]) == 0


def test_extra_learning_rate_lines_get_their_own_style_and_beta_sentence(tmp_path):
    extra = [_point("DPO lr=0.002", "beta=0.1", 0.80, 2.5), _point("DPO lr=0.002", "beta=0.5", 0.50, 1.0)]
    points = [frontier._row(p) for p in POINTS + extra]
    frontier.write_outputs(tmp_path, points, META, {"lr": 5e-4}, title="test")
    verdict = (tmp_path / "verdict.md").read_text()
    assert "- DPO lr=0.002: KL by beta beta=0.1 -> 2.50, beta=0.5 -> 1.00; KL falls as beta rises" in verdict
    assert "| DPO lr=0.002 beta=0.1 | 0.800" in verdict  # the best of the [2, 4) band (round 2: 0.70)
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
