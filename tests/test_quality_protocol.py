"""Issue 39's protocol in `python -m benchmarks.quality` (benchmarks/quality/protocol.py and the
runner's flags): seeds, the learning-curve grid, the second split and a recipe's budget on the
whole training side. The runner is driven with a fake `preftune` that writes the files a real run
and eval would (config.yaml, summary.json, eval.json, the per-pair file) with chosen numbers, so
the flags' plumbing and arithmetic are checked without training anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.quality import __main__ as quality
from benchmarks.quality import points, protocol, settings
from conftest import SHARED
from preftune.config import load_config, save_config
from preftune.core.stats import wilson

TQA_CSV = SHARED / "data" / "truthfulqa" / "TruthfulQA.visible.csv"
needs_shared_tqa = pytest.mark.skipif(not TQA_CSV.is_file() or not (SHARED / "data" / "hh-rlhf-harmless-base").is_dir(),
                                      reason="../shared/data is absent")
GAINED = {0: 3, 1: 4, 2: 2}  # pairs of the second half of 8 dev pairs each seed's run gets right


def test_parse_ints_second_split_and_curve_grid():
    assert protocol.parse_ints("0,1,2", "seeds") == (0, 1, 2)
    for bad in ("0,0", "a", "", "-1"):
        with pytest.raises(ValueError, match="--seeds"):
            protocol.parse_ints(bad, "seeds")
    assert protocol.second_split(444, 168) == (276, 444) and protocol.second_split(1800, 100) == (1700, 1800)
    with pytest.raises(ValueError):
        protocol.second_split(100, 100)
    # TruthfulQA's 444 train-side pairs: 1,800 is capped to 444 and 400 stays; epochs sorted
    assert protocol.curve_grid((1800, 100, 400), (2, 1), 444) == [(100, 1), (100, 2), (400, 1), (400, 2), (444, 1),
                                                                  (444, 2)]
    assert protocol.curve_grid((600, 1800), (1,), 444) == [(444, 1)]  # two sizes capped to one run once
    assert protocol.point_name(400, 2) == "n400-e2"


def test_budget_plan_turns_a_recipe_budget_into_overrides_on_the_whole_side():
    """1,800 training-side pairs, 64 validation pairs at the end: training on the first 1,736."""
    budget = {"max_steps": 120, "stop_on": ["kl_drift", "both_logps_falling"], "probe_every": 10, "keep_best": True,
              "val_pairs": 64, "kl_max": 8.0}
    n, args = protocol.budget_plan(budget, 1800, "/d/train.jsonl.gz")
    assert n == 1736
    assert args == ["train.max_steps=120", "diagnostics.kl_max=8.0", "diagnostics.probe_every=10",
                    'diagnostics.stop_on=["kl_drift", "both_logps_falling"]', "train.keep_best=true",
                    "data.eval_path=/d/train.jsonl.gz[1736:1800]", "diagnostics.probe_eval_pairs=64"]
    cfg = load_config(None, [a for a in args if not a.startswith("data.")])  # each override is a valid setting
    assert (cfg.train.max_steps, cfg.diagnostics.kl_max, cfg.diagnostics.stop_on) == \
        (120, 8.0, ["kl_drift", "both_logps_falling"])
    assert protocol.budget_plan({"max_steps": 60}, 444, "/t.jsonl") == (444, ["train.max_steps=60"])
    for bad, match in (({"keep_best": True, "probe_every": 10}, "keep_best needs"),
                       ({"stop_on": ["kl_drift"]}, "reads probes"),
                       ({"stop_on": ["eval_regressing"], "probe_every": 5}, "eval_regressing needs"),
                       ({"val_pairs": 444}, "must leave training pairs"), ({"max_step": 5}, "unknown key")):
        with pytest.raises(ValueError, match=match):
            protocol.budget_plan(bad, 444, "/t.jsonl")


@pytest.mark.parametrize("method", settings.METHODS)
def test_every_recipe_states_a_budget_the_runner_can_apply(method):
    """Each benchmarked recipe states one (provisional until measured): valid on both training sides,
    first and second split (HH 1,800 / 1,700 records, TruthfulQA 444 / 276), every override a setting."""
    budget = points.recipe_budget(method)
    assert budget, f"{method}.yaml states no recipe.budget"
    for side in (1800, 1700, 444, 276):
        n, args = protocol.budget_plan(budget, side, "/d/train.jsonl")
        assert 0 < n < side or "val_pairs" not in budget
        load_config(None, [a for a in args if not a.startswith("data.")])


# ---- the runner with a fake preftune -----------------------------------------------------------

def _per_pair_rows(n: int, gained: int | None, reference: bool) -> list[dict]:
    """Before: the first half right. After (a run): that, plus the first `gained` of the second half."""
    rows = []
    for i in range(n):
        before = 1.0 if i < n // 2 else 0.0
        after = None if gained is None else 1.0 if n // 2 <= i < n // 2 + gained else before
        rows.append({"line": i + 1, "pair": f"k{i}", "implicit_correct": after, "logp_correct": before,
                     "reference_logp_correct": before if reference else None})
    return rows


def _arg(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


class FakePreftune:
    """Stands in for points._preftune: records each call and writes what the real step would."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, args: list[str], log: Path) -> tuple[int, float]:
        self.calls.append(list(args))
        return (self._train if args[0] == "train" else self._eval)(args), 2.0

    def _train(self, args):
        cfg = load_config(_arg(args, "--config"), [a for a in args[1:] if "=" in a and not a.startswith("--")])
        run = Path(cfg.run.output_dir)
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")
        (run / "model").mkdir(exist_ok=True)
        (run / "model" / "adapter_model.safetensors").write_bytes(b"")  # the saved weights a reuse looks for
        best = {"step": 2, "accuracy": 0.6, "restored": True} if cfg.train.keep_best else None
        (run / "summary.json").write_text(json.dumps({"steps": 2, "data": {"pairs": 8, "truncated": 0}, "best": best,
                                                      "autocast_bf16": cfg.train.autocast_bf16 is True}))
        return 0

    def _eval(self, args):
        n, run = 8, _arg(args, "--run")
        cfg = load_config(str(Path(run) / "config.yaml")) if run else None
        gained = None if cfg is None else GAINED[cfg.train.seed]
        rows = _per_pair_rows(n, gained, reference=cfg is not None and cfg.loss.name not in settings.REFERENCE_FREE)
        right = sum(r["implicit_correct"] or 0 for r in rows) if gained is not None else n / 2
        e = {"pairs": n, "accuracy/implicit_reward": right / n, "accuracy/implicit_reward_ci95": wilson(right, n),
             "accuracy/logp": 0.5, "accuracy/logp_ci95": wilson(4, n), "perplexity/chosen": 2.0, "rewards/margins": 0.1,
             "kl": None if cfg is None else 1.0 + cfg.train.seed, "kl_stderr": 0.1, "kl_samples": 2,
             "sample_length/policy/mean": 4.0, "sample_length/reference/mean": 4.0, "data_stats": {"truncated": 0}}
        Path(_arg(args, "--out")).parent.mkdir(parents=True, exist_ok=True)
        Path(_arg(args, "--out")).write_text(json.dumps(e))
        if "--per-pair" in args:
            Path(_arg(args, "--per-pair")).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return 0


