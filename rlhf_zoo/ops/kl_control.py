"""KL coefficient controllers (Ziegler et al. 2019, sec. 2.2).

Adaptive: beta_{n+1} = beta_n (1 + K_beta e_n),  e_n = clip(KL_n / KL_target - 1, -0.2, 0.2), with
K_beta = n_steps / horizon, so beta moves towards keeping the measured KL near the target.
"""

from __future__ import annotations

from dataclasses import dataclass

PROPORTIONAL_ERROR_CLIP = 0.2


@dataclass
class FixedKLController:
    value: float

    def update(self, kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    value: float
    target: float
    horizon: int

    def update(self, kl: float, n_steps: int) -> float:
        error = min(max(kl / self.target - 1.0, -PROPORTIONAL_ERROR_CLIP), PROPORTIONAL_ERROR_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), int(state["horizon"])
