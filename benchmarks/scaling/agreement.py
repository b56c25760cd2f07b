"""Where preftune's and TRL's losses part at long pairs: the same step-1 gradients, or not (issue 37).

    PYTHONPATH=src python -m benchmarks.scaling.agreement [--model gemma3-270m] [--length 4096] [--batch 4]

The scaling benchmark compares the two tools' per-step losses. Step 1 says little: LoRA's B starts
at zero, so policy == reference and both losses are ln 2 whatever the arithmetic. Step 2 is the
first real comparison, and it is taken after one AdamW step, whose first update is lr * g / (|g| +
eps): the sign of each gradient element, not its size. A gradient element near zero whose sign the
two tools' rounding sets differently moves its weight by 2 lr instead of by a rounding error, so
step 2 can differ by far more than the gradients do. This script measures that, on the scaling
benchmark's own pairs, config and initial adapter (its trl+gc and block+gc points), in two fresh
processes:

1. TRL's DPOTrainer, `--trl-steps` steps (default 1): its losses, and its step-1 gradients as AdamW
   receives them (after clipping).
2. preftune, 2 steps: its own step-1 gradients saved the same way, then AdamW handed TRL's gradients
   in their place, so that its step-2 loss is preftune's loss at TRL's step-1 weights.

Then, offline, the two gradient sets: relative norm of the difference, elements whose sign differs,
and how many elements the first Adam update moves differently. Writes agreement-<model>.json beside
this file (the gradients stay in --keep, default a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import importable, module_command

from .__main__ import HERE, _tokenizer, make_pairs, output, trl_worker, worker

LR, EPS = 5e-4, 1e-8  # the scaling benchmark's AdamW (both tools): lr 5e-4, torch's default eps


def _record_gradients(dump: Path, swap: Path | None) -> None:
    """In this worker process: name the trainable parameters as LoRA is applied, and at AdamW's first
    step save their gradients to `dump` and, with `swap`, replace them with the gradients in it."""
    import torch
    from safetensors.torch import load_file, save_file

    import preftune.models.loading as loading
    import preftune.training.train as training

    names: dict[int, str] = {}
    apply_lora, step = loading.apply_lora, torch.optim.AdamW.step

    def named_lora(model, **kwargs):
        model = apply_lora(model, **kwargs)
        names.update({id(p): n for n, p in model.named_parameters() if p.requires_grad})
        return model

    def first_step_recorded(self, *args, **kwargs):
        if not dump.exists():
            params = [p for group in self.param_groups for p in group["params"]]
            save_file({names[id(p)]: p.grad.detach().clone().contiguous() for p in params}, str(dump))
            if swap is not None:
                theirs = load_file(str(swap))
                with torch.no_grad():
                    for p in params:
                        p.grad.copy_(theirs[names[id(p)]])
        return step(self, *args, **kwargs)

    loading.apply_lora = training.apply_lora = named_lora  # train.py imported the name
    torch.optim.AdamW.step = first_step_recorded


def compare(ours: dict, theirs: dict) -> dict:
    """Gradient agreement over every trainable element, and what AdamW's first step makes of it."""
    import torch

    if sorted(ours) != sorted(theirs):
        raise SystemExit(f"the two tools train different parameters: {sorted(set(ours) ^ set(theirs))[:4]}")
    a = torch.cat([ours[k].flatten().double() for k in sorted(ours)])
    b = torch.cat([theirs[k].flatten().double() for k in sorted(ours)])
    ua, ub = LR * a / (a.abs() + EPS), LR * b / (b.abs() + EPS)  # bias-corrected first step: m = g, v = g^2
    flipped = (torch.sign(a) != torch.sign(b)) & ((a != 0) | (b != 0))
    moved = (ua - ub).abs() > 1e-3 * LR
    nonzero = (a != 0) | (b != 0)
    return {"elements": a.numel(), "nonzero_elements": int(nonzero.sum()),
            "grad_norm_preftune": float(a.norm()), "grad_norm_trl": float(b.norm()),
            "grad_rel_diff_norm": float((a - b).norm() / b.norm()),
            "grad_max_abs_diff": float((a - b).abs().max()), "grad_median_abs": float(b[nonzero].abs().median()),
            "sign_differs": int(flipped.sum()),
            "sign_differs_max_abs_grad": float(torch.maximum(a.abs(), b.abs())[flipped].max()) if flipped.any() else 0.0,
            "adam_update_differs": int(moved.sum()),
            "adam_update_rel_diff_norm": float((ua - ub).norm() / ub.norm())}