@pytest.fixture
def fake(monkeypatch, tmp_path):
    f = FakePreftune()
    monkeypatch.setattr(points, "_preftune", f)
    monkeypatch.setattr(quality, "HERE", tmp_path / "here")  # a non-quick invocation writes beside the script
    return f


def _run(tmp_path, *flags):
    return quality.main(["--quick", "--model", "m", "--out", str(tmp_path / "q"), "--datasets", "truthfulqa", *flags])


def _trains(fake) -> list[list[str]]:
    return [c for c in fake.calls if c[0] == "train"]


@needs_shared_tqa
def test_default_invocation_runs_one_seed_zero_without_per_pair_files(tmp_path, fake):
    assert _run(tmp_path, "--methods", "sigmoid") == 0
    (train,) = _trains(fake)
    assert "train.seed=0" in train and _arg(train, "--config") is not None
    assert [a for a in train if a.startswith("run.output_dir=")] == [f"run.output_dir={tmp_path / 'q/truthfulqa/sigmoid/run'}"]
    assert not any("--per-pair" in c for c in fake.calls)
    results = json.loads((tmp_path / "q" / "results.json").read_text())
    assert "protocol" not in results["settings"] and "seeds" not in results["truthfulqa sigmoid"]
    assert results["truthfulqa sigmoid"]["gain"] == pytest.approx(3 / 8)  # seed 0: 3 of 8 pairs gained


