"""Running preftune for the quality benchmark: each step one `preftune` process (_preftune, the one
call that starts one), each step's record cached by its settings. The cache keys and the directory
layout below are what a finished point is recognised by (a rerun keeps it, --collect gathers it):
<out>/<data tag>/<method>[/<name>][/seed<N>]/{run/, eval.json, point.json, train.json},
<out>/base/<tag>.json and <out>/points/<tag>-base.json. run_point trains and evaluates one point,
base_eval evaluates the base model; search.py and peer_trl.py run their points through them."""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
from pathlib import Path

from benchmarks.experiments.hh_cli import HH, HH_SETTINGS, preftune_logged

from .protocol import second_split
from .settings import BUILTIN, RECIPES, ROOT, TQA, UNPAIRED, second_split_truthfulqa, split_truthfulqa

__all__ = ["recipe_for", "recipe_budget", "dataset_inputs", "base_eval", "train_args", "eval_args", "TRAIN_KEY",
           "run_point"]

_preftune = preftune_logged  # (exit code, wall seconds); hh_cli.preftune keeps no log


def _rel(path: Path | str) -> str:
    path = Path(path)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def recipe_for(method: str, dest: Path) -> tuple[list[str], dict]:
    """Command-line arguments giving `method`'s recipe, and where it came from. A recipe file is
    copied to `dest` without its `recipe:` metadata block and passed as --config."""
    import yaml

    path = RECIPES / f"{method}.yaml"
    if path.is_file():
        text = path.read_text()
        data = yaml.safe_load(text) or {}
        meta = data.pop("recipe", None)  # metadata: load_config skips it now, but older ones refuse it
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(yaml.safe_dump(data, sort_keys=False))
        # the key hashes the settings only: new evidence in the metadata does not redo finished points
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        return ["--config", str(dest)], {"source": _rel(path), "settings_sha256": digest,
                                         "recipe_meta": meta, "file_settings": data}
    settings = BUILTIN[method]
    args = [f"{k}={json.dumps(v)}" for k, v in settings.items()]
    return args, {"source": "built-in", "settings": settings}


def recipe_budget(method: str) -> dict | None:
    """The `budget:` a method's recipe file states in its metadata (protocol.py's form), or None."""
    import yaml

    path = RECIPES / f"{method}.yaml"
    meta = (yaml.safe_load(path.read_text()) or {}).get("recipe") if path.is_file() else None
    return (meta or {}).get("budget")


def dataset_inputs(name: str, out: Path, s: dict, split: str = "first", pairs: int | None = None) -> dict:
    """Train/dev paths (record slices), the data settings and sizes of one data set. `split`
    "second" takes the dev pairs from the training side instead, as many as the first split's dev:
    HH's last records (protocol.second_split; training reads the records before them), TruthfulQA's
    by a second hash outside the search's validation slice (settings.second_split_truthfulqa;
    training reads the rest in file order); `pairs` overrides the
    mode's training subsample (a learning-curve point). Sizes are capped at the training side.
    `side`/`side_pairs`: the training-side file and the records training may read from it."""
    if name == "hh":
        side, n, dev_n, split_info, settings = HH / "train.jsonl.gz", s["hh_pairs"], s["hh_dev"], None, list(HH_SETTINGS)
        side_n, dev = _records(side), f"{HH / 'dev.jsonl.gz'}[:{dev_n}]"
    else:
        split_info = split_truthfulqa(TQA, out / "data" / "truthfulqa")
        side, n, side_n, settings = out / "data" / "truthfulqa" / "train.jsonl", s["tqa_pairs"], split_info["train"], []
        dev_n = min(s["tqa_dev"] or split_info["dev"], split_info["dev"])
        dev = f"{out / 'data' / 'truthfulqa' / 'dev.jsonl'}[:{dev_n}]"
    tag = name
    if split == "second" and name == "truthfulqa":  # a hash draw, not the side's last slice: settings.py says why
        start = second_split(side_n, dev_n)[0]  # where a search's validation slice stops
        second = second_split_truthfulqa(side, out / "data" / "truthfulqa-second", dev_n, (s["tqa_pairs"], start))
        side, side_n, tag = out / "data" / "truthfulqa-second" / "train.jsonl", second["train"], f"{name}-second"
        dev = f"{out / 'data' / 'truthfulqa-second' / 'dev.jsonl'}[:{dev_n}]"
        split_info = {**split_info, "second": second}
    elif split == "second":
        start, stop = second_split(side_n, dev_n)
        dev, side_n, tag = f"{side}[{start}:{stop}]", start, f"{name}-second"
        split_info = {**(split_info or {}), "second": f"dev = training-side records [{start}:{stop}]; training reads "
                      f"records before {start}"}
    n = min(pairs or n, side_n)
    return {"name": name, "train": f"{side}[:{n}]", "dev": dev, "settings": settings, "train_pairs": n,
            "dev_pairs": dev_n, "split": split_info, "tag": tag, "side": str(side), "side_pairs": side_n}


