"""
The training objectives: the sampled reverse-KL estimator of on-policy distillation, and the
full-vocabulary GKD divergences it is compared with.

1. OPD, paper Eq. 1. The student pi_theta minimises the sequence-level reverse KL
       KL(pi_theta || pi_T) = E_{y ~ pi_theta} [ sum_t log pi_theta(y_t | y_<t) - log pi_T(y_t | y_<t) ].
   The rollouts come from a sampler q (vLLM or the trainer's own decode loop) that is pi_theta up to
   numerics, so the gradient is taken as a policy gradient with importance weights:
       advantage  A_t = log pi_T(y_t) - log q(y_t)                   (detached: q and pi_T are data)
       ratio      rho_t = exp(log pi_theta(y_t) - log q(y_t))        (carries the gradient)
       loss       = -(1 / N_seq) * sum_sequences sum_t rho_t * A_t * m_t
   At pi_theta = q, grad rho_t = grad log pi_theta(y_t), so grad loss = -E[sum_t grad log pi_theta(y_t) A_t].
   With the discount gamma, A_t is replaced by sum_{k >= t} gamma^(k-t) A_k. gamma = 1 is the exact
   gradient of the KL (score-function identity): a token's choice changes the log-ratios of every
   later token, and the expected score times any function of the earlier tokens is zero, so the
   future sum (and only it) is needed and is unbiased. gamma = 0 is the paper's setting: each
   token is pushed by its own log-ratio only, a biased but much lower-variance per-token signal
   (tests/test_loss.py measures the bias by exact enumeration).

   Temperature tau (paper: tau = 1). The sampler draws from the tempered student
   q_tau = softmax(z_theta / tau) and records log q_tau (sample.py); the student's log-probs in the
   ratio are score.token_logprobs(..., temperature=tau), log q_tau itself, so rho_t = 1 on the
   trainer's own rollouts at any tau (tests/test_score.py), and the divergence minimised is
       KL(q_tau || pi_T) = E_{y ~ q_tau} [ sum_t log q_tau(y_t | y_<t) - log pi_T(y_t | y_<t) ],
   the reverse KL from the tempered student to the teacher at temperature 1 (the teacher is scored
   by token_logprobs at its default tau = 1, the paper's pi_T). The advantage is then
   A_t = log pi_T(y_t) - log q_tau(y_t), the per-token log-ratio of that KL, and the logged
   reverse-KL estimate log q - log pi_T is its mean. The minimiser is q_tau = pi_T: the student's
   logits become tau * z_T (up to a constant per position), so the student sampled at tau
   reproduces the teacher sampled at 1, and the student at temperature 1 is the teacher at
   temperature 1 / tau. Scoring the teacher at tau as well would instead target z_theta = z_T (the
   teacher's shape at every temperature); it is not done, so that at tau = 1 both readings are
   Eq. 1 and the objective stays "make what the student samples look like what the teacher says".
   Top-p < 1 is refused for training (score.check_sampling_is_scorable): no scorer reproduces the
   sampler's nucleus exactly, so the ratio could not be 1.

   Normalisation: summed over the tokens of a sequence (the paper sums over the sequence length:
   Eq. 1 is a sequence-level KL, so a sequence's tokens are not averaged away) and divided by
   `num_sequences`, the number of sequences on this rank in this step (every rank holds the same
   number). Summing the micro-batch gradients then gives this rank's mean over its sequences, and
   DDP's all-reduce (FSDP2's reduce-scatter) averages over ranks: together the gradient of the mean
   over the global batch, however the rollouts are split (tests/test_train.py). Passing the global
   count instead would divide the gradient by the world size once more.

2. GKD (paper §5.3; Agarwal et al. 2024): the generalized Jensen-Shannon divergence between the
   full next-token distributions, with the TRL `generalized_jsd_loss` semantics:
       M = beta * pi_T + (1 - beta) * pi_S,  JSD_beta = beta * KL(pi_T || M) + (1 - beta) * KL(pi_S || M),
   beta = 0 is the forward KL(pi_T || pi_S), beta = 1 the reverse KL(pi_S || pi_T), both at
   temperature tau on the logits.

3. Logging statistics: the per-token reverse-KL estimate log q - log pi_T (its mean over tokens,
   and its mean in bins of 256 positions, the paper's Figures 2 and 5).

Departures from the paper:
1. `ratio_cap` (off by default) truncates the importance weight at c: min(rho, c), whose gradient is
   zero where rho > c. It bounds the update when sampler and trainer disagree a lot (bf16 kernels).
2. The GKD divergences take per-token full logits; this is for the §5.3 comparison at modest lengths.
"""

import torch
import torch.nn.functional as F