@needs_shared_tqa
def test_seeds_run_each_point_per_seed_and_the_row_is_their_mean_spread_and_interval(tmp_path, fake):
    """Seeds 0, 1, 2 gain 3, 4 and 2 of 8 pairs: +0.375, +0.500, +0.250, mean +0.375, std 0.125.
    simpo has no reference: its "before" comes from the base eval's own per-pair file."""
    assert _run(tmp_path, "--methods", "sigmoid,simpo", "--seeds", "0,1,2") == 0
    trains = _trains(fake)
    assert [next(a for a in t if a.startswith("train.seed=")) for t in trains] == \
        ["train.seed=0", "train.seed=1", "train.seed=2"] * 2
    dirs = {a for t in trains for a in t if a.startswith("run.output_dir=")}
    assert len(dirs) == 6 and f"run.output_dir={tmp_path / 'q/truthfulqa/sigmoid/seed2/run'}" in dirs
    evals = [c for c in fake.calls if c[0] == "eval"]
    assert all("--per-pair" in c for c in evals if "--run" in c)
    assert sum("--per-pair" in c for c in evals if "--run" not in c) == 1  # the base eval, once, for simpo
    results = json.loads((tmp_path / "q" / "results.json").read_text())
    for method in ("sigmoid", "simpo"):
        r = results[f"truthfulqa {method}"]
        assert r["seeds"] == 3 and r["seed_values"] == [0, 1, 2]
        assert r["per_seed_gains"] == pytest.approx([0.375, 0.5, 0.25])
        assert r["gain"] == pytest.approx(0.375) and r["gain_spread"]["std"] == pytest.approx(0.125)
        assert r["gain_ci95"][0] < r["gain"] < r["gain_ci95"][1] and r["gain_interval"] == "seeds x pairs bootstrap"
        assert r["kl"] == pytest.approx(2.0) and r["kl_max"] == 3.0  # seeds' KL 1, 2, 3
    bar = results["acceptance"]["issue39"]
    assert set(bar) == {"truthfulqa sigmoid"}  # DPO and IPO only
    assert bar["truthfulqa sigmoid"]["mean of >= 3 seeds"] and bar["truthfulqa sigmoid"]["gain >= 0.08"]
    assert bar["truthfulqa sigmoid"]["KL <= 10 nats (every seed)"] and bar["truthfulqa sigmoid"]["no health flag"]
    assert bar["truthfulqa sigmoid"]["interval excludes 0"] == (results["truthfulqa sigmoid"]["gain_ci95"][0] > 0)
    md = (tmp_path / "q" / "results.md").read_text()
    assert "| +0.375 ± 0.125 (+0.250 to +0.500, 3 seeds) [" in md and "seeds 0, 1, 2, LoRA" in md
    assert "Protocol: training seeds 0, 1, 2." in md
    before = len(fake.calls)
    assert _run(tmp_path, "--methods", "sigmoid,simpo", "--seeds", "0,1,2", "--collect") == 0
    assert len(fake.calls) == before  # --collect trains and evaluates nothing
    assert json.loads((tmp_path / "q" / "results.json").read_text())["truthfulqa simpo"]["gain"] == pytest.approx(0.375)


