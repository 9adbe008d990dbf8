"""Sample-level DP for U-shaped split learning: DP-SGD on the device's halves and noised steps.

In U-shaped split learning a device releases three things that depend on one training
sample ``(x, y)``, every time the sample is in a batch:

1. its cut activation (up to the cloud's middle part);
2. the gradient of its loss at the middle's output (``LOGIT_GRADIENT``; it depends on ``y``);
3. its contribution to the update of the device's own halves (edge and head), which leave the
   device at the end of each round.

DP-SGD on the parameters alone (what a federated device does) protects only 3; the cloud
would still see 1 and 2 un-noised at every step. Here every channel is a Gaussian mechanism
on the sample: the activation row is clipped to L2 norm ``act_clip`` and noised
(:mod:`split.privacy.activation_noise`), the per-sample loss gradient row is clipped to
``grad_clip`` and noised, and the parameter gradients are clipped per sample to ``param_clip``
and noised by Opacus' ``DPOptimizer`` (Abadi et al. 2016). Labels and predictions never leave
the device in U-shaped mode, so nothing else about the sample travels. What a device sends at
round end (its halves) is post-processing of the noised steps.

Accounting (one ledger per device, Opacus' RDP accountant):
    Neighbouring relation: replace-one (sensitivity ``2 * clip`` in every channel). The cloud
    sees one activation row per sample in each step, so it knows which step a sample is in:
    subsampling amplification (what makes DP-SGD cheap in federated mode) does not apply,
    and none is claimed. Each epoch visits every sample exactly once (a data-independent
    shuffle), so a sample is in ``epochs`` steps per round. One step is the three Gaussian
    mechanisms on that sample together, i.e. one Gaussian mechanism with
    ``1 / sigma_joint^2 = sum_i (2 / sigma_i)^2`` (RDP of Gaussians adds, and Opacus' RDP at
    sample rate 1 is exactly the Gaussian's ``alpha / (2 sigma^2)``), composed over every
    step the sample was in. The ledger steps ``(sigma_joint, sample_rate=1.0)`` once per
    epoch; the cloud runs the same arithmetic on its own count of the epochs it asked for.

What it does not cover: the number of samples on a device (it is sent in the clear, as in
federated learning), the model hyperparameters, and an observer that can run the device's
code with its OS-seeded noise generators (whoever knows the seeds can remove the noise).

Security: noise seeds come from :mod:`secrets` (the OS) unless a test passes one.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import secrets
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from split.errors import PrivacyConfigError
from split.privacy.budget import MAX_NOISE_MULTIPLIER, PrivacyLedger, check_delta

__all__ = ["SplitDP", "SplitDPTrainer", "joint_noise_multiplier"]

_CHANNELS = ("act", "grad", "param")
# Opacus guards per-sample clip factors against zero norms this way.
_NORM_EPS = 1e-6


def _positive(name: str, value) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise PrivacyConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def joint_noise_multiplier(sigmas: tuple[float, ...]) -> float:
    """Noise multiplier of one Gaussian mechanism equal to the given ones applied together.

    Each ``sigma`` is a channel's noise std over its clip; replace-one sensitivity is twice
    the clip, so the channel's own multiplier is ``sigma / 2``. Gaussian RDP adds:
    ``1 / s^2 = sum (2 / sigma)^2``.
    """
    return 1.0 / math.sqrt(sum((2.0 / s) ** 2 for s in sigmas))


@dataclass(frozen=True)
class SplitDP:
    """Clip norms and noise multipliers of the three channels, and the reporting delta.

    Attributes:
        act_clip / act_sigma: cut activation row: L2 clip and noise std / clip.
        grad_clip / grad_sigma: per-sample loss gradient at the middle's output.
        param_clip / param_sigma: per-sample gradient of the device's halves (DP-SGD).
        delta: delta at which epsilon is reported; must be < 1 / (samples on the device).
    """

    act_clip: float
    act_sigma: float
    grad_clip: float
    grad_sigma: float
    param_clip: float
    param_sigma: float
    delta: float

    def __post_init__(self) -> None:
        for channel in _CHANNELS:
            _positive(f"{channel}_clip", getattr(self, f"{channel}_clip"))
            _positive(f"{channel}_sigma", getattr(self, f"{channel}_sigma"))
        delta = self.delta
        if not isinstance(delta, numbers.Real) or not 0 < delta < 1:
            raise PrivacyConfigError(f"delta must be in (0, 1), got {delta!r}")

    @property
    def sigma_joint(self) -> float:
        """The one-step Gaussian mechanism's noise multiplier (replace-one)."""
        return joint_noise_multiplier((self.act_sigma, self.grad_sigma, self.param_sigma))

    def epsilon(self, releases: int) -> float:
        """Per-sample epsilon after a sample was in ``releases`` steps (Opacus RDP)."""
        if not isinstance(releases, int) or isinstance(releases, bool) or releases < 0:
            raise PrivacyConfigError(f"releases must be an int >= 0, got {releases!r}")
        ledger = PrivacyLedger(accountant="rdp", delta=self.delta)
        ledger.step(noise_multiplier=self.sigma_joint, sample_rate=1.0, steps=releases)
        return ledger.epsilon()

    def to_meta(self) -> dict:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta) -> SplitDP:
        """Parses the ``dp`` object of a MODEL message; PrivacyConfigError names the field."""
        if not isinstance(meta, dict):
            raise PrivacyConfigError(f"dp must be an object, got {type(meta).__name__}")
        want = set(cls.__dataclass_fields__)
        if set(meta) != want:
            raise PrivacyConfigError(
                f"dp must have exactly the keys {sorted(want)}, got {sorted(meta)}"
            )
        return cls(**meta)

    @classmethod
    def for_target(
        cls,
        *,
        target_epsilon: float,
        delta: float,
        releases: int,
        act_clip: float,
        grad_clip: float,
        param_clip: float,
    ) -> SplitDP:
        """One noise multiplier for all three channels so ``releases`` steps stay within
        ``target_epsilon`` (smallest such sigma, found by Opacus' noise search).

        Raises:
            PrivacyConfigError: The target needs sigma > ``MAX_NOISE_MULTIPLIER``; the message
                gives the epsilon reachable at that noise and the most steps that fit.
        """
        from split.privacy.budget import noise_for_target

        _positive("target_epsilon", target_epsilon)
        if not isinstance(releases, int) or releases < 1:
            raise PrivacyConfigError(f"releases must be an int >= 1, got {releases!r}")
        # Equal sigmas s in three channels: sigma_joint = s / (2 * sqrt(3)).
        ratio = 2.0 * math.sqrt(3.0)
        clips = {"act_clip": act_clip, "grad_clip": grad_clip, "param_clip": param_clip}
        try:
            joint = noise_for_target(
                target_epsilon=target_epsilon,
                delta=delta,
                sample_rate=1.0,
                steps=releases,
                max_noise_multiplier=MAX_NOISE_MULTIPLIER / ratio,
            )
        except PrivacyConfigError:
            cap = cls(**clips, act_sigma=MAX_NOISE_MULTIPLIER, grad_sigma=MAX_NOISE_MULTIPLIER,
                      param_sigma=MAX_NOISE_MULTIPLIER, delta=delta)  # fmt: skip
            fit = 0
            while fit < releases and cap.epsilon(fit + 1) <= target_epsilon:
                fit += 1
            raise PrivacyConfigError(
                f"target_epsilon={target_epsilon} is infeasible for {releases} steps per sample "
                f"(rounds x local_epochs) in ushaped DP: it needs noise multipliers > "
                f"{MAX_NOISE_MULTIPLIER}; closest feasible: epsilon={cap.epsilon(releases):.3g} "
                f"at {MAX_NOISE_MULTIPLIER}, or at most {fit} steps per sample"
            ) from None
        s = joint * ratio
        return cls(**clips, act_sigma=s, grad_sigma=s, param_sigma=s, delta=delta)