def _run(args: list[str]) -> dict:
    env = importable({**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    proc = subprocess.run(module_command("benchmarks.scaling.agreement", *args), env=env, capture_output=True, text=True)
    got = [json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if not got:
        raise SystemExit(f"worker {args[:2]} failed: {(proc.stderr.strip().splitlines() or ['killed'])[-1][:400]}")
    return got[-1]


def main() -> None:
    from safetensors.torch import load_file

    ap = argparse.ArgumentParser(prog="python -m benchmarks.scaling.agreement", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--trl-steps", type=int, default=1, help="2 also measures TRL's own step-2 loss here")
    ap.add_argument("--keep", help="directory for the pairs and both gradient files (default: temporary)")
    ap.add_argument("--worker", choices=["trl", "preftune"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    ap.add_argument("--swap", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        _record_gradients(Path(a.dump), Path(a.swap) if a.swap else None)
        if a.worker == "trl":
            return trl_worker(a.data, "trl+gc", a.steps, a.batch, a.length, a.model)
        with tempfile.TemporaryDirectory() as tmp:
            return worker(a.data, f"{tmp}/run", "block+gc", a.steps, a.batch, a.length, a.model)

    keep = Path(a.keep or tempfile.mkdtemp(prefix="agreement-"))
    keep.mkdir(parents=True, exist_ok=True)
    data = keep / f"pairs-{a.length}.jsonl"
    make_pairs(data, a.length, 2 * a.batch, tok=_tokenizer(a.model))  # the scaling benchmark's 2 steps of pairs
    common = ["--data", str(data), "--model", a.model, "--length", str(a.length), "--batch", str(a.batch)]
    trl = _run(["--worker", "trl", *common, "--steps", str(a.trl_steps), "--dump", str(keep / "grads-trl.safetensors")])
    print("trl", json.dumps(trl), flush=True)
    ours = _run(["--worker", "preftune", *common, "--steps", "2", "--dump", str(keep / "grads-preftune.safetensors"),
                 "--swap", str(keep / "grads-trl.safetensors")])
    print("preftune", json.dumps(ours), flush=True)
    grid = json.loads(output("results.json", a.model).read_text())["results"]
    trl_grid = next((r["losses"] for r in grid if r.get("length") == a.length and r.get("mode") == "trl+gc"), None)
    ours_grid = next((r["losses"] for r in grid if r.get("length") == a.length and r.get("mode") == "block+gc"), None)
    trl_step2 = trl["losses"][1] if len(trl["losses"]) > 1 else (trl_grid or [None, None])[1]
    result = {
        "command": " ".join(["python -m benchmarks.scaling.agreement", *sys.argv[1:]]),
        "model": a.model, "length": a.length, "batch": a.batch,
        "trl_losses": trl["losses"], "trl_step2_from": "this run" if len(trl["losses"]) > 1 else "results grid",
        "grid_losses": {"trl+gc": trl_grid, "block+gc": ours_grid},
        "preftune_losses_with_trl_step1_gradients": ours["losses"],
        "step2_rel_diff_at_trl_weights": (abs(ours["losses"][1] - trl_step2) / abs(trl_step2)
                                          if trl_step2 is not None else None),
        "step2_rel_diff_grid": (abs(ours_grid[1] - trl_grid[1]) / abs(trl_grid[1]) if trl_grid and ours_grid else None),
        "gradients": compare(load_file(str(keep / "grads-preftune.safetensors")),
                             load_file(str(keep / "grads-trl.safetensors"))),
    }
    dest = HERE / f"agreement-{a.model}.json"
    dest.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
