"""
Which tokens get gradient: the prefix length L_train at every step, and the token windows.

What it computes:
- Prefix schedule (paper §3 and §5.2): fixed L_train = L_0; linear L_k = min(L_0 + k * delta_L, L_max)
  after k optimizer steps (paper: L_0 = 1, delta_L = 256); full OPD is L_0 = L_max (paper: 16,384).
  Sampling stops at L_train (sample.py), so every sampled token is a prefix token.
- Token masks m[b, t] over the completion positions t = 0 .. T-1 of each rollout (paper Table 3):
  the whole sampled prefix; an ablation window a <= t < b; or the last N sampled tokens.
  loss.py multiplies the per-token terms by m, so every "which tokens count" decision lives here.

Departures from the paper: none in the formulas. The paper's linear schedule starts at L = 1; the
toy preset starts higher because its responses are ~100x shorter.
"""

import torch


def prefix_length(step: int, L_0: int, delta_L: int = 0, L_max: int | None = None) -> int:
    """L_train after `step` optimizer steps: L_0 + step * delta_L, capped at L_max."""
    if L_0 < 1:
        raise ValueError(f"L_train must be >= 1 token, got L_0 = {L_0}")
    if delta_L < 0:
        raise ValueError(f"delta_L must be >= 0, got {delta_L}")
    if L_max is not None and L_max < L_0:
        raise ValueError(f"L_max ({L_max}) must be >= L_0 ({L_0})")
    L = L_0 + step * delta_L
    return L if L_max is None else min(L, L_max)


def check_window(window: tuple[int, int] | None, last_n: int | None):
    if window is not None and last_n is not None:
        raise ValueError("choose a window [a, b) or the last N tokens, not both")
    if window is not None:
        a, b = window
        if a < 0 or a > b:
            raise ValueError(f"window [a, b) needs 0 <= a <= b, got a = {a}, b = {b}")
    if last_n is not None and last_n < 1:
        raise ValueError(f"last N tokens needs N >= 1, got {last_n}")


def token_mask(lengths: torch.Tensor, T: int, window: tuple[int, int] | None = None,
               last_n: int | None = None) -> torch.Tensor:
    """(B,) completion lengths -> (B, T) float mask of the completion positions that get gradient."""
    check_window(window, last_n)
    t = torch.arange(T, device=lengths.device)[None, :]  # (1, T) position inside the completion
    lengths = lengths[:, None]  # (B, 1)
    mask = t < lengths  # every sampled token: the prefix itself
    if window is not None:
        mask &= (t >= window[0]) & (t < window[1])
    if last_n is not None:
        mask &= t >= lengths - last_n
    return mask.float()
