"""`preftune report RUN_DIR [RUN_DIR...] [--experiment DIR...]`: one self-contained HTML page, plus PNGs.

Reads run files only (config.yaml, metrics.jsonl, summary.json, and any eval*.json or
demo.json written beside them) and experiment directories (benchmarks/experiments/*: a
results.json, PNGs and a verdict.md, shown as a table, inline images and text); nothing in
training imports this module. Plots are drawn with
matplotlib and inlined as SVG, so the page works offline with no script and no CDN. Several
runs are overlaid, one colour per run.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..utils.errors import ConfigError, DataError
from ..utils.safeio import atomic_path, loads_json, read_capped

__all__ = ["RunFiles", "read_run", "write_report", "plot_sweep"]

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


@dataclass
class RunFiles:
    name: str
    path: Path
    config: str
    rows: list[dict]
    summary: dict
    evals: dict = field(default_factory=dict)  # file name -> parsed JSON


def _number(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _present(value) -> bool:
    """A number that is there (`_number` also admits a missing value)."""
    return value is not None and _number(value)


_PLOTTED = ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "probe/kl", "probe/eval_accuracy", "probe/sample_length", "probe/reference_length",
            "lengths/chosen", "reward/mean", "step")


def _check_row(row, where: str, line: int) -> dict:
    """A metrics row as the plots read it: an object whose plotted values are numbers."""
    if not isinstance(row, dict):
        raise DataError(where, line, "record", f"expected an object, got {type(row).__name__}")
    for key in _PLOTTED:
        if not _number(row.get(key)):
            raise DataError(where, line, key, f"expected a number, got {type(row[key]).__name__}")
    if not isinstance(row.get("health", []), list) or not all(isinstance(f, str) for f in row.get("health", [])):
        raise DataError(where, line, "health", "expected a list of check names")
    return row


def _check_summary(summary, where: Path) -> dict:
    """The summary keys the page reads, with the types it reads them as."""
    if not isinstance(summary, dict):
        raise DataError(where, 1, "summary", f"expected an object, got {type(summary).__name__}")
    final, health, stop = summary.get("final", {}), summary.get("health", {}), summary.get("stopped_early")
    problems = [("final", isinstance(final, dict) and all(_number(final.get(k)) for k in _PLOTTED)),
                ("health", isinstance(health, dict) and all(isinstance(v, int) for v in health.values())),
                ("stopped_early", stop is None or (isinstance(stop, dict) and isinstance(stop.get("check"), str)
                                                    and isinstance(stop.get("step"), int))),
                ("eval", isinstance(summary.get("eval", {}), dict)
                 and _number((summary.get("eval") or {}).get("accuracy/implicit_reward"))
                 and _number((summary.get("eval") or {}).get("reward/gain"))),
                ("steps", _number(summary.get("steps"))), ("elapsed_s", _number(summary.get("elapsed_s")))]
    for key, ok in problems:
        if not ok:
            raise DataError(where, 1, key, "malformed (not what preftune writes)")
    return summary


def _check_eval(ev, where: Path) -> dict:
    if not isinstance(ev, dict):
        raise DataError(where, 1, "eval", f"expected an object, got {type(ev).__name__}")
    rows = ev.get("per_prompt") or []
    if not isinstance(rows, list) or not all(
            isinstance(r, dict) and _number(r.get("reference")) and _number(r.get("policy"))
            and r.get("reference") is not None and r.get("policy") is not None for r in rows):
        raise DataError(where, 1, "per_prompt", "expected a list of {reference: number, policy: number}")
    return ev


def read_run(path: str | Path) -> RunFiles:
    """A run directory (or a demo directory holding `train/`); one-line error if it is neither,
    or if a file in it is not what preftune writes (a report reads shared directories)."""
    root = Path(path)
    run = root / "train" if (root / "train" / "metrics.jsonl").is_file() else root
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(str(root), "metrics.jsonl", "not a run directory (no metrics.jsonl)")
    rows = []
    for i, line in enumerate(read_capped(metrics).decode("utf-8", "replace").splitlines(), 1):
        if line.strip():
            rows.append(_check_row(loads_json(line, metrics, i), str(metrics), i))
    summary_file = run / "summary.json"
    summary = _check_summary(loads_json(read_capped(summary_file), summary_file), summary_file) \
        if summary_file.is_file() else {}
    config_file = run / "config.yaml"
    evals = {}
    for folder in dict.fromkeys([run, root]):
        for f in sorted(folder.glob("eval*.json")) + sorted(folder.glob("demo.json")):
            evals[f.name] = _check_eval(loads_json(read_capped(f), f), f)
    config = read_capped(config_file).decode("utf-8", "replace") if config_file.is_file() else "(no config.yaml)"
    return RunFiles(root.name if run is root else f"{root.name}/{run.name}", root, config, rows, summary, evals)


# ---- plots -----------------------------------------------------------------------------

def _figure(title: str):
    import matplotlib  # plotting loads only when a report is drawn

    matplotlib.use("Agg")
    # run names and keys are text, never math markup: a run named `$x^$` was a mathtext parse error (exit 1)
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt  # see _figure

    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=100)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    return fig, ax


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


SMOOTHING = 0.6  # TensorBoard's default EMA weight; the axis label says it when a line is smoothed
_SMOOTH_FROM = 5  # points: shorter series are drawn as they are


def ema(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average with TensorBoard's debiasing (the first points are not pulled to 0)."""
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last, norm = weight * last + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(last / norm)
    return out


