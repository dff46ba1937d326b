"""klprobe.py against a naive per-token computation: one full forward of the teacher per completion
token, and plain loops over rollouts and positions."""

import types

import pytest
import torch

from conftest import tiny_qwen3
from klprobe import PositionKL, kl_by_position, position_kl
from sample import HFSampler, Rollout

EOS, PAD = 2, 0
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]


def naive_teacher_logp(teacher, prompt, completion):
    """log pi_T(y_t | x, y_<t) for every t, each from its own forward over the unpadded prefix."""
    out = []
    with torch.no_grad():
        for t, token in enumerate(completion):
            logits = teacher(input_ids=torch.tensor([prompt + completion[:t]])).logits[0, -1].double()
            out.append((logits.log_softmax(-1)[token]).item())
    return out


def naive_position_sums(rollouts, teacher, T):
    sums, counts = [0.0] * T, [0] * T
    for r in rollouts:
        for t, (q, p) in enumerate(zip(r.sampler_logp, naive_teacher_logp(teacher, r.prompt_ids, r.completion_ids))):
            sums[t] += q - p
            counts[t] += 1
    return sums, counts


def naive_bins(sums, counts, bin_size):
    means, totals = [], []
    for a in range(0, len(sums), bin_size):
        s, c = sum(sums[a:a + bin_size]), sum(counts[a:a + bin_size])
        means.append(s / c if c else None)
        totals.append(c)
    return means, totals


class FixedSampler:
    """Returns the same rollouts whatever it is asked, and records what it was asked."""

    def __init__(self, rollouts):
        self.rollouts, self.calls = rollouts, []

    def generate(self, prompts, n, max_new_tokens, seed, prompt_indices=None):
        self.calls.append((prompts, n, max_new_tokens, seed, prompt_indices))
        return self.rollouts


@pytest.fixture(scope="module")
def models():
    student, teacher = tiny_qwen3(seed=0), tiny_qwen3(seed=1)
    with torch.no_grad():  # make EOS likely, so that rollouts end at different lengths
        student.lm_head.weight[EOS] = 0.25 * student.lm_head.weight[20] + 0.02
    return student, teacher


def test_position_kl_is_the_per_position_sum_over_rollouts_that_reach_it():
    torch.manual_seed(0)
    lengths = [0, 1, 5, 7, 7, 3]
    q, p = torch.randn(6, 7, dtype=torch.float64), torch.randn(6, 7, dtype=torch.float64)
    got = position_kl(q, p, torch.tensor(lengths), T=10)
    for t in range(10):
        reach = [b for b, n in enumerate(lengths) if t < n]
        assert got.counts[t] == len(reach)
        assert got.sums[t].item() == pytest.approx(sum((q[b, t] - p[b, t]).item() for b in reach), abs=1e-9)
    means, counts = got.bins(3)
    assert counts == [sum(n > t for n in lengths for t in range(a, min(a + 3, 10))) for a in range(0, 10, 3)]
    assert means[-1] is None and got.mean(7, 10) is None  # no rollout reaches position 7
    assert got.mean(2, 5) == pytest.approx(got.sums[2:5].sum().item() / got.counts[2:5].sum().item())


def test_kl_by_position_equals_a_naive_per_token_computation(models):
    student, teacher = models
    tokenizer = types.SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD, chat_template=None, get_vocab=dict)  # no turns
    sampler = HFSampler(student, tokenizer)
    T = 24
    rollouts = sampler.generate(PROMPTS, 3, T, seed=5, prompt_indices=[40, 41, 42, 43])
    lengths = {len(r.completion_ids) for r in rollouts}
    assert T in lengths and min(lengths) < T  # full-length and EOS-stopped rollouts both occur
    sums, counts = naive_position_sums(rollouts, teacher, T)
    for batch_size in (1, 5, 64):  # padding and batching do not change the result
        fixed = FixedSampler(rollouts)
        got = kl_by_position(fixed, teacher, PROMPTS, T, 5, n=3, prompt_indices=[40, 41, 42, 43],
                             pad_token_id=PAD, batch_size=batch_size)
        assert fixed.calls == [(PROMPTS, 3, T, 5, [40, 41, 42, 43])]  # full length: max_new_tokens, not L_train
        assert got.counts.tolist() == counts
        assert torch.allclose(got.sums, torch.tensor(sums, dtype=torch.float64), atol=1e-4)
        for bin_size in (1, 4, 7):
            means, totals = got.bins(bin_size)
            ref_means, ref_totals = naive_bins(sums, counts, bin_size)
            assert totals == ref_totals
            assert means == pytest.approx(ref_means, abs=1e-5)
    # the probe run for real samples those very rollouts (same seed and indices: sample.py's seeding)
    direct = kl_by_position(sampler, teacher, PROMPTS, T, 5, n=3, prompt_indices=[40, 41, 42, 43],
                            pad_token_id=PAD, batch_size=8)
    assert direct.counts.tolist() == counts and torch.allclose(direct.sums, got.sums, atol=1e-6)


def test_empty_completions_are_skipped_and_mean_covers_any_range(models):
    _, teacher = models
    rollouts = [Rollout([5, 6], [], [], True, 0),
                Rollout([5, 6, 7], [8, 9, 10], [-1.0, -2.0, -0.5], True, 1),
                Rollout([11], [12, EOS], [-3.0, -0.1], False, 2)]
    got = kl_by_position(FixedSampler(rollouts), teacher, [[5, 6], [5, 6, 7], [11]], 4, 0,
                         pad_token_id=PAD, batch_size=2)
    sums, counts = naive_position_sums(rollouts, teacher, 4)
    assert got.counts.tolist() == counts == [2, 2, 1, 0]
    assert torch.allclose(got.sums, torch.tensor(sums, dtype=torch.float64), atol=1e-5)
    assert got.mean(0, 2) == pytest.approx(sum(sums[:2]) / 4, abs=1e-5)
    assert got.mean(1, 4) == pytest.approx(sum(sums[1:]) / 3, abs=1e-5)
    assert isinstance(got, PositionKL)


def test_probe_set_takes_prompts_no_step_trains_on_while_enough_are_left():
    from klprobe import ProbeSet
    prompts = [[i] for i in range(20)]
    trained = set(range(0, 20, 2))  # the even ones
    held_out = ProbeSet(prompts, 6, 0, 0, 1, 8, 1, trained=trained)
    assert len(held_out.mine) == 6 and not set(held_out.mine) & trained
    topped_up = ProbeSet(prompts, 14, 0, 0, 1, 8, 1, trained=trained)  # only 10 untrained: 4 trained ones added
    assert set(range(1, 20, 2)) <= set(topped_up.mine) and len(set(topped_up.mine)) == 14
    ranks = [ProbeSet(prompts, 6, 0, r, 2, 8, 1, trained=trained).mine for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(held_out.mine)  # the ranks split the same set
