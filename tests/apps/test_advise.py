"""advise.py: each rule fires on the data shape it is for, and says why."""

from preftune.apps.advise import advise, memory_estimate_gb

PAIRED = {"kind": "paired", "records": 5000, "length_bias": {"chosen_longer": 0.5}, "identical_pairs": 0,
          "duplicate_pairs": 0, "truncated": {"pairs": 0}}
P135M = 135_000_000


def test_large_paired_data_gets_dpo():
    a = advise(PAIRED, params=P135M, memory_gb=None, lora=True)
    assert a.loss == "sigmoid" and a.warnings == [] and "5000 preference pairs" in a.reasons[0]


def test_small_paired_data_gets_ipo():
    a = advise({**PAIRED, "records": 300}, params=P135M, memory_gb=None, lora=True)
    assert a.loss == "ipo" and "300 pairs" in a.reasons[0]


def test_unpaired_data_gets_kto_with_class_weights_when_imbalanced():
    stats = {"kind": "unpaired", "records": 1000, "desirable": 200, "undesirable": 800, "desirable_fraction": 0.2}
    a = advise(stats, params=P135M, memory_gb=None, lora=True)
    assert a.loss == "kto" and "loss.kto_auto_weights=true" in a.overrides


def test_no_room_for_a_reference_gets_reference_free():
    # full fine-tuning: 16 B/param without a reference, 20 with one
    without, with_ref = memory_estimate_gb(P135M, lora=False, reference=False), memory_estimate_gb(
        P135M, lora=False, reference=True)
    assert with_ref / without == 20 / 16
    budget = (without + with_ref) / 2
    a = advise(PAIRED, params=P135M, memory_gb=budget, lora=False)
    assert a.loss == "simpo" and "reference" in a.reasons[0]
    assert advise(PAIRED, params=P135M, memory_gb=budget, lora=True).loss == "sigmoid"  # LoRA's reference is free


def test_warnings_for_length_bias_duplicates_and_truncation():
    stats = {**PAIRED, "length_bias": {"chosen_longer": 0.8}, "duplicate_pairs": 12, "truncated": {"pairs": 900}}
    text = advise(stats, params=P135M, memory_gb=None, lora=True).text()
    assert "80% of pairs" in text and "12 duplicate pairs" in text and "900 of 5000 records are truncated" in text


# ---- numbers: the recipe's settings, epochs for the data size, expected memory ----------------

SMOL = {"layers": 30, "hidden": 576}


def test_the_numbers_come_from_the_methods_recipe():
    from preftune.core.recipes import load_recipe

    for stats, loss in ((PAIRED, "sigmoid"), ({**PAIRED, "records": 300}, "ipo")):
        a = advise(stats, params=P135M, memory_gb=None, lora=True)
        r = load_recipe(loss)
        assert a.recipe == loss and a.settings["lr"] == r.get("train.lr")
        assert a.settings["beta"] == r.get("loss.beta") and a.settings["batch_size"] == r.get("train.batch_size")
        assert a.settings["lora_r"] == r.get("model.lora_r") and a.confidence == r.meta["confidence"].strip()
        assert f"-c recipe:{loss}" in a.text()
    full = advise(PAIRED, params=P135M, memory_gb=None, lora=False)
    assert full.settings["lr"] == load_recipe("sigmoid").get("train.lr") / 10 and "model.lora=false" in full.overrides


def test_epochs_aim_at_min_steps_and_stop_at_three():
    from preftune.apps.advise import MAX_EPOCHS, MIN_STEPS, epochs_for

    assert epochs_for(5000, 4) == 1  # 1250 steps in one pass
    assert epochs_for(100, 4) == 2  # 25 steps a pass: 2 passes for 50
    assert epochs_for(10, 4) == MAX_EPOCHS == 3  # 3 steps a pass: capped, not 17 passes
    assert epochs_for(4 * MIN_STEPS, 4) == 1 and epochs_for(4 * MIN_STEPS - 4, 4) == 2
    a = advise({**PAIRED, "records": 100}, params=P135M, memory_gb=None, lora=True)  # ipo recipe: batch 4
    assert a.settings["epochs"] == 2 and a.settings["steps"] == 2 * 25 and "train.epochs=2" in a.overrides


