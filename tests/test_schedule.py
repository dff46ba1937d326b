"""schedule.py against direct loops over positions; the adaptive prefix on synthetic KL curves and
against a reference that recomputes the rule from the whole history at every step."""

import json
import random

import pytest
import torch

from schedule import AdaptivePrefix, prefix_length, token_mask


def test_linear_schedule_grows_by_delta_and_caps():
    assert [prefix_length(k, 1, 256, 16384) for k in range(4)] == [1, 257, 513, 769]
    assert prefix_length(100, 1, 256, 16384) == 16384
    assert prefix_length(7, 1024) == 1024  # fixed prefix
    assert prefix_length(0, 16384, 0, 16384) == 16384  # full OPD


@pytest.mark.parametrize("bad, match", [(dict(L_0=0), "L_train must be >= 1"), (dict(L_0=1, delta_L=-1), "delta_L"),
                                        (dict(L_0=10, L_max=5), "L_max")])
def test_bad_schedules_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        prefix_length(0, **bad)


def naive_mask(lengths, T, window=None, last_n=None):
    m = torch.zeros(len(lengths), T)
    for b, n in enumerate(lengths):
        for t in range(T):
            keep = t < n
            if window is not None:
                keep = keep and window[0] <= t < window[1]
            if last_n is not None:
                keep = keep and t >= n - last_n
            m[b, t] = float(keep)
    return m


@pytest.mark.parametrize("window, last_n", [(None, None), ((0, 3), None), ((2, 6), None), ((5, 5), None),
                                            (None, 1), (None, 4), (None, 20)])
def test_masks_match_a_loop_over_positions(window, last_n):
    lengths = [0, 1, 4, 7, 9]
    got = token_mask(torch.tensor(lengths), 9, window=window, last_n=last_n)
    assert torch.equal(got, naive_mask(lengths, 9, window, last_n))


@pytest.mark.parametrize("kwargs, match", [(dict(window=(5, 2)), "a <= b"), (dict(window=(-1, 2)), "a <= b"),
                                           (dict(last_n=0), "N >= 1"), (dict(window=(0, 2), last_n=1), "not both")])
def test_bad_windows_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        token_mask(torch.tensor([3]), 4, **kwargs)


# ----------------------------------------------------------------------------- the adaptive prefix

RULE = dict(min_steps=2, window=3, min_rel_decrease=0.05, kl_ratio=1.0)


def run(kls, probes=None, L_0=64, delta_L=32, L_max=192, **rule):
    """L_train at every step (read before the step's update) and the growth reasons."""
    schedule = AdaptivePrefix(L_0, delta_L, L_max, **(RULE | rule))
    Ls, reasons = [], []
    for k, kl in enumerate(kls):
        Ls.append(schedule.L)
        inside, beyond = (probes or {}).get(k, (None, None))
        reasons.append(schedule.update(kl, inside, beyond))
    return Ls, reasons, schedule


def test_no_growth_while_the_prefix_kl_keeps_falling():
    kls = [0.8 ** k for k in range(60)]  # each window of 3 steps is 49% below the one before: far from a plateau
    Ls, reasons, _ = run(kls)
    assert set(Ls) == {64} and reasons == [None] * 60