def _plot(ax, x, y, style, color, label) -> bool:
    """A series as people read it: one point is a marker (an empty axis before), a few are a line
    with markers, a long per-step series is a faint raw line under its EMA. True if smoothed."""
    if len(x) == 1:
        ax.plot(x, y, "o", color=color, label=label, ms=6)
        return False
    if len(x) < _SMOOTH_FROM:
        ax.plot(x, y, style, color=color, label=label, lw=1.5, marker="o", ms=3)
        return False
    ax.plot(x, y, style, color=color, lw=1, alpha=0.25)
    ax.plot(x, ema(y), style, color=color, label=label, lw=1.6)
    return True


def _lines(runs, title, keys, ylabel, styles=("-", "--", ":"), evals: tuple = ()):
    """One line per (run, key); None when no run has any of the keys. `evals`: (key in eval
    results, label) drawn as a star at the run's last step, for each eval of the run that has it."""
    fig, ax = _figure(title)
    drawn, smoothed = 0, False
    for i, run in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        for key, style in zip(keys, styles):
            x, y = _series(run.rows, key)
            if x:
                smoothed |= _plot(ax, x, y, style, color, f"{run.name}: {key}")
                drawn += 1
        last = run.rows[-1]["step"] if run.rows and isinstance(run.rows[-1].get("step"), (int, float)) else 0
        for source, result in _eval_results(run):
            for key, label in evals:
                if _present(result.get(key)):
                    ax.plot([last], [result[key]], "*", color=color, ms=11, label=f"{run.name}: {label} ({source})")
                    drawn += 1
    if not drawn:
        _close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel + (f" (EMA {SMOOTHING:g}; raw faint)" if smoothed else ""))
    ax.legend(fontsize=7, loc="best")
    return fig


def _eval_results(run) -> list[tuple[str, dict]]:
    """(name, result) of the run's held-out evaluations: summary.json's, then each eval*.json."""
    out = [("summary", run.summary["eval"])] if isinstance(run.summary.get("eval"), dict) else []
    return out + [(name, ev) for name, ev in run.evals.items() if isinstance(ev, dict)]


def _loss_margin(runs):
    fig, ax = _figure("loss (solid, left) and reward margin (dashed, right)")
    right = ax.twinx()
    smoothed = False
    for i, run in enumerate(runs):
        c = COLORS[i % len(COLORS)]
        smoothed |= _plot(ax, *_series(run.rows, "loss"), "-", c, f"{run.name}: loss")
        _plot(right, *_series(run.rows, "rewards/margins"), "--", c, f"{run.name}: margin")
        for flag, step in (run.summary.get("health") or {}).items():
            ax.axvline(step, color=c, alpha=0.4, lw=1)
            ax.annotate(flag, (step, ax.get_ylim()[1]), fontsize=7, rotation=90, va="top", color=c)
    ax.set_xlabel("step")
    note = f" (EMA {SMOOTHING:g}; raw faint)" if smoothed else ""
    ax.set_ylabel("loss" + note)
    right.set_ylabel("rewards/margins" + note)
    ax.legend(fontsize=7, loc="upper left")
    right.legend(fontsize=7, loc="upper right")
    return fig


