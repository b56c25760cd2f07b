"""TRL as a test oracle: its DPOTrainer loss code on exactly our tensors.

TRL computes losses inside `DPOTrainer._compute_loss`; we call it with a stand-in model whose
per-token log-probs sum to the given sequence logps (spread evenly over each row's completion
length) and with reference logps passed as precomputed values. Where our definition differs
on purpose, the test says so.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from preftune.core.losses import LOSSES

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.oracle

# What TRL checks in this file, by loss (a literal: docs/generate.py reads it for the method table,
# tests/test_docs.py checks each name is tested here): "loss" where the whole loss is compared,
# else the part that is (the rest differs on purpose; docs/guide/losses.md says how).
ORACLE = {"sigmoid": "loss", "hinge": "loss", "robust": "loss", "ipo": "ipo_length_normalize=true",
          "sft": "with sigmoid (RPO), equal lengths", "simpo": "loss", "orpo": "odds-ratio term",
          "exo_pair": "loss", "nca_pair": "loss", "sppo_hard": "loss", "aot": "loss", "aot_unpaired": "loss",
          "apo_zero": "loss", "apo_down": "loss", "discopop": "loss", "f_dpo": "loss", "cpo": "preference term",
          "bco_pair": "at baseline 0, TRL 1.16 has no running baseline"}


def trl_loss(loss_type, pc, pr, rc, rr, *, beta, lengths=None, label_smoothing=0.0, weights=None,
             f_divergence_type="reverse_kl", f_alpha_divergence_coef=1.0, discopop_tau=0.05):
    from trl.trainer.dpo_trainer import DPOTrainer

    n = pc.numel()
    lengths = torch.ones(2 * n, dtype=torch.long) if lengths is None else lengths.long()
    width = int(lengths.max())
    per_token = torch.zeros(2 * n, width)
    completion_mask = torch.zeros(2 * n, width + 1, dtype=torch.long)  # position 0 is the prompt
    for i, (total, k) in enumerate(zip(torch.cat([pc, pr]).tolist(), lengths.tolist())):
        per_token[i, :k] = total / k
        completion_mask[i, 1:k + 1] = 1

    def fake_model(**kwargs):
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    fake_model.training = True
    types = loss_type if isinstance(loss_type, list) else [loss_type]
    self = SimpleNamespace(
        model=fake_model, accelerator=SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type=f_divergence_type,
        loss_types=types, loss_weights=weights or [1.0] * len(types), beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        f_alpha_divergence_coef=f_alpha_divergence_coef, args=SimpleNamespace(discopop_tau=discopop_tau))
    inputs = {"input_ids": torch.ones(2 * n, width + 1, dtype=torch.long), "attention_mask": completion_mask.clone(),
              "completion_mask": completion_mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    return DPOTrainer._compute_loss(self, fake_model, inputs, return_outputs=False), self._metrics["train"]


def _random(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-60 * torch.rand(n, generator=g) for _ in range(4))
    worked = (torch.tensor([-10.0]), torch.tensor([-15.0]), torch.tensor([-11.0]), torch.tensor([-14.0]))
    lengths = torch.randint(1, 12, (2 * (n + 1),), generator=g)
    return [torch.cat([x, y]) for x, y in zip((pc, pr, rc, rr), worked)], lengths


def _ours(name, pc, pr, rc, rr, lengths=None, **params):
    spec = LOSSES[name]
    kwargs = dict(params)
    if spec.needs_lengths:
        kwargs["chosen_lengths"], kwargs["rejected_lengths"] = lengths.float().chunk(2)
    return spec.fn(pc, pr, rc, rr, **kwargs)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid(beta):
    (pc, pr, rc, rr), _ = _random()
    ours = _ours("sigmoid", pc, pr, rc, rr, beta=beta)
    theirs, metrics = trl_loss("sigmoid", pc, pr, rc, rr, beta=beta)
    assert abs(ours.losses.mean().item() - theirs.item()) < 1e-6
    assert metrics["rewards/chosen"][-1] == pytest.approx(ours.chosen_rewards.mean().item(), abs=1e-6)
    assert metrics["rewards/margins"][-1] == pytest.approx(
        (ours.chosen_rewards - ours.rejected_rewards).mean().item(), abs=1e-6)


def test_worked_example_through_trl():
    one = [torch.tensor([v]) for v in (-10.0, -15.0, -11.0, -14.0)]
    theirs, _ = trl_loss("sigmoid", *one, beta=0.1)
    assert theirs.item() == pytest.approx(0.598139, abs=1e-6)


def test_hinge():
    (pc, pr, rc, rr), _ = _random(seed=1)
    theirs, _ = trl_loss("hinge", pc, pr, rc, rr, beta=0.1)
    assert abs(_ours("hinge", pc, pr, rc, rr, beta=0.1).losses.mean().item() - theirs.item()) < 1e-6


def test_robust():
    (pc, pr, rc, rr), _ = _random(seed=2)
    theirs, _ = trl_loss("robust", pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    ours = _ours("robust", pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    assert abs(ours.losses.mean().item() - theirs.item()) < 1e-6


def test_ipo_length_normalized_matches_trl_and_summed_is_documented_difference():
    (pc, pr, rc, rr), lengths = _random(seed=3)
    theirs, _ = trl_loss("ipo", pc, pr, rc, rr, beta=0.1, lengths=lengths)
    normalized = _ours("ipo", pc, pr, rc, rr, lengths, beta=0.1, ipo_length_normalize=True)
    assert abs(normalized.losses.mean().item() - theirs.item()) < 1e-5 * max(1.0, theirs.item())
    # our default is the paper's summed form; it differs from TRL's offline IPO by design
    summed = _ours("ipo", pc, pr, rc, rr, lengths, beta=0.1, ipo_length_normalize=False)
    assert abs(summed.losses.mean().item() - theirs.item()) > 1e-2


def test_cdpo_is_trl_0_28_sigmoid_with_smoothing_not_trl_1_16():
    """TRL >= 0.29 ignores label_smoothing in `sigmoid`; ours keeps the cDPO formula."""
    (pc, pr, rc, rr), _ = _random(seed=4)
    ignored, _ = trl_loss("sigmoid", pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    assert abs(ignored.item() - _ours("sigmoid", pc, pr, rc, rr, beta=0.1).losses.mean().item()) < 1e-6
    cdpo = _ours("cdpo", pc, pr, rc, rr, beta=0.1, label_smoothing=0.2).losses.mean().item()
    assert abs(cdpo - ignored.item()) > 1e-3


def test_rpo_mixture_matches_trl_sigmoid_plus_sft_for_equal_lengths():
    """TRL's sft term is the batch token-mean NLL; ours is per-sequence mean, then the batch mean:
    equal when every chosen completion has the same length."""
    from preftune.core.losses import build_loss

    (pc, pr, rc, rr), _ = _random(seed=5)
    lengths = torch.full((2 * pc.numel(),), 4)
    theirs, _ = trl_loss(["sigmoid", "sft"], pc, pr, rc, rr, beta=0.1, lengths=lengths, weights=[1.0, 0.2])
    spec = build_loss("sigmoid", [["sigmoid", 1.0], ["sft", 0.2]])
    ours = spec.fn(pc, pr, rc, rr, beta=0.1, chosen_lengths=lengths[:pc.numel()].float(),
                   rejected_lengths=lengths[pc.numel():].float())
    assert abs(ours.losses.mean().item() - theirs.item()) < 1e-5
    assert not math.isnan(theirs.item())


def _avg_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (2, 12), generator=g).float()
    avg = -3 * torch.rand(2, 12, generator=g) - 1e-3  # average token logps, < 0
    return avg[0] * lengths[0], avg[1] * lengths[1], lengths[0], lengths[1]


def test_simpo_matches_trl_cpo_simpo_mode():
    """TRL's CPOTrainer (loss_type='simpo', cpo_alpha=0) on average logps: beta (a_w - a_l - gamma/beta)."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    pc, pr, nc, nr = _avg_inputs(6)
    self = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.5, beta=2.0, label_smoothing=0.0,
                           accelerator=SimpleNamespace(device="cpu"))
    theirs, chosen_rewards, _ = CPOTrainer.cpo_loss(self, pc / nc, pr / nr)
    ours = _ours("simpo", pc, pr, torch.zeros(12), torch.zeros(12), torch.cat([nc, nr]), beta=2.0, simpo_gamma=0.5)
    assert torch.allclose(ours.losses, theirs, atol=1e-6)
    assert torch.allclose(ours.chosen_rewards, chosen_rewards, atol=1e-6)