@functools.cache
def _records(path: Path) -> int:
    """Records (non-empty lines) in a JSONL file, gzipped or not."""
    with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as f:
        return sum(1 for line in f if line.strip())


def _cached(path: Path, key: dict, make, finished_only: bool = False) -> dict | None:
    """A finished step's record when its key (settings) is unchanged, else make it (None with
    `finished_only`); failures are not kept."""
    key = json.loads(json.dumps(key, default=str))  # as stored (a recipe's YAML may hold dates)
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("key") == key:
            return record
    if finished_only:
        return None
    record = {"key": key, **make()}
    if "error" not in record:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return record


def _failed(step: str, code: int, log: Path) -> dict:
    tail = log.read_text().strip().splitlines()[-1:] if log.is_file() else []
    print(f"  {step} failed (exit {code}): {tail[0] if tail else ''} ({_rel(log)})", flush=True)
    return {"error": f"{step} exited {code}", "log": _rel(log)}


def base_eval(data: dict, out: Path, s: dict, model: str, finished_only: bool = False, per_pair: bool = False) -> dict | None:
    """The base model on the dev pairs: log-prob accuracy (every method's baseline) and, under the
    reference-free simpo scorer, its mean-log-prob accuracy (simpo's and orpo's starting value).
    `per_pair`: also each pair's outcomes (`per_pair_file`), the "before" of simpo's and orpo's seeds."""
    tag = data["tag"] + ("-pairs" if per_pair else "")
    dest, log = out / "base" / f"{tag}.json", out / "logs" / f"{tag}-base.log"
    key = {"model": model, "dev": _rel(data["dev"]), "settings": data["settings"], "split": data["split"]}
    pairs_file = dest.with_suffix(".pairs.jsonl")
    extra = ["--per-pair", str(pairs_file)] if per_pair else []
    if per_pair:
        key["per_pair"] = True

    def make():
        code, wall = _preftune(["eval", "--data", data["dev"], "--out", str(dest), f"model.name_or_path={model}",
                                *data["settings"], "loss.name=simpo", "eval.kl_prompts=0", *extra], log)
        if code:
            return _failed(f"{data['tag']} base eval", code, log)
        e = json.loads(dest.read_text())
        return {"dataset": data["name"], "method": "base model", "logp_acc": e["accuracy/logp"],
                "logp_acc_ci95": e["accuracy/logp_ci95"], "mean_logp_acc": e["accuracy/implicit_reward"],
                "mean_logp_acc_ci95": e["accuracy/implicit_reward_ci95"], "dev_pairs": e["pairs"],
                "perplexity_chosen": e["perplexity/chosen"], "wall_s": wall, "eval_file": _rel(dest),
                **({"per_pair_file": _rel(pairs_file)} if per_pair else {})}
    return _cached(out / "points" / f"{tag}-base.json", key, make, finished_only)


def train_args(data: dict, method: str, run: Path, model: str, extra: tuple = (), seed: int = 0) -> tuple[list[str], dict]:
    """`preftune train` arguments: the recipe, then what the benchmark fixes over any recipe (the data,
    the seed, no held-out data in training; the schedule stays the recipe's), then `extra` overrides
    (search.py's grid point: lr, beta; a learning-curve point's epochs; a recipe's budget)."""
    recipe_args, recipe = recipe_for(method, run.parent / "recipe.yaml")
    fixed = [f"model.name_or_path={model}", *data["settings"], f"data.train_path={data['train']}", "data.eval_path=",
             f"train.seed={seed}", "train.keep_best=false", "diagnostics.probe_every=0", f"run.output_dir={run}",
             "run.overwrite=true"]
    if method in UNPAIRED:
        fixed.append("data.paired_to_unpaired=true")
    # fp32 unless `extra` asks for bf16: under train.autocast_bf16=auto a CUDA machine would train an
    # "fp32" point in bf16. Kept out of the record (the cache key), so points trained before the pin (on
    # CPU, where auto is fp32) stay finished; _trained checks the precision each run recorded instead.
    pin = [] if any(x.startswith("train.autocast_bf16=") for x in extra) else ["train.autocast_bf16=false"]
    record = {**recipe, "fixed_by_benchmark": fixed, **({"grid_point": list(extra)} if extra else {})}
    return ["train", *recipe_args, *fixed, *pin, *extra], record