def _clip_rows(t, clip: float):
    """Scales each row (dim 0) of a torch tensor to L2 norm at most ``clip``."""
    norms = t.flatten(1).norm(dim=1)
    factor = (clip / (norms + _NORM_EPS)).clamp(max=1.0)
    return t * factor.view(-1, *([1] * (t.dim() - 1)))


class SplitDPTrainer:
    """A device's DP state for one run of U-shaped split learning, kept across its rounds.

    The device's edge and head are wrapped once in Opacus' ``GradSampleModule`` (wrapping
    again each round would stack hooks, Opacus issue #608); parameters stay those of the
    given modules, so loading a round's halves into them is enough.

    Args:
        edge, head: the device's halves (trained in place).
        dp: the run's settings.
        num_samples: samples on this device (delta must be below its inverse).
        seed: seeds the three noise generators (tests only); None draws from the OS.

    Raises:
        PrivacyConfigError: delta >= 1/N, or modules Opacus cannot privatize (all listed).
    """

    def __init__(self, edge, head, dp: SplitDP, *, num_samples: int, seed: int | None = None):
        import torch
        from opacus import GradSampleModule
        from torch import nn

        from split.privacy.activation_noise import ActivationNoise
        from split.privacy.dpsgd import _problems

        check_delta(dp.delta, num_samples)
        problems = [f"edge.{p}" for p in _problems(edge)] + [f"head.{p}" for p in _problems(head)]
        if problems:
            raise PrivacyConfigError(
                "the device halves cannot be privatized by Opacus; offending modules: "
                + "; ".join(problems)
            )
        self.dp = dp
        seeds = (
            [secrets.randbits(63) for _ in range(3)]
            if seed is None
            else [int(v) for v in np.random.SeedSequence(seed).generate_state(3)]
        )
        self.act_noise = ActivationNoise(
            clip=dp.act_clip, noise_multiplier=dp.act_sigma, seed=seeds[0]
        ).layer()
        self._grad_gen = torch.Generator().manual_seed(seeds[1])
        self._param_gen = torch.Generator().manual_seed(seeds[2])
        self.modules = nn.ModuleDict({"edge": edge, "head": head})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.gsm = GradSampleModule(self.modules, loss_reduction="mean")
        self.ledger = PrivacyLedger(accountant="rdp", delta=dp.delta)

    def optimizer(self, *, lr: float, momentum: float, batch_size: int):
        """A DP optimizer over both halves for one round (clip per sample, add noise).

        Momentum post-processes the noised gradients: no privacy cost.
        """
        import torch
        from opacus.optimizers import DPOptimizer

        return DPOptimizer(
            torch.optim.SGD(self.modules.parameters(), lr=lr, momentum=momentum),
            noise_multiplier=self.dp.param_sigma,
            max_grad_norm=self.dp.param_clip,
            expected_batch_size=batch_size,
            loss_reduction="mean",
            generator=self._param_gen,
        )

    @staticmethod
    @contextlib.contextmanager
    def quiet():
        """Silences Opacus' "full backward hook is firing" note for the edge's first layer."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield

    def begin_epoch(self) -> None:
        """Counts one epoch: every sample of the device is in exactly one of its steps."""
        self.ledger.step(noise_multiplier=self.dp.sigma_joint, sample_rate=1.0)

    def noise_activation(self, act):
        """The cut activation as released: rows clipped to ``act_clip``, Gaussian noise added."""
        return self.act_noise(act)

    def noise_loss_gradient(self, grad):
        """The gradient of the batch's mean loss at the middle's output, as released.

        Row ``i`` of ``grad`` is ``(1/b) dl_i/dz_i``; the per-sample gradient ``dl_i/dz_i`` is
        clipped to ``grad_clip`` and noised with std ``grad_sigma * grad_clip``, then scaled
        back by ``1/b`` so the cloud trains on the mean loss as without DP.
        """
        import torch

        b = grad.shape[0]
        rows = _clip_rows(grad.detach() * b, self.dp.grad_clip)
        std = self.dp.grad_sigma * self.dp.grad_clip
        z = torch.randn(grad.shape, generator=self._grad_gen, dtype=grad.dtype)
        return (rows + std * z) / b

    def close(self) -> None:
        """Removes Opacus' hooks from the halves (before another trainer wraps them)."""
        self.gsm._close()

    def epsilon(self) -> float:
        return self.ledger.epsilon()

    @property
    def releases(self) -> int:
        return self.ledger.steps