def test_orpo_odds_ratio_term_matches_trl():
    """TRL's ORPO loss is NLL - mean(beta * log sigmoid(log_odds)); its NLL is the batch token-mean
    cross-entropy, ours the per-sequence -a_w, so the odds-ratio terms are compared."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    pc, pr, nc, nr = _avg_inputs(7)
    self = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    theirs, _, _, _, log_odds = ORPOTrainer.odds_ratio_loss(self, pc / nc, pr / nr)
    ours = _ours("orpo", pc, pr, torch.zeros(12), torch.zeros(12), torch.cat([nc, nr]), beta=0.1)
    assert torch.allclose(ours.losses - (-(pc / nc)), -theirs, atol=1e-6)
    assert ours.metrics["orpo/log_odds_ratio"].mean().item() == pytest.approx(log_odds.item(), abs=1e-5)


# ---- the catalogue (dpo_variants.py, cpo): TRL 1.16 on the same tensors ----

def _near(seed, n=16, spread=3.0):
    """Reference log-probs in [-60, 0], policies within +-spread of them (log-ratios of a few nats,
    where exp-based scores stay O(1) and an absolute 1e-6 means something), plus the worked example."""
    g = torch.Generator().manual_seed(seed)
    rc, rr = (-60 * torch.rand(n, generator=g) for _ in range(2))
    pc, pr = (ref + spread * (2 * torch.rand(n, generator=g) - 1) for ref in (rc, rr))
    worked = (torch.tensor([-10.0]), torch.tensor([-15.0]), torch.tensor([-11.0]), torch.tensor([-14.0]))
    return [torch.cat([x, y]) for x, y in zip((pc, pr, rc, rr), worked)]


def _close(ours, theirs):
    """Batch means within 1e-6 (relative above 1)."""
    assert abs(ours.losses.mean().item() - theirs.item()) <= 1e-6 * max(1.0, abs(theirs.item())), \
        (ours.losses.mean().item(), theirs.item())


@pytest.mark.parametrize("name,settings,trl_settings", [
    ("exo_pair", {"exo_epsilon": 1e-3}, {"label_smoothing": 1e-3}),  # TRL reads eps from label_smoothing
    ("exo_pair", {"exo_epsilon": 0.2}, {"label_smoothing": 0.2}),
    ("nca_pair", {}, {}),
    ("sppo_hard", {}, {}),
    ("aot", {"label_smoothing": 0.0}, {}),
    ("aot", {"label_smoothing": 0.1}, {"label_smoothing": 0.1}),
    ("aot_unpaired", {"label_smoothing": 0.1}, {"label_smoothing": 0.1}),
    ("apo_zero", {}, {}),
    ("apo_down", {}, {}),
    ("discopop", {"discopop_tau": 0.05}, {"discopop_tau": 0.05}),
    ("discopop", {"discopop_tau": 0.5}, {"discopop_tau": 0.5}),
])
@pytest.mark.parametrize("spread", [3.0, 30.0])
def test_catalogue_matches_trl(name, settings, trl_settings, spread):
    pc, pr, rc, rr = _near(8, spread=spread)
    for beta in (0.1, 0.5):
        theirs, metrics = trl_loss(name, pc, pr, rc, rr, beta=beta, **trl_settings)
        ours = _ours(name, pc, pr, rc, rr, beta=beta, **settings)
        _close(ours, theirs)
        assert metrics["rewards/chosen"][-1] == pytest.approx(ours.chosen_rewards.mean().item(), abs=1e-6)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
def test_f_dpo_matches_trls_f_divergence_sigmoid(divergence):
    """TRL applies the divergence to its `sigmoid` loss; ours is the `f_dpo` loss. At alpha 0.5 the
    two alpha conventions agree."""
    pc, pr, rc, rr = _near(9)
    theirs, _ = trl_loss("sigmoid", pc, pr, rc, rr, beta=0.1, f_divergence_type=divergence, f_alpha_divergence_coef=0.5)
    ours = _ours("f_dpo", pc, pr, rc, rr, beta=0.1, f_divergence_type=divergence, f_alpha_divergence_coef=0.5)
    _close(ours, theirs)


def test_f_dpo_alpha_is_the_papers_and_trl_1_16_code_uses_one_minus_it():
    """Ours: f'(u) = (1 - u^-alpha)/alpha (Wang et al. 2023, Table 1; TRL's documentation says
    u^-alpha too). TRL 1.16's code computes (u^(a-1) - 1)/(a-1): the same function at a = 1 - alpha."""
    pc, pr, rc, rr = _near(10)
    ours = _ours("f_dpo", pc, pr, rc, rr, beta=0.1, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)
    same, _ = trl_loss("sigmoid", pc, pr, rc, rr, beta=0.1, f_divergence_type="alpha_divergence",
                       f_alpha_divergence_coef=0.7)
    _close(ours, same)
    other, _ = trl_loss("sigmoid", pc, pr, rc, rr, beta=0.1, f_divergence_type="alpha_divergence",
                        f_alpha_divergence_coef=0.3)
    assert abs(ours.losses.mean().item() - other.item()) > 1e-4