def eval_args(run: Path, data: dict, dest: Path, s: dict, per_pair: Path | None = None) -> list[str]:
    """`preftune eval --run` on the dev pairs; `per_pair`: each pair's outcomes written there too;
    `s["judge"]` (--judge): its reward source scores the policy's and the reference's samples (win rate)."""
    return ["eval", "--run", str(run), "--data", data["dev"], "--out", str(dest), f"eval.kl_prompts={s['kl_prompts']}",
            f"eval.kl_samples={s['kl_samples']}", f"eval.max_new_tokens={s['max_new_tokens']}",
            *(["--per-pair", str(per_pair)] if per_pair else []), *(["--reward", s["judge"]] if s.get("judge") else [])]


TRAIN_KEY = ("model", "train", "split", "recipe")  # the part of a point's key that its training reads


def run_point(data: dict, method: str, out: Path, s: dict, model: str, extra: tuple = (), name: str = "",
              finished_only: bool = False, seed: int | None = None) -> dict | None:
    """Train one (data set, method) point and evaluate it on the dev pairs (cached by its settings:
    when only the dev pairs or the eval's arguments changed, the finished training is reused, see
    _trained). `extra`/`name`: a grid point's overrides and its directory name under the method
    (search.py, a learning-curve point, a full-train run). `seed`: one of several training seeds
    (--seeds): its own directory `seed<N>` and a --per-pair file; None is the default single seed 0."""
    root = out / data["tag"] / method / name if name else out / data["tag"] / method
    root = root if seed is None else root / f"seed{seed}"
    run, dest = root / "run", root / "eval.json"
    pairs_file = None if seed is None else root / "per_pair.jsonl"
    args, recipe = train_args(data, method, run, model, extra, seed=seed or 0)
    key = {"model": model, "train": _rel(data["train"]), "dev": _rel(data["dev"]), "split": data["split"],
           "recipe": {k: v for k, v in recipe.items() if k != "recipe_meta"},
           "eval": eval_args(Path("RUN"), {**data, "dev": _rel(data["dev"])}, Path("OUT"), s,
                             None if pairs_file is None else Path("PAIRS"))}

    def make():
        tag = "-".join(str(x) for x in (data["tag"], method, name, "" if seed is None else f"seed{seed}") if x != "")
        train_key = json.loads(json.dumps({k: key[k] for k in TRAIN_KEY}, default=str))
        trained = _trained(root, train_key, run, bf16="train.autocast_bf16=true" in args)
        (root / "point.json").unlink(missing_ok=True)  # its eval (and perhaps its run) is about to be replaced
        if trained is None:
            (root / "train.json").unlink(missing_ok=True)
            log = out / "logs" / f"{tag}-train.log"
            code, train_s = _preftune(args, log)
            if code:
                return _failed(f"{data['tag']} {method} train", code, log)
            trained = {"train_s": train_s}
        else:
            print(f"  {tag}: training unchanged, reused; evaluating again", flush=True)
        # the training's own record: a failed eval below leaves it, and the next invocation evaluates only
        (root / "train.json").write_text(json.dumps({"key": train_key, "train_s": trained["train_s"]}) + "\n")
        log = out / "logs" / f"{tag}-eval.log"
        code, eval_s = _preftune(eval_args(run, data, dest, s, pairs_file), log)
        if code:
            return _failed(f"{data['tag']} {method} eval", code, log)
        return {"train_s": trained["train_s"], "eval_s": eval_s, "recipe": recipe, "run": _rel(run),
                "eval_file": _rel(dest), **({} if pairs_file is None else {"seed": seed, "per_pair_file": _rel(pairs_file)})}
    return _cached(root / "point.json", key, make, finished_only)


def _trained(root: Path, train_key: dict, run: Path, bf16: bool = False) -> dict | None:
    """The record of a finished training whose key (TRAIN_KEY's part of a point's key) is `train_key`:
    train.json, or a point.json written before train.json existed; None unless the run directory
    still holds its summary.json and saved weights (a deleted or half-overwritten run trains again)
    and the summary's precision is `bf16`'s (a summary older than the field trained in fp32)."""
    if not (run / "summary.json").is_file() or not any((run / "model").glob("*.safetensors")):
        return None
    if bool(json.loads((run / "summary.json").read_text()).get("autocast_bf16", False)) != bf16:
        return None
    for path in (root / "train.json", root / "point.json"):
        if path.is_file():
            record = json.loads(path.read_text())
            if {k: record.get("key", {}).get(k) for k in TRAIN_KEY} == train_key and "train_s" in record:
                return record
    return None