@needs_shared_tqa
def test_second_split_draws_truthfulqa_dev_by_hash_outside_the_validation_slice(tmp_path, fake):
    """TruthfulQA's 444 train-side questions, 8 training and 8 dev pairs in quick mode: a search
    validates on records [8:436), so the second dev set is 8 questions drawn by hash from the 16
    outside it, and training reads the other records in file order, none of them a dev question."""
    assert _run(tmp_path, "--methods", "sigmoid") == 0
    assert _run(tmp_path, "--methods", "sigmoid", "--split", "second") == 0
    side = tmp_path / "q" / "data" / "truthfulqa" / "train.jsonl"
    data2 = tmp_path / "q" / "data" / "truthfulqa-second"
    second = [c for c in fake.calls[3:] if c[0] == "eval"]  # after the first split's base eval, train, eval
    assert {_arg(c, "--data") for c in second} == {f"{data2 / 'dev.jsonl'}[:8]"}
    (train,) = _trains(fake)[1:]
    assert f"data.train_path={data2 / 'train.jsonl'}[:8]" in train
    assert f"run.output_dir={tmp_path / 'q/truthfulqa-second/sigmoid/run'}" in train
    questions = [json.loads(x)["Question"] for x in side.read_text().splitlines()]
    dev = [json.loads(x)["Question"] for x in (data2 / "dev.jsonl").read_text().splitlines()]
    rest = [json.loads(x)["Question"] for x in (data2 / "train.jsonl").read_text().splitlines()]
    assert len(dev) == 8 and set(dev) <= set(questions[:8] + questions[436:]) and not set(dev) & set(rest)
    assert sorted(dev + rest) == sorted(questions)  # the side, split in two; the rest in file order:
    assert rest == [q for q in questions if q not in dev]
    assert dev != questions[436:]  # a draw, not the side's last slice
    first = json.loads((tmp_path / "q" / "results.json").read_text())
    r = json.loads((tmp_path / "q" / "results-second.json").read_text())["truthfulqa sigmoid"]
    assert r["split"] == "second" and "split" not in first["truthfulqa sigmoid"]
    assert (tmp_path / "q" / "results-second.md").read_text().count("the second split") == 1
    assert (tmp_path / "q" / "gain_vs_kl-second.png").is_file()
    agree = json.loads((tmp_path / "q" / "results-second.json").read_text())["settings"]["second_split_agreement"]
    assert agree["truthfulqa sigmoid"]["agrees"] is True and agree["truthfulqa sigmoid"]["second_gain"] == pytest.approx(3 / 8)
    assert "truthfulqa sigmoid: second split +0.375" in (tmp_path / "q" / "results-second.md").read_text()


def test_split_agreement_is_the_second_gain_inside_the_first_interval():
    from benchmarks.quality.quality_outputs import split_agreement

    first = {"hh ipo": {"gain": 0.12, "gain_ci95": [0.05, 0.19], "seeds": 3}, "settings": {}}
    second = [{"dataset": "hh", "method": "ipo", "gain": 0.04, "gain_ci95": [-0.02, 0.10], "seeds": 3},
              {"dataset": "hh", "method": "sigmoid", "gain": 0.1, "gain_ci95": [0.0, 0.2]}]
    got = split_agreement(first, second)
    assert list(got) == ["hh ipo"]  # sigmoid is not in first
    assert {k: got["hh ipo"][k] for k in ("first_gain", "first_ci95", "first_seeds", "second_gain", "second_ci95",
                                          "second_seeds", "agrees")} == {
        "first_gain": 0.12, "first_ci95": [0.05, 0.19], "first_seeds": 3, "second_gain": 0.04,
        "second_ci95": [-0.02, 0.10], "second_seeds": 3, "agrees": False}  # 0.04 below 0.05
    # the difference -0.08 with half-width sqrt(0.14^2 + 0.12^2) / 2 = 0.0922: it does not exclude 0
    assert got["hh ipo"]["gain_difference"] == pytest.approx(-0.08)
    assert got["hh ipo"]["gain_difference_ci95"] == pytest.approx([-0.08 - 0.092195, -0.08 + 0.092195], abs=1e-6)
    assert got["hh ipo"]["difference_excludes_0"] is False
    second[0]["gain"] = 0.05
    assert split_agreement(first, second)["hh ipo"]["agrees"] is True


def test_split_agreement_reports_the_bases_and_the_trained_accuracy():
    """TruthfulQA's second split measured +0.226 from a base of 0.50 against +0.377 from 0.33: the
    gains part, the trained accuracies (0.726 against 0.710 [0.611, 0.750]) do not."""
    from benchmarks.quality.quality_outputs import _agreement_line, split_agreement

    first = {"truthfulqa sigmoid": {"gain": 0.377, "gain_ci95": [0.272, 0.484], "before_logp_acc": 0.333,
                                    "implicit_acc": 0.710, "implicit_acc_ci95": [0.611, 0.750]}}
    second = [{"dataset": "truthfulqa", "method": "sigmoid", "gain": 0.226, "gain_ci95": [0.129, 0.323],
               "before_logp_acc": 0.500, "implicit_acc": 0.726}]
    a = split_agreement(first, second)["truthfulqa sigmoid"]
    assert (a["agrees"], a["accuracy_agrees"], a["difference_excludes_0"]) == (False, True, True)
    assert (a["first_base"], a["second_base"]) == (0.333, 0.5)
    line = _agreement_line("truthfulqa sigmoid", a)
    assert "OUTSIDE it. Difference -0.151 [-0.295, -0.007]." in line
    assert "trained implicit-reward accuracy 0.726 against 0.710 [0.611, 0.750]: within it." in line
    second[0]["implicit_acc"] = 0.76
    assert split_agreement(first, second)["truthfulqa sigmoid"]["accuracy_agrees"] is False