@pytest.mark.parametrize("spread", [3.0, 30.0])
def test_bco_pair_at_a_zero_baseline_matches_trl_1_16(spread):
    """TRL 1.16's bco_pair is -log sigmoid(beta c) - log sigmoid(-beta r): the running reward
    baseline of the BCO paper (and of TRL up to 0.2x) is gone, so TRL is ours with delta = 0. The
    baseline's update is checked by hand (tests/core/losses/test_dpo_token_variants.py)."""
    pc, pr, rc, rr = _near(11, spread=spread)
    for beta in (0.1, 0.5):
        theirs, metrics = trl_loss("bco_pair", pc, pr, rc, rr, beta=beta)
        ours = LOSSES["bco_pair"].fn(pc, pr, rc, rr, beta=beta, reward_baseline=torch.tensor(0.0))
        _close(ours, theirs)
        assert metrics["rewards/chosen"][-1] == pytest.approx(ours.chosen_rewards.mean().item(), abs=1e-6)
    shifted = LOSSES["bco_pair"].fn(pc, pr, rc, rr, beta=0.1, reward_baseline=torch.tensor(0.5))
    assert abs(shifted.losses.mean().item() - trl_loss("bco_pair", pc, pr, rc, rr, beta=0.1)[0].item()) > 1e-3


def test_cpo_preference_term_matches_trl_cpo_sigmoid():
    """TRL's CPOTrainer (loss_type='sigmoid', summed log-probs) computes the preference term and
    adds cpo_alpha times its own token-mean NLL outside it; with cpo_alpha = 0 the two agree, and
    the rewards (beta * pi) are TRL's."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    pc, pr, nc, nr = _avg_inputs(11)
    self = SimpleNamespace(alpha=0.0, loss_type="sigmoid", beta=0.1, label_smoothing=0.0,
                           accelerator=SimpleNamespace(device="cpu"))
    theirs, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(self, pc, pr)
    ours = _ours("cpo", pc, pr, torch.zeros(12), torch.zeros(12), torch.cat([nc, nr]), beta=0.1, cpo_alpha=0.0)
    assert torch.allclose(ours.losses, theirs, atol=1e-6)
    assert torch.allclose(ours.chosen_rewards, chosen_rewards) and torch.allclose(ours.rejected_rewards, rejected_rewards)
