"""loss.py by exact enumeration of every sequence of a tiny autoregressive student and teacher."""

import itertools
import math

import pytest
import torch

from loss import discounted_sum, generalized_jsd, gkd_loss, opd_loss, reverse_kl_stats

V, T = 3, 3  # vocabulary and sequence length: 27 sequences in all
SEQUENCES = torch.tensor(list(itertools.product(range(V), repeat=T)))  # (27, T)
PREFIXES = {p: i for i, p in enumerate(p for n in range(T) for p in itertools.product(range(V), repeat=n))}


def random_table(seed, scale=1.5):
    """A tabular autoregressive policy: one logit vector per prefix."""
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(len(PREFIXES), V, generator=g, dtype=torch.float64))


def token_logp(table, seqs):
    """(N, T) sequences -> (N, T) log pi(y_t | y_<t) under a tabular policy."""
    rows = torch.tensor([[PREFIXES[tuple(s[:t].tolist())] for t in range(T)] for s in seqs])
    return torch.log_softmax(table[rows], dim=-1).gather(-1, seqs[..., None]).squeeze(-1)


def exact_kl(student, teacher):
    logp_s, logp_t = token_logp(student, SEQUENCES), token_logp(teacher, SEQUENCES)
    return (logp_s.sum(1).exp() * (logp_s - logp_t).sum(1)).sum()


def grad(f, table):
    table = table.detach().clone().requires_grad_(True)
    f(table).backward()
    return table.grad


def expected_estimator(student, teacher, gamma):
    """E_{y ~ pi_s}[loss(y)] with the probabilities held fixed: its gradient is the estimator's mean gradient."""
    logp_s = token_logp(student, SEQUENCES)
    loss_per_seq = torch.stack([opd_loss(logp_s[i:i + 1], logp_s[i:i + 1].detach(),
                                         token_logp(teacher, SEQUENCES[i:i + 1]), torch.ones(1, T), 1,
                                         gamma=gamma)[0] for i in range(len(SEQUENCES))])
    return (logp_s.sum(1).exp().detach() * loss_per_seq).sum()


STUDENT, TEACHER = random_table(0), random_table(1)


def test_gamma_one_is_the_exact_gradient_of_the_kl():
    exact = grad(lambda s: exact_kl(s, TEACHER), STUDENT)
    estimator = grad(lambda s: expected_estimator(s, TEACHER, gamma=1.0), STUDENT)
    assert exact.abs().max() > 0.05  # a real gradient, not a trivially zero one
    assert torch.allclose(estimator, exact, atol=1e-10)


def test_monte_carlo_gradient_matches_within_statistical_tolerance():
    exact = grad(lambda s: exact_kl(s, TEACHER), STUDENT)
    probs = token_logp(STUDENT, SEQUENCES).sum(1).exp()
    N = 20000
    idx = torch.multinomial(probs, N, replacement=True, generator=torch.Generator().manual_seed(2))
    seqs = SEQUENCES[idx]

    def mc_loss(s):  # the sampler is the current policy: sampler_logp = pi_theta, detached
        logp_s = token_logp(s, seqs)
        return opd_loss(logp_s, logp_s.detach(), token_logp(TEACHER, seqs), torch.ones(N, T), N, gamma=1.0)[0]

    mc = grad(mc_loss, STUDENT)
    # Standard error per coordinate from the exact per-sequence gradients.
    per_seq = torch.stack([grad(lambda s: opd_loss(token_logp(s, SEQUENCES[i:i + 1]),
                                                   token_logp(s, SEQUENCES[i:i + 1]).detach(),
                                                   token_logp(TEACHER, SEQUENCES[i:i + 1]),
                                                   torch.ones(1, T), 1, gamma=1.0)[0], STUDENT)
                           for i in range(len(SEQUENCES))])  # (27, prefixes, V)
    mean = (probs[:, None, None] * per_seq).sum(0)
    std_err = ((probs[:, None, None] * (per_seq - mean) ** 2).sum(0) / N).sqrt()
    assert torch.allclose(mean, exact, atol=1e-10)
    assert ((mc - exact).abs() <= 5 * std_err + 1e-9).all()


def test_gamma_zero_is_the_per_token_gradient_and_its_bias_is_measured():
    def per_token_reference(s):  # E[sum_t grad log pi(y_t) * (log pi - log pi_T)(y_t)], written out
        logp_s, logp_t = token_logp(s, SEQUENCES), token_logp(TEACHER, SEQUENCES)
        p = logp_s.sum(1).exp().detach()
        return (p[:, None] * logp_s * (logp_s - logp_t).detach()).sum()

    estimator = grad(lambda s: expected_estimator(s, TEACHER, gamma=0.0), STUDENT)
    reference = grad(per_token_reference, STUDENT)
    exact = grad(lambda s: exact_kl(s, TEACHER), STUDENT)
    assert torch.allclose(estimator, reference, atol=1e-10)
    bias = (estimator - exact).norm() / exact.norm()
    cosine = (estimator * exact).sum() / (estimator.norm() * exact.norm())
    print(f"gamma=0 vs exact KL gradient: relative bias {bias:.3f}, cosine {cosine:.3f}")
    assert bias > 0.05  # on this example the per-token signal is visibly biased ...
    assert cosine > 0.5  # ... yet still a descent direction for the KL


