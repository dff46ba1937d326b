"""
The reverse KL by response position over the WHOLE response, beyond the trained prefix too.

What it computes: for a fixed probe set of prompts x, full-length student rollouts y ~ q(. | x)
(stopped at EOS or at max_new_tokens, never at L_train), scored by the teacher; then at every
completion position t the mean over the rollouts that reach t of the per-token estimate

    k_t = log q(y_t | x, y_<t) - log pi_T(y_t | x, y_<t),   E_{y_t ~ q}[k_t] = KL(q || pi_T) at t,

the same estimate as the training metric `reverse_kl` (loss.reverse_kl_stats), in bins of positions
(the paper's Figures 2 and 5 use bins of 256 tokens). Training samples only the first L_train
tokens, so its own metric stops at L_train; this probe shows whether training on the prefix also
lowers (or raises) the KL of the tokens after it, and feeds the adaptive schedule (schedule.py).

Its FLOP are evaluation, not training: a run's `total_flops` must leave them out.

Departures from the paper:
1. q is the sampler's distribution (temperature and top-p applied), as in the training metric; at the
   paper's temperature 1 and top-p 1 it is the student itself.
2. Rollouts are seeded per (seed, prompt index, sample index) (sample.py): with a fixed seed the probe
   draws with the same random numbers at every step, so the curves over training differ by the
   student's change, not by the draw.
"""

from dataclasses import dataclass

import numpy as np
import torch

from loss import reverse_kl_stats
from schedule import token_mask
from score import completion_logprobs, make_micro_batch


@dataclass
class PositionKL:
    """Per completion position t: the sum of k_t over the rollouts that reach t, and their number."""
    sums: torch.Tensor  # (T,) float64
    counts: torch.Tensor  # (T,) float64

    def bins(self, bin_size: int) -> tuple[list[float | None], list[int]]:
        """Mean k_t and token count per bin [0, b), [b, 2b), ...; None for a bin no rollout reaches."""
        n_bins = (len(self.sums) + bin_size - 1) // bin_size
        pad = n_bins * bin_size - len(self.sums)
        sums = torch.nn.functional.pad(self.sums, (0, pad)).view(n_bins, bin_size).sum(-1)
        counts = torch.nn.functional.pad(self.counts, (0, pad)).view(n_bins, bin_size).sum(-1)
        return [(s / c).item() if c > 0 else None for s, c in zip(sums, counts)], [int(c) for c in counts]

    def mean(self, a: int, b: int) -> float | None:
        """Mean k_t over the tokens at positions a <= t < b; None when no rollout reaches a."""
        count = self.counts[a:b].sum()
        return (self.sums[a:b].sum() / count).item() if count > 0 else None


def position_kl(sampler_logp: torch.Tensor, teacher_logp: torch.Tensor, lengths: torch.Tensor, T: int) -> PositionKL:
    """(B, C) log q and log pi_T of the completion tokens, (B,) lengths -> k_t summed per position, T >= C."""
    mask = token_mask(lengths, sampler_logp.shape[1])  # every token of every rollout: no prefix, no window
    _, _, sums, counts = reverse_kl_stats(sampler_logp.double(), teacher_logp.double(), mask.double(),
                                          bin_size=1, n_bins=T)
    return PositionKL(sums.cpu(), counts.cpu())


def kl_by_position(sampler, teacher, prompts: list[list[int]], max_new_tokens: int, seed: int, *,
                   n: int = 1, prompt_indices: list[int] | None = None, pad_token_id: int,
                   batch_size: int) -> PositionKL:
    """Sample n full-length rollouts per prompt (sampler.generate: sample.HFSampler or VLLMSampler),
    score them with the teacher `batch_size` rollouts at a time, and sum k_t per position."""
    rollouts = [r for r in sampler.generate(prompts, n, max_new_tokens, seed, prompt_indices=prompt_indices)
                if r.completion_ids]  # an empty completion has no position to count
    total = PositionKL(*torch.zeros(2, max_new_tokens, dtype=torch.float64))  # (T,) sums and counts
    for start in range(0, len(rollouts), batch_size):
        batch = make_micro_batch(rollouts[start:start + batch_size], pad_token_id, teacher.device)
        with torch.no_grad():
            teacher_logp = completion_logprobs(teacher, batch)  # (B, C) log pi_T of the sampled tokens
        part = position_kl(batch["sampler_logp"].cpu(), teacher_logp.cpu(), batch["lengths"].cpu(), max_new_tokens)
        total.sums += part.sums
        total.counts += part.counts
    return total


class ProbeSet:
    """train.py's probe: a fixed set of n prompts (a seeded draw), each rank sampling its share of them
    with seeds of their own (negative prompt indices, never a training rollout's). Held out where the data
    allow: prompts in `trained` (those the run's steps draw) are taken only when too few others are left.
    Evaluation: its FLOP stay out of a run's total_flops."""

    def __init__(self, prompts, n: int, seed: int, rank: int, world_size: int, max_new_tokens: int, batch_size: int,
                 trained: set[int] = frozenset()):
        order = np.random.default_rng([seed, 1]).permutation(len(prompts)).tolist()
        chosen = ([i for i in order if i not in trained] + [i for i in order if i in trained])[:n]
        self.mine = chosen[rank::world_size]
        self.prompts = [prompts[i] for i in self.mine]
        self.seed, self.max_new_tokens, self.batch_size = seed, max_new_tokens, batch_size

    def run(self, sampler, teacher, pad_token_id: int, all_sum) -> PositionKL:
        """kl_by_position of the set, summed over ranks (all_sum: an in-place all-reduce)."""
        part = kl_by_position(sampler, teacher, self.prompts, self.max_new_tokens, self.seed,
                              prompt_indices=[-1 - i for i in self.mine], pad_token_id=pad_token_id,
                              batch_size=self.batch_size)
        device = teacher.device
        return PositionKL(*(all_sum(x.to(device)).cpu() for x in (part.sums, part.counts)))
