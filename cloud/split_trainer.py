"""The cloud trainer for split learning over MQTT: vanilla, U-shaped and SplitFed V1/V2 rounds.

Each round the cloud sends each selected device its half (MODEL), then serves the device's
steps: ACTIVATION in, GRADIENT (or, U-shaped, LOGITS then GRADIENT after LOGIT_GRADIENT) out,
every message tagged with the step id. vanilla and U-shaped devices take turns, the device half
relayed from one to the next (Gupta & Raskar 2018; Vepakomma et al. 2018); SplitFed devices run
in parallel and their halves are averaged by samples (Thapa et al. 2020). Bad messages are
rejected with a one-line reason and counted; a vanished device's session is dropped; the round
goes on without it.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cloud.checkpoint import load_checkpoint, save_checkpoint
from cloud.config import FederatedConfig
from cloud.devices import DeviceRegistry
from cloud.report import RunReport
from cloud.round_state import RoundState
from cloud.split_messaging import SplitMessaging
from cloud.split_session import PARALLEL_MODES, SPLIT_MODES, CloudHalf
from cloud.split_steps import StepLedger, StepQueue
from cloud.strategies import ClientUpdate, get_strategy
from converters.datasets import Dataset
from converters.errors import ConfigError
from converters.mqtt import MqttConfig, MqttEndpoint
from converters.tensor_codec import encode_tensors
from converters.topics import Topics
from converters.wire import MsgType

log = logging.getLogger(__name__)


def resolve_cuts(config: FederatedConfig, model, spec) -> tuple[str, str | None]:
    """The run's (cut, head_cut): the zoo default cut; U-shaped defaults to the last cut point."""
    import torch

    from split.graph import valid_cuts

    cut = config.cut if config.cut is not None else spec.default_cut  # '' is no layer
    head_cut = config.head_cut
    if config.mode == "ushaped" and head_cut is None:
        head_cut = valid_cuts(model, torch.zeros(2, *spec.input_shape))[-1]
    if config.mode != "ushaped" and head_cut is not None:
        raise ConfigError(f"head_cut is only used with mode='ushaped', got mode={config.mode!r}")
    return cut, head_cut


