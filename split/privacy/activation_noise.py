"""Noised cut activations for split learning: per-sample clip + Gaussian noise on the device.

What it protects: the feature values of one sample as carried by its cut activation, against
whoever sees the activation (the cloud, the broker, anyone on the wire). Each forward of a
sample clips its flattened activation to L2 norm ``clip`` and adds N(0, (sigma * clip)^2) to
every coordinate: a Gaussian mechanism on that one record. A sample released E times (once per
local epoch, every round its device trains, plus every noised inference) is the E-fold
composition; its (epsilon, delta) bounds how well any observer of all E activations can tell
the record's features from any other features, so it bounds reconstruction of the record.

Neighbouring relation: replace-one, sensitivity ``2 * clip``. The activation released for a
sample is a function of that sample alone, so the question is "x or x'?", not "x or nothing?":
the cloud already knows a sample is present (the batch size, and in vanilla mode its label).
Two clipped activations lie in the same ball of radius ``clip``, at most ``2 * clip`` apart,
so the effective noise multiplier handed to Opacus is ``sigma * clip / (2 * clip) = sigma / 2``.
(Add/remove with "absent = zero vector" would give ``clip`` and half the epsilon, but the
absent case is never what the cloud sees.) Epsilon comes from Opacus' RDP accountant stepped
once per release at sample rate 1 (no subsampling amplification: every sample is in every
epoch); nothing here does the RDP arithmetic.

What it does not protect: labels (they travel in clear in vanilla and SplitFed modes; use
U-shaped), the gradients the cloud sends back and the model halves the devices return (they
depend on the data without calibrated noise; use DP-SGD / DP-FedAvg for those), membership or
attribute inference through the trained model, and anything released without noise: an
inference path that runs the edge half without this layer gets no protection. Noise is
applied in train and eval mode alike for that reason. The codecs (fp16, int8) encode the noised
activation, so they are post-processing and keep the guarantee. The noise seed must stay on
the device: whoever knows it can subtract the noise, so the default draws it from the OS.
"""

from __future__ import annotations

import math
import numbers
import secrets
from dataclasses import dataclass

import torch
from torch import nn

from split.errors import PrivacyConfigError
from split.privacy.budget import PrivacyLedger

__all__ = ["ActivationNoise", "NoisyActivation", "activation_epsilon", "clip_per_sample"]

NEIGHBOURING = "replace-one"
# Opacus (and the literature) guard the per-sample clip factor against zero norms this way.
_NORM_EPS = 1e-6


def _check(name: str, value) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0:
        raise PrivacyConfigError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class ActivationNoise:
    """Settings of the device's activation noise.

    Attributes:
        clip: L2 bound of each sample's flattened cut activation; 0 turns noise off.
        noise_multiplier: Noise std per coordinate divided by ``clip``; 0 turns noise off.
            Both are 0 (off) or both > 0.
        seed: Seeds the noise (tests only). None draws a seed from the OS; a seed known to
            the cloud lets it remove the noise.
    """

    clip: float = 0.0
    noise_multiplier: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        _check("clip", self.clip)
        _check("noise_multiplier", self.noise_multiplier)
        if (self.clip > 0) != (self.noise_multiplier > 0):
            raise PrivacyConfigError(
                "clip and noise_multiplier must both be > 0 (noise on) or both 0 (off), got "
                f"clip={self.clip}, noise_multiplier={self.noise_multiplier}"
            )

    @property
    def enabled(self) -> bool:
        return self.clip > 0

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of one release under replace-one: ``2 * clip``."""
        return 2.0 * self.clip

    @property
    def effective_noise_multiplier(self) -> float:
        """Noise std over sensitivity, the sigma of the Gaussian mechanism Opacus accounts."""
        return self.noise_multiplier * self.clip / self.sensitivity if self.enabled else 0.0

    def layer(self) -> NoisyActivation:
        """A fresh module applying this noise (its own generator)."""
        return NoisyActivation(self)


def clip_per_sample(act: torch.Tensor, clip: float) -> torch.Tensor:
    """Scales each sample (dim 0) so its flattened L2 norm is at most ``clip``.

    Differentiable: autograd sees the scale factor as a function of the activation.
    """
    norms = act.flatten(1).norm(dim=1)
    factor = (clip / (norms + _NORM_EPS)).clamp(max=1.0)
    return act * factor.view(-1, *([1] * (act.dim() - 1)))


class NoisyActivation(nn.Module):
    """Clip + Gaussian noise on a batch of cut activations; identity when noise is off.

    Noise is added in train and eval mode alike: an un-noised release is unprotected.
    """

    def __init__(self, noise: ActivationNoise) -> None:
        super().__init__()
        self.noise = noise
        self.generator = torch.Generator()
        seed = noise.seed if noise.seed is not None else secrets.randbits(63)
        self.generator.manual_seed(seed)

    def forward(self, act: torch.Tensor) -> torch.Tensor:
        if not self.noise.enabled:
            return act
        clipped = clip_per_sample(act, self.noise.clip)
        std = self.noise.noise_multiplier * self.noise.clip
        z = torch.randn(act.shape, generator=self.generator, dtype=act.dtype)
        return clipped + std * z


def activation_epsilon(noise: ActivationNoise, *, releases: int, delta: float) -> float:
    """Per-sample epsilon after ``releases`` noised releases of one sample's activation.

    Opacus' RDP accountant, one ``step(noise_multiplier=sigma_eff, sample_rate=1.0)`` per
    release; 0.0 for no release, inf if noise is off.
    """
    if not isinstance(releases, int) or releases < 0:
        raise PrivacyConfigError(f"releases must be an int >= 0, got {releases!r}")
    if releases and not noise.enabled:
        return math.inf
    ledger = PrivacyLedger(accountant="rdp", delta=delta)
    ledger.step(noise_multiplier=noise.effective_noise_multiplier, sample_rate=1.0, steps=releases)
    return ledger.epsilon()