@needs_shared_tqa
def test_learning_curve_grid_runs_each_size_and_epochs_with_the_reference_cache(tmp_path, fake):
    assert _run(tmp_path, "--methods", "sigmoid", "--train-pairs", "8,4", "--epochs", "1,2") == 0
    side = tmp_path / "q" / "data" / "truthfulqa" / "train.jsonl"
    grid = [(next(a for a in t if a.startswith("data.train_path=")), t[-2], t[-1]) for t in _trains(fake)]
    assert grid == [(f"data.train_path={side}[:{n}]", f"train.epochs={e}", "train.reference_cache=true")
                    for n, e in ((4, 1), (4, 2), (8, 1), (8, 2))]
    curve = json.loads((tmp_path / "q" / "learning_curve.json").read_text())
    assert [(x["method"], x["epochs"], [p["train_pairs"] for p in x["points"]]) for x in curve["lines"]] == \
        [("sigmoid", 1, [4, 8]), ("sigmoid", 2, [4, 8])]
    assert curve["lines"][0]["points"][0]["gain"] == pytest.approx(3 / 8)
    assert (tmp_path / "q" / "learning_curve.png").stat().st_size > 10_000
    assert not (tmp_path / "q" / "results.json").exists()  # the curve does not overwrite the table


@needs_shared_tqa
def test_full_train_applies_the_recipes_stated_budget(tmp_path, fake, monkeypatch):
    """sigmoid states a budget (64 validation pairs from the end of the 444): it trains on the first
    380 with early stopping and the best checkpoint; ipo states none and trains on all 444 as it is."""
    import shutil

    import yaml

    from preftune.core.recipes import RECIPE_DIR

    monkeypatch.setattr(points, "RECIPES", tmp_path / "recipes")
    (tmp_path / "recipes").mkdir()
    data = yaml.safe_load((RECIPE_DIR / "sigmoid.yaml").read_text())
    data["recipe"]["budget"] = {"stop_on": ["kl_drift"], "probe_every": 10, "keep_best": True, "val_pairs": 64}
    (tmp_path / "recipes" / "sigmoid.yaml").write_text(yaml.safe_dump(data))
    ipo = yaml.safe_load((RECIPE_DIR / "ipo.yaml").read_text())
    ipo["recipe"].pop("budget", None)
    (tmp_path / "recipes" / "ipo.yaml").write_text(yaml.safe_dump(ipo))
    shutil.copy(RECIPE_DIR / "simpo.yaml", tmp_path / "recipes" / "simpo.yaml")
    assert _run(tmp_path, "--methods", "sigmoid,ipo", "--full-train") == 0
    side = tmp_path / "q" / "data" / "truthfulqa" / "train.jsonl"
    sigmoid, ipo_train = _trains(fake)
    assert f"data.train_path={side}[:380]" in sigmoid and f"data.eval_path={side}[380:444]" in sigmoid
    assert sigmoid.index(f"data.eval_path={side}[380:444]") > sigmoid.index("data.eval_path=")  # the budget wins
    assert "train.keep_best=true" in sigmoid and 'diagnostics.stop_on=["kl_drift"]' in sigmoid
    assert f"data.train_path={side}[:444]" in ipo_train and not any(a.startswith("diagnostics.stop_on") for a in ipo_train)
    results = json.loads((tmp_path / "q" / "results-full-train.json").read_text())
    assert results["truthfulqa sigmoid"]["budget"]["val_pairs"] == 64 and results["truthfulqa ipo"]["budget"] is None
    assert results["truthfulqa sigmoid"]["train_pairs"] == 380
    assert results["truthfulqa sigmoid"]["best_checkpoint"]["restored"] and "best_checkpoint" not in results["truthfulqa ipo"]


