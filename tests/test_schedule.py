"""schedule.py against direct loops over positions."""

import pytest
import torch

from schedule import prefix_length, token_mask


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
