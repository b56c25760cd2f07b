"""PPO with a critic, RLOO and REINFORCE++ as a batch source of train()'s one loop.

Each batch of samples (`online.prompts_per_step` prompts x `online.samples_per_prompt`
completions, drawn and scored exactly as GRPO's, grpo.py) is turned into per-token advantages
once, before any gradient step, with the policy, reference and critic as they are then (eval
mode, no dropout):

1. the score of each completion: minus `ppo.missing_eos_penalty` when it did not end with EOS,
   clipped to [-ppo.reward_clip, ppo.reward_clip], scaled over the batch (`ppo.whiten_rewards`);
2. the k1 KL log pi_old - log pi_ref of every token, weighted by ppo.kl_coef (fixed, or steered
   to ppo.kl_target by the adaptive controller of Ziegler et al. 2019 after every batch);
3. the loss's estimator (core/losses/ppo.ESTIMATORS): GAE against the critic's values (ppo), the
   leave-one-out baseline (rloo), the batch-normalised return-to-go (reinforce_pp).

Then `ppo.epochs` passes, each over `ppo.mini_batches` shuffled mini-batches (one micro-batch
each), on the clipped loss against the sampling-time log-probs (and, for PPO, the clipped value
loss against the sampling-time values). Micro-batch i is pass/mini-batch i of batch of samples
i // (epochs x mini_batches); the batch is kept in rollouts/ (safetensors) so a run resumed in
the middle of one trains on the same samples: resume is exact, as GRPO's.

Rows are right-padded (the critic reads every position of every row; no packed layout here).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file

from ...core.logprobs import completion_token_logps
from ...core.losses import build_loss
from ...core.losses.ppo import ESTIMATORS, explained_variance, shaped_scores
from ...core.step import completion_values
from ...data.collate import collate_sequences
from ...data.layouts import Layout
from ...models.critic import build_critic
from ...models.vllm_engine import engine_for
from ...training.train import RunResult, train
from ...utils.devices import place
from ...utils.errors import ConfigError
from .grpo import GRPOSource, read_samples, write_samples
from .rollouts import load_prompts, reward_from_config

__all__ = ["PPOSource", "run_ppo", "adaptive_kl_coef"]


def adaptive_kl_coef(coef: float, kl: float, *, target: float, samples: int, horizon: int) -> float:
    """The adaptive KL controller (Ziegler et al. 2019): the proportional error
    clip(kl / target - 1, -0.2, 0.2) moves the coefficient by error x samples / horizon.
    Example: coef 0.1, kl 12, target 6, 64 samples, horizon 10000: error 0.2, coef 0.1 x 1.00128."""
    error = min(max(kl / target - 1, -0.2), 0.2)
    return coef * (1 + error * samples / horizon)


class PPOSource(GRPOSource):
    """Scored samples of the current policy, advantages from the loss's estimator, epochs of
    mini-batches over each batch of samples."""

    feeds = ("policy_gradient",)

    def __init__(self, cfg, spec, prompts: list, reward, eval_prompts: list | None = None, engine=None):
        super().__init__(cfg, spec, prompts, reward, eval_prompts, engine)
        if spec.estimator not in ESTIMATORS:
            raise ConfigError("defaults", "loss.name", f"{spec.name!r} names no advantage estimator")
        if spec.estimator == "rloo" and cfg.online.samples_per_prompt < 2:
            raise ConfigError("defaults", "online.samples_per_prompt", "rloo needs at least 2 samples per prompt")
        self.identity.update({f"ppo.{k}": v for k, v in vars(cfg.ppo).items()})
        self.stats["source"] = spec.name
        self._modules: dict = {}
        self._kl: tuple | None = None  # (batch of samples, its kl_coef, its mean KL per completion, its size)

    def describe(self) -> str:
        o, p = self.cfg.online, self.cfg.ppo
        critic = f", critic {self.stats.get('critic', 'none')}" if self.spec.estimator == "gae" else ""
        return (f"{self.spec.name}, {len(self.prompts)} prompts, {o.prompts_per_step} per batch x "
                f"{o.samples_per_prompt} samples, {p.epochs} epochs x {p.mini_batches} mini-batches, "
                f"reward {self.reward.name}{critic}{self._overlap_note()}")

    def layout(self, cfg, model, model_dir: str):
        self.chosen = Layout("padded", False)
        return self.chosen, {"layout": "padded", "prefix_sharing": False,
                             "reason": "the critic reads every position of right-padded rows"}

    def modules(self, cfg, model, reference) -> dict:
        """PPO's critic (models/critic.py), trained beside the policy; RLOO and REINFORCE++ have none."""
        if self.spec.estimator != "gae":
            return {}
        critic, origin = build_critic(model, cfg.model, shared=cfg.ppo.shared_critic, reward=self.reward,
                                      from_reward_model=cfg.ppo.critic_from_reward_model)
        self.stats["critic"] = origin
        self._modules = {"critic": critic}
        return self._modules

    def start(self, cfg, model, accelerator, reference, reference_info: dict, fp: dict) -> None:
        super().start(cfg, model, accelerator, reference, reference_info, fp)
        if "critic" in self._modules:
            self.loss_adjustments = {**self.loss_adjustments, "critic": self._modules["critic"]}  # keeps overlap's tis_cap
        return None

    # ---- micro-batch i: one pass, one mini-batch of one batch of samples ----

    def _micro_batch(self, index: int) -> dict:
        p = self.cfg.ppo
        per = p.epochs * p.mini_batches
        sample, within = divmod(index, per)
        epoch, part = divmod(within, p.mini_batches)
        if self._held is not None and self._held[0] == sample:
            full = self._held[1]
        elif within == 0:
            full = self._rollout(sample)
        else:  # resumed in the middle of a batch of samples: the saved one
            full = self._read(sample)
        self._held = (sample, full)
        n = len(full["rows"])
        if p.mini_batches == 1:
            order = torch.arange(n)
        else:
            g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + sample * 1_009 + epoch)
            order = torch.randperm(n, generator=g)
        return self._select(full, order.chunk(p.mini_batches)[part].tolist())

    def _select(self, full: dict, rows: list[int]) -> dict:
        """Rows of a batch of samples collated as one micro-batch, their per-token values flat in
        the same row order."""
        chosen = [full["rows"][k] for k in rows]
        batch = collate_sequences([pr for pr, _ in chosen], [c for _, c in chosen], self.tokenizer.pad_token_id)
        starts = full["offsets"]
        flat_index = torch.tensor([t for k in rows for t in range(starts[k], starts[k + 1])], dtype=torch.int64)
        for key in ("old_logps", "advantages", "returns", "old_values", "sampler_logps"):
            if key in full:
                batch[key] = full[key][flat_index]
        for key in ("rewards", "kl_seq", "non_score", "returns_mean", "advantages_mean", "kl_coef",
                    "explained_variance", "no_eos", "staleness"):
            if key in full:
                batch[key] = full[key][rows]
        return place(batch, self.model)

    def _kl_coef(self, sample: int) -> float:
        p = self.cfg.ppo
        if not p.kl_target or sample == 0:
            return p.kl_coef
        if self._kl is None or self._kl[0] != sample - 1:  # resumed: the previous batch's saved figures
            t = load_file(str(self._path(sample - 1)))
            self._kl = (sample - 1, float(t["kl_coef"][0]), float(t["kl_seq"].mean()), int(t["kl_seq"].numel()))
        _, coef, kl, n = self._kl
        return adaptive_kl_coef(coef, kl, target=p.kl_target, samples=n, horizon=p.kl_horizon)

    def _rollout(self, sample: int) -> dict:
        """Draw, score and evaluate batch of samples `sample`: everything its passes need."""
        p, g = self.cfg.ppo, self.cfg.online.samples_per_prompt
        rows, scores, sampler, staleness = self._draw(sample)
        batch = place(collate_sequences([pr for pr, _ in rows], [c for _, c in rows], self.tokenizer.pad_token_id),
                      self.model)
        critic = self._modules.get("critic")
        modes = [(m, m.training) for m in (self.model, critic) if m is not None]
        for m, _ in modes:
            m.eval()
        with torch.no_grad():
            old, mask = completion_token_logps(self.model, batch)
            with self.reference.context():
                ref = completion_token_logps(self.reference.forward_model(self.model), batch)[0]
            values = completion_values(critic, batch) if critic is not None else None
        for m, was in modes:
            m.train(was)
        eos = self.tokenizer.eos_token_id
        no_eos = torch.tensor([float(not c or c[-1] != eos) for _, c in rows])
        raw = scores.float()
        scores = shaped_scores(raw, no_eos, missing_eos_penalty=p.missing_eos_penalty, reward_clip=p.reward_clip,
                               whiten_rewards=p.whiten_rewards)
        coef = self._kl_coef(sample)
        scores = scores.to(old.device)
        advantages, returns, kl = ESTIMATORS[self.spec.estimator](
            scores, old, ref, mask, kl_coef=coef, values=values, gamma=p.gamma, lam=p.lam,
            whiten_advantages=p.whiten_advantages, group_size=g, baseline=p.reinforce_baseline)
        m = mask.bool()
        counts = mask.sum(dim=1).clamp(min=1)
        kl_seq = kl.sum(dim=1)
        n = len(rows)
        full = {"rows": rows, "offsets": [0, *torch.cumsum(mask.sum(dim=1), 0).tolist()],
                "old_logps": old[m].cpu(), "advantages": advantages[m].cpu(), "returns": returns[m].cpu(),
                "sampler_logps": sampler.cpu(), "rewards": raw, "kl_seq": kl_seq.cpu(),
                "non_score": (-coef * kl_seq).cpu(), "returns_mean": ((returns * mask).sum(1) / counts).cpu(),
                "advantages_mean": ((advantages * mask).sum(1) / counts).cpu(), "kl_coef": torch.full((n,), coef, dtype=torch.float64),
                "no_eos": no_eos}
        if staleness is not None:  # an engine: optimizer steps between the sampling weights and these, per row
            full["staleness"] = staleness
        if values is not None:  # a critic: how much of the returns' variance its values explain
            full["explained_variance"] = torch.full((n,), explained_variance(values, returns, mask))
            full["old_values"] = values[m].cpu()
        self._kl = (sample, coef, float(kl_seq.mean()), n)
        if p.epochs * p.mini_batches > 1 or p.kl_target:
            self._write(sample, full)
        return full

    def _steps_before(self, index: int) -> int:
        """Each batch of samples is ppo.epochs x ppo.mini_batches micro-batches."""
        return index * self.cfg.ppo.epochs * self.cfg.ppo.mini_batches // self.cfg.train.grad_accum

    def _path(self, sample: int) -> Path:
        return Path(self.cfg.run.output_dir) / "rollouts" / f"ppo-{sample:08d}-rank{self.rank}.safetensors"

    def _write(self, sample: int, full: dict) -> None:
        """A batch of samples and everything computed from it."""
        write_samples(self._path(sample), full["rows"], {k: v for k, v in full.items() if isinstance(v, torch.Tensor)})

    def _read(self, sample: int) -> dict:
        rows, lengths, t = read_samples(self._path(sample))
        return {"rows": rows, "offsets": [0, *torch.cumsum(lengths, 0).tolist()], **t}


def run_ppo(cfg, *, resume: bool = False, allow_config_change: bool = False) -> RunResult:
    """`preftune ppo` (and `preftune resume` of a PPO, RLOO or REINFORCE++ run): train() on a PPOSource."""
    if not cfg.online.prompts_path:
        raise ConfigError("defaults", "online.prompts_path", "is required")
    spec = build_loss(cfg.loss.name)
    eval_prompts = load_prompts(cfg.online.eval_prompts_path) if cfg.online.eval_prompts_path else None
    engine = engine_for(cfg)  # sampling.engine=vllm: a server that lives as long as this run
    source = PPOSource(cfg, spec, load_prompts(cfg.online.prompts_path), reward_from_config(cfg.online), eval_prompts,
                       engine)
    with engine or nullcontext():
        return train(cfg, resume=resume, allow_config_change=allow_config_change, source=source)