def test_a_changed_eval_setting_evaluates_again_without_training_and_a_changed_recipe_trains(tmp_path, fake,
                                                                                             monkeypatch):
    """run_point keys the training apart from the eval: eval.kl_prompts changing re-runs the eval
    only; the recipe's lr changing trains again; a point.json of the whole key (as written before
    train.json existed) is finished as it is, and a run without its saved weights trains again."""
    import shutil

    import yaml

    from preftune.core.recipes import RECIPE_DIR

    monkeypatch.setattr(points, "RECIPES", tmp_path / "recipes")
    (tmp_path / "recipes").mkdir()
    shutil.copy(RECIPE_DIR / "sigmoid.yaml", tmp_path / "recipes" / "sigmoid.yaml")
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    data = {"name": "d", "tag": "d", "train": f"{tmp_path / 'pairs.jsonl'}[:1]", "dev": f"{tmp_path / 'pairs.jsonl'}[:1]",
            "split": None, "settings": []}
    s = {"kl_prompts": 2, "kl_samples": 1, "max_new_tokens": 4}
    out, root = tmp_path / "q", tmp_path / "q" / "d" / "sigmoid"

    def kinds(**changed):
        before = len(fake.calls)
        point = points.run_point(data, "sigmoid", out, {**s, **changed}, "m")
        assert "error" not in point and point["train_s"] == 2.0
        return [c[0] for c in fake.calls[before:]]

    assert kinds() == ["train", "eval"]
    (root / "train.json").unlink(missing_ok=True)  # a point finished before train.json: its whole key still matches
    assert kinds() == []
    assert kinds(kl_prompts=4) == ["eval"]  # the training's key is point.json's, less the eval
    assert "eval.kl_prompts=4" in json.loads((root / "point.json").read_text())["key"]["eval"]
    assert kinds(kl_prompts=4) == []
    recipe = yaml.safe_load((tmp_path / "recipes" / "sigmoid.yaml").read_text())
    recipe["train"]["lr"] = 1e-4
    (tmp_path / "recipes" / "sigmoid.yaml").write_text(yaml.safe_dump(recipe))
    assert kinds(kl_prompts=4) == ["train", "eval"]
    shutil.rmtree(root / "run" / "model")  # the weights are gone: an eval-only change cannot reuse the run
    assert kinds(kl_prompts=2) == ["train", "eval"]
    assert "train.autocast_bf16=false" in _trains(fake)[-1]  # fp32 pinned: auto would be bf16 on a CUDA GPU
    summary = json.loads((root / "run" / "summary.json").read_text())
    (root / "run" / "summary.json").write_text(json.dumps({**summary, "autocast_bf16": True}))
    assert kinds(kl_prompts=4) == ["train", "eval"]  # a run that trained in bf16 is no fp32 point
    summary.pop("autocast_bf16")
    (root / "run" / "summary.json").write_text(json.dumps(summary))
    assert kinds(kl_prompts=2) == ["eval"]  # a summary older than the field: fp32 (auto was fp32 on CPU)


# ---- honest selection (search.py): validation from the training side, dev once at the end ------

def _tqa_rows(path: Path, questions: list[str]) -> str:
    path.write_text("".join(json.dumps({"Type": "t", "Category": "c", "Question": q, "Best Answer": f"right {k}",
                                        "Correct Answers": f"right {k}", "Incorrect Answers": f"wrong {k}",
                                        "Source": "s"}) + "\n" for k, q in enumerate(questions)))
    return str(path)


def test_validation_slice_stops_where_the_second_splits_dev_begins():
    from benchmarks.quality import search

    data = {"name": "truthfulqa", "train": "/d/train.jsonl[:160]", "dev": "/d/dev.jsonl[:168]", "train_pairs": 160}
    assert search.validation_inputs(data, 120, stop=276)["dev"] == "/d/train.jsonl[160:276]"  # 444 - 168 = 276
    assert search.validation_inputs(data, 120, stop=276)["dev_pairs"] == 116
    assert search.validation_inputs(data, 120)["dev"] == "/d/train.jsonl[160:280]"
    with pytest.raises(ValueError, match="no validation pairs"):
        search.validation_inputs(data, 120, stop=160)


