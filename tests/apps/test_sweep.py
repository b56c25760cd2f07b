"""sweep.py: a 2 x 2 grid on the tiny model; table, plots, and reuse of finished points."""

import json

from conftest import PAIRS, write_jsonl
from preftune.cli import main


def test_sweep_grid_table_plots_and_rerun(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    args = ["sweep", "--beta", "0.1,0.5", "--lr", "1e-3,3e-2", f"data.train_path={data}",
            f"model.name_or_path={tiny_model_dir}", f"run.output_dir={tmp_path / 'grid'}", "model.lora_r=4",
            "train.epochs=2", "eval.kl_prompts=2", "eval.kl_samples=16", "eval.max_new_tokens=8",
            "diagnostics.probe_every=0"]
    assert main(args) == 0
    rows = [json.loads(x) for x in (tmp_path / "grid" / "results.jsonl").read_text().splitlines()]
    assert [(r["beta"], r["lr"]) for r in rows] == [(0.1, 1e-3), (0.1, 3e-2), (0.5, 1e-3), (0.5, 3e-2)]
    assert all(r["kl"] is not None and r["accuracy"] is not None for r in rows)
    # a 30x higher learning rate moves the policy further from the reference
    assert rows[1]["kl"] > rows[0]["kl"] and rows[3]["kl"] > rows[2]["kl"]
    for name in ("results.md", "kl_vs_beta.png", "reward_vs_kl.png"):
        assert (tmp_path / "grid" / name).stat().st_size > 200
    assert "| beta0.1-lr0.001-w0.1 |" in capsys.readouterr().out
    assert main(args) == 0  # every point has eval.json: nothing is trained again
    assert capsys.readouterr().out.count("done before, kept") == 4


def test_sweep_rejects_a_bad_grid(tmp_path, capsys):
    assert main(["sweep", "--beta", "0.1,x", "--lr", "1e-3"]) == 2
    assert capsys.readouterr().err.strip() == "command line: --beta: expected comma-separated numbers, got '0.1,x'"
