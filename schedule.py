"""
Which tokens get gradient: the prefix length L_train at every step, and the token windows.

What it computes:
- Prefix schedule (paper §3 and §5.2): fixed L_train = L_0; linear L_k = min(L_0 + k * delta_L, L_max)
  after k optimizer steps (paper: L_0 = 1, delta_L = 256); full OPD is L_0 = L_max (paper: 16,384).
  Sampling stops at L_train (sample.py), so every sampled token is a prefix token.
- Token masks m[b, t] over the completion positions t = 0 .. T-1 of each rollout (paper Table 3):
  the whole sampled prefix; an ablation window a <= t < b; or the last N sampled tokens.
  loss.py multiplies the per-token terms by m, so every "which tokens count" decision lives here.
- Adaptive prefix (`AdaptivePrefix`; the paper leaves as future work a curriculum "based on
  validation performance or KL/entropy signals"). L starts at L_0 and, after a step that leaves at
  least `min_steps` steps trained at the current L, grows to min(L + delta_L, L_max) when either
      (a) the prefix is learnt relative to what follows it: a full-length probe (klprobe.py) finds
          KL_in <= kl_ratio * KL_beyond, the mean per-token reverse KL over positions [0, L) and over
          the next delta_L positions [L, L + delta_L) of the student's full rollouts; or
      (b) the in-prefix KL has plateaued: over the last 2 * window steps at this L, the mean training
          reverse KL (every token trained is inside the prefix) of the newer `window` steps is more
          than (1 - min_rel_decrease) times that of the older `window` steps.
  Why these two: (a) moves the prefix to where the student is now furthest from the teacher; with
  kl_ratio = 1 that is "the tokens just past the prefix have more KL than the prefix itself". But
  prefix training also lowers the KL beyond the prefix (paper §4), and when it
  lowers it as fast as inside, (a) never fires: (b) then grows the prefix once training stops
  paying at this length. The KL history starts afresh at every growth: a longer prefix averages
  over other positions, so its KL is not comparable with the shorter one's. (b) reads the training
  metric and costs nothing; (a) needs the probe, whose sampling and scoring are evaluation cost.

Departures from the paper: none in the formulas. The paper's linear schedule starts at L = 1; the
toy preset starts higher because its responses are ~100x shorter. The adaptive schedule is not in
the paper.
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


class AdaptivePrefix:
    """L_train grown by the KL signals of the module docstring; holds L and the KL history at this L.

    Defaults (train.py's): grow after a plateau of two 2-step windows whose KL fell by < 5%, or when
    the probe's KL inside the prefix is no higher than beyond it. Each step: read `.L`, train at it, then call `update` with the step's training reverse KL and, on
    the steps that run the probe, the probe's mean KL over [0, L) and over `beyond()`, both taken
    with the L the step trained at (before `update` may grow it)."""

    def __init__(self, L_0: int, delta_L: int, L_max: int, *, min_steps: int = 2, window: int = 2,
                 min_rel_decrease: float = 0.05, kl_ratio: float = 1.0):
        prefix_length(0, L_0, delta_L, L_max)  # the same checks as the linear schedule
        if delta_L < 1:
            raise ValueError(f"the adaptive schedule grows by delta_L >= 1 tokens, got {delta_L}")
        if min_steps < 1 or window < 1:
            raise ValueError(f"min_steps and window must be >= 1 step, got {min_steps} and {window}")
        if not 0 <= min_rel_decrease < 1 or kl_ratio <= 0:
            raise ValueError(f"need 0 <= min_rel_decrease < 1 and kl_ratio > 0, got {min_rel_decrease}, {kl_ratio}")
        self.delta_L, self.L_max, self.min_steps, self.window = delta_L, L_max, min_steps, window
        self.min_rel_decrease, self.kl_ratio = min_rel_decrease, kl_ratio
        self.L = L_0
        self.step = 0  # updates so far = optimizer steps taken
        self.kl_at_L: list[float] = []  # training reverse KL of every step at the current L, oldest first
        self.growths: list[dict] = []  # {"step", "L", "reason"} for each growth: the schedule's own log

    def beyond(self) -> tuple[int, int]:
        """The positions [L, L + delta_L) whose probe KL rule (a) compares with the prefix's."""
        return self.L, self.L + self.delta_L

    def update(self, kl_prefix: float, kl_inside: float | None = None, kl_beyond: float | None = None) -> str | None:
        """Record one trained step; grow L when a rule fires. Returns "beyond" (a), "plateau" (b) or None.

        kl_prefix: the step's mean per-token reverse KL on its rollouts (train.py's `reverse_kl`).
        kl_inside, kl_beyond: the probe's mean over [0, L) and over `beyond()`, on probe steps only
        (None when not probed, or when no probe rollout reached past L)."""
        self.step += 1
        self.kl_at_L.append(float(kl_prefix))
        reason = None
        if self.L < self.L_max and len(self.kl_at_L) >= self.min_steps:
            if kl_inside is not None and kl_beyond is not None and kl_inside <= self.kl_ratio * kl_beyond:
                reason = "beyond"
            elif len(self.kl_at_L) >= 2 * self.window:
                older = sum(self.kl_at_L[-2 * self.window:-self.window]) / self.window
                newer = sum(self.kl_at_L[-self.window:]) / self.window
                if newer > (1 - self.min_rel_decrease) * older:  # fell by less than min_rel_decrease
                    reason = "plateau"
        if reason is not None:
            self.L = min(self.L + self.delta_L, self.L_max)
            self.kl_at_L = []  # a longer prefix averages other positions: start its history afresh
            self.growths.append({"step": self.step, "L": self.L, "reason": reason})
        return reason

    def state_dict(self) -> dict:
        """Everything `update` reads (JSON-serialisable), for checkpoints: a resumed run grows identically."""
        return {"L": self.L, "step": self.step, "kl_at_L": list(self.kl_at_L),
                "growths": [dict(g) for g in self.growths]}

    def load_state_dict(self, state: dict) -> None:
        if not 1 <= state["L"] <= self.L_max:
            raise ValueError(f"checkpointed L_train {state['L']} is outside [1, L_max = {self.L_max}]")
        self.L, self.step = state["L"], state["step"]
        self.kl_at_L, self.growths = list(state["kl_at_L"]), [dict(g) for g in state["growths"]]
