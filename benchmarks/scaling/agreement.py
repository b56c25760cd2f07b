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

    PYTHONPATH=src python -m benchmarks.scaling.agreement --exact --keep DIR

then computes the step-2 loss at TRL's step-1 weights in float64 (and in float32 through the same
code), from the pairs and TRL gradients a run left in DIR, and adds how far each tool's float32
loss is from it: which of the two is nearer the exact value, and how near float32 can be.
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
from benchmarks.speed_vs_trl.__main__ import BETA, LR, _model

from .__main__ import HERE, _tokenizer, make_pairs, output, overrides, trl_worker, worker

EPS = 1e-8  # torch's AdamW default, which both tools' optimizers keep (lr: the TRL worker's LR)


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


def exact_loss(data: Path, grads: Path, model_name: str, length: int, batch: int) -> dict:
    """The step-2 DPO loss at TRL's step-1 weights computed in float64: the initial adapter (the
    workers' seed), one AdamW step (fp32, as both tools take it) with TRL's saved gradients, then
    the second batch's policy and reference (adapters off) sequence log-probs in float64, the LM
    head applied in blocks of completion positions. Also the same in float32 through the same code,
    so the script's own arithmetic can be told from the tools'."""
    import torch
    from safetensors.torch import load_file

    from preftune.config import load_config
    from preftune.data.prepare import prepare_pairs

    model, tok, _ = _model(model_name)  # set_seed + apply_lora: the adapter both workers start from
    theirs = load_file(str(grads))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for n, p in params.items():
        p.grad = theirs[n].to(p.dtype)
    opt = torch.optim.AdamW(list(params.values()), lr=LR, weight_decay=0.0, eps=EPS)
    opt.step()
    # the scaling worker's config (its max lengths), so the pairs are tokenized as both tools trained on them
    cfg = load_config(None, overrides(str(data), str(data.parent / "run"), "block+gc", 2, batch, length, model_name))
    pairs, _ = prepare_pairs(str(data), cfg, tok)
    second = pairs[batch: 2 * batch]  # train.shuffle=false and TRL's sequential sampler: file order
    causal = model.get_base_model()
    head = causal.get_output_embeddings()

    def logp(prompt: list[int], completion: list[int], dtype) -> float:
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            hidden = causal.model(input_ids=ids).last_hidden_state[0].to(dtype)
            start = len(prompt) - 1  # the position whose logits predict the first completion token
            total = torch.zeros((), dtype=torch.float64)
            for at in range(start, start + len(completion), 256):
                stop = min(at + 256, start + len(completion))
                logits = torch.nn.functional.linear(hidden[at:stop], head.weight.to(dtype))
                target = ids[0, at + 1: stop + 1]
                total += (logits.log_softmax(-1).gather(-1, target[:, None]).sum()).double()
        return float(total)

    out = {}
    for dtype in (torch.float64, torch.float32):
        model.to(dtype)
        margins = []
        for x in second:
            sums = {}
            for name, completion in (("chosen", x.chosen_ids), ("rejected", x.rejected_ids)):
                sums[f"policy_{name}"] = logp(list(x.prompt_ids), list(completion), dtype)
                with model.disable_adapter():
                    sums[f"reference_{name}"] = logp(list(x.prompt_ids), list(completion), dtype)
            margins.append((sums["policy_chosen"] - sums["reference_chosen"])
                           - (sums["policy_rejected"] - sums["reference_rejected"]))
        m = torch.tensor(margins, dtype=torch.float64)
        out[str(dtype).removeprefix("torch.")] = {
            "loss": float(-torch.nn.functional.logsigmoid(BETA * m).mean()), "log_ratio_margins": margins}
    return out


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
    ap.add_argument("--exact", action="store_true", help="only the float64 step-2 loss at TRL's step-1 weights, from "
                    "the pairs and TRL gradients already in --keep (a run before); added to the results file")
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

    dest = HERE / f"agreement-{a.model}.json"
    if a.exact:
        if not a.keep:
            ap.error("--exact reads the pairs and TRL's gradients from --keep")
        keep = Path(a.keep)
        got = exact_loss(keep / f"pairs-{a.length}.jsonl", keep / "grads-trl.safetensors", a.model, a.length, a.batch)
        result = json.loads(dest.read_text()) if dest.is_file() else {}
        trl_step2 = (result.get("grid_losses") or {}).get("trl+gc", [None, None])[1]
        ours = (result.get("preftune_losses_with_trl_step1_gradients") or [None, None])[1]
        exact = got["float64"]["loss"]
        result["exact_at_trl_weights"] = {
            "command": " ".join(["python -m benchmarks.scaling.agreement", *sys.argv[1:]]), **got,
            "trl_rel_diff": None if trl_step2 is None else abs(trl_step2 - exact) / exact,
            "preftune_rel_diff": None if ours is None else abs(ours - exact) / exact}
        dest.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result["exact_at_trl_weights"], indent=1))
        return None
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
    dest.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
