"""KL coefficient controllers (Ziegler et al. 2019, sec. 2.2).

Adaptive: beta_{n+1} = beta_n (1 + K_beta e_n),  e_n = clip(KL_n / KL_target - 1, -0.2, 0.2), with
K_beta = n_steps / horizon, so beta moves towards keeping the measured KL near the target.
"""

from __future__ import annotations

from dataclasses import dataclass

PROPORTIONAL_ERROR_CLIP = 0.2


@dataclass
class FixedKLController:
    """A constant KL coefficient ``value``. Controllers are checkpointable (``state_dict``)."""

    value: float

    def update(self, kl: float, n_steps: int) -> float:
        """After a rollout of ``n_steps`` episodes whose mean sequence KL was ``kl``: the coefficient for
        the next one (here unchanged)."""
        return self.value

    def state_dict(self) -> dict[str, float]:
        """The controller's state, for `rlhf_zoo.checkpoint` (JSON-able floats)."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore what `state_dict` returned."""
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """beta that moves towards keeping the mean sequence KL near ``target`` (the module's rule):
    ``value`` is the current beta, ``horizon`` the number of episodes over which it adapts."""

    value: float
    target: float
    horizon: int

    def update(self, kl: float, n_steps: int) -> float:
        """After a rollout of ``n_steps`` episodes with mean sequence KL ``kl``: update and return beta."""
        error = min(max(kl / self.target - 1.0, -PROPORTIONAL_ERROR_CLIP), PROPORTIONAL_ERROR_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        """The controller's state, for `rlhf_zoo.checkpoint`."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore what `state_dict` returned."""
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), int(state["horizon"])
