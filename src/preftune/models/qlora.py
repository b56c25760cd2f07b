"""bitsandbytes only when QLoRA is asked for, and one numeric path for its 4-bit layers on every CPU
(layer 0: imports nothing of ours but errors; no torch at import).

Two things went wrong on CPUs with AVX512-BF16 (AMD EPYC Zen 4, Sapphire Rapids and later):

- **Noise.** peft imports bitsandbytes whenever it is installed (`peft/helpers.py`), and on such a
  CPU bitsandbytes' import logs "Failed to load CPU gemm_4bit_forward from kernels-community" on
  stderr. Every command that loaded a model printed it, and a one-line error became two.
  `hide_bitsandbytes()` (the CLI calls it first) blocks its import in this process, so peft and
  transformers see it as not installed; `allow_bitsandbytes()` (the
  QLoRA path calls it before its own import) lifts that. A library user's process is never touched:
  only the `preftune` command hides it.
- **Wrong gradients.** The first time a `Linear4bit` runs in eval mode without gradients
  (an eval, the adapters-off reference, a sample), bitsandbytes repacks its weights in place into a
  bf16 inference layout, and from then on every forward, training ones included, takes that
  layout's kernel, which has no backward to the layer's input: measured on a 2-layer model, the
  gradient reaching the embeddings fell from norm 6272 to 741 (LoRA below the last layer trains on
  wrong gradients, silently), and eval-mode logits moved by 4.5e-3 against training mode (bf16
  block scales), so a reference computed in eval mode was not the policy at step 0. The repacking
  also requires in_features divisible by the block size and out_features by 32, or it crashes
  (`shape '[32, 0]' is invalid`). `keep_one_cpu_path(model)` turns it off on every 4-bit layer:
  every forward dequantizes to the compute dtype, as on CPUs without AVX512-BF16.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["hide_bitsandbytes", "allow_bitsandbytes", "keep_one_cpu_path"]

_NAME = "bitsandbytes"


class _DropKernelNotice(logging.Filter):
    """The kernels-community notice is about a bf16 inference kernel preftune never uses
    (keep_one_cpu_path), so it is noise even for QLoRA users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


_NOTICE_FILTER = _DropKernelNotice()


def hide_bitsandbytes() -> None:
    """Make bitsandbytes unimportable in this process until allow_bitsandbytes(). A `None` entry in
    sys.modules is Python's documented import block: `import bitsandbytes` raises ImportError and
    `importlib.util.find_spec` answers None, which is how peft and transformers ask. A no-op when it
    is already imported (too late to keep its import quiet, and hiding it would break its users)."""
    sys.modules.setdefault(_NAME, None)


def allow_bitsandbytes() -> None:
    """Undo hide_bitsandbytes() and silence bitsandbytes' kernel notice: call before importing it."""
    if _NAME in sys.modules and sys.modules[_NAME] is None:
        del sys.modules[_NAME]
        # transformers memoises "is bitsandbytes installed?": an answer given while it was hidden goes
        utils = sys.modules.get("transformers.utils.import_utils")
        cached = getattr(utils, "is_bitsandbytes_available", None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NOTICE_FILTER)  # a set: adding twice is once


def keep_one_cpu_path(model) -> int:
    """Turn off bitsandbytes' in-place CPU repacking on every 4-bit layer of `model` (see the module
    docstring); call it right after loading, before any forward. Returns how many layers it changed."""
    changed = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
