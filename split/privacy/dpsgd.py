"""Sample-level DP-SGD on a device: one privatized model, optimizer and ledger per device."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from split.errors import PrivacyBudgetExceededError, PrivacyConfigError
from split.privacy.budget import DPConfig, PrivacyLedger, check_delta, noise_for_target


def _problems(model: nn.Module) -> list[str]:
    """Every reason Opacus cannot privatize ``model``, one entry per offending module."""
    found = []
    for name, module in trainable_modules(model):
        label = f"{name or '<root>'} ({type(module).__name__})"
        validator = ModuleValidator.VALIDATORS.get(type(module))
        errors = [str(err) for err in validator(module)] if validator else []
        # Buffers of a trainable layer (e.g. running statistics) would be updated without
        # noise; Opacus' GradSampleModule refuses them too.
        if not errors and any(True for _ in module.buffers(recurse=False)):
            errors.append("has non-private buffers")
        found.extend(f"{label}: {err}" for err in errors)
    return found


def fix_model(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Return a DP-compatible copy of ``model`` and a report of replaced modules.

    The cloud should build its global model with the same function so device and cloud share
    one architecture (e.g. GroupNorm where the original had BatchNorm).

    Args:
        model: Any ``nn.Module``; it is not modified.

    Returns:
        ``(fixed_copy, report)`` where report lines read ``"BatchNorm2d(1) -> GroupNorm"``.

    Raises:
        PrivacyConfigError: The fixed model still has modules Opacus cannot privatize; the
            message lists all of them.
    """
    original = copy.deepcopy(model).train()
    fixed = ModuleValidator.fix(original) if not ModuleValidator.is_valid(original) else original
    fixed.train()
    report = []
    new_modules = dict(fixed.named_modules())
    for name, old in original.named_modules():
        new = new_modules.get(name)
        if new is not None and type(new) is not type(old):
            report.append(f"{type(old).__name__}({name or '<root>'}) -> {type(new).__name__}")
    problems = _problems(fixed)
    if problems:
        raise PrivacyConfigError(
            "model cannot be privatized by Opacus even after ModuleValidator.fix; offending "
            f"modules: {'; '.join(problems)}"
        )
    return fixed, report


class _RoundData(Dataset):
    """Fixed-size dataset whose contents are swapped each round.

    The DP data loader (Poisson sampler, sample rate) is built once for N records; only the
    tensors behind the indices change between rounds.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]

    def __getitems__(self, indices: list[int]) -> list:
        # One fancy-indexing gather per batch instead of N item fetches + stacking. An empty
        # list tells Opacus' collate wrapper the Poisson batch is empty.
        if not indices:
            return []
        idx = torch.as_tensor(indices, dtype=torch.long)
        return [(self.x[idx], self.y[idx])]


def _take_batch(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate for ``_RoundData.__getitems__``: the batch is already gathered."""
    return batch[0]


