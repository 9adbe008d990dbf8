"""Sample-level DP for split learning: DP-SGD on the device's halves and noised step messages.

A device in split learning releases, every time one training sample ``(x, y)`` is in a batch:

1. its cut activation (up to the cloud);
2. U-shaped: the gradient of its loss at the output of the cloud's middle part
   (``LOGIT_GRADIENT``; it depends on ``y``); vanilla and SplitFed: the label ``y`` itself;
3. its contribution to the update of the device's own halves (edge, and head in U-shaped),
   which leave the device at the end of each round.

DP-SGD on the parameters alone (what a federated device does) protects only 3; the cloud
would still see 1 and 2 at every step. Here every channel is a DP mechanism on the sample:
the activation row is clipped to L2 norm ``act_clip`` and noised
(:mod:`split.privacy.activation_noise`); U-shaped, the per-sample loss gradient row is clipped
to ``grad_clip`` and noised; vanilla / SplitFed, each label is replaced once per run by k-ary
randomized response with ``label_epsilon`` (Warner 1965; the label-DP mechanism of Ghazi et
al. 2021) and every step sends that same randomized label (post-processing, so it is paid
once); the parameter gradients are clipped per sample to ``param_clip`` and noised by Opacus'
``DPOptimizer`` (Abadi et al. 2016). What a device sends at round end (its halves) is
post-processing of the noised steps.

Accounting (one ledger per device, Opacus' RDP accountant):
    Neighbouring relation: replace-one (sensitivity ``2 * clip`` in every Gaussian channel).
    The cloud sees one activation row per sample in each step, so it knows which step a
    sample is in: subsampling amplification (what makes DP-SGD cheap in federated mode) does
    not apply, and none is claimed. Each epoch visits every sample exactly once (a
    data-independent shuffle), so a sample is in ``epochs`` steps per round. One step is the
    Gaussian mechanisms on that sample together, i.e. one Gaussian mechanism with
    ``1 / sigma_joint^2 = sum_i (2 / sigma_i)^2`` (RDP of Gaussians adds, and Opacus' RDP at
    sample rate 1 is exactly the Gaussian's ``alpha / (2 sigma^2)``), composed over every
    step the sample was in. The ledger steps ``(sigma_joint, sample_rate=1.0)`` once per
    epoch; the cloud runs the same arithmetic on its own count of the epochs it asked for.
    Randomized response is ``(label_epsilon, 0)``-DP and is added by basic composition:
    ``epsilon = epsilon_gaussian(delta) + label_epsilon``.

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
    """Clip norms and noise of each channel, and the reporting delta.

    Attributes:
        act_clip / act_sigma: cut activation row: L2 clip and noise std / clip.
        param_clip / param_sigma: per-sample gradient of the device's halves (DP-SGD).
        delta: delta at which epsilon is reported; must be < 1 / (samples on the device).
        grad_clip / grad_sigma: U-shaped only: per-sample loss gradient at the middle's output.
        label_epsilon / num_classes: vanilla and SplitFed only: randomized response on labels.
    """

    act_clip: float
    act_sigma: float
    param_clip: float
    param_sigma: float
    delta: float
    grad_clip: float | None = None
    grad_sigma: float | None = None
    label_epsilon: float | None = None
    num_classes: int | None = None

    def __post_init__(self) -> None:
        for channel in self.channels:
            _positive(f"{channel}_clip", getattr(self, f"{channel}_clip"))
            _positive(f"{channel}_sigma", getattr(self, f"{channel}_sigma"))
        delta = self.delta
        if not isinstance(delta, numbers.Real) or not 0 < delta < 1:
            raise PrivacyConfigError(f"delta must be in (0, 1), got {delta!r}")
        grad = (self.grad_clip is not None, self.grad_sigma is not None)
        label = (self.label_epsilon is not None, self.num_classes is not None)
        if grad[0] != grad[1] or label[0] != label[1] or grad[0] == label[0]:
            raise PrivacyConfigError(
                "dp needs either grad_clip + grad_sigma (ushaped) or label_epsilon + num_classes "
                f"(labels on the wire), got grad_clip={self.grad_clip}, grad_sigma="
                f"{self.grad_sigma}, label_epsilon={self.label_epsilon}, "
                f"num_classes={self.num_classes}"
            )
        if self.label_epsilon is not None:
            _positive("label_epsilon", self.label_epsilon)
            k = self.num_classes
            if not isinstance(k, int) or isinstance(k, bool) or k < 2:
                raise PrivacyConfigError(f"num_classes must be an int >= 2, got {k!r}")

    @property
    def channels(self) -> tuple[str, ...]:
        """The Gaussian channels: ``act``, ``param`` and, U-shaped, ``grad``."""
        return ("act", "param") + (("grad",) if self.grad_clip is not None else ())

    @property
    def sigma_joint(self) -> float:
        """The one-step Gaussian mechanism's noise multiplier (replace-one)."""
        return joint_noise_multiplier(tuple(getattr(self, f"{c}_sigma") for c in self.channels))

    @property
    def keep_probability(self) -> float:
        """Randomized response: chance a label is sent unchanged, ``e^eps / (e^eps + k - 1)``."""
        if self.label_epsilon is None:
            return 1.0
        e = math.exp(self.label_epsilon)
        return e / (e + self.num_classes - 1)

    def epsilon(self, releases: int) -> float:
        """Per-sample epsilon after a sample was in ``releases`` steps (Opacus RDP, plus
        ``label_epsilon`` once the labels were randomized, i.e. from the first step on)."""
        if not isinstance(releases, int) or isinstance(releases, bool) or releases < 0:
            raise PrivacyConfigError(f"releases must be an int >= 0, got {releases!r}")
        ledger = PrivacyLedger(accountant="rdp", delta=self.delta)
        ledger.step(noise_multiplier=self.sigma_joint, sample_rate=1.0, steps=releases)
        labels = self.label_epsilon if self.label_epsilon is not None and releases else 0.0
        return ledger.epsilon() + labels

    def to_meta(self) -> dict:
        """The settings as sent in MODEL; channels the mode lacks are left out."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_meta(cls, meta) -> SplitDP:
        """Parses the ``dp`` object of a MODEL message; PrivacyConfigError names the field."""
        if not isinstance(meta, dict):
            raise PrivacyConfigError(f"dp must be an object, got {type(meta).__name__}")
        known = set(cls.__dataclass_fields__)
        required = {"act_clip", "act_sigma", "param_clip", "param_sigma", "delta"}
        if not required <= set(meta) <= known:
            raise PrivacyConfigError(
                f"dp needs the keys {sorted(required)} and may have {sorted(known - required)}, "
                f"got {sorted(meta)}"
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
        param_clip: float,
        grad_clip: float | None = None,
        label_epsilon: float | None = None,
        num_classes: int | None = None,
    ) -> SplitDP:
        """One noise multiplier for all Gaussian channels so ``releases`` steps stay within
        ``target_epsilon`` (minus ``label_epsilon``); the smallest such sigma, found by
        Opacus' noise search.

        Raises:
            PrivacyConfigError: The target needs sigma > ``MAX_NOISE_MULTIPLIER``, or
                ``label_epsilon`` leaves nothing for the Gaussian channels; the message gives
                the epsilon reachable at that noise and the most steps that fit.
        """
        from split.privacy.budget import _max_steps, noise_for_target

        _positive("target_epsilon", target_epsilon)
        if not isinstance(releases, int) or releases < 1:
            raise PrivacyConfigError(f"releases must be an int >= 1, got {releases!r}")
        rest = target_epsilon - (label_epsilon or 0.0)
        if rest <= 0:
            raise PrivacyConfigError(
                f"label_epsilon={label_epsilon} leaves nothing of target_epsilon="
                f"{target_epsilon} for the activations and parameters; lower it"
            )
        fixed = dict(act_clip=act_clip, param_clip=param_clip, delta=delta,
                     label_epsilon=label_epsilon, num_classes=num_classes)  # fmt: skip

        def plan(s: float) -> SplitDP:
            grad = {} if grad_clip is None else {"grad_clip": grad_clip, "grad_sigma": s}
            return cls(**fixed, **grad, act_sigma=s, param_sigma=s)

        # Equal sigmas s in n channels: sigma_joint = s / (2 * sqrt(n)).
        ratio = 2.0 * math.sqrt(len(plan(1.0).channels))
        try:
            joint = noise_for_target(
                target_epsilon=rest,
                delta=delta,
                sample_rate=1.0,
                steps=releases,
                max_noise_multiplier=MAX_NOISE_MULTIPLIER / ratio,
            )
        except PrivacyConfigError:
            cap = plan(MAX_NOISE_MULTIPLIER)
            # Binary search over step counts (the budget module's): the Gaussian part's share.
            fit = _max_steps(accountant="rdp", target_epsilon=rest, delta=delta,
                             sigma=cap.sigma_joint, q=1.0, above=releases)  # fmt: skip
            raise PrivacyConfigError(
                f"target_epsilon={target_epsilon} is infeasible for {releases} steps per sample "
                f"(rounds x local_epochs): it needs noise multipliers > {MAX_NOISE_MULTIPLIER}; "
                f"closest feasible: epsilon={cap.epsilon(releases):.3g} at "
                f"{MAX_NOISE_MULTIPLIER}, or at most {fit} steps per sample"
            ) from None
        return plan(joint * ratio)


class SplitDPTrainer:
    """A device's DP state for one run of split learning, kept across its rounds.

    The device's edge (and U-shaped, head) are wrapped once in Opacus' ``GradSampleModule``
    (wrapping again each round would stack hooks, Opacus issue #608); parameters stay those of
    the given modules, so loading a round's halves into them is enough.

    Args:
        edge, head: the device's halves (trained in place); head is None unless U-shaped.
        dp: the run's settings.
        num_samples: samples on this device (delta must be below its inverse).
        seed: seeds the three noise generators (tests only); None draws from the OS.

    Raises:
        PrivacyConfigError: delta >= 1/N, or modules Opacus cannot privatize (all listed).
    """

    def __init__(
        self, edge, head, dp: SplitDP, *, num_samples: int, seed: int | None = None
    ) -> None:
        import torch
        from opacus import GradSampleModule
        from torch import nn

        from split.privacy.activation_noise import ActivationNoise
        from split.privacy.dpsgd import _problems

        check_delta(dp.delta, num_samples)
        if (head is None) != (dp.grad_clip is None):
            raise PrivacyConfigError(
                "dp: a head (ushaped) needs grad_clip/grad_sigma and no label_epsilon; without a "
                "head the labels travel and need label_epsilon"
            )
        problems = [f"edge.{p}" for p in _problems(edge)]
        problems += [f"head.{p}" for p in _problems(head)] if head is not None else []
        if problems:
            raise PrivacyConfigError(
                "the device halves cannot be privatized by Opacus; offending modules: "
                + "; ".join(problems)
            )
        self.dp = dp
        seeds = (
            [secrets.randbits(63) for _ in range(4)]
            if seed is None
            else [int(v) for v in np.random.SeedSequence(seed).generate_state(4)]
        )
        self.act_noise = ActivationNoise(
            clip=dp.act_clip, noise_multiplier=dp.act_sigma, seed=seeds[0]
        ).layer()
        self._grad_gen = torch.Generator().manual_seed(seeds[1])
        self._param_gen = torch.Generator().manual_seed(seeds[2])
        self._label_rng = np.random.default_rng(seeds[3])
        self._labels: np.ndarray | None = None
        halves = {"edge": edge} if head is None else {"edge": edge, "head": head}
        self.modules = nn.ModuleDict(halves)
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

        from split.privacy.activation_noise import clip_per_sample

        b = grad.shape[0]
        rows = clip_per_sample(grad.detach() * b, self.dp.grad_clip)
        std = self.dp.grad_sigma * self.dp.grad_clip
        z = torch.randn(grad.shape, generator=self._grad_gen, dtype=grad.dtype)
        return (rows + std * z) / b

    def close(self) -> None:
        """Removes Opacus' hooks from the halves (before another trainer wraps them)."""
        self.gsm._close()

    def released_labels(self, y: np.ndarray) -> np.ndarray:
        """The labels as sent: each replaced once by k-ary randomized response, then reused.

        With probability ``keep_probability`` a label stays, else it becomes one of the other
        ``k - 1`` classes uniformly. Drawn on the first call for the device's whole dataset
        (``y`` indexed like the device's samples); later calls return the same labels, so
        resending them costs nothing more.

        Raises:
            PrivacyConfigError: A label is outside ``[0, num_classes)`` or ``y`` changed size.
        """
        dp = self.dp
        y = np.asarray(y, dtype=np.int64)
        if self._labels is None:
            k = dp.num_classes
            if y.size and (y.min() < 0 or y.max() >= k):
                raise PrivacyConfigError(
                    f"labels must be in [0, {k}) for randomized response, got {y.min()}..{y.max()}"
                )
            flip = self._label_rng.random(len(y)) >= dp.keep_probability
            shift = self._label_rng.integers(1, k, size=len(y))  # another class, uniformly
            self._labels = np.where(flip, (y + shift) % k, y)
        if len(self._labels) != len(y):
            raise PrivacyConfigError(
                f"the device's labels changed size ({len(self._labels)} -> {len(y)}) within a run"
            )
        return self._labels

    def epsilon(self) -> float:
        labels = self.dp.label_epsilon if self.dp.label_epsilon and self.releases else 0.0
        return self.ledger.epsilon() + labels

    def state_dict(self) -> dict:
        """JSON-able state that must survive a device restart: the settings, the ledger and
        the randomized labels (drawing them again would spend ``label_epsilon`` again)."""
        labels = None if self._labels is None else [int(v) for v in self._labels]
        return {"dp": self.dp.to_meta(), "ledger": self.ledger.state_dict(), "labels": labels}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` of the same run.

        Raises:
            PrivacyConfigError: The state is malformed or was saved under other settings.
        """
        if not isinstance(state, dict) or set(state) != {"dp", "ledger", "labels"}:
            raise PrivacyConfigError("split DP state must have the keys dp, ledger, labels")
        if SplitDP.from_meta(state["dp"]) != self.dp:
            raise PrivacyConfigError(
                f"split DP state was saved under other settings {state['dp']}, not "
                f"{self.dp.to_meta()}"
            )
        labels = state["labels"]
        if labels is not None:
            arr = np.asarray(labels, dtype=np.int64)
            k = self.dp.num_classes
            if arr.ndim != 1 or k is None or (arr.size and (arr.min() < 0 or arr.max() >= k)):
                raise PrivacyConfigError(
                    f"split DP state: labels must be a list of ints in [0, {k})"
                )
            self._labels = arr
        self.ledger.load_state_dict(state["ledger"])

    @property
    def releases(self) -> int:
        return self.ledger.steps