def test_ratio_is_one_and_its_gradient_is_the_score_when_sampler_equals_policy():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    ids = torch.randint(0, 7, (2, 5))
    logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    _, ratio = opd_loss(logp, logp.detach(), torch.zeros(2, 5), torch.ones(2, 5), 2)
    assert torch.allclose(ratio, torch.ones(2, 5))
    ratio_grad = torch.autograd.grad(torch.exp(logp - logp.detach()).sum(), logits, retain_graph=True)[0]
    score_grad = torch.autograd.grad(logp.sum(), logits)[0]
    assert torch.allclose(ratio_grad, score_grad)


def test_loss_is_summed_over_tokens_and_averaged_over_sequences():
    student, sampler = torch.randn(3, 4), torch.randn(3, 4)
    teacher, mask = torch.randn(3, 4), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0.]])
    loss, _ = opd_loss(student, sampler, teacher, mask, num_sequences=6)
    want = sum(-math.exp(student[b, t] - sampler[b, t]) * (teacher[b, t] - sampler[b, t])
               for b in range(3) for t in range(4) if mask[b, t]).item() / 6
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # Splitting the batch into micro-batches with the global count sums to the same loss.
    parts = sum(opd_loss(student[i:i + 1], sampler[i:i + 1], teacher[i:i + 1], mask[i:i + 1], 6)[0].item()
                for i in range(3))
    assert parts == pytest.approx(loss.item(), rel=1e-5)


def test_discounting_matches_a_double_loop_and_is_remasked():
    x = torch.randn(2, 6)
    gamma = 0.7
    want = torch.tensor([[sum(gamma ** (k - t) * x[b, k] for k in range(t, 6)) for t in range(6)] for b in range(2)])
    assert torch.allclose(discounted_sum(x, gamma), want, atol=1e-6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6]).float()
    student = torch.zeros(2, 6, requires_grad=True)
    loss, _ = opd_loss(student, torch.zeros(2, 6), x, mask, 2, gamma=gamma)
    loss.backward()
    assert (student.grad[0, 3:] == 0).all()  # padding gets no gradient after discounting


def test_ratio_cap_truncates_and_stops_gradient_above_the_cap():
    student = torch.tensor([[0.0, 2.0]], requires_grad=True)  # ratios 1 and e^2 against a zero sampler
    loss, ratio = opd_loss(student, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 1, ratio_cap=2.0)
    loss.backward()
    assert torch.allclose(ratio, torch.tensor([[1.0, 2.0]]))
    assert student.grad[0, 1] == 0 and student.grad[0, 0] != 0


def direct_jsd(s_logits, t_logits, beta, tau):
    """Generalized JSD from the softmax definitions, one position at a time."""
    out = torch.zeros(s_logits.shape[:-1])
    for idx in itertools.product(*map(range, s_logits.shape[:-1])):
        ps, pt = torch.softmax(s_logits[idx] / tau, -1), torch.softmax(t_logits[idx] / tau, -1)
        m = beta * pt + (1 - beta) * ps
        kl = lambda p, q: sum(p[v] * math.log(p[v] / q[v]) for v in range(len(p)))  # noqa: E731
        if beta == 0:
            out[idx] = kl(pt, ps)
        elif beta == 1:
            out[idx] = kl(ps, pt)
        else:
            out[idx] = beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    return out


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_generalized_jsd_equals_the_softmax_definition(beta, tau):
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    assert torch.allclose(generalized_jsd(s, t, beta, tau), direct_jsd(s, t, beta, tau), atol=1e-5)


def test_gkd_endpoints_are_forward_and_reverse_kl():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    assert torch.allclose(generalized_jsd(s, t, 0.0), (lt.exp() * (lt - ls)).sum(-1), atol=1e-6)
    assert torch.allclose(generalized_jsd(s, t, 1.0), (ls.exp() * (ls - lt)).sum(-1), atol=1e-6)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert gkd_loss(s, t, mask, 2, beta=1.0) == pytest.approx(((ls.exp() * (ls - lt)).sum(-1) * mask).sum().item() / 2)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, 1.5)


def test_reverse_kl_stats_bin_by_position():
    sampler, teacher = torch.randn(2, 600), torch.randn(2, 600)
    mask = torch.ones(2, 600)
    mask[1, 300:] = 0
    total, count, bins, counts = reverse_kl_stats(sampler, teacher, mask)
    kl = (sampler - teacher) * mask
    assert torch.allclose(total, kl.sum()) and count == 900
    assert torch.allclose(bins, torch.stack([kl[:, :256].sum(), kl[:, 256:512].sum(), kl[:, 512:].sum()]), atol=1e-4)
    assert counts.tolist() == [512, 256 + 44, 88]