class SplitTrainer(SplitMessaging):
    """Runs split-learning rounds against devices (:class:`edge.split_client.SplitClient`).

    Args:
        config: the run's settings; ``config.mode`` picks the topology.
        mqtt: connection to the broker.
        test_set: held-out data the merged model is evaluated on after each round.
        expected_devices: devices to wait for before round 1.
        on_round: called with each round's metrics row.
        batch_window: SplitFed V2: seconds to wait for more devices' activations to serve them
            in ONE cloud forward/backward; 0 serves one device at a time.
        max_batch_devices: most devices served by one cloud call.
    """

    def __init__(
        self,
        config: FederatedConfig,
        *,
        mqtt: MqttConfig,
        test_set: Dataset,
        expected_devices: int | None = None,
        on_round: Callable[[dict], None] | None = None,
        batch_window: float = 0.005,
        max_batch_devices: int = 32,
    ) -> None:
        import torch

        from split.graph import split_model
        from split.zoo import build_model

        if config.mode not in SPLIT_MODES:
            raise ConfigError(f"mode must be one of {', '.join(SPLIT_MODES)}, got {config.mode!r}")
        if config.strategy != "fedavg" and config.mode not in PARALLEL_MODES:
            raise ConfigError(
                f"strategy={config.strategy!r} needs a SplitFed mode (splitfed-v1/v2 average "
                f"device halves); mode={config.mode!r} relays one half device to device"
            )
        if config.strategy == "fedprox":
            raise ConfigError(
                "strategy='fedprox' is not supported in split modes: split devices do not add "
                "the proximal term; use fedavg, fedavgm, fedadam, fedyogi, median or trimmed-mean"
            )
        if batch_window < 0 or max_batch_devices < 1:
            raise ValueError(
                f"batch_window must be >= 0 and max_batch_devices >= 1, got {batch_window}, "
                f"{max_batch_devices}"
            )
        self.config = config
        self.topics = Topics(prefix=config.prefix)
        self.test = test_set
        self.expected = expected_devices or config.min_clients
        self.on_round = on_round
        self.batch_window = batch_window if config.mode == "splitfed-v2" else 0.0
        self.max_batch_devices = max_batch_devices
        self.registry = DeviceRegistry()
        self.model, self.spec = build_model(config.model, seed=config.seed)
        self.cut, self.head_cut = resolve_cuts(config, self.model, self.spec)
        example = torch.zeros(2, *self.spec.input_shape)
        self.split = split_model(
            self.model, cut=self.cut, example_input=example, head_cut=self.head_cut
        )
        device_modules = [self.split.edge] + ([self.split.head] if self.split.head else [])
        # What devices hold and the cloud relays or averages: edge (+ head) state, model names.
        self.device_params = {
            k: v.detach().numpy().copy() for m in device_modules for k, v in m.state_dict().items()
        }
        # Sample-level DP (split.privacy.split_dp): the settings sent to every device.
        self.split_dp = self._plan_dp() if config.dp == "sample" else None
        self._expect = {k: (v.shape, str(v.dtype)) for k, v in self.device_params.items()}
        self.half = CloudHalf(
            mode=config.mode,
            module=self.split.cloud,
            lr=config.lr,
            momentum=config.momentum,
            num_classes=self.spec.num_classes,
        )
        # Device halves, and in V1 the cloud-half copies, each get their own instance: server
        # momentum / Adam state belongs to one parameter set.
        self.strategy = get_strategy(config.strategy, **config.strategy_args)
        self.cloud_strategy = get_strategy(config.strategy, **config.strategy_args)
        self.rng = np.random.default_rng(config.seed)
        self.round = 0
        self.session = secrets.token_hex(8)
        self.report = RunReport(config.out_dir)
        self.ckpt_path = Path(config.out_dir) / "checkpoint.npz"
        self.stray_rejected = 0
        self._act_epsilon: dict[str, float] = {}  # device -> its reported per-sample epsilon
        self._act_releases: dict[str, int] = {}  # device -> epochs it was asked to train
        self._state: RoundState | None = None
        self._state_lock = threading.Lock()
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._ledger = StepLedger()
        # Step workers (config.split_workers): each device's trained cloud-half copy, by device,
        # and which worker trained it; the round's cloud half, encoded once for HALF replies.
        self.workers_mode = config.split_workers > 0
        self._half_updates: dict[str, dict[str, np.ndarray]] = {}
        self._half_workers: dict[str, str] = {}
        self._half_body = b""
        self._step_bytes = [0, 0]  # step traffic the workers carried this round (up, down)
        self._cloud_expect = {
            k: (tuple(v.shape), v.numpy().dtype.name)
            for k, v in self.split.cloud.state_dict().items()
        }
        self._work = StepQueue(
            window=self.batch_window, max_devices=max_batch_devices, active=self._active
        )
        self._torch = torch
        self._pool: ThreadPoolExecutor | None = None
        self.endpoint = MqttEndpoint(mqtt)

    def _plan_dp(self):
        """The run's :class:`split.privacy.split_dp.SplitDP`, calibrated for every round.

        Raises:
            ConfigError: The device halves cannot be privatized, or the budget is infeasible.
        """
        from split.errors import PrivacyConfigError
        from split.privacy.dpsgd import _problems
        from split.privacy.split_dp import SplitDP

        cfg = self.config
        head = self.split.head
        problems = [f"edge.{p}" for p in _problems(self.split.edge)]
        problems += [f"head.{p}" for p in _problems(head)] if head is not None else []
        if problems:
            raise ConfigError(
                f"dp='sample': the device halves of {cfg.model} cannot be privatized by Opacus; "
                f"offending modules: {'; '.join(problems)}"
            )
        if head is not None:  # U-shaped: the loss gradient travels, the labels stay
            extra = dict(grad_clip=cfg.grad_noise_clip)
        else:  # the labels travel: randomized response, half the target unless set
            share = cfg.label_epsilon or (cfg.target_epsilon or 0.0) / 2
            extra = dict(label_epsilon=share, num_classes=self.spec.num_classes)
        try:
            if cfg.target_epsilon is not None:
                return SplitDP.for_target(
                    target_epsilon=cfg.target_epsilon,
                    delta=cfg.delta,
                    releases=cfg.rounds * cfg.local_epochs,
                    act_clip=cfg.act_noise_clip,
                    param_clip=cfg.clip,
                    **extra,
                )
            sigma = cfg.noise_multiplier
            if head is not None:
                extra["grad_sigma"] = cfg.grad_noise_multiplier or sigma
            return SplitDP(
                act_clip=cfg.act_noise_clip,
                act_sigma=cfg.act_noise_multiplier or sigma,
                param_clip=cfg.clip,
                param_sigma=sigma,
                delta=cfg.delta,
                **extra,
            )
        except PrivacyConfigError as exc:
            raise ConfigError(f"dp='sample': {exc}") from None

    def _budget_left(self) -> str | None:
        """Why another round would overspend target_epsilon, or None if it fits."""
        cfg = self.config
        if self.split_dp is None or cfg.target_epsilon is None:
            return None
        worst = max(self._act_releases.values(), default=0) + cfg.local_epochs
        after = self.split_dp.epsilon(worst)
        if after <= cfg.target_epsilon:
            return None
        return (
            f"privacy budget: another round would reach epsilon {after:.4g} > target_epsilon="
            f"{cfg.target_epsilon} ({worst} steps per sample on the most-trained device)"
        )

    # -- rounds ----------------------------------------------------------------------------

    def _active(self) -> int:
        state = self._current()
        if state is None:
            return 1
        with state.cond:
            return len(state.pending())

    def _model_meta(self) -> dict:
        cfg = self.config
        return {
            "model": cfg.model,
            "session": self.session,
            "mode": cfg.mode,
            "cut": self.cut,
            "head_cut": self.head_cut,
            "steps": "workers" if self.workers_mode else "cloud",
            "config": {
                "epochs": cfg.local_epochs,
                "batch_size": cfg.batch_size,
                "lr": cfg.lr,
                "momentum": cfg.momentum,
                "act_codec": cfg.act_codec,
                "step_qos": cfg.step_qos,
                # With DP the activation noise is part of config.dp (one ledger).
                "act_noise_clip": 0.0 if self.split_dp else cfg.act_noise_clip,
                "act_noise_multiplier": 0.0 if self.split_dp else cfg.act_noise_multiplier,
                "act_noise_delta": cfg.delta,
                **({"dp": self.split_dp.to_meta()} if self.split_dp else {}),
            },
        }

    def _send_model(self, device: str, round_: int) -> None:
        # Each local epoch releases every sample's activation once (counted even if it crashes).
        releases = self._act_releases.get(device, 0) + self.config.local_epochs
        self._act_releases[device] = releases
        body = encode_tensors(self.device_params, codec="float32")
        payload = self._envelope(MsgType.MODEL, round_, self._model_meta(), body)
        self._pool.submit(self._send, device, payload)

    def _outstanding(self, state: RoundState, devices: set[str]) -> set[str]:
        """Devices still owing their UPDATE (and, with step workers, their cloud-half copy).
        Call with ``state.cond`` held."""
        left = devices & state.pending()
        if self.workers_mode:
            left |= devices - set(self._half_updates) - state.dropped
        return left

    def _wait(self, state: RoundState, devices: set[str], deadline: float) -> None:
        with state.cond:
            while self._outstanding(state, devices) and time.monotonic() < deadline:
                state.cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))

    def _select(self) -> list[str]:
        cfg = self.config
        if len(self.registry.online()) < cfg.min_clients:
            self.registry.wait_for(cfg.min_clients, timeout=cfg.register_timeout)
        online = self.registry.online()
        k = min(cfg.clients_per_round or int(np.ceil(cfg.fraction * len(online))), len(online))
        return sorted(self.rng.choice(online, size=k, replace=False).tolist()) if k else []

    def _run_round(self) -> dict:
        cfg = self.config
        t0 = time.monotonic()
        deadline = t0 + cfg.round_timeout
        sent0, recv0 = self.endpoint.stats.bytes_sent, self.endpoint.stats.bytes_received
        stats0 = self.half.stats.snapshot()
        selected = self._select()
        log.debug("round %d: selected %s", self.round, selected)
        state = RoundState(round=self.round, selected=frozenset(selected))
        self.half.begin_round()
        self._ledger.forget()
        if self.workers_mode:
            with state.cond:
                self._half_updates.clear()
                self._half_workers.clear()
                self._step_bytes = [0, 0]
            self._half_body = encode_tensors(
                {k: v.detach().numpy() for k, v in self.split.cloud.state_dict().items()},
                codec="float32",
            )
        with self._state_lock:
            self._state = state
        self._announce(MsgType.ROUND_START, "running")
        if cfg.mode in PARALLEL_MODES:
            for device in selected:
                self._send_model(device, state.round)
            self._wait(state, set(selected), deadline)
        else:
            for device in selected:  # devices take turns; the device half is relayed
                self._send_model(device, state.round)
                self._wait(state, {device}, deadline)
                with state.cond:
                    update = state.updates.get(device)
                if update is not None:
                    self.device_params = update.params
        with self._state_lock:
            self._state = None
        for device in state.pending():
            self.half.drop(device)
        with state.cond:
            updates = sorted(state.updates.values(), key=lambda u: u.client_id)
            row = {
                "round": self.round,
                "mode": cfg.mode,
                "clients_selected": len(selected),
                "clients_ok": len(updates),
                "clients_dropped": len(state.dropped),
                "clients_timed_out": len(state.pending()),
                "rejected": state.rejected,
                "late": state.late,
                "duplicates": state.duplicates,
            }
            if self.workers_mode:
                # A device counts only with its cloud-half copy: its worker may have died.
                updates = [u for u in updates if u.client_id in self._half_updates]
                row["clients_ok"] = len(updates)
                row["step_workers"] = len(set(self._half_workers.values()))
        if self.split_dp is not None:
            row["epsilon"] = self._split_dp_epsilon(updates)
        elif cfg.act_noise_clip > 0:
            row["epsilon"] = self._act_noise_epsilon(updates)
        if updates and len(updates) >= min(cfg.min_clients, len(selected)):
            self._aggregate(updates)
            acc, loss = self._evaluate()
            row.update(status="ok", accuracy=acc, loss=loss)
        else:
            log.warning(
                "round %d failed: %d of %d devices finished",
                self.round,
                len(updates),
                len(selected),
            )
            row.update(status="failed", accuracy=None, loss=None)
        stats = self.half.stats.snapshot()
        seconds = time.monotonic() - t0
        samples = stats["cloud_samples"] - stats0["cloud_samples"]
        calls = stats["cloud_calls"] - stats0["cloud_calls"]
        if self.workers_mode:  # the workers computed: count what the finished devices trained
            samples = sum(u.num_samples for u in updates) * cfg.local_epochs
        row.update(
            # With step workers the steps bypass this process: add what they carried.
            bytes_up=self.endpoint.stats.bytes_received - recv0 + self._step_bytes[0],
            bytes_down=self.endpoint.stats.bytes_sent - sent0 + self._step_bytes[1],
            seconds=seconds,
            samples=samples,
            samples_per_s=samples / seconds if seconds > 0 else 0.0,
            cloud_calls=calls,
            cloud_compute_seconds=stats["cloud_compute_seconds"] - stats0["cloud_compute_seconds"],
        )
        return row

    def _split_dp_epsilon(self, updates: list[ClientUpdate]) -> float:
        """Largest per-sample epsilon of any device so far, from the cloud's own count.

        The cloud knows how many epochs it asked each device for (counted when MODEL leaves,
        so a device that crashed mid-round is not under-reported); a device's own report must
        agree with that count, else it is logged and ignored.
        """
        worst = self.split_dp.epsilon(max(self._act_releases.values(), default=0))
        for u in updates:
            got = u.metrics.get("epsilon") if isinstance(u.metrics, dict) else None
            want = self.split_dp.epsilon(self._act_releases.get(u.client_id, 0))
            ok = isinstance(got, (int, float)) and not isinstance(got, bool)
            if not ok or not math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12):
                log.warning(
                    "%s reported epsilon=%r, but its %d steps per sample give %.6g; the cloud's "
                    "count is used", u.client_id, got, self._act_releases.get(u.client_id, 0), want
                )  # fmt: skip
            self._act_epsilon[u.client_id] = want
        return worst

    def _act_noise_epsilon(self, updates: list[ClientUpdate]) -> float:
        """Largest per-sample epsilon of any device so far (inf: one reported none).

        A device's value is the larger of its report and the cloud's own count of the epochs
        it asked for, so a device that released activations but never sent its UPDATE (crash,
        divergence) is not under-reported.
        """
        from split.privacy.activation_noise import ActivationNoise, activation_epsilon

        cfg = self.config
        for u in updates:
            eps = u.metrics.get("act_epsilon") if isinstance(u.metrics, dict) else None
            ok = isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps >= 0
            if not ok:
                log.warning("%s reported act_epsilon=%r; counted as inf", u.client_id, eps)
            self._act_epsilon[u.client_id] = float(eps) if ok else math.inf
        noise = ActivationNoise(clip=cfg.act_noise_clip, noise_multiplier=cfg.act_noise_multiplier)
        worst = 0.0
        for device, releases in self._act_releases.items():
            own = activation_epsilon(noise, releases=releases, delta=cfg.delta)
            worst = max(worst, own, self._act_epsilon.get(device, 0.0))
        return worst

    def _aggregate(self, updates: list[ClientUpdate]) -> None:
        cfg = self.config
        if cfg.mode in PARALLEL_MODES:
            self.device_params = self.strategy.aggregate(self.device_params, updates)
        if cfg.mode == "splitfed-v1":
            copies = dict(self._half_updates) if self.workers_mode else self.half.copies()
            done = [u for u in updates if u.client_id in copies]
            if done:
                base = {k: v.detach().numpy() for k, v in self.split.cloud.state_dict().items()}
                cloud_updates = [
                    ClientUpdate(u.client_id, copies[u.client_id], u.num_samples) for u in done
                ]
                merged = self.cloud_strategy.aggregate(base, cloud_updates)
                self._load(self.split.cloud, merged)

    def _load(self, module, params: dict) -> None:
        torch = self._torch
        module.load_state_dict(
            {k: torch.from_numpy(np.array(v, copy=True)) for k, v in params.items()}, strict=False
        )

    def _evaluate(self) -> tuple[float, float]:
        from split.train import evaluate

        self._load_device_halves()
        return evaluate(self.split, self.test.x, self.test.y)

    def _load_device_halves(self) -> None:
        """Copies ``device_params`` into the cloud's edge (and head) modules."""
        self._load(
            self.split.edge,
            {k: v for k, v in self.device_params.items() if k in self.split.edge.state_dict()},
        )
        if self.split.head is not None:
            self._load(
                self.split.head,
                {k: v for k, v in self.device_params.items() if k in self.split.head.state_dict()},
            )

    # -- checkpoint ------------------------------------------------------------------------

    def _checkpoint(self) -> None:
        """Everything a resumed run needs after the completed round (atomic, no pickle)."""
        save_checkpoint(
            self.ckpt_path,
            {
                "round": self.round,
                "run_id": self.config.run_id,
                "model": self.config.model,
                "mode": self.config.mode,
                "cut": self.cut,
                "head_cut": self.head_cut,
                "device_params": self.device_params,
                "cloud_params": {
                    k: v.detach().numpy().copy() for k, v in self.split.cloud.state_dict().items()
                },
                "strategy": self.strategy.state_dict(),
                "cloud_strategy": self.cloud_strategy.state_dict(),
                "rng": self.rng.bit_generator.state,
                "act_releases": dict(self._act_releases),
                "act_epsilon": dict(self._act_epsilon),
                "split_dp": self.split_dp.to_meta() if self.split_dp else None,
            },
        )

    def _resume(self) -> None:
        state = load_checkpoint(self.ckpt_path)
        here = {"run_id": self.config.run_id, "model": self.config.model,
                "mode": self.config.mode, "cut": self.cut, "head_cut": self.head_cut}  # fmt: skip
        for key, value in here.items():
            if state.get(key) != value:
                raise ConfigError(
                    f"--resume: checkpoint {self.ckpt_path} is for {key}={state.get(key)!r}, "
                    f"this run has {key}={value!r}"
                )
        self.round = int(state["round"])
        self.device_params = state["device_params"]
        self._load(self.split.cloud, state["cloud_params"])
        self.strategy.load_state_dict(state["strategy"])
        self.cloud_strategy.load_state_dict(state["cloud_strategy"])
        self.rng.bit_generator.state = state["rng"]
        # Activation-noise accounting continues: releases and reports are never reset.
        self._act_releases = {k: int(v) for k, v in state["act_releases"].items()}
        self._act_epsilon = {k: float(v) for k, v in state["act_epsilon"].items()}
        saved_dp = state.get("split_dp")
        if (saved_dp is None) != (self.split_dp is None):
            raise ConfigError(
                f"--resume: checkpoint {self.ckpt_path} has dp={'sample' if saved_dp else 'none'}"
                f", this run has dp={self.config.dp!r}"
            )
        if saved_dp is not None:
            from split.privacy.split_dp import SplitDP

            # The noise already spent was calibrated for the original plan; keep it, so the
            # ledger goes on at the same sigma (more rounds then stop at the budget).
            self.split_dp = SplitDP.from_meta(saved_dp)
        self._load_device_halves()
        self.report.load_existing(upto_round=self.round)
        log.info("resumed %s after round %d", self.config.run_id, self.round)

    def run(self, *, resume: bool = False) -> dict:
        """Runs the remaining rounds; returns the summary (also written to summary.json).

        Args:
            resume: continue after the last checkpointed round (model halves, strategy state,
                selection RNG and activation-noise accounting), or start at round 1 if there
                is no checkpoint.
        """
        cfg = self.config
        resumed = resume and self.ckpt_path.exists()
        if resumed:
            self._resume()
        elif resume:
            log.info("--resume: no checkpoint at %s; starting at round 1", self.ckpt_path)
        self.endpoint.connect()
        if not resumed:  # once connected: an unreachable broker must not cost the old outputs
            self.report.start_fresh()
        self.endpoint.subscribe(self.topics.presence_wildcard(), self._on_presence)
        self.endpoint.subscribe(self.topics.up_wildcard(), self._on_up)
        if self.workers_mode:
            self.endpoint.subscribe(self.topics.workers_up_wildcard(), self._on_worker)
        worker = threading.Thread(target=self._compute_loop, name="split-cloud", daemon=True)
        worker.start()
        stop_reason = None
        try:
            with ThreadPoolExecutor(max_workers=32, thread_name_prefix="send") as pool:
                self._pool = pool
                self._announce(MsgType.ROUND_START, "registering")
                n = self.registry.wait_for(self.expected, timeout=cfg.register_timeout)
                log.info("%d device(s) online, %d expected", n, self.expected)
                while self.round < cfg.rounds:
                    stop_reason = self._budget_left()
                    if stop_reason:
                        log.warning("stopping: %s", stop_reason)
                        break
                    self.round += 1
                    row = self._run_round()
                    # Row first, then checkpoint (as the federated server does).
                    self.report.add(row)
                    self._checkpoint()
                    if self.on_round is not None:
                        self.on_round(row)
                self._announce(MsgType.BYE, "finished")
        finally:
            self._pool = None
            self._work.close()
            worker.join(timeout=5)
            self.endpoint.close()
        self.report.plot()
        return self.report.summary(
            {
                "run_id": cfg.run_id,
                "model": cfg.model,
                "mode": cfg.mode,
                "cut": self.cut,
                "head_cut": self.head_cut,
                "act_codec": cfg.act_codec,
                "dp": (
                    "sample"
                    if self.split_dp
                    else "activation"
                    if cfg.act_noise_clip > 0
                    else "none"
                ),  # fmt: skip
                "delta": cfg.delta if cfg.act_noise_clip > 0 else None,
                "act_noise_clip": cfg.act_noise_clip,
                "act_noise_multiplier": (
                    self.split_dp.act_sigma if self.split_dp else cfg.act_noise_multiplier
                ),
                "split_dp": self.split_dp.to_meta() if self.split_dp else None,
                "stopped": stop_reason,
                "strategy": cfg.strategy,
                "stray_rejected": self.stray_rejected,
                "cloud_samples": sum(r.get("samples", 0) for r in self.report.rows),
            }
        )