def test_folds_split_the_training_pairs_by_prompt_and_refuse_a_dev_prompt(tmp_path):
    """12 training rows, 'Q3?' three times: 3 folds, every row validated exactly once, no question
    on both sides of a fold; a dev question among the training ones is an error."""
    from benchmarks.quality import search

    questions = [f"Q{k}?" for k in range(9)] + ["Q3?", "Q3?", "Q10?"]
    side = _tqa_rows(tmp_path / "train.jsonl", questions + ["Q99?"])  # a 13th row past the training pairs
    dev = _tqa_rows(tmp_path / "dev.jsonl", ["D1?", "D2?"])
    data = {"name": "truthfulqa", "tag": "truthfulqa", "side": side, "train": f"{side}[:12]", "dev": dev,
            "train_pairs": 12, "settings": []}
    folds = search.fold_inputs(data, 3, tmp_path / "folds")
    seen = []
    for f in folds:
        fit = [json.loads(x)["Question"] for x in Path(f["train"]).read_text().splitlines()]
        val = [json.loads(x)["Question"] for x in Path(f["dev"]).read_text().splitlines()]
        assert not set(fit) & set(val) and len(fit) + len(val) == 12 and f["dev_pairs"] == len(val) == 4
        assert f["tag"].startswith("truthfulqa-k3-fold")
        seen += val
    assert sorted(seen) == sorted(questions) and "Q99?" not in seen
    with pytest.raises(ValueError, match="dev pairs are not held out"):
        search.fold_inputs({**data, "dev": _tqa_rows(tmp_path / "dev2.jsonl", ["Q4?"])}, 3, tmp_path / "f2")


def test_pool_folds_pools_accuracy_over_every_validation_pair():
    """Folds of 40, 40 and 20 pairs at 0.75, 0.50, 0.60: (30 + 20 + 12) / 100 = 0.62."""
    from benchmarks.quality import search

    rows = [{"implicit_acc": a, "dev_pairs": m, "kl": kl, "length_ratio": 1.0, "flags": f}
            for a, m, kl, f in ((0.75, 40, 1.0, []), (0.5, 40, 2.0, ["kl_drift (eval)"]), (0.6, 20, 3.0, []))]
    r = search.pool_folds(rows)
    assert r["implicit_acc"] == pytest.approx(0.62) and r["val_pairs"] == 100 and r["kl"] == pytest.approx(2.0)
    assert r["implicit_acc_ci95"] == pytest.approx(wilson(62, 100)) and r["flags"] == ["kl_drift (eval) (fold 1)"]
    assert search.pool_folds([*rows, {"error": "train exited 1"}]) == {"error": "train exited 1"}


@needs_shared_tqa
def test_search_chooses_on_folds_and_reads_dev_once_after_the_choice(tmp_path, fake, monkeypatch):
    from benchmarks.quality import search

    monkeypatch.setattr(search, "HERE", tmp_path / "here")
    argv = ["--method", "sigmoid", "--dataset", "truthfulqa", "--pairs", "12", "--folds", "3", "--lrs", "5e-4",
            "--betas", "0.1,0.3", "--model", "m", "--out", str(tmp_path / "s"), "--dev", "100"]
    assert search.main(argv) == 0
    dev = str(tmp_path / "s" / "data" / "truthfulqa" / "dev.jsonl")
    reads_dev = [i for i, c in enumerate(fake.calls) if (_arg(c, "--data") or "").startswith(dev)]
    trains = [c for c in fake.calls if c[0] == "train"]
    assert len(trains) == 2 * 3 + 1  # 2 grid points x 3 folds, then the chosen point once
    assert len(reads_dev) == 2 and reads_dev[0] == len(fake.calls) - 3  # dev: its base eval and one eval, at the end
    assert {_arg(fake.calls[i], "--data") for i in reads_dev} == {f"{dev}[:100]"}  # --dev 100 of the 168
    assert all(f"{tmp_path / 's' / 'folds'}" in _arg(c, "--data") for c in fake.calls[:reads_dev[0]] if c[0] == "eval")
    result = json.loads((tmp_path / "here" / "search" / "truthfulqa-sigmoid-k3.json").read_text())
    assert result["folds"] == 3 and result["val_pairs"] == 12 and result["chosen"]["beta"] == 0.1
    assert result["dev"]["dev_pairs"] == 8 and result["dev"]["gain"] == pytest.approx(3 / 8)
    md = (tmp_path / "here" / "search" / "truthfulqa-sigmoid-k3.md").read_text()
    assert "Chosen on validation: lr 0.0005, beta 0.1" in md and "Dev (measured once, after the choice" in md


