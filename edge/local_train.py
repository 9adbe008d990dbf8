"""Local training on a device: loads the global parameters, trains E epochs, returns the new ones.

Training needs torch (and Opacus for sample-level DP), imported here on first use only, so an
inference-only device never pays for it. One ``LocalTrainer`` lives per device for the whole run:
with DP-SGD its privacy accountant must persist across rounds (Opacus issues #608/#433/#688).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

Params = dict[str, np.ndarray]


class LocalTrainer:
    """Trains one device's copy of the model on the device's own data.

    Args:
        model_ref: zoo name or ``path/file.py:factory`` of the model (as in the run announcement).
        x: local inputs, float32 (N, C, H, W).
        y: local labels, int64 (N,).
        seed: seeds torch for this device, so a simulation is reproducible.
        ledger_path: where the DP-SGD privacy ledger persists (JSON). A device that restarts
            continues its ledger instead of spending its whole budget again; None keeps it in
            memory only.
    """

    def __init__(
        self,
        *,
        model_ref: str,
        x: np.ndarray,
        y: np.ndarray,
        seed: int,
        ledger_path: str | Path | None = None,
    ) -> None:
        import torch

        from split.zoo import build_model

        self._torch = torch
        self.model_ref = model_ref
        self.model, self.spec = build_model(model_ref, seed=seed)
        self.x, self.y = x, y
        self.seed = seed
        self._dp = None  # split.privacy.dpsgd.DPTrainer, created on the first DP round
        self._round = 0
        self.ledger_path = Path(ledger_path) if ledger_path is not None else None

    def _load(self, params: Params) -> None:
        torch = self._torch
        state = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in params.items()}
        self.model.load_state_dict(state, strict=True)

    def _params(self) -> Params:
        state = self._dp.state_dict() if self._dp is not None else self.model.state_dict()
        return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}

    def fit(self, params: Params, config: dict) -> tuple[Params, dict]:
        """Runs one round of local training from ``params``; returns (new params, metrics).

        ``config`` keys: epochs, batch_size, lr, momentum, proximal_mu, and for sample-level DP
        ``dp`` ("sample"), noise_multiplier or target_epsilon, delta, clip, rounds.
        """
        # Seeded by the round number the cloud sent, so a resumed run trains identically.
        self._round = int(config.get("round", self._round + 1))
        seed = self.seed * 100_003 + self._round
        if config.get("dp") == "sample":
            return self._fit_dp(params, config, seed)
        from split.train import train_epochs

        self._load(params)
        mu = float(config.get("proximal_mu", 0.0))
        metrics = train_epochs(
            self.model,
            self.x,
            self.y,
            epochs=int(config["epochs"]),
            batch_size=int(config["batch_size"]),
            lr=float(config["lr"]),
            seed=seed,
            momentum=float(config.get("momentum", 0.0)),
            proximal_mu=mu,
            global_params=params if mu > 0 else None,
        )
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["samples"] = len(self.y)
        return self._params(), metrics

    def _fit_dp(self, params: Params, config: dict, seed: int) -> tuple[Params, dict]:
        from split.privacy.budget import DPConfig
        from split.privacy.dpsgd import DPTrainer

        if self._dp is None:
            dp_config = DPConfig(
                mode="sample",
                noise_multiplier=config.get("noise_multiplier"),
                target_epsilon=config.get("target_epsilon"),
                delta=float(config["delta"]),
                max_grad_norm=float(config["clip"]),
            )
            self._dp = DPTrainer(
                self.model,
                config=dp_config,
                sample_size=len(self.y),
                batch_size=int(config["batch_size"]),
                lr=float(config["lr"]),
                epochs_per_round=int(config["epochs"]),
                rounds=int(config["rounds"]),
                seed=seed,
                # Plain DP-SGD on devices: the run's momentum (0.9 by default) is tuned for
                # non-private SGD and makes noised local steps diverge.
            )
            if self.ledger_path is not None and self.ledger_path.exists():
                self._dp.load_ledger_state(json.loads(self.ledger_path.read_text()))
        self._dp.load_state(
            {k: self._torch.from_numpy(np.array(v, copy=True)) for k, v in params.items()}
        )
        metrics = dict(self._dp.train_round(self.x, self.y))
        self._save_ledger()
        # The mean loss on private records is not covered by the accountant: never send it.
        metrics.pop("loss", None)
        metrics["samples"] = len(self.y)
        return self._params(), metrics

    def _save_ledger(self) -> None:
        if self.ledger_path is None:
            return
        self.ledger_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.ledger_path.with_name(self.ledger_path.name + ".tmp")
        tmp.write_text(json.dumps(self._dp.ledger_state()))
        os.replace(tmp, self.ledger_path)
