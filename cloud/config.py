"""Configuration of a federated run: one frozen dataclass, loadable from TOML."""

from __future__ import annotations

import math
import numbers
import os
import re
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from converters.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DP_MODES = ("none", "sample", "user")
SECURE_MODES = ("none", "secagg", "he-paillier")
# Training topologies: "fedavg" is FederatedServer; the others run cloud.split_trainer.
MODES = ("fedavg", "vanilla", "ushaped", "splitfed-v1", "splitfed-v2")
CODECS = ("float32", "fp16", "int8")
COMPRESSIONS = ("zlib", "zstd")
# What each annotation of a field accepts (bool is never a number here: TOML `true` is no count).
_KINDS = {
    "int": (numbers.Integral, "an int"),
    "float": (numbers.Real, "a number"),
    "str": (str, "a string"),
    "dict": (dict, "a table"),
}


def _check(cond: bool, name: str, rule: str, value) -> None:
    if not cond:
        raise ConfigError(f"{name} {rule}, got {value!r}")


def _check_type(name: str, annotation: str, value) -> None:
    kinds = annotation.split(" | ")
    if value is None:
        _check("None" in kinds, name, f"must be {_KINDS[kinds[0]][1]}", value)
        return
    ok = not isinstance(value, bool) and any(
        isinstance(value, _KINDS[k][0]) for k in kinds if k != "None"
    )
    _check(ok, name, f"must be {_KINDS[kinds[0]][1]}", value)