def _per_prompt(runs):
    """Mean reward of policy vs reference samples for each eval prompt (eval --reward, demo)."""
    for run in runs:
        for name, ev in run.evals.items():
            rows = ev.get("per_prompt")
            if rows:
                fig, ax = _figure(f"per-prompt reward: {run.name} ({name})")
                x = range(len(rows))
                ax.bar([i - 0.2 for i in x], [r["reference"] for r in rows], 0.4, label="reference", color="#999999")
                ax.bar([i + 0.2 for i in x], [r["policy"] for r in rows], 0.4, label="policy", color=COLORS[0])
                ax.set_xlabel("eval prompt")
                ax.set_ylabel("mean reward")
                ax.legend(fontsize=7)
                yield fig


def _reliability(runs):
    """Reliability diagram of the held-out evaluation (summary.json eval.calibration): predicted
    probability that the preferred side wins, sigmoid(|margin|), against how often it did; dots
    sized by pairs. A reward model (train-rm) or DPO's implicit reward, calibrated: on the diagonal."""
    fig, ax = _figure("calibration on held-out pairs (dots sized by pairs; diagonal = calibrated)")
    drawn = 0
    for i, run in enumerate(runs):
        cal = ((run.summary.get("eval") or {}).get("calibration") or {})
        bins = [b for b in cal.get("bins") or [] if isinstance(b, dict)
                and all(_present(b.get(k)) for k in ("confidence", "accuracy", "pairs"))]
        if bins:
            ece = cal.get("ece") if _number(cal.get("ece")) else float("nan")
            ax.scatter([b["confidence"] for b in bins], [b["accuracy"] for b in bins],
                       s=[10 + 4 * b["pairs"] for b in bins], color=COLORS[i % len(COLORS)], alpha=0.7,
                       label=f"{run.name} (ECE {ece:.3f})")
            drawn += 1
    if not drawn:
        _close(fig)
        return None
    ax.plot([0.5, 1.0], [0.5, 1.0], ":", color="#666666", lw=1)
    ax.set_xlabel("predicted P(preferred side is chosen)")
    ax.set_ylabel("observed accuracy")
    ax.legend(fontsize=7, loc="best")
    return fig


def _close(fig) -> None:
    import matplotlib.pyplot as plt  # see _figure

    plt.close(fig)


def _figures(runs) -> list[tuple[str, object]]:
    figs = [("loss_margin", _loss_margin(runs)),
            ("rewards", _lines(runs, "implicit rewards", ["rewards/chosen", "rewards/rejected"], "reward")),
            ("logps", _lines(runs, "log-probs of chosen (solid) and rejected (dashed)",
                             ["logps/chosen", "logps/rejected"], "logp (nats)")),
            ("accuracy", _lines(runs, "reward accuracy (train, held-out probe; stars: held-out eval)",
                                ["rewards/accuracies", "probe/eval_accuracy"], "accuracy",
                                evals=(("accuracy/implicit_reward", "held-out"),))),
            ("kl", _lines(runs, "KL(policy || reference) on samples (stars: eval)", ["probe/kl"], "nats per sample",
                          evals=(("kl", "eval KL"),))),
            ("lengths", _lines(runs, "lengths: samples (solid), reference samples (dashed), chosen data (dotted)",
                               ["probe/sample_length", "probe/reference_length", "lengths/chosen"], "tokens")),
            ("rollouts", _lines(runs, "GRPO: mean reward of each step's sampled groups", ["reward/mean"], "reward")),
            ("nll", _lines(runs, "SFT: NLL per completion token", ["nll/token"], "nats")),
            ("calibration", _reliability(runs))]
    figs += [(f"per_prompt_{i}", f) for i, f in enumerate(_per_prompt(runs))]
    return [(name, fig) for name, fig in figs if fig is not None]


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: inline SVG


