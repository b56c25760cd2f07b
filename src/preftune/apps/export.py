"""`preftune export RUN --out DIR [--merge] [--push-to-hub REPO]`: a finished run's model as a
directory other tools load unchanged, with a model card (README.md) saying how it was made.

- LoRA run, `--merge`: the base the run started from (config.yaml's model.*, an SFT adapter
  merged in as training did), the run's adapter applied and merged: a plain safetensors model
  directory (tokenizer and generation config included) for `AutoModelForCausalLM.from_pretrained`.
  Before merging, the base's weights are checked against the sha256 that reference.json recorded
  when the run started, so a base that changed since (a new hub revision, an edited directory)
  is refused instead of silently merged into.
- LoRA run, no `--merge`: the adapter directory, with adapter_config.json's
  `base_model_name_or_path` set to model.name_or_path as the user wrote it in config.yaml (never
  the local or cache directory the run actually loaded).
- Full fine-tuning: the run's model directory (there is nothing to merge).
- 4-bit (QLoRA) runs are not merged: the adapter was trained against the 4-bit base's outputs,
  and merging it into full-precision weights would give a different model without saying so.
  Their adapter exports (load it on the 4-bit base, as training did).

DIR is written whole or not at all (safeio.atomic_path). Card text taken from the config or the
data (paths, model names) goes into Markdown code spans, so it shows as typed and is never read
as Markdown or HTML.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import Config, load_config, run_name
from ..core.losses import LOSSES
from ..core.losses.kinds import REWARD_MODEL
from ..data.sources import hub_dataset, hub_offline
from ..models.loading import load_start, load_tokenizer, resolve_model_dir, weights_sha256
from ..models.zoo import ZOO
from ..utils.errors import ConfigError, DataError, PreftuneError
from ..utils.rundir import finished
from ..utils.safeio import atomic_path, atomic_write, read_capped, read_json
from ..utils.version import __version__

__all__ = ["export_run", "ExportResult", "model_card", "read_run"]

_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class Run:
    """What export reads from a finished run directory."""
    path: Path
    cfg: Config
    summary: dict
    data_stats: dict
    reference: dict
    adapter: bool  # model/ is a PEFT adapter dir (else a full HF model dir)


@dataclass
class ExportResult:
    out: Path
    kind: str  # "merged" | "adapter" | "full" | "reward model"
    pushed: str | None = None  # the hub URL of the upload, when asked


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = read_json(path)
    except DataError as err:
        raise ConfigError(str(path), path.name, f"unreadable ({err.problem})") from None
    return value if isinstance(value, dict) else {}


def read_run(run_dir: str | Path, opt_ins: list[str] = ()) -> Run:
    """The run in `run_dir`, or a one-line ConfigError naming the file that is missing or bad.
    `opt_ins`: `model.trust_remote_code=true` and the like from the command line; the run's own
    config.yaml cannot give them (load_config(saved_run=True))."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(str(path), "RUN", "no such run directory")
    if not (path / "config.yaml").is_file():
        raise ConfigError(str(path / "config.yaml"), "config.yaml", "missing: not a run directory written by "
                          "preftune train")
    summary = finished(path)
    if summary is None:
        raise ConfigError(str(path / "summary.json"), "summary.json", "missing or incomplete: the run has not "
                          "finished (preftune resume RUN finishes it)")
    model = path / "model"
    adapter = (model / "adapter_config.json").is_file()
    if not model.is_dir():
        raise ConfigError(str(model), "model", "missing: the run saved no model")
    if not adapter and not (model / "config.json").is_file():
        raise ConfigError(str(model), "model", "neither a PEFT adapter (adapter_config.json) nor an HF model "
                          "directory (config.json)")
    if adapter and not (model / "adapter_model.safetensors").is_file():
        raise ConfigError(str(model / "adapter_model.safetensors"), "model", "missing: the adapter has no weights")
    return Run(path, load_config(path / "config.yaml", list(opt_ins), saved_run=True), summary, _read_json(path / "data_stats.json"),
               _read_json(path / "reference.json"), adapter)


