"""
Per-token log-probs of a causal LM, without the full-vocabulary logits of the whole sequence.

What it computes: logp[b, t] = log pi_tau(x[b, t+1] | x[b, <=t]) for t = 0 .. T-2, shape (B, T-1),
where pi_tau = softmax(logits / tau) is the model at temperature tau (default 1: the model itself).
The teacher calls it under no_grad, at tau = 1, to score the student's sampled tokens (log pi_T in
Eq. 1); the student calls it with grad, at the sampler's temperature, for log pi_theta in the
importance ratio of loss.py: then it is the log-prob of the very distribution q_tau the sampler drew
from (sample.py), and on the trainer's own rollouts the ratio pi_theta / q is 1.

Top-p < 1 is not scored: the nucleus is the smallest set of tokens holding mass p, and whether a
token near its boundary is in it depends on rounding. sample.py, vLLM and this forward pass each
compute the logits and the cumulative sums their own way, so a token can be inside the sampler's
nucleus and outside the trainer's (log-ratio -inf), and wherever the two nuclei differ every token's
renormalised log-prob differs too. check_sampling_is_scorable refuses top-p < 1.

Why chunks: the lm_head turns (positions, hidden) into (positions, vocab). For a 16k-token response
and Qwen3's 151,936-token vocabulary that is ~5 GB of bf16 logits per sequence (paper footnote 2),
and log-softmax in float32 doubles it. Here the decoder runs once, then the lm_head and the
log-softmax run on `chunk_size` positions at a time, and only the (positions,) log-probs of the
targets are kept. With grad, each chunk is wrapped in activation checkpointing, so its logits are
freed after the forward and recomputed in the backward: peak memory holds one chunk of logits.

Training reads these per-position log-probs at the completion tokens only: completion_logprobs pads a
micro-batch of rollouts (pad_rollouts), scores it and gathers (B, C) log-probs of the C completion
tokens, where position t = start - 1 + c predicts completion token c (completion_index).

Departures from a plain `model(input_ids).logits.log_softmax(-1)`:
1. The result is float32 even when the model is bf16: the importance ratio exp(log pi_theta - log q)
   and the advantage log pi_T - log q are differences of nearly equal numbers.
2. log pi = logit - logsumexp(logits): the full log-softmax is never materialised.
3. position_ids come from the attention mask, so left- and right-padded batches score the same.
"""

import torch
from torch.utils.checkpoint import checkpoint

from schedule import token_mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counted over the real tokens only, so left and right padding score alike."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _chunk_logp(hidden, targets, lm_head, temperature):
    """(N, H) hidden states and (N,) targets -> (N,) log-probs at this temperature, in float32."""
    logits = lm_head(hidden).float()  # (N, V): the only full-vocabulary tensor, one chunk at a time
    if temperature != 1.0:  # divided in float32, as the sampler divides (sample.sampling_logprobs)
        logits = logits / temperature
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logprobs(model, input_ids, attention_mask=None, chunk_size: int = 512,
                   temperature: float = 1.0) -> torch.Tensor:
    """log pi_tau(x_{t+1} | x_{<=t}) for every position: (B, T) ids -> (B, T-1) float32 log-probs."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (B, T) with T >= 2, got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
    B, T, H = hidden.shape  # (B, T, H)
    flat_hidden = hidden[:, :-1].reshape(-1, H)  # (B*(T-1), H): position t predicts token t+1
    flat_targets = input_ids[:, 1:].reshape(-1)  # (B*(T-1),)
    lm_head = model.get_output_embeddings()
    chunks = []
    for s in range(0, flat_hidden.shape[0], chunk_size):
        h, y = flat_hidden[s:s + chunk_size], flat_targets[s:s + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:  # recompute this chunk's logits in backward
            chunks.append(checkpoint(_chunk_logp, h, y, lm_head, temperature, use_reentrant=False))
        else:
            chunks.append(_chunk_logp(h, y, lm_head, temperature))
    return torch.cat(chunks).view(B, T - 1)


def check_sampling_is_scorable(temperature: float, top_p: float) -> None:
    """Training needs log q of every sampled token from the trainer's own forward pass (the importance
    ratio's denominator, recorded by the sampler, must be reproducible by its numerator log pi_theta): any temperature > 0 can be scored, a nucleus (top-p < 1) cannot (module docstring)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (sampling, not greedy), got {temperature}")
    if top_p != 1.0:
        raise ValueError(f"top-p {top_p} is not supported in training: the student's log-probs cannot reproduce "
                         f"the sampler's nucleus, so the importance ratio would not be 1 on its own rollouts; "
                         f"use top-p 1 (temperature is supported)")


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student=None, teacher=None) -> None:
    """The teacher scores the student's token ids (and in the probe the student continues the teacher's):
    both must read them as the same tokens. Pass the models too to compare their output layers."""
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError(f"student and teacher have different vocabularies ({len(student_tokenizer)} vs "
                         f"{len(teacher_tokenizer)} tokens): token ids must mean the same to both")
    if student is not None and teacher is not None:
        rows = student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
        if rows[0] != rows[1]:
            raise ValueError(f"student and teacher output layers have different vocabulary sizes {rows}")