# ---- page ------------------------------------------------------------------------------

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
figure{display:inline-block;margin:0.5em;border:1px solid #ddd;padding:0.3em}
figure svg{width:510px;height:auto}table{border-collapse:collapse;font-size:0.9em}
td,th{border:1px solid #ccc;padding:0.2em 0.6em;text-align:right}pre{background:#f6f6f6;padding:0.8em;
font-size:0.8em;overflow:auto}.flag{color:#b00020;font-weight:bold}.ok{color:#2a7}"""


def _kl_cell(run) -> str | None:
    """The run's KL as its evaluation measured it (the same figure as eval.json, with its standard
    error), else the last in-training probe's, marked as such: the table showed the probe's while
    eval.json said otherwise, with no way to tell which was which."""
    for name, ev in reversed(run.evals.items()):
        if isinstance(ev, dict) and _present(ev.get("kl")) and ev.get("kl_samples"):
            se = ev.get("kl_stderr") if _present(ev.get("kl_stderr")) else 0.0
            return f"{ev['kl']:.3g} ± {se:.2g} ({name}, {ev['kl_samples']} samples)"
    probes = [r for r in run.rows if _present(r.get("probe/kl"))]
    return f"{probes[-1]['probe/kl']:.3g} (probe, step {probes[-1]['step']})" if probes else None


def _table(runs) -> str:
    keys = ["steps", "loss", "rewards/margins", "rewards/accuracies", "KL (nats)", "eval accuracy",
            "held-out reward gain", "elapsed_s"]
    out = ["<table><tr><th>run</th>" + "".join(f"<th>{k}</th>" for k in keys) + "</tr>"]
    for run in runs:
        final = run.summary.get("final") or (run.rows[-1] if run.rows else {})
        values = [run.summary.get("steps", len(run.rows)), final.get("loss"), final.get("rewards/margins"),
                  final.get("rewards/accuracies"), _kl_cell(run),
                  (run.summary.get("eval") or {}).get("accuracy/implicit_reward"),
                  (run.summary.get("eval") or {}).get("reward/gain"), run.summary.get("elapsed_s")]
        cells = "".join(f"<td>{v:.4g}</td>" if isinstance(v, float)
                        else f"<td>{'' if v is None else html.escape(str(v))}</td>" for v in values)
        out.append(f"<tr><th>{html.escape(run.name)}</th>{cells}</tr>")
    return "\n".join(out + ["</table>"])


def _health(runs) -> str:
    items = []
    for run in runs:
        flags = run.summary.get("health") or {}
        text = ", ".join(f'<span class="flag">{html.escape(f)}</span> from step {int(s)}' for f, s in flags.items())
        stop = run.summary.get("stopped_early")
        if stop:
            text += f" (stopped early on {html.escape(stop['check'])} at step {int(stop['step'])})"
        items.append(f"<li>{html.escape(run.name)}: {text or '<span class=ok>no health flags</span>'}</li>")
    return "<ul>" + "".join(items) + "</ul>"


def _cell(v) -> str:
    if isinstance(v, float):
        return f"<td>{v:.4g}</td>"
    if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v) and len(v) <= 4:
        return "<td>[" + ", ".join(f"{x:.4g}" for x in v) + "]</td>"
    if isinstance(v, (dict, list)):
        return f"<td>{html.escape(json.dumps(v)[:120])}</td>"
    return f"<td>{'' if v is None else html.escape(str(v))}</td>"


def _experiment(path: str | Path) -> str:
    """An experiment directory as HTML: its results.json (each object-valued entry one row, its
    scalar fields the columns), every PNG beside it inline (data: URIs) and verdict.md as text."""
    root = Path(path)
    results_file = root / "results.json"
    if not results_file.is_file():
        raise ConfigError(str(root), "results.json", "not an experiment directory (no results.json)")
    results = loads_json(read_capped(results_file, follow_symlinks=False), results_file)
    if not isinstance(results, dict):
        raise DataError(str(results_file), 1, "results", f"expected an object, got {type(results).__name__}")
    rows = {k: v for k, v in results.items() if isinstance(v, dict)}
    keys = list(dict.fromkeys(k for v in rows.values() for k, x in v.items() if not isinstance(x, (dict, list))
                              or (isinstance(x, list) and len(x) <= 4)))[:14]
    parts = [f"<h2>Experiment: {html.escape(root.name)}</h2>"]
    if isinstance(results.get("command"), str):
        parts.append(f"<pre>{html.escape(results['command'])}</pre>")
    if rows:
        parts.append("<table><tr><th></th>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>")
        parts += [f"<tr><th>{html.escape(name)}</th>" + "".join(_cell(v.get(k)) for k in keys) + "</tr>"
                  for name, v in rows.items()]
        parts.append("</table>")
    for png in sorted(root.glob("*.png")):
        data = base64.b64encode(read_capped(png, field="png", follow_symlinks=False)).decode()
        parts.append(f'<figure><img alt="{html.escape(png.name)}" style="max-width:1000px" '
                     f'src="data:image/png;base64,{data}"></figure>')
    verdict = root / "verdict.md"
    if verdict.is_file():
        text = read_capped(verdict, field="verdict.md", follow_symlinks=False).decode("utf-8", "replace")
        parts.append(f"<pre>{html.escape(text)}</pre>")
    return "\n".join(parts)


def write_report(run_dirs: list[str], out: str | Path | None = None, *, png: bool = True,
                 experiments: list[str] = ()) -> Path:
    """Write `report.html` (and `report-<plot>.png` files beside it unless `png` is False);
    experiment directories (`experiments`) are shown after the runs."""
    if not run_dirs and not experiments:
        raise ConfigError("command line", "report", "name at least one run directory or --experiment DIR")
    runs = [read_run(d) for d in run_dirs]
    shown = [_experiment(e) for e in experiments]
    out = Path(out) if out else (runs[0].path if runs else Path(experiments[0])) / "report.html"
    figs = _figures(runs) if runs else []
    # every value from the run files is escaped; the CSP is a second wall: no script may run at all
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='Content-Security-Policy' "
             f"content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\"><title>preftune report</title>"
             f"<style>{_CSS}</style></head><body><h1>preftune report</h1>",
             *(["<h2>Summary</h2>", _table(runs), "<h2>Health checks</h2>", _health(runs), "<h2>Plots</h2>"]
               if runs else [])]
    for name, fig in figs:
        parts.append(f'<figure class="plot" id="plot-{name}">{_svg(fig)}</figure>')
    parts += shown
    for run in runs:
        parts.append(f"<h2>Config: {html.escape(run.name)}</h2><pre>{html.escape(run.config)}</pre>")
    parts.append("</body></html>")
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(parts))
        if png:
            for name, fig in figs:  # each PNG whole or not at all; a symlink there is replaced, not followed
                with atomic_path(out.with_name(f"{out.stem}-{name}.png")) as png_tmp:
                    fig.savefig(png_tmp, format="png", bbox_inches="tight")
        for _, fig in figs:
            _close(fig)
    return out


def plot_sweep(results: list[dict], out_dir: Path) -> list[Path]:
    """KL-vs-beta and reward-vs-KL plots for `preftune sweep` (one line per learning rate)."""
    paths = []
    lrs = sorted({r["lr"] for r in results})
    for name, xkey, ykey, title in (("kl_vs_beta", "beta", "kl", "KL(policy || reference) vs beta"),
                                    ("reward_vs_kl", "kl", "reward", "held-out reward vs KL")):
        fig, ax = _figure(title)
        for i, lr in enumerate(lrs):
            pts = sorted((r[xkey], r[ykey]) for r in results if r["lr"] == lr and r.get(ykey) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=COLORS[i % len(COLORS)], label=f"lr {lr:g}")
        ax.set_xlabel(xkey)
        ax.set_ylabel(ykey)
        if xkey == "beta":
            ax.set_xscale("log")
        ax.legend(fontsize=7)
        path = out_dir / f"{name}.png"
        fig.savefig(path, bbox_inches="tight")
        fig.savefig(path.with_suffix(".svg"), bbox_inches="tight")
        _close(fig)
        paths.append(path)
    return paths