def _hub_api(repo: str):
    """A HfApi that can reach the hub with a token, or a one-line ConfigError saying why not.
    Checked before anything is written, so an unreachable hub costs no merge."""
    if hub_offline():
        raise ConfigError(repo, "--push-to-hub", "HF_HUB_OFFLINE is set, so the hub is not contacted; "
                          "unset it to push (the export itself needs no network: drop --push-to-hub)")
    from huggingface_hub import HfApi  # deferred: only pushing needs the hub client

    # HF_ENDPOINT read now, not when huggingface_hub was first imported
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        api.whoami()
    except Exception as err:  # noqa: BLE001 - no token, refused, DNS, TLS, HTTP 5xx: all "cannot push"
        why = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(repo, "--push-to-hub", f"the hub is unreachable or refuses this token: {why}") from None
    return api


def _push(api, folder: Path, repo: str) -> str:
    try:
        api.create_repo(repo, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                                 commit_message=f"preftune export (preftune {__version__})")
    except Exception as err:  # noqa: BLE001 - as in _hub_api; the export on disk is complete either way
        why = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(repo, "--push-to-hub", f"not pushed ({why}); the export in {folder} is complete") from None
    return str(getattr(info, "commit_url", None) or info)


def _is_export(folder: Path) -> bool:
    """A directory an earlier `preftune export` wrote: its model card's metadata carries our tag."""
    try:
        text = read_capped(folder / "README.md", field="README.md", cap=1 << 20).decode("utf-8", "replace")
        meta = yaml.safe_load(text.split("---\n")[1]) if text.startswith("---\n") else None
    except (PreftuneError, yaml.YAMLError, IndexError):
        return False
    return isinstance(meta, dict) and "preftune" in (meta.get("tags") or [])


