"""TRL as the oracle for the losses that read per-token log-probs: LD-DPO (TRL's `ld_alpha`) and
WPO (TRL's `use_weighting`).

Here TRL runs its whole path on a tiny model: its fused LM head (per-token log-probs and
log sum_v p(v)^2, from the hidden states) and `DPOTrainer._compute_loss` (the shared/tail masks,
the weights, the loss), with a live reference model. Ours is `core/step.loss_forward` on the same
two models and the same pairs, in each of our layouts. Loss and the policy's gradient agree.
"""

import contextlib
import copy
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from conftest import build_model
from preftune.core.losses import LOSSES
from preftune.core.step import loss_forward
from preftune.data.collate import collate_packed_pairs, collate_pairs
from preftune.data.tokenize import TokenizedPair

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.oracle

# What TRL checks in this file, by loss (a literal: docs/generate.py reads it for the method table)
ORACLE = {"ld_dpo": "loss and gradient, on a model", "wpo": "loss and gradient, on a model"}

VOCAB = 64
# chosen longer, rejected longer, equal lengths, a one-token side
PAIRS = [TokenizedPair([5, 6, 7], [8, 9, 12, 2], [10, 2], "x", 1),
         TokenizedPair([5], [11, 2], [15, 16, 17, 18, 19, 2], "x", 2),
         TokenizedPair([3, 4, 5, 6, 7, 8], [9, 20, 2], [9, 10, 2], "x", 3),
         TokenizedPair([21, 22], [2], [23, 24, 25, 2], "x", 4)]
LAYOUTS = {"padded": lambda pairs: collate_pairs(pairs, pad_id=0),
           "packed": lambda pairs: collate_packed_pairs(pairs, prefix_sharing=False),
           "packed_shared": lambda pairs: collate_packed_pairs(pairs, prefix_sharing=True)}


class _Reference:
    """A separate frozen reference model, as models.loading.FrozenCopyReference gives one."""

    def __init__(self, model):
        self.model = model

    def context(self):
        return contextlib.nullcontext()

    def forward_model(self, policy):
        return self.model


def _models():
    policy, reference = build_model(VOCAB, seed=0), build_model(VOCAB, seed=1)
    return policy.eval(), reference.eval().requires_grad_(False)  # eval: TRL's metrics key "eval", no dropout anyway


def trl_dpo(policy, reference, batch, *, beta, ld_alpha=None, use_weighting=False):
    """TRL 1.16's sigmoid loss and the policy's gradient, through its fused LM head on copies."""
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    model, ref = copy.deepcopy(policy), copy.deepcopy(reference)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1")
                      + (("log_sum_sq_probs",) if use_weighting else ()))
    add_fused_lm_head(ref)
    self = SimpleNamespace(
        model=model, ref_model=ref, aux_loss_enabled=False, ld_alpha=ld_alpha, precompute_ref_logps=False,
        accelerator=SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x),
        f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
        use_weighting=use_weighting, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0,
        _tp_size=1, f_alpha_divergence_coef=1.0, args=SimpleNamespace(discopop_tau=0.05,
                                                                      gradient_checkpointing_kwargs=None))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    loss = DPOTrainer._compute_loss(self, model, inputs, return_outputs=False)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}, self._metrics["eval"]


def ours(name, policy, reference, layout, **settings):
    policy.zero_grad(set_to_none=True)
    losses, parts = loss_forward(policy, _Reference(reference), LOSSES[name], LAYOUTS[layout](PAIRS), settings)
    losses.mean().backward()
    return losses.mean().item(), {n: p.grad for n, p in policy.named_parameters()}, parts


def _agree(mine, theirs):
    loss, grads, _ = mine
    their_loss, their_grads, _ = theirs
    assert abs(loss - their_loss) <= 1e-6, (loss, their_loss)
    for name, grad in grads.items():
        assert torch.allclose(grad, their_grads[name], rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_ld_dpo_equals_trls_ld_alpha(layout, alpha):
    """alpha 1 is TRL's plain sigmoid (its ld_alpha=None) too; the rewards TRL logs are ours."""
    policy, reference = _models()
    theirs = trl_dpo(policy, reference, collate_pairs(PAIRS, pad_id=0), beta=0.5, ld_alpha=alpha)
    mine = ours("ld_dpo", policy, reference, layout, beta=0.5, ld_alpha=alpha)
    _agree(mine, theirs)
    assert theirs[2]["rewards/margins"][-1] == pytest.approx(
        (mine[2]["chosen_rewards"] - mine[2]["rejected_rewards"]).mean().item(), abs=1e-6)
    if alpha == 1.0:
        plain = trl_dpo(policy, reference, collate_pairs(PAIRS, pad_id=0), beta=0.5)
        assert plain[0] == pytest.approx(theirs[0], abs=1e-6)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_wpo_equals_trls_use_weighting(layout):
    """The policy's aligned weights from its own head, in both: TRL's fused head with
    log_sum_sq_probs, ours through logprobs.pair_logps (chunked head here)."""
    policy, reference = _models()
    theirs = trl_dpo(policy, reference, collate_pairs(PAIRS, pad_id=0), beta=0.5, use_weighting=True)
    mine = ours("wpo", policy, reference, layout, beta=0.5)
    _agree(mine, theirs)
    unweighted = trl_dpo(policy, reference, collate_pairs(PAIRS, pad_id=0), beta=0.5)
    assert abs(unweighted[0] - theirs[0]) > 1e-3  # the weights matter on these pairs