def test_peak_memory_reproduces_the_scaling_points_it_was_fitted_to():
    """This round's benchmarks/scaling points on jemalloc (the `preftune` command's allocator when it
    is installed), LoRA, batch 4, chunked head: SmolLM2-135M without checkpointing at 256, 1024 and
    2048 tokens per pair (allocators.json), with it at 1024, 2048, 4096 and 8192 (results.json), and
    Gemma 3 270M (262k vocabulary) at 2048 with and without (results-gemma3-270m.json): each within 10%."""
    import json
    from pathlib import Path

    from preftune.apps.advise import peak_memory_gb

    here = Path(__file__).resolve().parents[2] / "benchmarks/scaling"
    models = {"smollm2-135m-instruct": (134_515_008, {**SMOL, "vocab": 49152, "intermediate": 1536, "attention": 960}),
              "gemma3-270m": (268_098_176, {"layers": 18, "hidden": 640, "vocab": 262144, "intermediate": 2048,
                                            "attention": 1536})}
    rows = [r for r in json.loads((here / "allocators.json").read_text())["results"] if r["allocator"] == "jemalloc"]
    rows += [{**r, "model": "smollm2-135m-instruct"} for r in json.loads((here / "results.json").read_text())["results"]
             if r.get("allocator") == "jemalloc" and r["mode"] == "block+gc"]
    gemma = json.loads((here / "results-gemma3-270m.json").read_text())
    # the 4096 point's jemalloc run is kept under earlier_runs since its re-run on a machine without jemalloc
    rows += [r for r in gemma["results"] + gemma.get("earlier_runs", []) if r.get("allocator") == "jemalloc"]
    rows = [{"model": "smollm2-135m-instruct", **r} for r in rows]
    assert sorted((r["model"][:5], r["length"], r["mode"]) for r in rows) == [
        ("gemma", 512, "block"), ("gemma", 512, "block+gc"), ("gemma", 1024, "block"), ("gemma", 1024, "block+gc"),
        ("gemma", 2048, "block"), ("gemma", 2048, "block+gc"), ("gemma", 4096, "block+gc"),
        ("smoll", 256, "block"), ("smoll", 1024, "block"),
        ("smoll", 1024, "block+gc"), ("smoll", 2048, "block"), ("smoll", 2048, "block+gc"), ("smoll", 4096, "block+gc"),
        ("smoll", 8192, "block+gc")]
    for row in rows:
        params, shape = models[row["model"]]
        est = peak_memory_gb(params, lora=True, reference=True, tokens=4 * row["length"],
                             checkpointing=row["mode"] == "block+gc", completion_tokens=2 * row["length"],
                             **shape)["peak_gb"]
        assert abs(est - row["peak_rss_mb"] / 1024) / (row["peak_rss_mb"] / 1024) < 0.10, (row["model"], row["length"],
                                                                                          row["mode"], est)


def test_advice_states_memory_and_warns_when_it_does_not_fit():
    stats = {**PAIRED, "prompt_tokens": {"p90": 150}, "chosen_tokens": {"p90": 80}, "rejected_tokens": {"p90": 300}}
    from preftune.apps.advise import pair_tokens

    assert pair_tokens(stats, max_length=256, max_prompt_length=192) == 150 + 80 + 106  # rejected cut at 256-150
    kto = {"kind": "unpaired", "prompt_tokens": {"p90": 150}, "completion_tokens": {"p90": 80}}
    assert pair_tokens(kto, max_length=256, max_prompt_length=192) == 150 + 2 * 80  # its KL row shares the prompt
    a = advise(stats, params=P135M, memory_gb=None, lora=True, shape=SMOL, max_length=256, max_prompt_length=192)
    m = a.memory
    assert m["tokens_per_item"] == 336 and m["batch_size"] == 4
    assert m["peak_gb_checkpointing"] < m["peak_gb"] and "expected peak memory" in a.text()
    tight = advise(stats, params=P135M, memory_gb=m["peak_gb"] - 0.1, lora=True, shape=SMOL, max_length=256,
                   max_prompt_length=192)
    assert any("gradient_checkpointing=true" in w for w in tight.warnings)
    tighter = advise(stats, params=P135M, memory_gb=m["peak_gb_checkpointing"] - 0.1, lora=True, shape=SMOL,
                     max_length=256, max_prompt_length=192)
    assert any("lower train.batch_size" in w for w in tighter.warnings)
    assert advise(stats, params=P135M, memory_gb=None, lora=True).memory == {}  # no shape, no figure