class DPTrainer:
    """A device's local DP-SGD trainer that persists across federated rounds.

    The model is privatized once (Opacus issues #608/#433: wrapping it again each round
    stacks hooks and ``_module.`` prefixes); each round loads the new global weights into the
    wrapped module with ``load_state`` and trains with Poisson sampling. The Opacus accountant
    lives in a ``PrivacyLedger`` and keeps counting across rounds (issue #688).

    Args:
        model: The model to train (copied, fixed with ``fix_model``; see ``fix_report``).
        config: ``DPConfig`` with ``mode="sample"``.
        sample_size: Number of local records N (fixed: the sample rate depends on it).
        batch_size: Expected batch size; sample rate is ``1 / ceil(N / batch_size)`` (as Opacus).
        lr: SGD learning rate.
        epochs_per_round: Local epochs per ``train_round``.
        rounds: Planned rounds; required with ``target_epsilon`` (the noise is calibrated for
            ``rounds * epochs_per_round * steps_per_epoch`` steps).
        seed: Seeds Poisson sampling and the Gaussian noise.

    Raises:
        PrivacyConfigError: Bad configuration, delta >= 1/N, infeasible target, or a model
            Opacus cannot privatize.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        config: DPConfig,
        sample_size: int,
        batch_size: int,
        lr: float,
        epochs_per_round: int,
        rounds: int | None,
        seed: int,
        momentum: float = 0.0,
    ) -> None:
        if not (0.0 <= momentum < 1.0):
            raise PrivacyConfigError(f"momentum must be in [0, 1), got {momentum}")
        if config.mode != "sample":
            raise PrivacyConfigError(f"DPTrainer needs config.mode='sample', got {config.mode!r}")
        for name, value in (
            ("sample_size", sample_size),
            ("batch_size", batch_size),
            ("epochs_per_round", epochs_per_round),
        ):
            if not isinstance(value, int) or value < 1:
                raise PrivacyConfigError(f"{name} must be a positive int, got {value}")
        if batch_size > sample_size:
            raise PrivacyConfigError(
                f"batch_size must be <= sample_size={sample_size}, got {batch_size}"
            )
        if not lr > 0:
            raise PrivacyConfigError(f"lr must be > 0, got {lr}")
        if rounds is not None and (not isinstance(rounds, int) or rounds < 1):
            raise PrivacyConfigError(f"rounds must be a positive int or None, got {rounds}")
        check_delta(config.delta, sample_size)
        self.config = config
        self.sample_size = sample_size
        self.epochs_per_round = epochs_per_round
        # Opacus derives the sample rate as 1 / len(data_loader) and its Poisson sampler runs
        # int(1 / sample_rate) batches per epoch, which float rounding can make one less than
        # len(data_loader) (e.g. 92 for 93); mirror both so budgets are planned exactly.
        self.sample_rate = 1.0 / math.ceil(sample_size / batch_size)
        self.steps_per_epoch = int(1 / self.sample_rate)
        self.target_epsilon = config.target_epsilon
        if config.target_epsilon is not None:
            if rounds is None:
                raise PrivacyConfigError(
                    "rounds must be set when target_epsilon is given (noise is calibrated "
                    "for the planned steps), got rounds=None"
                )
            self.noise_multiplier = noise_for_target(
                target_epsilon=config.target_epsilon,
                delta=config.delta,
                sample_rate=self.sample_rate,
                steps=rounds * epochs_per_round * self.steps_per_epoch,
                accountant=config.accountant,
            )
        else:
            self.noise_multiplier = float(config.noise_multiplier)

        self._fixed, self.fix_report = fix_model(model)
        self.ledger = PrivacyLedger(accountant=config.accountant, delta=config.delta)
        self._seeds = [int(v) for v in np.random.SeedSequence(seed).generate_state(2)]
        self._batch_size = batch_size
        self._lr = lr
        # Momentum post-processes the already privatized gradients: no privacy cost.
        self._momentum = float(momentum)
        self._data = _RoundData(sample_size)
        self._criterion = nn.CrossEntropyLoss()
        # Privatized on the first round: Opacus' data loader needs a sample's shape.
        self._module: nn.Module | None = None
        self._optimizer = None
        self._loader = None

    def _privatize(self) -> None:
        loader = DataLoader(
            self._data,
            batch_size=self._batch_size,
            collate_fn=_take_batch,
            generator=torch.Generator().manual_seed(self._seeds[0]),
        )
        with warnings.catch_warnings():
            # Opacus warns that secure_mode is off; seeded noise is what reproducibility needs.
            warnings.simplefilter("ignore", UserWarning)
            engine = PrivacyEngine(accountant=self.config.accountant)
            # The ledger's accountant becomes the engine's: the optimizer hook steps the ledger.
            engine.accountant = self.ledger.accountant
            self._module, self._optimizer, self._loader = engine.make_private(
                module=self._fixed,
                optimizer=torch.optim.SGD(
                    self._fixed.parameters(), lr=self._lr, momentum=self._momentum
                ),
                data_loader=loader,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.config.max_grad_norm,
                poisson_sampling=True,
                noise_generator=torch.Generator().manual_seed(self._seeds[1]),
            )
        if len(self._loader) != self.steps_per_epoch:
            raise PrivacyConfigError(
                f"Opacus data loader has {len(self._loader)} steps per epoch, expected "
                f"steps_per_epoch={self.steps_per_epoch}"
            )

    @property
    def model(self) -> nn.Module:
        """The fixed, unwrapped model (shares parameters with the privatized one)."""
        # GradSampleModule wraps the fixed model without copying it: parameters are shared.
        return self._fixed

    def load_state(self, state_dict: dict) -> None:
        """Load a standard (unprefixed) state dict, e.g. the new global model of a round.

        Values may be torch tensors or NumPy arrays. Parameters are copied in place, so the
        DP optimizer and hooks stay attached.

        Raises:
            PrivacyConfigError: Keys differ from the (fixed) model's keys.
        """
        expected = set(self.model.state_dict())
        got = set(state_dict)
        if got != expected:
            raise PrivacyConfigError(
                f"state_dict keys must match the privatized model; missing: "
                f"{sorted(expected - got)}, unexpected: {sorted(got - expected)}"
            )
        tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()}
        self.model.load_state_dict(tensors, strict=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Standard state dict (detached copies): same keys as the fixed model, no prefix."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def epsilon(self) -> float:
        """Epsilon spent so far on this device's data, at ``config.delta``."""
        return self.ledger.epsilon()

    def ledger_state(self) -> dict:
        """JSON-able privacy ledger state for checkpoints."""
        return self.ledger.state_dict()

    def load_ledger_state(self, state: dict) -> None:
        """Restore a ledger state saved with ``ledger_state`` (e.g. after a device restart)."""
        self.ledger.load_state_dict(state)

    def train_round(self, x: np.ndarray, y: np.ndarray) -> dict:
        """Run ``epochs_per_round`` local epochs of DP-SGD on ``(x, y)``.

        Args:
            x: Inputs, shape ``(sample_size, ...)``, float.
            y: Integer class labels, shape ``(sample_size,)``.

        Returns:
            ``{"loss", "epsilon", "steps", "samples"}``: mean training loss over the round,
            epsilon after the round, optimizer steps and sampled records in this round.

        Raises:
            PrivacyBudgetExceededError: With a ``target_epsilon``, before any step of a round
                that would end above it; the model and ledger are left untouched.
            PrivacyConfigError: ``x``/``y`` do not have ``sample_size`` rows.
        """
        if len(x) != self.sample_size or len(y) != self.sample_size:
            raise PrivacyConfigError(
                f"x and y must have sample_size={self.sample_size} rows (the sample rate is "
                f"fixed), got len(x)={len(x)}, len(y)={len(y)}"
            )
        steps = self.epochs_per_round * self.steps_per_epoch
        if self.target_epsilon is not None:
            after = self.ledger.epsilon_after(
                noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=steps
            )
            if after > self.target_epsilon:
                raise PrivacyBudgetExceededError(
                    f"epsilon would reach {after:.4g} > target_epsilon={self.target_epsilon} "
                    f"after this round ({steps} steps, now {self.epsilon():.4g}); stop training "
                    "or start a new budget"
                )
        self._data.x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        self._data.y = torch.as_tensor(np.asarray(y, dtype=np.int64))
        if self._module is None:
            self._privatize()
        self._module.train()
        total_loss, samples, done = 0.0, 0, 0
        with warnings.catch_warnings():
            # Opacus' hooks fire on the first layer even though inputs need no gradient.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(self.epochs_per_round):
                total_loss, samples, done = self._epoch(total_loss, samples, done)
        # Drop per-sample gradients now: they are batch-sized copies of every weight.
        self._optimizer.zero_grad(set_to_none=True)
        return {
            "loss": total_loss / max(samples, 1),
            "epsilon": self.epsilon(),
            "steps": done,
            "samples": samples,
        }

    def _epoch(self, total_loss: float, samples: int, done: int) -> tuple[float, int, int]:
        for xb, yb in self._loader:
            self._optimizer.zero_grad(set_to_none=True)
            loss = self._criterion(self._module(xb), yb)
            loss.backward()
            self._optimizer.step()
            # An empty Poisson batch still takes a (noise-only) step; its mean loss is NaN.
            if len(yb):
                total_loss += float(loss.detach()) * len(yb)
            samples += len(yb)
            done += 1
        return total_loss, samples, done