def test_curve_lines_group_by_method_and_epochs_and_say_where_the_gain_saturates():
    """Gains +0.05, +0.08, +0.12 [+0.08, +0.16] at 100, 400, 1,800 pairs: 400 is the fewest pairs
    reaching +0.08, the lower end of the largest size's interval (reaching: equal counts)."""
    from benchmarks.quality.curves import curve_lines, saturates_at

    def row(n, gain, lo, hi, epochs=1, **extra):
        return {"dataset": "hh", "method": "ipo", "train_pairs": n, "epochs": epochs, "gain": gain, "gain_ci95": [lo, hi],
                "implicit_acc": 0.5 + gain, "before_logp_acc": 0.5, "kl": 1.0, "flags": [], "wall_s": 300.0,
                "steps": n // 4, **extra}
    rows = [row(1800, 0.12, 0.08, 0.16), row(100, 0.05, -0.02, 0.12), row(400, 0.08, 0.01, 0.15),
            row(400, 0.2, 0.1, 0.3, epochs=2, seeds=3), {"dataset": "hh", "method": "ipo", "train_pairs": 100,
                                                          "epochs": 2, "error": "train exited 1", "log": "l"}]
    curve = curve_lines(rows)
    one, two = curve["lines"]
    assert [p["train_pairs"] for p in one["points"]] == [100, 400, 1800] and one["saturates_at"] == 400
    assert two["epochs"] == 2 and two["saturates_at"] is None and two["points"][0]["wall_s_per_seed"] == 100.0
    assert curve["errors"] == [{"dataset": "hh", "method": "ipo", "train_pairs": 100, "epochs": 2,
                                "error": "train exited 1", "log": "l"}]
    # measured against the MOST pairs, not the best gain: 1,800's interval reaches 0, so 100 pairs already match it
    assert saturates_at([{"train_pairs": 100, "gain": 0.03, "gain_ci95": [-0.05, 0.11]},
                         {"train_pairs": 400, "gain": 0.2, "gain_ci95": [0.15, 0.25]},
                         {"train_pairs": 1800, "gain": 0.1, "gain_ci95": [0.0, 0.2]}]) == 100


@needs_shared_tqa
def test_precision_runs_each_point_in_fp32_and_bf16_side_by_side(tmp_path, fake):
    """--precision fp32,bf16: the fp32 point stays in its own directory (a finished default point is
    reused), the bf16 point trains with train.autocast_bf16=true beside it, and the outputs
    (results-precision.*) keep both rows apart and compare them."""
    assert _run(tmp_path, "--methods", "sigmoid", "--seeds", "0,1,2", "--precision", "fp32,bf16") == 0
    trains = _trains(fake)
    assert len(trains) == 6 and sum("train.autocast_bf16=true" in t for t in trains) == 3
    dirs = {a for t in trains for a in t if a.startswith("run.output_dir=")}
    assert f"run.output_dir={tmp_path / 'q/truthfulqa/sigmoid/seed1/run'}" in dirs
    assert f"run.output_dir={tmp_path / 'q/truthfulqa/sigmoid/bf16/seed1/run'}" in dirs
    assert not (tmp_path / "q" / "results.json").exists()  # the default table is not overwritten
    results = json.loads((tmp_path / "q" / "results-precision.json").read_text())
    fp, bf = results["truthfulqa sigmoid (fp32)"], results["truthfulqa sigmoid (bf16)"]
    assert (fp["precision"], bf["precision"]) == ("fp32", "bf16") and fp["seeds"] == bf["seeds"] == 3
    assert set(results["acceptance"]["dpo_recipe"]) == {"truthfulqa fp32", "truthfulqa bf16"}
    md = (tmp_path / "q" / "results-precision.md").read_text()
    assert "| truthfulqa | sigmoid (bf16) |" in md and "training precision fp32 and bf16" in md
    assert "- truthfulqa sigmoid, bf16 against fp32: gain +0.375 against +0.375 (+0.000);" in md
    assert "- truthfulqa sigmoid (bf16): 3 seeds, gains" in md
    before = len(fake.calls)
    assert _run(tmp_path, "--methods", "sigmoid", "--seeds", "0,1,2") == 0
    assert len(fake.calls) == before  # the fp32 seeds were already finished: nothing trains again


def test_precision_flag_refuses_an_unknown_precision(capsys):
    with pytest.raises(SystemExit) as e:
        quality._protocol(quality.argparse.Namespace(seeds=None, train_pairs=None, epochs=None, full_train=False,
                                                     split="first", precision="fp16"), {}, ["hh"])
    assert "--precision" in str(e.value)
