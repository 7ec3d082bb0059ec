"""The CPPO trainer: one ``train_step`` per rollout step.

    rollout -> rewards -> group advantages -> old and reference log-probs -> mini-batch updates
    -> weight refit -> metrics

Every rank runs the same ``train_step``. The rollout source returns the SAME list of samples on
every rank (prompt-major: the n responses of a prompt are consecutive and share ``group_id``);
rewards and GRPO advantages are therefore identical everywhere. Each mini-batch of
``--global-batch-size`` responses is split over data-parallel ranks (rank r takes the r-th
contiguous share); old and reference log-probs are computed for this rank's share only,
forward-only through megatron's pipeline schedule. One optimizer step per mini-batch (update.py),
then the new weights go to the rollout engine (``refit``) and the weight version advances.

What plugs in (training/plugins.py): a ``RolloutSource`` (the vLLM engine), a ``PromptSource``
(the dataset: a position that checkpoints save and restore), a ``RewardFn``. The Trainer is built
complete by training/builder.py (policy, reference, plug-ins, monitor, counters restored).
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_cppo.algorithms import CPPOLoss, grpo_advantages
from megatron_cppo.data.types import PromptItem, Sample
from megatron_cppo.training.balance import balance_order, verl_workload
from megatron_cppo.training.batch import sample_cost
from megatron_cppo.training.plugins import Plugins
from megatron_cppo.training.update import UpdateContext, compute_log_probs, update_mini_batch

__all__ = ["Trainer", "TrainerState"]


# ----------------------------------------------------------------------------------------------


@dataclass
class TrainerState:
    """Counters a checkpoint saves."""

    step: int = 0                 # rollout steps done
    optimizer_steps: int = 0      # optimizer steps taken (skipped ones not counted)
    skipped_steps: int = 0
    weight_version: int = 0       # version of the weights the rollout engine holds
    consumed_prompts: int = 0


@dataclass
class PhaseTimer:
    times: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


class Trainer:
    """Owns the policy (``model.Policy``), the reference model, the loss and the plug-ins.
    ``start``: where the start (= reference) weights came from (saved in every checkpoint)."""

    def __init__(self, *, cfg, state, policy, reference, plugins: Plugins, ctx: UpdateContext,
                 counters: TrainerState, start: dict, logger=None):
        self.cfg, self.state, self.policy, self.reference = cfg, state, policy, reference
        self.plugins = plugins
        self.rollout, self.prompts, self.reward_fn = (plugins.rollout, plugins.prompts,
                                                      plugins.reward_fn)
        self.ctx, self.counters, self.start, self.logger = ctx, counters, start, logger
        self.last_samples: list[Sample] = []
        self.last_prompts: list[PromptItem] = []
        self.last_eval: tuple[list[PromptItem], list[Sample]] = ([], [])
        self.loss_fn = CPPOLoss(cfg.loss, tp_group=state.tp_group,
                                temperature=cfg.rollout.rollout_temperature,
                                valid_vocab=ctx.valid_vocab)

    # ---- one rollout step

    def train_step(self) -> dict[str, float]:
        cfg, s = self.cfg, self.state
        timer = PhaseTimer()
        # 1. rollout with the current weights
        with timer("rollout"):
            prompts = self.prompts.next_batch(cfg.rollout.rollout_batch_size)
            for line in self.prompts.reports():  # e.g. the data epoch that just ended
                self._print(line)
            samples = self.rollout.generate(prompts, cfg.rollout.sampling())
        self.counters.consumed_prompts += len(prompts)
        # 2. rewards, 3. group advantages (identical on every rank)
        with timer("reward"):
            scored = self.reward_fn(samples)
            for smp, r in zip(samples, scored):
                smp.reward = float(r["reward"])
                smp.reward_extra.update({k: v for k, v in r.items() if k != "reward"})
            adv = grpo_advantages(torch.tensor([x.reward for x in samples]),
                                  torch.tensor([x.group_id for x in samples]))
            for smp, a in zip(samples, adv.tolist()):
                smp.advantage = a
        # this data-parallel rank's share of every mini-batch
        minis = self._my_mini_batches(samples)
        mine = [x for m in minis for x in m]
        # 4. old and reference log-probs, forward-only through the schedule
        with timer("log_probs"):
            for smp, lp in zip(mine, compute_log_probs(self.policy.chunks, mine, self.ctx)):
                smp.old_log_probs = lp
            if self.reference is not None:
                with self.reference as ref_chunks:
                    for smp, lp in zip(mine, compute_log_probs(ref_chunks, mine, self.ctx)):
                        smp.ref_log_probs = lp
        # 5. one optimizer step per mini-batch
        results = []
        with timer("update"):
            for mini in self._progress(minis, "update"):
                res = update_mini_batch(self.policy.chunks, self.policy.optimizer, mini,
                                        self.loss_fn, self.ctx, scheduler=self.policy.scheduler)
                results.append(res)
                if res.stepped:
                    self.counters.optimizer_steps += 1
                else:
                    self.counters.skipped_steps += 1
                    self._log_skip(res)
        # 6. the rollout engine gets the new weights
        with timer("refit"):
            self.counters.weight_version += 1
            self.rollout.refit(self.policy.raw_chunks(), s, self.counters.weight_version)
        self.counters.step += 1
        self.last_prompts, self.last_samples = prompts, samples
        # 7. metrics
        return self._metrics(samples, mine, results, timer.times)

    def _my_mini_batches(self, samples: list[Sample]) -> list[list[Sample]]:
        gbs, dp, r = self.cfg.training.global_batch_size, self.state.dp_size, self.state.dp_rank
        if len(samples) % gbs:
            raise ValueError(f"the rollout returned {len(samples)} responses; --global-batch-size "
                             f"{gbs} must divide it")
        share = gbs // dp
        if not self.cfg.training.balance_batch:
            # rank r takes the r-th contiguous share of each mini-batch of the rollout order
            return [samples[k + r * share:k + (r + 1) * share]
                    for k in range(0, len(samples), gbs)]
        # verl's balance_batch: the whole step reordered so that contiguous equal parts, one per
        # rank, carry similar token workloads; each rank's part then in mini-batches of its share
        perm = balance_order([verl_workload(x.num_tokens) for x in samples], dp)
        part = len(samples) // dp
        mine = [samples[i] for i in perm[r * part:(r + 1) * part]]
        return [mine[k:k + share] for k in range(0, part, share)]

    def _print(self, line: str) -> None:
        if self.logger is not None:
            self.logger.print(line)

    def _progress(self, items, desc):
        if self.logger is None:
            return items
        return self.logger.progress(items, desc=desc)

    def _log_skip(self, res) -> None:
        if self.logger is not None:
            self.logger.warn(f"step {self.counters.step + 1}: optimizer step skipped (loss finite: "
                             f"{res.metrics.get('loss_finite', 0.0) == 1.0}, grad norm "
                             f"{res.grad_norm}); weights unchanged")

    # ---- metrics

    def _metrics(self, samples, mine, results, times) -> dict[str, float]:
        m: dict[str, float] = {"step": float(self.counters.step)}
        rewards = torch.tensor([x.reward for x in samples])
        m["reward_mean"] = float(rewards.mean())
        for key in ("acc", "format"):
            vals = [float(x.reward_extra[key]) for x in samples if key in x.reward_extra]
            if vals:
                m[f"{key}_rate"] = sum(vals) / len(vals)
        lengths = torch.tensor([float(x.response_ids.numel()) for x in samples])
        m["response_length_mean"] = float(lengths.mean())
        m["positive_advantage_frac"] = float((torch.tensor([x.advantage for x in samples]) > 0)
                                             .float().mean())
        # sampler vs trainer log-probs of the same tokens (before the update)
        diff_sum = torch.zeros(2, dtype=torch.float64)
        for x in mine:
            if x.rollout_log_probs is not None and x.old_log_probs is not None:
                diff_sum[0] += (x.old_log_probs - x.rollout_log_probs.float()).abs().sum()
                diff_sum[1] += x.old_log_probs.numel()
        if self.state.dp_size > 1:
            dist.all_reduce(diff_sum, group=self.state.dp_group)
        if diff_sum[1] > 0:
            m["rollout_vs_train_logprob_diff"] = float(diff_sum[0] / diff_sum[1])
        # update: mean over mini-batches
        for res in results:
            for k, v in res.metrics.items():
                m[k] = m.get(k, 0.0) + v / len(results)
        m["grad_norm"] = sum(r.grad_norm for r in results) / max(len(results), 1)
        m["skipped_steps"] = float(sum(not r.stepped for r in results))
        m["lr"] = float(self.policy.optimizer.param_groups[0]["lr"])
        m["weight_version"] = float(self.counters.weight_version)
        m.update(self.prompts.stats())
        for k, v in times.items():
            m[f"time/{k}"] = v
        total = sum(times.values())
        m["time/step"] = total
        tokens = sum(x.num_tokens for x in samples)
        m["tokens_per_s"] = tokens / total if total > 0 else 0.0
        if times.get("update", 0) > 0:  # tokens through the model in the update, all views
            views = self.cfg.loss.cpl_coef > 0
            mine_tokens = sum(sample_cost(x, views and (x.advantage > 0 or not
                                                        self.cfg.loss.cpl_gating)) for x in mine)
            m["update_tokens_per_s"] = mine_tokens * self.state.dp_size / times["update"]
        return m

    # ---- evaluation

    def evaluate(self, prompts: Sequence[PromptItem]) -> dict[str, float]:
        """avg@N accuracy and mean reward on ``prompts`` with the current weights (N =
        --eval-n-samples at --eval-temperature: one greedy response by default, as the
        reference validates; the rollout's length and nucleus setting)."""
        e = self.cfg.eval
        sampling = dataclasses.replace(self.cfg.rollout.sampling(), n=e.eval_n_samples,
                                       temperature=e.eval_temperature)
        samples = self.rollout.generate(prompts, sampling)
        scored = self.reward_fn(samples)
        for smp, r in zip(samples, scored):  # kept for the generation dumps
            smp.reward = float(r["reward"])
            smp.reward_extra.update({k: v for k, v in r.items() if k != "reward"})
        self.last_eval = (list(prompts), samples)
        acc = [float(r.get("acc", r["reward"])) for r in scored]
        return {"val_acc": sum(acc) / max(len(acc), 1),
                "val_reward": sum(float(r["reward"]) for r in scored) / max(len(scored), 1)}
