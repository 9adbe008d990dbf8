"""FedProx (Li et al., MLSys 2020): FedAvg on the server plus a proximal term on the devices."""

from __future__ import annotations

from cloud.strategies.base import check_number
from cloud.strategies.fedavg import FedAvg

__all__ = ["FedProx"]


class FedProx(FedAvg):
    """Aggregates like FedAvg and asks devices to add ``mu/2 * ||w - w_global||^2`` to the loss.

    Args:
        mu: proximal coefficient (>= 0; 0 is plain FedAvg). Sent as ``proximal_mu``.
    """

    name = "fedprox"

    def __init__(self, *, mu: float = 0.01) -> None:
        self.mu = check_number(self.name, "mu", mu, low=0.0)

    def client_config(self) -> dict:
        return {"proximal_mu": self.mu}

    def __repr__(self) -> str:
        return f"FedProx(mu={self.mu})"
