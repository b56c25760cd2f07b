"""`preftune advise FILE`: which method to run, from the data's shape and size and the memory budget.

Rules, in order (each recommendation says which fired and why):
  unpaired data (prompt, completion, label)     -> kto (no pairs to compare)
  no room for a reference model                 -> simpo or orpo (reference-free)
  fewer than ~1,000 pairs                       -> ipo (a bounded target: DPO's margin grows without
                                                   limit on small, separable data and overfits)
  otherwise                                     -> sigmoid (DPO)
plus warnings for length bias, duplicates and truncation, and the settings to start from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Advice", "advise", "memory_estimate_gb", "SMALL_DATA_PAIRS"]

SMALL_DATA_PAIRS = 1000
LENGTH_BIAS = 0.6  # chosen longer in more than this fraction of pairs


@dataclass
class Advice:
    loss: str
    reasons: list[str]
    overrides: list[str]
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def text(self) -> str:
        lines = [f"recommended: loss.name={self.loss}"] + [f"  because {r}" for r in self.reasons]
        if self.overrides:
            lines.append("  start from: " + " ".join(self.overrides))
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def memory_estimate_gb(params: int, *, lora: bool, reference: bool) -> float:
    """fp32 training memory before activations: weights (4 B/param), and for full fine-tuning
    gradients (4) and AdamW moments (8); a frozen reference copy adds 4 more. LoRA's reference is
    the same weights with adapters off, so it costs nothing."""
    per_param = 4 if lora else 16
    if reference and not lora:
        per_param += 4
    return params * per_param / 2**30


def advise(stats: dict, *, params: int, memory_gb: float | None, lora: bool) -> Advice:
    """`stats` from data.inspect.inspect_records; `params` the model's parameter count."""
    reasons, warnings, overrides = [], [], []
    n = stats["records"]
    with_ref = memory_estimate_gb(params, lora=lora, reference=True)
    without_ref = memory_estimate_gb(params, lora=lora, reference=False)
    if stats["kind"] == "unpaired":
        loss = "kto"
        reasons.append(f"the data is unpaired ({stats['desirable']} desirable / {stats['undesirable']} undesirable "
                       "examples): KTO learns from single labelled completions")
        frac = stats["desirable_fraction"]
        if not 0.4 <= frac <= 0.6:
            overrides.append("loss.kto_auto_weights=true")
            reasons.append(f"labels are imbalanced ({frac:.0%} desirable): weight the classes equally")
    elif memory_gb is not None and with_ref > memory_gb >= without_ref:
        loss = "simpo"
        reasons.append(f"a reference copy does not fit: about {with_ref:.1f} GB with it vs {memory_gb:g} GB "
                       f"available ({without_ref:.1f} GB without); SimPO and ORPO need no reference "
                       "(or use LoRA: its reference is the same weights with adapters off)")
        overrides += ["loss.beta=2.0", "loss.simpo_gamma=0.5"]
    elif n < SMALL_DATA_PAIRS:
        loss = "ipo"
        reasons.append(f"{n} pairs is a small set (< {SMALL_DATA_PAIRS}): DPO's loss keeps pushing margins "
                       "on separable pairs and overfits; IPO regresses the margin to a fixed target")
    else:
        loss = "sigmoid"
        reasons.append(f"{n} preference pairs: standard DPO (sigmoid loss) is the well-tested default")
    if memory_gb is not None and without_ref > memory_gb:
        warnings.append(f"even without a reference, training needs about {without_ref:.1f} GB > {memory_gb:g} GB: "
                        "use LoRA (model.lora=true) or a smaller model")
    bias = stats.get("length_bias", {}).get("chosen_longer")
    if bias is not None and bias > LENGTH_BIAS:
        warnings.append(f"chosen is longer in {bias:.0%} of pairs: DPO will learn 'longer is better'; watch "
                        "length_drift, or consider simpo (length-normalised reward)")
    for key, what in (("identical_pairs", "identical chosen/rejected pairs teach nothing"),
                      ("duplicate_pairs", "duplicate pairs weigh some examples twice")):
        if stats.get(key):
            warnings.append(f"{stats[key]} {what}")
    truncated = stats.get("truncated")
    cut = truncated.get("pairs") if isinstance(truncated, dict) else truncated
    if cut and cut > 0.05 * n:
        warnings.append(f"{cut} of {n} records are truncated at the configured lengths: raise data.max_length")
    return Advice(loss, reasons, [f"loss.name={loss}", *overrides], warnings)