def test_model_shape_reads_config_json(tmp_path):
    import json

    from preftune.models.loading import model_shape

    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 30, "hidden_size": 576,
                                                      "vocab_size": 49152}))
    assert model_shape(str(tmp_path)) == {**SMOL, "vocab": 49152, "intermediate": 0, "attention": 0}
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 18, "hidden_size": 640}}))
    assert model_shape(str(tmp_path)) == {"layers": 18, "hidden": 640, "vocab": 0, "intermediate": 0,
                                          "attention": 0}  # no head term, no attention widths
    # SmolLM2: 9 heads of 576 / 9 = 64, 3 key-value heads; Gemma 3 270M: head_dim 256 given, 4 heads, 1 kv head
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 30, "hidden_size": 576,
                                                      "num_attention_heads": 9, "num_key_value_heads": 3}))
    assert model_shape(str(tmp_path))["attention"] == 64 * (9 + 2 * 3)
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 18, "hidden_size": 640, "head_dim": 256,
                                                      "num_attention_heads": 4, "num_key_value_heads": 1}))
    assert model_shape(str(tmp_path))["attention"] == 256 * (4 + 2 * 1)
    (tmp_path / "config.json").write_text("{not json")
    assert model_shape(str(tmp_path)) is None
    assert model_shape(str(tmp_path / "absent")) is None


def test_evidence_lines_say_what_was_measured():
    from preftune.apps.advise import _evidence_line

    line = _evidence_line({"data": "D", "base_logp_accuracy": 0.333, "implicit_accuracy": 0.685, "kl": 8.44,
                           "health": []})
    assert line == "D, base model's log-prob accuracy 0.333 -> trained implicit-reward accuracy 0.685, KL 8.44 nats, " \
                   "no health flag"
    assert _evidence_line({"data": "D", "note": "rose", "health": ["kl_drift"]}) == "D, health: kl_drift"
    assert _evidence_line({"data": "D", "note": "rose"}) == "D, rose"
    assert _evidence_line({"data": "D", "gain": "+0.1 [+0.0, +0.2]", "chosen": {"lr": 7e-4, "beta": 2.0},
                           "grid": [{}, {}]}) == "D, gain +0.1 [+0.0, +0.2], chose lr 0.0007, beta 2.0"
    assert _evidence_line({"data": "D", "grid": [{}, {}, {}]}) == \
        "D, no point of 3 chosen (each raised a health flag or did not gain)"


def test_recipe_lines_print_its_evidence_and_stated_budget_or_say_there_is_none():
    from preftune.apps.advise import Advice

    def recipe_lines(evidence, budget):
        a = Advice("sigmoid", ["r"], [], recipe="sigmoid", confidence="low", evidence=evidence, budget=budget)
        return a.text().splitlines()[4:]  # after: recommended, because, start from, confidence

    measured = [{"data": "D", "kl": 1.5, "health": []}]
    assert recipe_lines(measured, {"stop_on": ["kl_drift", "both_logps_falling"], "keep_best": True,
                                   "val_pairs": 64}) == [
        "    measured: D, KL 1.5 nats, no health flag",
        "  stated budget (benchmarks.quality --full-train applies it, preftune train does not): "
        "stop_on: kl_drift, both_logps_falling; keep_best: true; val_pairs: 64"]
    assert recipe_lines([], {}) == ["  evidence: the recipe states none", "  budget: the recipe states none"]
    assert "budget" not in Advice("robust", ["r"], []).text()  # no recipe, nothing to say about one


def test_advice_carries_the_chosen_recipes_evidence_and_budget():
    from preftune.core.recipes import load_recipe

    a = advise(PAIRED, params=P135M, memory_gb=None, lora=True)
    meta = load_recipe("sigmoid").meta
    assert a.budget == meta["budget"] and a.as_dict()["budget"] == meta["budget"]
    text = a.text()
    assert text.count("    measured: ") == len(meta["evidence"]) and "  stated budget " in text
    assert "keep_best: true" in text and "evidence: the recipe states none" not in text