@dataclass(frozen=True)
class FederatedConfig:
    """Everything the cloud trainer needs to run federated rounds.

    Attributes mirror the ``[run]`` table of a ``run.toml`` and the ``edgesplit simulate``
    flags. Privacy parameters are only ever set here, never through environment variables.
    """

    run_id: str = "run"
    model: str = "digits-mlp"
    dataset: str = "digits"
    rounds: int = 10
    clients_per_round: int = 0  # 0 = every registered device
    fraction: float = 1.0
    min_clients: int = 2
    round_timeout: float = 60.0
    register_timeout: float = 60.0
    local_epochs: int = 10
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.9
    strategy: str = "fedavg"
    strategy_args: dict = field(default_factory=dict)
    codec: str = "float32"
    compress: str | None = None
    prefix: str = "edgesplit"
    seed: int = 0
    test_fraction: float = 0.2
    out_dir: str = "runs/run"
    dp: str = "none"
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    clip: float = 1.0
    population: int = 0  # user-level DP: devices the round samples from (0 = registered)
    secure: str = "none"
    max_update_bytes: int = 64 * 2**20
    mode: str = "fedavg"
    cut: str | None = None  # None: the model's default cut
    head_cut: str | None = None  # U-shaped only; None: the last cut point
    act_codec: str = "float32"
    # Secure aggregation (cloud.secure): Shamir threshold t for secagg (0 = majority of the
    # selected devices), per-coordinate clip of each update delta, Paillier modulus bits.
    secure_threshold: int = 0
    secure_clip: float = 4.0
    he_key_bits: int = 2048
    # Split modes: devices clip each sample's cut activation to L2 norm act_noise_clip and add
    # N(0, (act_noise_multiplier * act_noise_clip)^2) per coordinate (0, 0 = off).
    act_noise_clip: float = 0.0
    act_noise_multiplier: float = 0.0
    # U-shaped with dp="sample" (split.privacy.split_dp): devices clip each sample's gradient
    # at the middle's output (LOGIT_GRADIENT) to grad_noise_clip and add Gaussian noise of std
    # grad_noise_multiplier * grad_noise_clip. Multipliers left 0 take noise_multiplier, or
    # are calibrated together from target_epsilon.
    grad_noise_clip: float = 0.0
    grad_noise_multiplier: float = 0.0
    # vanilla / SplitFed with dp="sample": each label is replaced once per run by k-ary
    # randomized response at this epsilon (0: half of target_epsilon).
    label_epsilon: float = 0.0
    # SecAgg+ (Bell et al., CCS'20): neighbours per device in secagg's k-regular graph;
    # 0 = 2 * ceil(log2 n) + 1, n - 1 or more = plain SecAgg (every pair of devices).
    secagg_neighbours: int = 0
    # SplitFed V1 only: the cloud half's steps are served by step workers (cloud.split_worker)
    # sharing the load through the broker; `simulate` starts this many, `cloud` expects them
    # to be started separately (`edgesplit split-worker`). 0 = served in the trainer's process.
    split_workers: int = 0
    # MQTT QoS of single-frame split step messages and their replies. 0 saves the PUBACKs (two
    # of the four packets per step): safe because the reply is the end-to-end ack, a device
    # resends a step after step_resend seconds and repeats are answered from the reply cache;
    # a lost step then costs step_resend seconds. 1 lets paho redeliver while connected.
    step_qos: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.out_dir, os.PathLike):  # a Path from Python callers: keep it a str
            object.__setattr__(self, "out_dir", os.fspath(self.out_dir))
        for f in fields(self):  # types first: a TOML string must not reach a comparison
            _check_type(f.name, f.type, getattr(self, f.name))
        _check(
            bool(_NAME.match(self.run_id)), "run_id", "must match [A-Za-z0-9_.-]{1,64}", self.run_id
        )
        _check(self.rounds >= 1, "rounds", "must be >= 1", self.rounds)
        _check(
            self.clients_per_round >= 0, "clients_per_round", "must be >= 0", self.clients_per_round
        )
        _check(0 < self.fraction <= 1, "fraction", "must be in (0, 1]", self.fraction)
        _check(self.min_clients >= 1, "min_clients", "must be >= 1", self.min_clients)
        # Federated rounds refuse to sample fewer than min_clients; split rounds accept
        # min(min_clients, selected) updates, so one device per round stays possible there.
        _check(
            self.mode != "fedavg"
            or self.clients_per_round == 0
            or self.clients_per_round >= self.min_clients,
            "clients_per_round",
            f"must be 0 (all) or >= min_clients={self.min_clients} in mode 'fedavg' (fewer fails "
            "every round)",
            self.clients_per_round,
        )
        for name in ("round_timeout", "register_timeout"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value > 0, name, "must be a finite number > 0", value)
        _check(self.local_epochs >= 1, "local_epochs", "must be >= 1", self.local_epochs)
        _check(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        _check(math.isfinite(self.lr) and self.lr > 0, "lr", "must be a finite number > 0", self.lr)
        _check(0 <= self.momentum < 1, "momentum", "must be in [0, 1)", self.momentum)
        _check(0 < self.test_fraction < 1, "test_fraction", "must be in (0, 1)", self.test_fraction)
        _check(self.seed >= 0, "seed", "must be >= 0", self.seed)
        _check(self.population >= 0, "population", "must be >= 0", self.population)
        _check(self.codec in CODECS, "codec", f"must be one of {', '.join(CODECS)}", self.codec)
        _check(
            self.compress is None or self.compress in COMPRESSIONS,
            "compress",
            f"must be unset or one of {', '.join(COMPRESSIONS)}",
            self.compress,
        )
        _check(bool(self.out_dir), "out_dir", "must be a non-empty path", self.out_dir)
        _check(self.dp in DP_MODES, "dp", f"must be one of {', '.join(DP_MODES)}", self.dp)
        _check(self.secure in SECURE_MODES, "secure", f"must be one of {SECURE_MODES}", self.secure)
        _check(0 < self.delta < 1, "delta", "must be in (0, 1)", self.delta)
        _check(math.isfinite(self.clip) and self.clip > 0, "clip", "must be > 0", self.clip)
        if self.noise_multiplier is not None:
            ok = math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0
            _check(ok, "noise_multiplier", "must be >= 0", self.noise_multiplier)
        if self.target_epsilon is not None:
            ok = math.isfinite(self.target_epsilon) and self.target_epsilon > 0
            _check(ok, "target_epsilon", "must be > 0", self.target_epsilon)
        if self.dp != "none":
            one = (self.noise_multiplier is None) != (self.target_epsilon is None)
            _check(one, "dp", "needs exactly one of noise_multiplier / target_epsilon", self.dp)
        _check(self.mode in MODES, "mode", f"must be one of {', '.join(MODES)}", self.mode)
        _check(
            self.act_codec in CODECS,
            "act_codec",
            f"must be one of {', '.join(CODECS)}",
            self.act_codec,
        )
        for name in ("cut", "head_cut"):
            value = getattr(self, name)
            _check(value is None or self.mode != "fedavg", name, "needs a split mode", value)
        _check(
            self.secure == "none" or self.mode == "fedavg",
            "secure",
            f"needs mode 'fedavg' (split mode {self.mode!r} has no secure aggregation)",
            self.secure,
        )
        _check(self.max_update_bytes > 0, "max_update_bytes", "must be > 0", self.max_update_bytes)
        _check(
            self.secure_threshold >= 0, "secure_threshold", "must be >= 0", self.secure_threshold
        )
        ok = math.isfinite(self.secure_clip) and self.secure_clip > 0
        _check(ok, "secure_clip", "must be a finite number > 0", self.secure_clip)
        # Paillier below 2048 bits is not acceptable (NIST SP 800-57 112-bit security floor).
        _check(self.he_key_bits >= 2048, "he_key_bits", "must be >= 2048", self.he_key_bits)
        noise_fields = (
            "act_noise_clip", "act_noise_multiplier", "grad_noise_clip", "grad_noise_multiplier",
            "label_epsilon",
        )  # fmt: skip
        for name in noise_fields:
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, name, "must be a finite number >= 0", value)
        act_on = (self.act_noise_clip > 0, self.act_noise_multiplier > 0)
        if self.mode != "fedavg" and self.dp != "none":
            self._check_split_dp()
        else:
            _check(
                act_on[0] == act_on[1],
                "act_noise_clip / act_noise_multiplier",
                "must both be > 0 (noise on) or both 0 (off)",
                (self.act_noise_clip, self.act_noise_multiplier),
            )
            for name in ("grad_noise_clip", "grad_noise_multiplier", "label_epsilon"):
                _check(
                    getattr(self, name) == 0,
                    name,
                    "needs dp='sample' in a split mode",
                    getattr(self, name),
                )
        _check(
            not any(act_on) or self.mode != "fedavg",
            "act_noise_clip",
            "needs a split mode (--mode vanilla|ushaped|splitfed-v1|splitfed-v2)",
            self.act_noise_clip,
        )
        _check(
            self.secagg_neighbours >= 0, "secagg_neighbours", "must be >= 0", self.secagg_neighbours
        )
        _check(self.split_workers >= 0, "split_workers", "must be >= 0", self.split_workers)
        _check(self.step_qos in (0, 1), "step_qos", "must be 0 or 1", self.step_qos)
        _check(
            self.split_workers == 0 or self.mode == "splitfed-v1",
            "split_workers",
            f"needs mode 'splitfed-v1' (per-device cloud copies a worker can own), "
            f"mode is {self.mode!r}",
            self.split_workers,
        )

    def _check_split_dp(self) -> None:
        """dp in a split mode: sample-level DP with every channel of every step noised."""
        _check(
            self.dp == "sample",
            "dp",
            f"must be 'sample' or 'none' in split mode {self.mode!r} (user-level DP would not "
            "cover the per-sample steps)",
            self.dp,
        )
        ushaped = self.mode == "ushaped"
        _check(
            self.act_noise_clip > 0,
            "act_noise_clip",
            "must be > 0 with dp='sample' in a split mode (every step releases the cut "
            "activation; it is clipped per sample, then noised)",
            self.act_noise_clip,
        )
        if ushaped:
            _check(
                self.grad_noise_clip > 0,
                "grad_noise_clip",
                "must be > 0 with dp='sample' in mode 'ushaped' (every step releases the loss "
                "gradient; it is clipped per sample, then noised)",
                self.grad_noise_clip,
            )
            _check(
                self.label_epsilon == 0,
                "label_epsilon",
                "must be 0 in mode 'ushaped' (labels never leave the device)",
                self.label_epsilon,
            )
        else:
            for name in ("grad_noise_clip", "grad_noise_multiplier"):
                _check(
                    getattr(self, name) == 0,
                    name,
                    f"is for mode 'ushaped' only (mode {self.mode!r} sends labels, not loss "
                    "gradients; see label_epsilon)",
                    getattr(self, name),
                )
        if self.target_epsilon is not None:
            for name in ("act_noise_multiplier", "grad_noise_multiplier"):
                _check(
                    getattr(self, name) == 0,
                    name,
                    "must be 0 with target_epsilon (all multipliers are calibrated together)",
                    getattr(self, name),
                )
            _check(
                self.label_epsilon < self.target_epsilon,
                "label_epsilon",
                f"must be < target_epsilon={self.target_epsilon}",
                self.label_epsilon,
            )
        else:
            _check(
                (self.noise_multiplier or 0) > 0,
                "noise_multiplier",
                "must be > 0 with dp='sample' in a split mode",
                self.noise_multiplier,
            )
            _check(
                ushaped or self.label_epsilon > 0,
                "label_epsilon",
                f"must be > 0 with dp='sample' and noise_multiplier in mode {self.mode!r} "
                "(labels cross the wire with every step)",
                self.label_epsilon,
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FederatedConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_toml(cls, path: str | Path) -> FederatedConfig:
        """Reads the ``[run]`` table of a TOML file (or the top level when there is none)."""
        return cls.from_dict(read_run_table(path))

    def replace(self, **changes) -> FederatedConfig:
        return FederatedConfig.from_dict({**self.to_dict(), **changes})


def read_run_table(path: str | Path) -> dict:
    """The ``[run]`` table of a TOML file (or its top level when there is none), unvalidated:
    the CLI merges its flags into it before :meth:`FederatedConfig.from_dict` checks the whole.

    Raises:
        ConfigError: the file cannot be read, is not valid TOML/UTF-8, or ``[run]`` is no table.
    """
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config {str(path)!r} cannot be read: {exc.strerror}") from None
    table = data.get("run", data)
    _check(isinstance(table, dict), f"{path}: [run]", "must be a table", table)
    return table