def _check_out(run: Run, out: Path, overwrite: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(str(out), "--out", "exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(str(out), "--out", "already exists and is not empty (pass --overwrite or choose "
                              "another directory)")
        if not _is_export(out):  # --overwrite replaces an earlier export, never someone's other directory
            raise ConfigError(str(out), "--out", "is not an earlier preftune export (no model card tagged "
                              "preftune), so --overwrite does not replace it; choose another directory")
    here, src = out.resolve(), run.path.resolve()
    if here == src or src in here.parents or here in src.parents:
        raise ConfigError(str(out), "--out", f"overlaps the run directory {run.path}; export outside it")


def _merged(run: Run):
    """The base the run started from with the run's adapter merged in (a plain transformers model)."""
    m = run.cfg.model
    if m.load_in_4bit:
        raise ConfigError(str(run.path / "config.yaml"), "model.load_in_4bit", "the adapter was trained on a 4-bit "
                          "base; merging it into full-precision weights would change its outputs, so --merge "
                          "refuses it: export without --merge and load the adapter on the 4-bit base")
    # an SFT adapter the run kept training (adapter_merge=false) is the run's adapter itself: its base is plain
    start = m if m.adapter_merge else dataclasses.replace(m, adapter_name_or_path="")
    base, _ = load_start(start, resolve_model_dir(m.name_or_path, allow_pickle_weights=m.allow_pickle_weights))
    recorded = run.reference.get("weights_sha256") if run.reference.get("strategy") == "adapters_off" else None
    if recorded and weights_sha256(base) != recorded:
        raise ConfigError(m.name_or_path, "model.name_or_path", "its weights are not the ones this run started "
                          f"from (sha256 differs from {run.path / 'reference.json'}); merging would build a "
                          "different model")
    from peft import PeftModel  # deferred: only adapter runs need peft

    return PeftModel.from_pretrained(base, str(run.path / "model")).merge_and_unload()


def _copy_files(src: Path, dest: Path, skip: tuple[str, ...] = ()) -> None:
    """The run's model files, as regular files only: a symlink planted in model/ would otherwise
    carry its target (any file the user can read) into the export and onto the hub."""
    for f in sorted(src.iterdir()):
        if f.is_symlink():
            raise ConfigError(str(f), "model", "is a symlink; an export copies only the run's own regular files")
        if f.is_file() and f.name not in skip:
            shutil.copyfile(f, dest / f.name)


def _write_model(run: Run, tmp: Path, merge: bool) -> str:
    """Fill `tmp` with the model files; returns the kind of export."""
    model_dir = run.path / "model"
    if LOSSES[run.cfg.loss.name].kind is REWARD_MODEL:  # train-rm wrote the merged classifier already (rm.py)
        if not (run.path / "reward_model" / "config.json").is_file():
            raise ConfigError(str(run.path / "reward_model"), "reward_model", "missing: the reward-model run did "
                              "not finish writing its model")
        _copy_files(run.path / "reward_model", tmp, skip=("README.md",))
        return "reward model"
    if not run.adapter:  # full fine-tuning: the run's directory is already a plain model
        _copy_files(model_dir, tmp, skip=("README.md",))
        return "full"
    if merge:
        m = run.cfg.model
        _merged(run).save_pretrained(tmp, safe_serialization=True)  # generation_config.json included
        load_tokenizer(str(model_dir), trust_remote_code=m.trust_remote_code).save_pretrained(tmp)
        return "merged"
    _copy_files(model_dir, tmp, skip=("README.md",))
    config = json.loads((tmp / "adapter_config.json").read_text())
    # as the user wrote it, not the loaded dir; a packaged model by the hub id its GGUF came from, which
    # other tools can load (the card says how the weights differ)
    config["base_model_name_or_path"] = _hub_base(run.cfg.model.name_or_path) or run.cfg.model.name_or_path
    config["revision"] = run.cfg.model.revision or None
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return "adapter"


def export_run(run_dir: str | Path, out: str | Path, *, merge: bool = False, overwrite: bool = False,
               push_to_hub: str | None = None, opt_ins: list[str] = ()) -> ExportResult:
    """Export the finished run in `run_dir` to `out` (see the module docstring); with `push_to_hub`,
    upload `out` to that hub repo afterwards (checked first: offline or unreachable is an error
    before anything is written)."""
    run, out = read_run(run_dir, opt_ins), Path(out)
    _check_out(run, out, overwrite)
    api = _hub_api(push_to_hub) if push_to_hub else None
    with atomic_path(out, directory=True, replace_dir=overwrite, field="--out") as tmp:
        kind = _write_model(run, tmp, merge)
        atomic_write(tmp / "README.md", model_card(run, kind))
    pushed = _push(api, out, push_to_hub) if api is not None else None
    return ExportResult(out, kind, pushed)


# ---- the model card ------------------------------------------------------------------------

def _code(text) -> str:
    """`text` as a Markdown code span: shown literally (no emphasis, links or HTML), on one line."""
    text = " ".join(str(text).split())
    ticks = "`" * (max((len(r) for r in _tick_runs(text)), default=0) + 1)  # longer than any run inside
    pad = " " if text.startswith("`") or text.endswith("`") or not text else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _tick_runs(text: str) -> list[str]:
    runs, current = [], ""
    for ch in text:
        if ch == "`":
            current += ch
        elif current:
            runs.append(current)
            current = ""
    return [*runs, *([current] if current else [])]


def _num(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _code(value)
    if isinstance(value, int):
        return str(value)
    text = f"{value:.4g}"
    return text if any(c in text for c in ".en") else f"{text}.0"  # 1.0, not 1: a float stays one


def _hub_base(name: str) -> str | None:
    """The base model as a hub id, when there is one: a hub id itself, or the model a packaged GGUF
    was quantized from (its weights differ by the quantization: the card says so)."""
    if name in ZOO:
        return ZOO[name].hub_id or None
    return name if hub_dataset(name) and ":" not in name else None  # a hub id has a dataset id's shape


def _front_matter(run: Run, kind: str) -> str:
    """The hub's metadata block, built and checked by huggingface_hub's ModelCardData (so its keys
    are the ones the hub reads); values from the config stay data."""
    from huggingface_hub import ModelCardData  # deferred: only exports write cards

    cfg, base = run.cfg, _hub_base(run.cfg.model.name_or_path)
    datasets = sorted({hub[0] for p in (cfg.data.train_path, cfg.data.eval_path) if p and (hub := hub_dataset(p))})
    relation = {"adapter": "adapter", "merged": "finetune", "full": "finetune"}.get(kind)
    licence = ZOO[cfg.model.name_or_path].hub_licence if cfg.model.name_or_path in ZOO else None
    data = ModelCardData(library_name="peft" if kind == "adapter" else "transformers", base_model=base,
                         base_model_relation=relation if base else None, datasets=datasets or None,
                         license=licence or None,
                         tags=["preftune", cfg.loss.name, *(["lora"] if cfg.model.lora else []), *(
                             ["reward-model"] if kind == "reward model" else [])])
    return "---\n" + data.to_yaml() + "\n---\n"


def _base_lines(run: Run, kind: str) -> list[str]:
    m = run.cfg.model
    lines = [f"- Base model: {_code(m.name_or_path)}" + (f" (revision {_code(m.revision)})" if m.revision else "")]
    if m.name_or_path in ZOO:
        entry = ZOO[m.name_or_path]
        lines.append(f"  (preftune's packaged {_code(entry.gguf)}, dequantized to float32"
                     + (f", quantized from {_code(entry.hub_id)}" if entry.hub_id else "") + ")")
        if kind == "adapter":
            lines.append(f"- The adapter was trained on those dequantized weights. On {_code(entry.hub_id)} itself "
                         "it loads and runs, but the base differs by the quantization: for the exact model, "
                         "export with `--merge` (a plain transformers model), or load the base in preftune "
                         f"(`model.name_or_path={m.name_or_path}`)")
    if m.adapter_name_or_path:
        how = "merged into the base before training" if m.adapter_merge else "trained further as the policy"
        lines.append(f"- Started from the SFT adapter {_code(m.adapter_name_or_path)} ({how})")
    if m.load_in_4bit:
        lines.append(f"- Base weights loaded in 4 bits ({_code(m.bnb_4bit_quant_type)}, QLoRA)")
    what = {"merged": "the LoRA adapter merged into the base weights (a plain transformers model)",
            "adapter": "a LoRA adapter (PEFT); load it on the base model",
            "full": "the fully fine-tuned model",
            "reward model": "a reward model (sequence classification, one score; LoRA merged)"}[kind]
    return [*lines, f"- This directory: {what}"]


def _data_lines(run: Run) -> list[str]:
    d, stats, lines = run.cfg.data, run.data_stats, []
    counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in stats.items()
                       if isinstance(v, int) and not isinstance(v, bool) and (v or k == "pairs"))
    if d.train_path:
        lines.append(f"- Training data: {_code(d.train_path)}: {counts or 'no counts recorded'}")
    elif run.cfg.online.prompts_path:
        lines.append(f"- Prompts (online, sampled from the policy): {_code(run.cfg.online.prompts_path)}; reward "
                     f"{_code(run.cfg.online.reward)}" + (f": {counts}" if counts else ""))
    held_out = run.summary.get("eval") or {}
    if d.eval_path:
        n = held_out.get("pairs")
        lines.append(f"- Held-out data: {_code(d.eval_path)}" + (f": {n} pairs" if n is not None else ""))
    return lines


def _bf16(setting, summary: dict) -> bool:
    """Whether the run trained under bf16 autocast: what it recorded (summary.json), else its setting
    (a run from before "auto" existed recorded nothing and set true or false)."""
    return bool(summary["autocast_bf16"]) if "autocast_bf16" in summary else setting is True


def _training_lines(run: Run) -> list[str]:
    c, s = run.cfg, run.summary
    params = ", ".join(f"{k} {_num(v)}" for k, v in (s.get("loss_params") or {}).items()
                       if k != "beta" and isinstance(v, (int, float, str)) and not isinstance(v, bool))
    loss = f"{_code(c.loss.name)}" + (f" (mix {_code(c.loss.mix)})" if c.loss.mix else "")
    t, procs = c.train, (s.get("distributed") or {}).get("processes", 1)
    steps = f"{s.get('steps')} optimizer steps ({t.epochs} epoch{'s' if t.epochs != 1 else ''}" + \
            (f", max_steps {t.max_steps})" if t.max_steps else ")")
    lines = [f"- Loss: {loss}, beta {_num(c.loss.beta)}" + (f"; parameters: {params}" if params else ""),
             f"- Optimizer: AdamW, lr {_num(t.lr)}, {_code(t.scheduler)} schedule, warmup ratio "
             f"{_num(t.warmup_ratio)}, weight decay {_num(t.weight_decay)}, grad-norm clip {_num(t.max_grad_norm)}",
             f"- Steps: {steps}; batch {t.batch_size} pairs x {t.grad_accum} accumulation x {procs} "
             f"process{'es' if procs != 1 else ''}; seed {t.seed}",
             f"- Precision: {_code(c.model.dtype)}" + (", bf16 autocast" if _bf16(t.autocast_bf16, s) else "")]
    m = c.model
    lines.append(f"- LoRA: r {m.lora_r}, alpha {m.lora_alpha}, dropout {_num(m.lora_dropout)}, target modules "
                 f"{_code(_names(m.lora_target_modules))}" if m.lora else "- Full fine-tuning (no LoRA)")
    return lines


def _names(value) -> str:
    return value if isinstance(value, str) else ", ".join(map(str, value))


def _eval_lines(run: Run) -> list[str]:
    held_out = run.summary.get("eval")
    if not held_out:
        return ["No held-out set was evaluated (data.eval_path was empty)."]
    lines = []
    for key, value in held_out.items():
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
            lines.append(f"- {_code(key)}: [{_num(value[0])}, {_num(value[1])}]")
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
            lines.append(f"- {_code(key)}: {_num(value)}")  # strings (GRPO's reward source) as code spans
    return lines


def _health_lines(run: Run) -> list[str]:
    s = run.summary
    flags = s.get("health") or {}
    lines = [f"- {_code(name)} from step {step}" for name, step in flags.items()] or ["- none raised"]
    if s.get("stopped_early"):
        stop = s["stopped_early"]
        lines.append(f"- stopped early at step {stop.get('step')} on {_code(stop.get('check'))} (diagnostics.stop_on)")
    final = s.get("final") or {}
    shown = [f"{k} {_num(final[k])}" for k in ("loss", "rewards/margins", "rewards/accuracies", "reward/mean")
             if isinstance(final.get(k), (int, float))]
    if shown:
        lines.append(f"- last training step ({final.get('step')}): " + ", ".join(shown))
    return lines


def _usage(kind: str, base: str) -> list[str]:
    if kind == "adapter":
        return ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
                "", f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base)})",
                'model = PeftModel.from_pretrained(base, "THIS_DIRECTORY_OR_REPO")', "```"]
    if kind == "reward model":
        return ["```python", "from transformers import AutoModelForSequenceClassification", "",
                'model = AutoModelForSequenceClassification.from_pretrained("THIS_DIRECTORY_OR_REPO")', "```",
                "", "or as a preftune reward source: `rm:THIS_DIRECTORY`"]
    return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            'model = AutoModelForCausalLM.from_pretrained("THIS_DIRECTORY_OR_REPO")',
            'tokenizer = AutoTokenizer.from_pretrained("THIS_DIRECTORY_OR_REPO")', "```"]


def model_card(run: Run, kind: str) -> str:
    """README.md for an export: hub metadata, then base, data, loss and hyperparameters,
    held-out metrics, health flags and the preftune version, all read from the run's files."""
    s = run.summary
    parts = [_front_matter(run, kind), f"# {_code(run_name(run.cfg))}", "",
             f"Preference-tuned with preftune {__version__} (loss {_code(s.get('loss', run.cfg.loss.name))}); "
             f"trained by preftune {s.get('preftune_version', 'unknown')}, exported with `preftune export`.", "",
             "## Model", *_base_lines(run, kind), "", "## Use",
             *_usage(kind, _hub_base(run.cfg.model.name_or_path) or run.cfg.model.name_or_path), "",
             "## Data", *_data_lines(run), "", "## Training", *_training_lines(run), "",
             "## Held-out evaluation", *_eval_lines(run), "", "## Health checks", *_health_lines(run), ""]
    return "\n".join(parts)