def position_logits(model, input_ids, attention_mask, positions) -> torch.Tensor:
    """Full next-token logits at chosen positions only: (B, T) ids, (B, C) positions -> (B, C, V).
    GKD compares whole distributions; gathering the hidden states first keeps the prompt's positions
    away from the lm_head, so the logits are those of the completion alone."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
    picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, C, H)
    return model.get_output_embeddings()(picked)


# ----------------------------------------------------------------------------- rollouts in micro-batches


def pad_rollouts(rollouts, pad_token_id: int, device=None):
    """Right-padded prompt + completion ids (B, T), their attention mask, and where each completion
    starts and how long it is, (B,) each."""
    T = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    ids = torch.full((len(rollouts), T), pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rollouts), T), dtype=torch.long)
    for b, r in enumerate(rollouts):
        row = r.prompt_ids + r.completion_ids
        ids[b, :len(row)], attn[b, :len(row)] = torch.tensor(row), 1
    starts = torch.tensor([len(r.prompt_ids) for r in rollouts])
    lengths = torch.tensor([len(r.completion_ids) for r in rollouts])
    return ids.to(device), attn.to(device), starts.to(device), lengths.to(device)


def completion_index(starts: torch.Tensor, C: int, T: int) -> torch.Tensor:
    """(B, C) positions whose next-token prediction is completion token c: start - 1 + c (position t
    predicts token t + 1), clamped inside the row; past a rollout's length they are padding, masked."""
    index = starts[:, None] - 1 + torch.arange(C, device=starts.device)[None, :]
    return index.clamp(max=T - 2)


def completion_logprobs(lm, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """log pi_tau(y_c | x, y_<c) of every completion token of a micro-batch (make_micro_batch): (B, C)
    float32. Past a rollout's length the values are padding: batch["mask"] is 0 there."""
    ids = batch["ids"]
    logp = token_logprobs(lm, ids, batch["attn"], temperature=temperature)  # (B, T-1)
    return logp.gather(1, completion_index(batch["starts"], batch["C"], ids.shape[1]))


def completion_logits(lm, batch: dict) -> torch.Tensor:
    """The full next-token logits at the completion positions only, (B, C, V): what GKD compares."""
    return position_logits(lm, batch["ids"], batch["attn"],
                           completion_index(batch["starts"], batch["C"], batch["ids"].shape[1]))


def sampled_logprobs(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """(B, C, V) completion logits -> (B, C) float32 log-probs of the completion tokens themselves."""
    ids = batch["ids"]
    targets = ids[:, 1:].gather(1, completion_index(batch["starts"], batch["C"], ids.shape[1]))  # (B, C)
    return torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)


class LogProbs(torch.nn.Module):
    """What DDP or FSDP2 wraps, so the wrapper's hooks (gradient all-reduce, parameter all-gather) see
    every parameter: its forward is completion_logprobs of the student, or with logits=True
    completion_logits (GKD)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, batch: dict, temperature: float = 1.0, logits: bool = False) -> torch.Tensor:
        return completion_logits(self.lm, batch) if logits else completion_logprobs(self.lm, batch, temperature)


def make_micro_batch(rollouts, pad_token_id: int, device, window=None, last_n=None) -> dict:
    """One micro-batch: padded ids, the completion's loss mask (schedule.token_mask: all tokens, a
    window or the last n) and the sampler's log-probs log q, (B, C)."""
    ids, attn, starts, lengths = pad_rollouts(rollouts, pad_token_id, device)
    C = int(lengths.max())
    sampler_logp = torch.zeros(len(rollouts), C, device=device)
    for b, r in enumerate(rollouts):
        sampler_logp[b, :len(r.sampler_logp)] = torch.tensor(r.sampler_logp)
    return dict(ids=ids, attn=attn, starts=starts, C=C, lengths=lengths, sampler_logp=sampler_logp,
                mask=token_mask(lengths, C, window, last_n))


def group_by_budget(rollouts, budget: int):
    """Consecutive groups whose padded size (rows x longest row) stays within the token budget."""
    group, longest = [], 0
    for r in rollouts:
        n = len(r.prompt_ids) + len(r.completion_ids)
        if group and (len(group) + 1) * max(longest, n) > budget:
            yield group
            group, longest = [], 0
        group.append(r)
        longest = max(longest, n)
    if group:
        yield group
