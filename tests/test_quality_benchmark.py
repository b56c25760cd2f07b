"""`python -m benchmarks.quality` (benchmarks/quality/__main__.py and the settings, points and
table_rows modules beside it): its pure parts (the TruthfulQA split, the gain interval, the
budget estimate, recipes, the table and outputs) without training, and one --quick run on a tiny
model through the `preftune` CLI whose written numbers are checked against the files they came
from; and the pure parts of its TRL peer and recipe search."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.quality import __main__ as quality
from benchmarks.quality import peer_trl, points, search, settings, table_rows
from conftest import SHARED
from preftune.apps.report import write_report
from preftune.config import load_config
from preftune.core.stats import wilson
from preftune.data.sources import load_records

TQA_CSV = SHARED / "data" / "truthfulqa" / "TruthfulQA.visible.csv"
needs_shared_tqa = pytest.mark.skipif(not TQA_CSV.is_file() or not (SHARED / "data" / "hh-rlhf-harmless-base").is_dir(),
                                      reason="../shared/data is absent")


def _csv(path: Path, questions: list[str]) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"])
        w.writeheader()
        for k, q in enumerate(questions):
            w.writerow({"Type": "t", "Category": "c", "Question": q, "Best Answer": f"right {k}",
                        "Correct Answers": f"right {k}", "Incorrect Answers": f"wrong {k}; also wrong", "Source": "s"})
    return path


def test_truthfulqa_split_is_by_question_fixed_and_loads_as_pairs(tmp_path):
    questions = [f"Question number {k}?" for k in range(200)]
    questions += ["  question NUMBER 7? ", "Question number 150?"]  # the same questions again, written otherwise
    counts = settings.split_truthfulqa(_csv(tmp_path / "q.csv", questions), tmp_path / "a")
    assert counts["train"] + counts["dev"] == 202 and 40 <= counts["dev"] <= 80  # ~30% of 200 distinct questions
    sides = {s: [json.loads(x)["Question"] for x in (tmp_path / "a" / f"{s}.jsonl").read_text().splitlines()]
             for s in ("train", "dev")}
    keys = {s: {settings.question_key(q) for q in qs} for s, qs in sides.items()}
    assert not keys["train"] & keys["dev"]
    seven = {s: sum(settings.question_key(q) == "question number 7?" for q in qs) for s, qs in sides.items()}
    assert sorted(seven.values()) == [0, 2]  # both spellings of one question on the same side
    settings.split_truthfulqa(_csv(tmp_path / "r.csv", questions[::-1]), tmp_path / "b")  # order does not matter
    assert {json.loads(x)["Question"] for x in (tmp_path / "b" / "dev.jsonl").read_text().splitlines()} == set(sides["dev"])
    (rec, *_) = load_records(tmp_path / "a" / "dev.jsonl")  # preftune's own TruthfulQA adapter reads the rows
    assert rec.prompt == f"Q: {sides['dev'][0].strip()}\nA:" and rec.rejected.startswith(" wrong")


@needs_shared_tqa
def test_split_of_the_shared_truthfulqa(tmp_path):
    counts = settings.split_truthfulqa(settings.TQA, tmp_path)
    assert (counts["questions"], counts["train"], counts["dev"]) == (612, 612 - settings.TQA_DEV_PAIRS, settings.TQA_DEV_PAIRS)


def test_newcombe_interval_reproduces_the_published_example():
    """Newcombe 1998 (Stat. Med. 17:873), Table II, example (a): 56/70 vs 48/80, difference 0.2000,
    method 10 interval 0.0524 to 0.3339."""
    d, (lo, hi) = settings.newcombe(56 / 70, wilson(56, 70), 48 / 80, wilson(48, 80))
    assert d == pytest.approx(0.2) and lo == pytest.approx(0.0524, abs=5e-5) and hi == pytest.approx(0.3339, abs=5e-5)
    d, (lo, hi) = settings.newcombe(0.5, wilson(50, 100), 0.5, wilson(50, 100))
    assert d == 0 and lo == pytest.approx(-hi) and 0.13 < hi < 0.14  # +-0.135 at 100 pairs, as the docstring says


def test_default_budget_fits_90_minutes_by_the_documented_rates():
    est = settings.estimate_seconds(settings.SETTINGS["full"], list(settings.METHODS), list(settings.DATASETS))
    assert est["total_s"] <= 90 * 60
    assert f"~ {est['total_s'] / 60:.0f} min" in quality.__doc__ and f"= {est['per_point_s']['hh']} s" in quality.__doc__


def test_every_method_has_its_recipe_file_where_the_benchmark_looks():
    """The recipes moved to src/preftune/core/recipes/ with the layout change; a benchmark looking in
    the old place would silently fall back to BUILTIN for every method."""
    assert [m for m in settings.METHODS if not (settings.RECIPES / f"{m}.yaml").is_file()] == []


def test_recipes_from_files_without_their_metadata_and_built_in_otherwise(tmp_path, monkeypatch):
    monkeypatch.setattr(points, "RECIPES", tmp_path / "recipes")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "sigmoid.yaml").write_text("recipe:\n  tuned: false\nloss:\n  beta: 0.2\ntrain:\n  lr: 1.0e-4\n")
    args, source = points.recipe_for("sigmoid", tmp_path / "point" / "recipe.yaml")
    assert args == ["--config", str(tmp_path / "point" / "recipe.yaml")] and source["source"].endswith("sigmoid.yaml")
    assert source["recipe_meta"] == {"tuned": False}
    # new evidence in the metadata keeps the key (finished points stay); a changed setting does not
    (tmp_path / "recipes" / "sigmoid.yaml").write_text("recipe:\n  tuned: false\n  evidence: [x]\nloss:\n  beta: 0.2\n"
                                                      "train:\n  lr: 1.0e-4\n")
    assert points.recipe_for("sigmoid", tmp_path / "p2.yaml")[1]["settings_sha256"] == source["settings_sha256"]
    (tmp_path / "recipes" / "sigmoid.yaml").write_text("recipe:\n  tuned: false\nloss:\n  beta: 0.3\n"
                                                      "train:\n  lr: 1.0e-4\n")
    assert points.recipe_for("sigmoid", tmp_path / "p3.yaml")[1]["settings_sha256"] != source["settings_sha256"]
    (tmp_path / "recipes" / "sigmoid.yaml").write_text("recipe:\n  tuned: false\nloss:\n  beta: 0.2\ntrain:\n  lr: 1.0e-4\n")
    cfg = load_config(args[1], ["model.name_or_path=x"])  # loads: the recipe: block is gone
    assert (cfg.loss.beta, cfg.train.lr) == (0.2, 1e-4)
    for method in settings.METHODS:  # every built-in recipe is a valid preftune configuration
        args, source = points.recipe_for(method, tmp_path / method / "recipe.yaml")
        if method != "sigmoid":
            train = load_config(None, args).train
            assert source["source"] == "built-in" and (train.lr, train.epochs, train.batch_size) == \
                (5e-4, 1, 8 if method == "kto" else 4)
    assert load_config(None, points.recipe_for("rpo", tmp_path / "r.yaml")[0]).loss.mix == [["sigmoid", 1.0], ["sft", 0.2]]


def test_summarize_reads_the_run_and_its_eval(tmp_path):
    """One point's row from the files a run and its eval leave: gain over the base model's log-prob
    accuracy (not over the run's own), flags from the run and from the eval's samples."""
    from preftune.config import save_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(load_config(None, ["loss.name=cdpo", "loss.label_smoothing=0.1", "train.lr=5e-4", "train.max_steps=20"]),
                run_dir / "config.yaml")
    (run_dir / "summary.json").write_text(json.dumps({"health": {"margin_explosion": 7}, "steps": 20,
                                                      "data": {"pairs": 80, "truncated": 3}, "final": {"loss": 0.4}}))
    e = {"pairs": 100, "accuracy/implicit_reward": 0.7, "accuracy/implicit_reward_ci95": wilson(70, 100),
         "accuracy/logp": 0.6, "accuracy/logp_ci95": wilson(60, 100), "rewards/margins": 0.8, "kl": 12.5,
         "kl_stderr": 1.0, "kl_samples": 32, "sample_length/policy/mean": 46.0, "sample_length/reference/mean": 23.0,
         "data_stats": {"truncated": 1}}
    (tmp_path / "eval.json").write_text(json.dumps(e))
    point = {"train_s": 300.0, "eval_s": 120.5, "recipe": {"source": "built-in"}, "run": str(run_dir),
             "eval_file": str(tmp_path / "eval.json")}
    base = {"logp_acc": 0.5, "logp_acc_ci95": wilson(50, 100), "mean_logp_acc": 0.55,
            "mean_logp_acc_ci95": wilson(55, 100)}
    r = table_rows.summarize({"name": "hh"}, "cdpo", point, base)
    assert r["gain"] == pytest.approx(0.2) and r["gain_ci95"] == pytest.approx([0.0642, 0.3258], abs=1e-4)
    assert r["logp_gain"] == pytest.approx(0.1) and r["implicit_acc"] == 0.7 and r["before_logp_acc"] == 0.5
    assert r["flags"] == ["margin_explosion (step 7)", "kl_drift (eval)", "length_drift (eval)"]  # 12.5 > 10, 2x > 1.5x
    assert (r["length_ratio"], r["wall_s"], r["steps"], r["train_examples"]) == (2.0, 420.5, 20, 80)
    assert r["trained_with"]["loss"] == {"name": "cdpo", "beta": 0.1, "label_smoothing": 0.1}
    assert "gain_over_own_start" not in r
    assert list(r)[:14] == list(_row("hh", "cdpo", 0.5, 0.7, 1.0))[:14]  # the outputs test's rows are shaped like these
    simpo = table_rows.summarize({"name": "hh"}, "simpo", point, base)  # reference-free: also its gain over its own start
    assert simpo["gain_over_own_start"] == pytest.approx(0.15) and simpo["before_mean_logp_acc"] == 0.55
    e.update({"kl": 3.0, "sample_length/policy/mean": 11.5, "sample_length/reference/mean": 44.3})  # ORPO on TQA
    (tmp_path / "eval.json").write_text(json.dumps(e))
    assert table_rows.summarize({"name": "hh"}, "orpo", point, base)["flags"] == ["margin_explosion (step 7)",
                                                                          "length_collapse (eval)"]  # 0.26 < 0.5
    failed = table_rows.summarize({"name": "hh"}, "kto", {"error": "hh kto train exited 3", "log": "l"}, base)
    assert failed == {"dataset": "hh", "method": "kto", "error": "hh kto train exited 3", "log": "l"}


def _row(dataset, method, before, after, kl, flags=(), n=100, **extra):
    ci_b, ci_a = wilson(before * n, n), wilson(after * n, n)
    gain, gain_ci = settings.newcombe(after, ci_a, before, ci_b)
    return {"dataset": dataset, "method": method, "recipe": "built-in", "before_logp_acc": before,  # summarize's order
            "implicit_acc": after, "implicit_acc_ci95": ci_a, "gain": gain, "gain_ci95": gain_ci, "kl": kl,
            "length_ratio": 40 / 38, "flags": list(flags), "wall_s": 500.0, "logp_acc": before, "logp_acc_ci95": ci_b,
            "before_logp_acc_ci95": ci_b, "logp_gain": 0.0, "logp_gain_ci95": [-0.1, 0.1], "margin": 0.5,
            "kl_stderr": 0.2, "kl_samples": 32, "sample_length_policy": 40.0, "sample_length_reference": 38.0, "steps": 20, "train_examples": 80, "train_unit": "pairs", "dev_pairs": n,
            "trained_with": {"loss": {"name": method, "beta": 0.1}, "lr": 5e-4, "batch_size": 4}, **extra}


def test_outputs_table_acceptance_and_plot(tmp_path):
    bases = {"hh": {"logp_acc": 0.5, "logp_acc_ci95": wilson(50, 100), "wall_s": 100.0},
             "truthfulqa": {"error": "truthfulqa base eval exited 2", "log": "logs/x.log"}}
    rows = [_row("hh", "sigmoid", 0.5, 0.7, 3.0), _row("hh", "ipo", 0.5, 0.55, 12.0, flags=["kl_drift (eval)"]),
            _row("hh", "simpo", 0.5, 0.65, 1.0, before_mean_logp_acc=0.6, gain_over_own_start=0.05,
                 gain_over_own_start_ci95=[-0.08, 0.18]),
            {"dataset": "hh", "method": "kto", "error": "hh kto train exited 3", "log": "logs/k.log"}]
    meta = {"mode": "full", "model": "m", "kl_prompts": 16, "kl_samples": 2, "max_new_tokens": 48, "elapsed_s": 10.0,
            "estimate": {"total_s": 5000}}
    quality.write_outputs(tmp_path, rows, bases, meta)
    results = json.loads((tmp_path / "results.json").read_text())
    assert [k for k, v in results.items() if isinstance(v, dict) and "method" in v] == \
        ["hh sigmoid", "hh ipo", "hh simpo", "hh kto"]
    assert results["acceptance"]["dpo_recipe"]["hh"]["pass"] is True  # +0.20 [+0.064, +0.326], no flag, KL 3
    assert results["acceptance"]["gain_excludes_0"] == {"hh sigmoid": True, "hh ipo": False, "hh simpo": True}
    md = (tmp_path / "results.md").read_text()
    rows_md = [line for line in md.splitlines() if line.startswith("| hh |") or line.startswith("| truthfulqa |")]
    assert len(rows_md) == 6 and "failed: truthfulqa base eval exited 2" in rows_md[-1]
    assert "| hh | sigmoid | built-in | 0.500 [0.404, 0.596] | 0.700 [0.604, 0.781] | +0.200 [+0.064, +0.326] |" in md
    assert "| kl_drift (eval) |" in md and "failed: hh kto train exited 3 (logs/k.log)" in md
    assert "its gain over its own start is +0.050 [-0.080, +0.180]" in md
    assert "DPO recipe on hh: pass" in md and "not for hh ipo" in md and "20 steps of 4 on 80 training pairs" in md
    assert (tmp_path / "gain_vs_kl.png").stat().st_size > 10_000
    page = write_report([], tmp_path / "report.html", png=False, experiments=[str(tmp_path)]).read_text()
    header = page.split("<table><tr><th></th>")[1].split("</tr>")[0]  # the report's columns: the headline fields
    assert all(f"<th>{k}</th>" in header for k in ("implicit_acc", "gain", "gain_ci95", "kl", "flags", "wall_s"))


@needs_shared_tqa
def test_quick_run_on_a_tiny_model(tmp_path, tiny_model_dir):
    """The whole pipeline through the CLI: base eval, training and eval of two methods (one
    reference-free, one unpaired) on the TruthfulQA split; the numbers written agree with the eval
    files and with each other, and a rerun keeps the finished points."""
    args = ["--quick", "--model", str(tiny_model_dir), "--out", str(tmp_path / "q"), "--methods", "simpo,kto",
            "--datasets", "truthfulqa"]
    assert quality.main(args) == 0
    out = tmp_path / "q"
    results = json.loads((out / "results.json").read_text())
    base = results["truthfulqa base model"]
    assert base["dev_pairs"] == 8 and 0 <= base["logp_acc"] <= 1
    for method, examples in (("simpo", 8), ("kto", 16)):  # kto: the same 8 pairs as 16 labelled examples
        r = results[f"truthfulqa {method}"]
        recipe = Path(settings.RECIPES) / f"{method}.yaml"  # the method's recipe file once it exists, else built-in
        assert r["recipe"] == (points._rel(recipe) if recipe.is_file() else "built-in")
        e = json.loads((Path(settings.ROOT) / r["eval_file"]).read_text())
        assert (r["implicit_acc"], r["logp_acc"], r["margin"], r["kl"]) == \
            (e["accuracy/implicit_reward"], e["accuracy/logp"], e["rewards/margins"], e["kl"])
        assert r["before_logp_acc"] == base["logp_acc"]
        assert r["gain"] == pytest.approx(r["implicit_acc"] - base["logp_acc"])
        assert r["gain_ci95"][0] < r["gain"] < r["gain_ci95"][1]
        batch = r["trained_with"]["batch_size"]  # the recipe's: one epoch over the training subsample
        assert (r["steps"], r["train_examples"], r["dev_pairs"], r["kl_samples"]) == (-(-examples // batch), examples, 8, 2)
        assert 0 < r["sample_length_policy"] <= 4 and r["length_ratio"] > 0 and math.isfinite(r["kl"])
        assert r["trained_with"]["loss"]["name"] == method and r["trained_with"]["epochs"] == 1
        assert r["flags"] == [] and r["wall_s"] == pytest.approx(r["train_s"] + r["eval_s"], abs=0.1)
    simpo = results["truthfulqa simpo"]  # its reward needs no reference: its own start is the base's mean-logp accuracy
    assert simpo["before_mean_logp_acc"] == base["mean_logp_acc"] and "gain_over_own_start" not in results["truthfulqa kto"]
    assert simpo["gain_over_own_start"] == pytest.approx(simpo["implicit_acc"] - base["mean_logp_acc"])
    assert results["settings"]["data"]["truthfulqa"]["split"]["questions_on_both_sides"] == 0
    train_q = {json.loads(x)["Question"] for x in (out / "data" / "truthfulqa" / "train.jsonl").read_text().splitlines()}
    dev_q = {json.loads(x)["Question"] for x in (out / "data" / "truthfulqa" / "dev.jsonl").read_text().splitlines()}
    assert len(dev_q) == settings.TQA_DEV_PAIRS and not train_q & dev_q
    assert len([line for line in (out / "results.md").read_text().splitlines() if line.startswith("| truthfulqa |")]) == 3
    assert (out / "gain_vs_kl.png").is_file()
    stamp = (out / "truthfulqa" / "kto" / "point.json").stat().st_mtime_ns
    assert quality.main(args) == 0  # finished points are kept: nothing is trained or evaluated again
    assert (out / "truthfulqa" / "kto" / "point.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["truthfulqa kto"]["gain"] == results["truthfulqa kto"]["gain"]


def test_peer_trl_gets_preftunes_order_warmup_and_an_equal_time_step_count():
    """TRL is handed preftune's epoch-0 order and warmup length; its equal-time run gets the steps
    its measured per-step time fits into preftune's seconds, at least 1 and at most the epoch."""
    import torch

    from preftune.data.order import EpochSampler

    order = peer_trl.preftune_order(10, 0)
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert order == torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
    assert order == list(iter(EpochSampler(10, 0)))
    assert (peer_trl.warmup_steps(0.1, 100), peer_trl.warmup_steps(0.1, 27), peer_trl.warmup_steps(0.1, 9)) == (10, 2, 0)
    assert peer_trl.equal_time_steps(400.0, 14.9, 100) == 26  # 26 * 14.9 = 387 s <= 400 s
    assert peer_trl.equal_time_steps(400.0, 1.0, 100) == 100 and peer_trl.equal_time_steps(5.0, 14.9, 100) == 1


def test_search_validates_on_the_training_side_and_chooses_the_best_unflagged_point(tmp_path, monkeypatch):
    import shutil

    import yaml

    from preftune.core.recipes import RECIPE_DIR

    data = {"name": "truthfulqa", "train": "/d/train.jsonl[:160]", "dev": "/d/dev.jsonl[:168]", "train_pairs": 160}
    val = search.validation_inputs(data, 120)
    assert val["dev"] == "/d/train.jsonl[160:280]" and val["train"] == data["train"]  # never the dev file
    rows = [{"lr": 1e-3, "beta": 0.1, "implicit_acc": 0.80, "kl": 12.0, "flags": ["kl_drift (eval)"]},
            {"lr": 5e-4, "beta": 0.1, "implicit_acc": 0.70, "kl": 8.0, "flags": []},
            {"lr": 5e-4, "beta": 0.3, "implicit_acc": 0.697, "kl": 3.0, "flags": []},  # within 0.005: lower KL wins
            {"lr": 2e-4, "beta": 0.1, "implicit_acc": 0.60, "kl": 1.0, "flags": []},
            {"lr": 2e-4, "beta": 0.3, "error": "train exited 1"}]
    assert (search.choose(rows)["lr"], search.choose(rows)["beta"]) == (5e-4, 0.3)
    assert search.choose(rows[:1]) is None and search.choose([]) is None
    monkeypatch.setattr(search, "RECIPES", tmp_path)
    shutil.copy(RECIPE_DIR / "sigmoid.yaml", tmp_path / "sigmoid.yaml")
    result = {"lrs": [2e-4, 5e-4, 1e-3], "betas": [0.1, 0.3], "train_pairs": 160, "val_pairs": 120, "model": "m",
              "command": "search.py --method sigmoid", "rows": rows}
    path = search.write_recipe("sigmoid", "truthfulqa", search.choose(rows), result)
    written = yaml.safe_load(path.read_text())
    assert written["train"]["lr"] == 5e-4 and written["loss"]["beta"] == 0.3 and written["recipe"]["tuned"] is True
    assert written["recipe"]["evidence"][0]["chosen"] == {"lr": 5e-4, "beta": 0.3}
    assert len(written["recipe"]["evidence"][0]["grid"]) == 4 and path.read_text().startswith("#")
    cfg = load_config(path)  # still a config that loads, metadata skipped
    assert (cfg.train.lr, cfg.loss.beta) == (5e-4, 0.3)
    dev = {"dev_pairs": 168, "data": "dev.jsonl[:168]", "implicit_acc": 0.77, "gain": 0.44, "gain_ci95": [0.34, 0.54],
           "before_logp_acc": 0.333, "kl": 2.11, "flags": []}
    search.add_dev("sigmoid", dev)  # after the choice: the one dev figure joins the search's evidence
    again = yaml.safe_load(path.read_text())
    assert again["recipe"]["evidence"][0]["dev_measured_once"].startswith("Dev (measured once, after the choice")
    assert "gain +0.440 [+0.340, +0.540]" in again["recipe"]["evidence"][0]["dev_measured_once"]
    assert {k: v for k, v in again.items() if k != "recipe"} == {k: v for k, v in written.items() if k != "recipe"}
    hh = {**result, "rows": [{**r, "lr": r["lr"] * 2} for r in rows if "error" not in r]}
    search.write_recipe("sigmoid", "hh", search.choose(hh["rows"]), hh, settings=False)  # --record-evidence
    both = yaml.safe_load(path.read_text())
    assert (both["train"]["lr"], both["loss"]["beta"]) == (5e-4, 0.3)  # the settings are the truthfulqa search's
    assert both["recipe"]["tuned_on"] == again["recipe"]["tuned_on"]
    assert [e["data"].split()[0] for e in both["recipe"]["evidence"][:2]] == ["hh", "truthfulqa"]  # both searches kept
    assert both["recipe"]["evidence"][0]["chosen"] == {"lr": 1e-3, "beta": 0.3}
    assert both["recipe"]["evidence"][0]["settings"].startswith("evidence only")
    assert "dev_measured_once" in both["recipe"]["evidence"][1]


def test_collect_mode_gathers_finished_points_and_trains_nothing(tmp_path):
    calls = []

    def make():
        calls.append(1)
        return {"value": 1}
    assert points._cached(tmp_path / "p.json", {"k": 1}, make, finished_only=True) is None and not calls
    assert points._cached(tmp_path / "p.json", {"k": 1}, make) == {"key": {"k": 1}, "value": 1} and calls == [1]
    assert points._cached(tmp_path / "p.json", {"k": 1}, make, finished_only=True) == {"key": {"k": 1}, "value": 1}
    assert points._cached(tmp_path / "p.json", {"k": 2}, make, finished_only=True) is None and calls == [1]  # other settings


def test_flags_are_todays_checks_replayed_over_the_runs_metrics(tmp_path, monkeypatch):
    """A run recorded both_logps_falling from raw logps of longer batches; replayed with the
    log-ratios (rewards / beta for a run that predates them) it has no flag, and the note says so."""
    from preftune.config import save_config

    monkeypatch.setattr(table_rows, "ROOT", tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(load_config(None, ["loss.beta=0.1"]), run_dir / "config.yaml")
    rows = [{"step": i + 1, "loss": 0.69, "rewards/margins": 0.01, "rewards/accuracies": 0.6,
             "logps/chosen": -94.0 - 30 * (i >= 40), "logps/rejected": -127.0 - 6 * (i >= 40),
             "rewards/chosen": -0.006 * min(i, 45), "rewards/rejected": -0.008 * min(i, 45)} for i in range(50)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert table_rows.replay_health(Path("run"), "sigmoid") == {}  # log-ratios -2.7 / -3.6 nats: not both below -5
    assert table_rows.replay_health(Path("run"), "simpo") == {"both_logps_falling": 49}  # reference-free: raw logps (9 longer batches in the window)
    for i, r in enumerate(rows):
        r["rewards/chosen"], r["rewards/rejected"] = -0.03 * i, -0.04 * i  # log-ratios down to -14.7 / -19.6
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert table_rows.replay_health(Path("run"), "sigmoid") == {"both_logps_falling": 23}  # -5.25 / -7.0 over steps 14-23


def _per_pair(gained: int, lost: int, n: int = 200) -> list[dict]:
    """One seed's per-pair rows (as `preftune eval --per-pair` writes them): the base model is right
    on the first half (its log-prob outcome, read as the run's reference); the run gains the
    first `gained` of the second half and loses the first `lost` of the first half."""
    rows = []
    for i in range(n):
        before = 1.0 if i < n // 2 else 0.0
        after = 0.0 if i < lost else 1.0 if n // 2 <= i < n // 2 + gained else before
        rows.append({"line": i + 1, "pair": f"k{i}", "implicit_correct": after, "logp_correct": before,
                     "reference_logp_correct": before})
    return rows


def test_several_seeds_make_one_row_with_mean_spread_and_a_seeds_by_pairs_interval(tmp_path):
    """Three seeds on the same 200 dev pairs gaining 30-10, 34-6 and 26-14 pairs: gains +0.10,
    +0.14, +0.06 (mean +0.10, std sqrt((0 + 0.04^2 + 0.04^2) / 2) = 0.04). Interval by hand:
    pairs' share sqrt(0.19 / 200) = 0.031 (shared by every seed), seeds' share 0.04 / sqrt(3) = 0.023,
    together ~0.038, i.e. about +0.025 to +0.175 (the bootstrap of 3 seeds reads their share a
    little smaller). Every seed gains and the interval excludes 0: tuned. A fourth point whose
    third seed loses is not, whatever its mean."""
    from benchmarks.quality.seeds import combine_seeds, gain_cell, pair_outcomes

    per_seed = [_per_pair(30, 10), _per_pair(34, 6), _per_pair(26, 14)]
    rows = [_row("hh", "sigmoid", 0.5, 0.5 + g, kl, seed=s, flags=f)
            for s, g, kl, f in ((0, 0.10, 3.0, []), (1, 0.14, 4.5, ["kl_drift (eval)"]), (2, 0.06, 2.0, []))]
    row = combine_seeds(rows, [pair_outcomes(p) for p in per_seed])
    assert row["gain"] == pytest.approx(0.10) and row["gain_spread"]["std"] == pytest.approx(0.04)
    assert row["per_seed_gains"] == pytest.approx([0.10, 0.14, 0.06]) and row["seeds"] == 3
    lo, hi = row["gain_ci95"]
    assert 0.01 < lo < 0.045 and 0.155 < hi < 0.19, (lo, hi)
    assert row["tuned"] is True and row["kl"] == pytest.approx(3.1666, abs=1e-3) and row["kl_max"] == 4.5
    assert row["flags"] == ["kl_drift (eval) (seed 1)"]
    assert gain_cell(row) == f"+0.100 ± 0.040 (+0.060 to +0.140, 3 seeds) [{lo:+.3f}, {hi:+.3f}]"
    # before from the base eval's per-pair file instead of the reference: the same outcomes here
    base = [{"line": r["line"], "pair": r["pair"], "logp_correct": r["logp_correct"]} for r in per_seed[0]]
    assert pair_outcomes(per_seed[0], base) == pair_outcomes(per_seed[0])
    with pytest.raises(ValueError, match="not in the base eval"):
        pair_outcomes(per_seed[0], base[1:])
    losing = combine_seeds([_row("hh", "ipo", 0.5, 0.5 + g, 1.0, seed=s) for s, g in ((0, 0.2), (1, 0.1), (2, -0.02))],
                           [pair_outcomes(_per_pair(g, lo_)) for g, lo_ in ((45, 5), (30, 10), (10, 14))])
    assert losing["tuned"] is False and losing["tuned_failed"][0] == "every seed gains"
    bases = {"hh": {"logp_acc": 0.5, "logp_acc_ci95": wilson(50, 100), "wall_s": 100.0}}
    meta = {"mode": "full", "model": "m", "kl_prompts": 16, "kl_samples": 2, "max_new_tokens": 48, "elapsed_s": 10.0,
            "estimate": {"total_s": 5000}}
    quality.write_outputs(tmp_path, [row, losing], bases, meta)
    md = (tmp_path / "results.md").read_text()
    assert f"| +0.100 ± 0.040 (+0.060 to +0.140, 3 seeds) [{lo:+.3f}, {hi:+.3f}] |" in md
    assert "| 0.600 (0.560 to 0.640) |" in md  # implicit accuracy: mean and the seeds' range
    assert "hh sigmoid: 3 seeds, gains +0.100, +0.140, +0.060; the gain holds across seeds (tuned)." in md
    assert "hh ipo: 3 seeds" in md and "not tuned: every seed gains" in md
    acc = json.loads((tmp_path / "results.json").read_text())["acceptance"]
    assert acc["holds_across_seeds"] == {"hh sigmoid": True, "hh ipo": False}
    assert acc["dpo_recipe"]["hh"]["gain holds across seeds"] is True
    assert acc["dpo_recipe"]["hh"]["pass"] is False  # a seed raised kl_drift (eval)


def test_summarize_takes_the_paired_interval_when_the_eval_has_one(tmp_path):
    """An eval of a run with a reference carries `paired`: the row's gain and interval are its,
    with McNemar's p; without it, Newcombe's (the test above)."""
    from preftune.apps.eval import paired_block
    from preftune.config import save_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(load_config(None, ["loss.name=sigmoid"]), run_dir / "config.yaml")
    (run_dir / "summary.json").write_text(json.dumps({"steps": 20, "data": {"pairs": 80, "truncated": 0}}))
    rows = [{**r, "logp_margin": 0.0, "implicit_margin": 0.0, "reference_logp_margin": 0.0} for r in _per_pair(30, 10)]
    e = {"pairs": 200, "accuracy/implicit_reward": 0.6, "accuracy/implicit_reward_ci95": wilson(120, 200),
         "accuracy/logp": 0.5, "accuracy/logp_ci95": wilson(100, 200), "rewards/margins": 0.8, "kl": 2.0,
         "kl_stderr": 0.1, "kl_samples": 32, "sample_length/policy/mean": 30.0, "sample_length/reference/mean": 30.0,
         "data_stats": {"truncated": 0}, "paired": paired_block(rows)}
    (tmp_path / "eval.json").write_text(json.dumps(e))
    point = {"train_s": 1.0, "eval_s": 1.0, "recipe": {"source": "built-in"}, "run": str(run_dir),
             "eval_file": str(tmp_path / "eval.json")}
    base = {"logp_acc": 0.5, "logp_acc_ci95": wilson(100, 200)}
    r = table_rows.summarize({"name": "hh"}, "sigmoid", point, base)
    assert r["gain"] == pytest.approx(0.1) and r["gain_ci95"] == e["paired"]["gain"]["gain_ci95"]
    assert r["gain_interval"].startswith("paired bootstrap over pairs") and 0.001 < r["gain_mcnemar_p"] < 0.0027
    newcombe = settings.newcombe(0.6, wilson(120, 200), 0.5, wilson(100, 200))[1]
    assert r["gain_ci95"][1] - r["gain_ci95"][0] < 0.7 * (newcombe[1] - newcombe[0])  # pairing: ~0.12 against ~0.19


def test_a_judge_scores_every_point_and_seeds_share_its_prompts(tmp_path):
    """--judge: the eval gets the reward source; a point's row carries the win rate and its
    per-prompt fractions; seeds combine into their mean with a seeds x prompts interval; the
    table gets a win-rate section (none without a judge, so earlier tables are unchanged)."""
    from benchmarks.quality.seeds import combine_seeds, combine_win_rates, pair_outcomes
    from preftune.config import save_config

    s = {"kl_prompts": 4, "kl_samples": 2, "max_new_tokens": 8}
    plain = points.eval_args(Path("RUN"), {"dev": "d.jsonl"}, Path("OUT"), s)
    assert "--reward" not in plain  # the key of every point measured without a judge is what it was
    assert points.eval_args(Path("RUN"), {"dev": "d.jsonl"}, Path("OUT"), {**s, "judge": "rm:runs/rm"})[-2:] == \
        ["--reward", "rm:runs/rm"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(load_config(None, ["loss.name=sigmoid"]), run_dir / "config.yaml")
    (run_dir / "summary.json").write_text(json.dumps({"steps": 20, "data": {"pairs": 80, "truncated": 0}}))
    e = {"pairs": 100, "accuracy/implicit_reward": 0.7, "accuracy/implicit_reward_ci95": wilson(70, 100),
         "accuracy/logp": 0.6, "accuracy/logp_ci95": wilson(60, 100), "rewards/margins": 0.8, "kl": 2.0,
         "kl_stderr": 0.1, "kl_samples": 8, "sample_length/policy/mean": 30.0, "sample_length/reference/mean": 30.0,
         "data_stats": {"truncated": 0}, "win_rate": 0.625, "win_rate/ci95": [0.5, 0.75], "win_rate/comparisons": 8,
         "reward/source": "rm:runs/rm", "reward/policy": 1.5, "reward/reference": 1.0,
         "per_prompt": [{"win": w} for w in (1.0, 0.5, 0.5, 0.5)]}
    (tmp_path / "eval.json").write_text(json.dumps(e))
    point = {"train_s": 1.0, "eval_s": 1.0, "recipe": {"source": "built-in"}, "run": str(run_dir),
             "eval_file": str(tmp_path / "eval.json")}
    r = table_rows.summarize({"name": "hh"}, "sigmoid", point, {"logp_acc": 0.5, "logp_acc_ci95": wilson(50, 100)})
    assert (r["win_rate"], r["win_rate_ci95"], r["judge"], r["win_by_prompt"]) == \
        (0.625, [0.5, 0.75], "rm:runs/rm", [1.0, 0.5, 0.5, 0.5])
    seeds = [{**r, "win_rate": w, "win_by_prompt": b} for w, b in
             ((0.625, [1.0, 0.5, 0.5, 0.5]), (0.75, [1.0, 1.0, 0.5, 0.5]), (0.5, [0.5, 0.5, None, 0.5]))]
    got = combine_win_rates(seeds)
    assert got["win_rate"] == pytest.approx(0.625) and got["per_seed_win_rates"] == [0.625, 0.75, 0.5]
    assert got["win_prompts"] == 3  # prompt 2 failed in seed 2: out of the interval
    lo, hi = got["win_rate_ci95"]
    assert 0.5 <= lo < 0.65 < hi <= 1.0
    with pytest.raises(ValueError, match="same prompts"):
        combine_win_rates([seeds[0], {**seeds[1], "win_by_prompt": [1.0]}])
    bases = {"hh": {"logp_acc": 0.5, "logp_acc_ci95": wilson(50, 100), "wall_s": 100.0}}
    meta = {"mode": "full", "model": "m", "kl_prompts": 4, "kl_samples": 2, "max_new_tokens": 8, "elapsed_s": 1.0,
            "estimate": {"total_s": 5000}}
    row = combine_seeds(seeds, [pair_outcomes(_per_pair(30, 10))] * 3)  # a seeds row takes the judge's figures too
    assert {k: row[k] for k in got} == got
    quality.write_outputs(tmp_path, [row], bases, meta)
    md = (tmp_path / "results.md").read_text()
    assert f"| hh | sigmoid | 0.625 [{lo:.3f}, {hi:.3f}] (0.625, 0.750, 0.500 by seed) | 1.500 / 1.000 | 8 |" in md
    assert "scored by rm:runs/rm, which no training here used" in md
    quality.write_outputs(tmp_path, [_row("hh", "sigmoid", 0.5, 0.7, 3.0)], bases, meta)
    assert "Sampled win rate" not in (tmp_path / "results.md").read_text()