def test_evidence_lines_name_figures_they_have_no_phrase_for():
    """orpo's entries state base_mean_logp_accuracy and gain_over_own_start: printed under their own
    names instead of dropped; an accuracy without its base is not given a '?' base."""
    from preftune.apps.advise import _evidence_line

    assert _evidence_line({"data": "D", "command": "c", "implicit_accuracy": 0.54, "base_mean_logp_accuracy": 0.535,
                           "gain_over_own_start": "+0.005", "kl": 7.1}) == \
        "D, trained implicit-reward accuracy 0.54, base mean logp accuracy 0.535, gain over own start +0.005, KL 7.1 nats"


def test_the_rl_loops_four_models_by_hand():
    """1e8 parameters, LoRA: policy + adapters-off reference 4e8 B; a separate critic another 4e8 B;
    a 1e8-parameter reward model 4e8 B; activations of 1,000 tokens x 10 layers x (100 wide + an MLP
    of 300 and attention widths of 200 when the config gives neither), twice with a critic (its own pass)."""
    from preftune.apps.advise import ACT_BYTES, RUNTIME_GB, rl_memory_gb

    gb = 2**30
    m = rl_memory_gb(10**8, lora=True, critic="separate", reward_params=10**8, layers=10, hidden=100, tokens=1000)
    assert m["policy_and_reference_gb"] == m["critic_gb"] == m["reward_model_gb"] == 4e8 / gb
    # MLP width 3 x hidden and q/k/v widths 2 x hidden when the config gives neither
    assert m["activations_gb"] == 2 * 1000 * 10 * (100 + 300 + 200) * ACT_BYTES[False] / gb
    assert m["peak_gb"] == 3 * 4e8 / gb + m["activations_gb"] + RUNTIME_GB[False]
    none = rl_memory_gb(10**8, lora=False, critic="none", reward_params=0, layers=10, hidden=100, tokens=1000)
    assert none["critic_gb"] == 0 and none["policy_and_reference_gb"] == 20 * 10**8 / gb  # 16 + a frozen copy's 4
    assert none["activations_gb"] == m["activations_gb"] / 2


def test_the_head_term_is_one_block_of_the_vocabulary_by_hand():
    """The chunked head holds HEAD_BUFFERS float32 (positions x vocabulary) arrays for one block:
    min(completion tokens, chunk); the dense head (chunk 0) for all completion tokens."""
    from preftune.apps.advise import HEAD_BUFFERS, head_memory_gb, peak_memory_gb, rl_memory_gb

    gb = 2**30
    assert head_memory_gb(1000, 3000, 1024) == 1024 * 1000 * 4 * HEAD_BUFFERS / gb
    assert head_memory_gb(1000, 3000, 0) == 3000 * 1000 * 4 * HEAD_BUFFERS / gb
    assert head_memory_gb(1000, 500, 1024) == 500 * 1000 * 4 * HEAD_BUFFERS / gb
    assert head_memory_gb(0, 3000, 1024) == 0.0  # a config without vocab_size: no term
    # a wide vocabulary caps the block at 2**26 logits: Gemma 3's 262,144 columns -> 256 positions
    assert head_memory_gb(262144, 3000, 1024) == 256 * 262144 * 4 * HEAD_BUFFERS / gb
    assert head_memory_gb(49152, 3000, 1024) == 1024 * 49152 * 4 * HEAD_BUFFERS / gb  # SmolLM2: under the cap
    m = peak_memory_gb(10**8, lora=True, reference=True, layers=10, hidden=100, tokens=4000, vocab=1000,
                       completion_tokens=3000, chunk_tokens=1024)
    assert m["head_gb"] == head_memory_gb(1000, 3000, 1024)
    assert m["peak_gb"] == m["fixed_gb"] + m["activations_gb"] + m["head_gb"]
    rl = rl_memory_gb(10**8, lora=True, critic="none", reward_params=0, layers=10, hidden=100, tokens=4000,
                      vocab=1000, completion_tokens=3000, chunk_tokens=0)
    assert rl["head_gb"] == head_memory_gb(1000, 3000, 0) and rl["peak_gb"] == sum(
        v for k, v in rl.items() if k != "peak_gb")