def test_a_flat_kl_grows_every_two_windows_up_to_L_max():
    w, kls = RULE["window"], [0.3] * 40
    Ls, reasons, schedule = run(kls)
    # the history restarts at each growth, so a flat curve plateaus again after 2w more steps
    assert Ls == [min(64 + (k // (2 * w)) * 32, 192) for k in range(40)]
    assert [g["step"] for g in schedule.growths] == [2 * w, 4 * w, 6 * w, 8 * w]  # 64 -> 96 -> 128 -> 160 -> 192
    assert [g["L"] for g in schedule.growths] == [96, 128, 160, 192] and schedule.L == 192
    assert {g["reason"] for g in schedule.growths} == {"plateau"}


@pytest.mark.parametrize("decrease, grows", [(0.04, True), (0.06, False)])
def test_plateau_threshold_on_the_relative_decrease_between_windows(decrease, grows):
    """KL_k = c^k with c^w = 1 - decrease: each window's mean is exactly (1 - decrease) times the last."""
    w = RULE["window"]
    c = (1 - decrease) ** (1 / w)
    Ls, reasons, _ = run([c ** k for k in range(2 * w)])
    assert (reasons[-1] == "plateau") == grows and reasons[:-1] == [None] * (2 * w - 1)


def test_grows_when_the_probe_finds_less_kl_inside_the_prefix_than_just_beyond():
    kls = [0.8 ** k for k in range(12)]  # never a plateau: only the probe can grow the prefix
    # step 0: condition holds but only 1 step at L (min_steps 2); step 3: holds; step 4 (new L): only 1 step;
    # step 7: inside > beyond, no growth; step 9: holds with kl_ratio 1
    probes = {0: (0.1, 0.5), 3: (0.2, 0.3), 4: (0.1, 0.9), 7: (0.4, 0.3), 9: (0.3, 0.3)}
    Ls, reasons, schedule = run(kls, probes)
    assert [k for k, r in enumerate(reasons) if r] == [3, 9] and set(reasons) == {None, "beyond"}
    assert Ls == [64] * 4 + [96] * 6 + [128] * 2
    _, reasons, _ = run(kls, probes, kl_ratio=0.5)  # inside at most half of beyond: only step 4's probe
    assert [k for k, r in enumerate(reasons) if r] == [4]
    _, reasons, _ = run(kls, {3: (0.2, None)})  # no probe rollout reached past L: no comparison
    assert reasons == [None] * 12


def reference_L(kls, probes, L_0, delta_L, L_max, min_steps, window, min_rel_decrease, kl_ratio):
    """The rule read off the module docstring, recomputed from the whole history at every step."""
    Ls, L, since = [], L_0, 0  # since: index of the first step trained at the current L
    for k in range(len(kls)):
        Ls.append(L)
        at_L = kls[since:k + 1]
        inside, beyond = probes.get(k, (None, None))
        learnt = inside is not None and beyond is not None and inside <= kl_ratio * beyond
        plateau = len(at_L) >= 2 * window and \
            (sum(at_L[-2 * window:-window]) - sum(at_L[-window:])) / sum(at_L[-2 * window:-window]) < min_rel_decrease
        if L < L_max and len(at_L) >= min_steps and (learnt or plateau):
            L, since = min(L + delta_L, L_max), k + 1
    return Ls


@pytest.mark.parametrize("seed", range(5))
def test_matches_the_rule_recomputed_from_the_whole_history(seed):
    rng = random.Random(seed)
    kls, kl = [], 1.0
    for _ in range(80):  # noisy decay with flat stretches
        kl *= rng.choice([0.9, 0.97, 1.0, 1.02])
        kls.append(kl)
    probes = {k: (rng.uniform(0, 1), rng.uniform(0, 1)) for k in range(0, 80, 5)}
    rule = dict(min_steps=rng.randint(1, 4), window=rng.randint(1, 4), min_rel_decrease=0.05,
                kl_ratio=rng.choice([0.5, 1.0]))
    Ls, _, _ = run(kls, probes, L_0=16, delta_L=8, L_max=96, **rule)
    assert Ls == reference_L(kls, probes, 16, 8, 96, **rule)
    assert len(set(Ls)) > 2  # the run did grow, several times


def test_resumes_identically_from_its_state_dict():
    rng = random.Random(0)
    kls = [max(0.05, 1.0 - 0.02 * k + rng.uniform(-0.05, 0.05)) for k in range(50)]
    probes = {k: (rng.uniform(0, 1), rng.uniform(0, 1)) for k in range(0, 50, 4)}
    Ls, reasons, whole = run(kls, probes, L_max=1024)
    first = AdaptivePrefix(64, 32, 1024, **RULE)
    for k in range(23):
        first.update(kls[k], *probes.get(k, (None, None)))
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    resumed = AdaptivePrefix(64, 32, 1024, **RULE)
    resumed.load_state_dict(state)
    rest = []
    for k in range(23, 50):
        rest.append(resumed.L)
        resumed.update(kls[k], *probes.get(k, (None, None)))
    assert rest == Ls[23:] and resumed.state_dict() == whole.state_dict()
    assert any(g["step"] > 23 for g in whole.growths)  # the resumed part did grow


@pytest.mark.parametrize("args, match", [((64, 0, 128), "delta_L >= 1"), ((64, 32, 32), "L_max"),
                                         ((0, 32, 128), "L_train must be >= 1")])
def test_bad_adaptive_schedules_are_rejected(args, match):
    with pytest.raises(ValueError, match=match):
        AdaptivePrefix(*args, **RULE)
    with pytest.raises(ValueError, match="window"):
        AdaptivePrefix(64, 32, 128, **(RULE | dict(window=0)))