def discounted_sum(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B, T) -> (B, T) with out[:, t] = sum_{k >= t} gamma^(k-t) x[:, k]."""
    if gamma == 0.0:
        return x
    out = torch.zeros_like(x)
    running = torch.zeros_like(x[:, 0])
    for t in reversed(range(x.shape[1])):
        running = x[:, t] + gamma * running
        out[:, t] = running
    return out


def opd_loss(student_logp, sampler_logp, teacher_logp, mask, num_sequences: int,
             gamma: float = 0.0, ratio_cap: float | None = None):
    """Importance-weighted reverse-KL policy-gradient loss (paper Eq. 1). Inputs (B, T); returns (loss, ratio)."""
    if num_sequences < 1:
        raise ValueError(f"num_sequences must be >= 1, got {num_sequences}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    # The advantage is data: q and pi_T are fixed distributions, nothing flows back through them.
    advantage = (teacher_logp - sampler_logp).detach() * mask  # (B, T) per-token log pi_T / q
    advantage = discounted_sum(advantage, gamma) * mask  # re-mask: discounting spills into padding
    ratio = torch.exp(student_logp - sampler_logp.detach())  # (B, T) pi_theta / q, carries the grad
    if ratio_cap is not None:
        ratio = ratio.clamp(max=ratio_cap)  # truncated IS: zero gradient where rho > cap
    loss = -(ratio * advantage * mask).sum() / num_sequences  # sum over tokens, mean over sequences
    return loss, ratio.detach()


def generalized_jsd(student_logits, teacher_logits, beta: float = 0.5, temperature: float = 1.0):
    """Per-token generalized JSD over the vocabulary: (..., V) logits -> (...) divergences."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)

    def kl(p_log, q_log):  # KL(p || q) over the last axis, from log-probs
        return (p_log.exp() * (p_log - q_log)).sum(-1)

    if beta == 0.0:
        return kl(teacher, student)  # forward KL(T || S)
    if beta == 1.0:
        return kl(student, teacher)  # reverse KL(S || T)
    mixture = torch.logsumexp(torch.stack([student + torch.log(torch.tensor(1 - beta)),
                                           teacher + torch.log(torch.tensor(beta))]), dim=0)
    return beta * kl(teacher, mixture) + (1 - beta) * kl(student, mixture)


def gkd_loss(student_logits, teacher_logits, mask, num_sequences: int, beta: float = 0.5,
             temperature: float = 1.0):
    """GKD divergence summed over the masked tokens, averaged over sequences (the OPD normalisation)."""
    return (generalized_jsd(student_logits, teacher_logits, beta, temperature) * mask).sum() / num_sequences


def reverse_kl_stats(student_logp, teacher_logp, mask, bin_size: int = 256, n_bins: int | None = None):
    """Mean per-token reverse-KL estimate log q - log pi_T overall and per bin of positions.

    student_logp: the log-prob of each sampled token under the distribution it was drawn from (the
    sampler's log q, or the trainer's log pi_theta at the sampler's temperature, equal up to numerics).
    Returns (sum, count, bin_sums, bin_counts) as float tensors so ranks can all-reduce them before
    dividing; bins are [0, 256), [256, 512), ... of the completion positions, n_bins of them
    (default: enough for T; more gives empty bins, so batches of different T add up).
    """
    kl = (student_logp - teacher_logp) * mask  # (B, T)
    T = kl.shape[1]
    n_bins = max(n_bins or 0, (T + bin_size - 1) // bin_size)
    pad = n_bins * bin_size - T
    kl_bins = F.pad(kl, (0, pad)).view(kl.shape[0], n_bins, bin_size).sum((0, 2))
    count_bins = F.pad(mask, (0, pad)).view(mask.shape[0], n_bins, bin_size).sum((0, 2))
    return kl.sum(), mask.sum(), kl_bins, count_bins


class StepStats:
    """A step's logged statistics: summed over its micro-batches (add), then over ranks (reduce)."""

    def __init__(self, L_train: int, kl_bin: int, device, ratio_cap: float | None = None):
        self.kl_bin, self.n_bins, self.ratio_cap = kl_bin, (L_train + kl_bin - 1) // kl_bin, ratio_cap
        zero = lambda n=(): torch.zeros(n, device=device)  # noqa: E731
        self.loss, self.kl, self.tokens, self.ratio_sum, self.above_cap, self.ratio_max = (zero() for _ in range(6))
        self.bin_sums, self.bin_counts = zero(self.n_bins), zero(self.n_bins)

    def add(self, loss, ratio, student_logp, teacher_logp, mask, num_sequences: int):
        """One micro-batch: its loss (already divided by num_sequences), ratios and log-probs, (B, C)."""
        kl, tokens, kl_bins, count_bins = reverse_kl_stats(student_logp.detach(), teacher_logp, mask, self.kl_bin,
                                                           self.n_bins)
        self.loss += loss.detach() * num_sequences
        self.kl, self.tokens = self.kl + kl, self.tokens + tokens
        self.bin_sums += kl_bins[:self.n_bins]
        self.bin_counts += count_bins[:self.n_bins]
        self.ratio_sum += (ratio * mask).sum()
        self.ratio_max = torch.maximum(self.ratio_max, (ratio * mask).max())
        if self.ratio_cap is not None:
            self.above_cap += ((ratio >= self.ratio_cap) * mask).sum()

    def reduce(self, rollouts, on_policy_prompts: int, prompts_per_step: int, all_sum, all_max) -> dict:
        """The metrics over all ranks (all_sum, all_max: in-place collectives, or identities on one
        process), given this rank's rollouts and how many of its prompts were sampled on-policy."""
        counts = torch.tensor([len(rollouts), sum(r.truncated for r in rollouts), on_policy_prompts],
                              device=self.loss.device, dtype=torch.float32)
        n, truncated, on_policy = all_sum(counts).tolist()
        sums = all_sum(torch.stack([self.loss, self.kl, self.tokens, self.ratio_sum, self.above_cap]))
        bin_sums, bin_counts = all_sum(self.bin_sums), all_sum(self.bin_counts)
        loss, kl, tokens, ratio_sum, above_cap = sums.tolist()
        return {"loss": loss / n, "reverse_kl": kl / max(tokens, 1), "rollouts": int(n), "truncated": int(truncated),
                "on_policy_fraction": on_policy / prompts_per_step, "response_tokens": int(tokens),
                "mean_response_tokens": tokens / n, "ratio_mean": ratio_sum / max(tokens, 1),
                "ratio_max": all_max(self.ratio_max).item(),
                "ratio_above_cap": above_cap / max(tokens, 1) if self.ratio_cap else None, "kl_bin": self.kl_bin,
                "reverse_kl_by_position": [round((s / c).item(), 5) if c > 0 else None
                                           for s, c in zip(bin_sums, bin_counts)]}
