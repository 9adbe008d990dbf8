"""Device side of secure aggregation (Bonawitz et al., CCS'17, semi-honest variant with dropouts).

Per round a device makes two fresh X25519 key pairs (``c`` encrypts Shamir shares to peers,
``s`` agrees pairwise mask seeds) and a fresh 32-byte self-mask seed ``b`` (OS CSPRNG via
:mod:`secrets`), and walks four steps, every message relayed by the cloud:

1. AdvertiseKeys: send ``c_pk || s_pk``.
2. ShareKeys: on the list of advertised keys, Shamir-share ``b`` and the raw ``s`` secret key
   t-of-|U1| and send each peer its pair of shares under AES-256-GCM keyed by
   HKDF(X25519(c_u, c_v)); the cloud only relays ciphertexts.
3. MaskedInput: once local training is done and the peers' encrypted shares arrived, send
   ``y = q(w * clip(delta)) + PRG(b) + sum_v ±PRG(HKDF(X25519(s_u, s_v)))  (mod 2^32)``.
4. Unmasking: for the survivors list the cloud sends, reveal the b-share of each survivor and
   the s-share of each dropped device; never both for one device, and only once per round.

SecAgg+ (Bell et al., CCS'20): when the cloud announces ``secure_neighbours`` k and a graph
seed, every step above runs over this device's neighbours in the k-regular graph of
:func:`converters.secagg_protocol.neighbour_graph` instead of over all of U1, with the
threshold t counted within the closed neighbourhood (k + 1 holders): O(k) instead of O(n)
key agreements, masks and shares per device. ``k >= n - 1`` is plain SecAgg.

Secret keys never leave the device except as those encrypted shares. Distributed DP: a
``noise`` hook adds this device's noise share to the clipped, weighted vector before masking.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable

import numpy as np

from converters import secagg_protocol as sp
from converters.errors import WireError
from converters.wire import Envelope, MsgType

log = logging.getLogger(__name__)

_SHARE_PLAIN = 2 * sp.SHARE_BYTES  # b-share || s-share


def _pair(u: str, v: str) -> tuple[str, str]:
    return (u, v) if u < v else (v, u)


class SecAggClient:
    """One device's state for one secure-aggregation round (pure: no I/O).

    Args:
        device_id: this device.
        run_id: the run, bound into every key derivation and AES-GCM associated data.
        round_: the round, likewise (keys and seeds are fresh per round anyway).
        threshold: Shamir threshold t announced by the cloud.
        neighbours: SecAgg+ graph degree k announced by the cloud; None: every device is a
            neighbour (plain SecAgg).
        graph_seed: the round's public graph seed announced by the cloud.
    """

    def __init__(
        self,
        *,
        device_id: str,
        run_id: str,
        round_: int,
        threshold: int,
        neighbours: int | None = None,
        graph_seed: str = "",
    ) -> None:
        if not isinstance(threshold, int) or threshold < 1:
            raise ValueError(f"threshold must be an int >= 1, got {threshold!r}")
        if neighbours is not None and (not isinstance(neighbours, int) or neighbours < 1):
            raise ValueError(f"neighbours must be None or an int >= 1, got {neighbours!r}")
        if not isinstance(graph_seed, str):
            raise ValueError(f"graph_seed must be a str, got {type(graph_seed).__name__}")
        self.id, self.run_id, self.round, self.threshold = device_id, run_id, round_, threshold
        self.k, self.graph_seed = neighbours, graph_seed
        self.neighbours: frozenset[str] = frozenset()  # set once the key list arrives
        self._c = sp.generate_private_key()
        self._s = sp.generate_private_key()
        self._b = secrets.token_bytes(sp.KEY_BYTES)
        self.keys: dict[str, bytes] = {}  # U1: device -> c_pk || s_pk
        self.u2: list[str] | None = None
        self._held: dict[str, tuple[int | None, int | None]] = {}
        self._answered = False
        self.rejected: list[str] = []

    def _ctx(self, purpose: str, a: str, b: str) -> bytes:
        return sp.context(self.run_id, self.round, purpose, a, b)

    def advertise(self) -> bytes:
        """Step 1: ``c_pk || s_pk`` (64 bytes)."""
        return sp.public_bytes(self._c) + sp.public_bytes(self._s)

    def share_keys(self, key_list: dict[str, bytes]) -> dict[str, bytes]:
        """Step 2: encrypted shares of ``b`` and ``s_sk`` for every other advertised device.

        Raises:
            WireError: our own keys are missing, fewer than t devices, or duplicate keys.
        """
        if key_list.get(self.id) != self.advertise():
            raise WireError(f"round {self.round}: key list lacks this device's own keys")
        if len(key_list) < self.threshold:
            raise WireError(
                f"round {self.round}: {len(key_list)} advertised devices < threshold "
                f"{self.threshold}"
            )
        halves = [v[i : i + 32] for v in key_list.values() for i in (0, 32)]
        if len(set(halves)) != len(halves):  # Bonawitz: abort unless all keys are distinct
            raise WireError(f"round {self.round}: advertised public keys are not all distinct")
        self.keys = dict(key_list)
        if self.k is None:
            self.neighbours = frozenset(key_list) - {self.id}
        else:
            graph = sp.neighbour_graph(
                key_list, k=self.k, seed=self.graph_seed, run_id=self.run_id, round_=self.round
            )
            self.neighbours = graph[self.id]
        if len(self.neighbours) + 1 < self.threshold:
            raise WireError(
                f"round {self.round}: {len(self.neighbours)} neighbours + this device < "
                f"threshold {self.threshold}"
            )
        xs = sp.holder_indices(key_list)
        holders = [xs[v] for v in sorted(self.neighbours | {self.id})]
        b_sh = sp.split_secret(int.from_bytes(self._b, "big"), threshold=self.threshold, xs=holders)
        s_raw = sp.private_bytes(self._s)
        s_sh = sp.split_secret(int.from_bytes(s_raw, "big"), threshold=self.threshold, xs=holders)
        self._held[self.id] = (b_sh[xs[self.id]], s_sh[xs[self.id]])
        out = {}
        for v in sorted(self.neighbours):
            pks = key_list[v]
            key = sp.agree(self._c, pks[:32], info=self._ctx("share-key", *_pair(self.id, v)))
            plain = sp.share_to_bytes(b_sh[xs[v]]) + sp.share_to_bytes(s_sh[xs[v]])
            out[v] = sp.seal(key, plain, aad=self._ctx("share", self.id, v))
        return out

    def receive_shares(self, blobs: dict[str, bytes]) -> list[str]:
        """Step 2 (receiving): decrypts the shares neighbours sent us; U2 = senders plus us.

        A share failing its AES-GCM tag is rejected (reason logged and returned); this device
        still masks with its sender, it just cannot help unmask that sender later.

        Raises:
            WireError: a sender was not advertised or is not a neighbour, or U2 (within this
                device's neighbourhood) is below the threshold.
        """
        unknown = sorted(set(blobs) - set(self.keys) | ({self.id} & set(blobs)))
        if unknown:
            raise WireError(f"round {self.round}: shares from unadvertised devices {unknown}")
        strangers = sorted(set(blobs) - self.neighbours)
        if strangers:
            raise WireError(f"round {self.round}: shares from non-neighbours {strangers[:3]}")
        u2 = sorted(set(blobs) | {self.id})
        if len(u2) < self.threshold:
            raise WireError(
                f"round {self.round}: {len(u2)} devices shared keys < threshold {self.threshold}"
            )
        reasons = []
        for u, blob in blobs.items():
            try:
                key = sp.agree(
                    self._c, self.keys[u][:32], info=self._ctx("share-key", *_pair(self.id, u))
                )
                plain = sp.open_sealed(
                    key, blob, aad=self._ctx("share", u, self.id), what=f"share from {u}"
                )
                if len(plain) != _SHARE_PLAIN:
                    raise WireError(f"share from {u} must be {_SHARE_PLAIN} bytes")
                b_y = sp.share_from_bytes(plain[: sp.SHARE_BYTES])
                s_y = sp.share_from_bytes(plain[sp.SHARE_BYTES :])
                self._held[u] = (b_y, s_y)
            except WireError as exc:
                reasons.append(f"{self.id} round {self.round}: {exc}")
        self.u2 = u2
        self.rejected += reasons
        return reasons

    def masked_input(self, x_u32: np.ndarray) -> np.ndarray:
        """Step 3: ``x + PRG(b) + sum_{v in U2 ∩ N(u)} sign(u, v) * PRG(s_uv)`` mod 2^32."""
        from kernels.masking import add_masks, expand_mask

        if self.u2 is None:
            raise WireError(f"round {self.round}: masked input requested before ShareKeys")
        n = int(x_u32.shape[0])
        masks = [(expand_mask(self._b, n), 1)]
        for v in self.u2:
            if v == self.id:
                continue
            seed = sp.agree(self._s, self.keys[v][32:], info=self._ctx("mask", *_pair(self.id, v)))
            masks.append((expand_mask(seed, n), 1 if self.id < v else -1))
        return add_masks(x_u32, masks)

    def unmask(self, survivors: list[str], dropped: list[str]) -> dict[str, bytes]:
        """Step 4: ``{v: b"b" + b-share}`` for survivors, ``{v: b"s" + s-share}`` for dropped.

        Only devices in this device's U2 (its neighbours that shared keys, and itself) get a
        share; the lists may name other devices too.

        Raises:
            WireError: asked twice, the lists overlap or do not cover U2, this device is
                not a survivor, or fewer survivors in its U2 than the threshold.
        """
        if self._answered:
            raise WireError(f"round {self.round}: unmasking already answered once")
        if self.u2 is None:
            raise WireError(f"round {self.round}: unmask request before ShareKeys")
        surv, drop = set(survivors), set(dropped)
        if surv & drop or not set(self.u2) <= surv | drop or self.id not in surv:
            raise WireError(
                f"round {self.round}: survivors/dropped must partition U2 and include this "
                f"device, got {sorted(surv)} / {sorted(drop)}"
            )
        mine = surv & set(self.u2)
        if len(mine) < self.threshold:
            raise WireError(
                f"round {self.round}: {len(mine)} survivors < threshold {self.threshold}"
            )
        self._answered = True
        out = {}
        for v in sorted(set(self.u2)):
            held = self._held.get(v)
            if held is None:
                continue  # its share failed authentication; the others cover it
            out[v] = (
                b"b" + sp.share_to_bytes(held[0])
                if v in surv
                else b"s" + sp.share_to_bytes(held[1])
            )
        # The s-share of every survivor and the b-share of every dropped device are now useless.
        self._held.clear()
        return out


Reply = Callable[[Envelope, MsgType, dict, bytes], None]


class SecAggSession:
    """Drives :class:`SecAggClient` rounds for one device agent over its MQTT replies.

    Args:
        device_id: this device.
        num_samples: its training set size (its FedAvg weight numerator).
        reply: ``reply(request_env, type, meta, body)`` sends on the device's uplink.
    """

    def __init__(self, *, device_id: str, num_samples: int, reply: Reply) -> None:
        self.id, self.num_samples, self._reply = device_id, num_samples, reply
        self._lock = threading.Lock()
        self._client: SecAggClient | None = None
        self._env: Envelope | None = None
        self._vector: np.ndarray | None = None
        self._metrics: dict = {}
        self._sent_masked = False
        self.rejected = 0
        # Hooks: noise(vector) -> vector adds a distributed-DP share before masking;
        # after_phase(name) lets fault-injection tests crash the device at a chosen step.
        self.noise: Callable[[np.ndarray], np.ndarray] | None = None
        self.after_phase: Callable[[str], None] | None = None

    def _phase_done(self, name: str) -> None:
        if self.after_phase is not None:
            self.after_phase(name)

    def on_model(self, env: Envelope) -> None:
        """A MODEL for a secagg round: start the round and advertise keys at once."""
        cfg = env.meta.get("config") or {}
        with self._lock:
            self._client = SecAggClient(
                device_id=self.id,
                run_id=env.run_id,
                round_=env.round,
                threshold=cfg.get("secure_threshold"),
                neighbours=cfg.get("secure_neighbours"),
                graph_seed=cfg.get("secure_graph_seed", ""),
            )
            self._env, self._vector, self._sent_masked = env, None, False
            body = self._client.advertise()
        self._reply(env, MsgType.KEY_ADVERTISE, {"phase": "advertise"}, body)
        self._phase_done("advertise")

    def submit_update(self, env: Envelope, old: dict, new: dict, metrics: dict) -> None:
        """Local training finished: quantise the weighted, clipped delta; send when ready."""
        cfg = env.meta["config"]
        plan = sp.FixedPointPlan(
            clip=float(cfg["secure_clip"]),
            frac_bits=int(cfg["secure_frac_bits"]),
            n_devices=int(cfg["secure_devices"]),
        )
        weight = self.num_samples / int(cfg["secure_total_samples"])
        vec = sp.weighted_clipped_delta(new, old, weight=weight, clip=plan.clip)
        if self.noise is not None:
            vec = np.clip(self.noise(vec), -plan.clip, plan.clip)
        from kernels.masking import quantize_fixed

        q = quantize_fixed(vec, frac_bits=plan.frac_bits, clip=plan.clip)
        with self._lock:
            if self._env is None or self._env.round != env.round:
                return  # a newer round started meanwhile
            self._vector, self._metrics = q, metrics
        self._maybe_send_masked()

    def _maybe_send_masked(self) -> None:
        with self._lock:
            c = self._client
            if c is None or c.u2 is None or self._vector is None or self._sent_masked:
                return
            self._sent_masked = True
            body = c.masked_input(self._vector).astype("<u4").tobytes()
            env, meta = self._env, {"phase": "masked", "metrics": self._metrics}
            self._vector = None
        self._reply(env, MsgType.MASKED_UPDATE, meta, body)
        self._phase_done("masked")

    def on_message(self, env: Envelope) -> None:
        """KEY_ADVERTISE (key list), KEY_SHARE (our shares), UNMASK_REQUEST from the cloud.

        Raises:
            WireError: a malformed or out-of-order message (the agent logs and counts it).
        """
        with self._lock:
            c = self._client
            if c is None or self._env is None or env.round != c.round or env.run_id != c.run_id:
                raise WireError(f"{env.type.name} for round {env.round} outside a secagg round")
        if env.type == MsgType.KEY_ADVERTISE:
            keys = sp.unpack_map(env.body, value_len=64)
            with self._lock:
                shares = c.share_keys(keys)
            self._reply(env, MsgType.KEY_SHARE, {"phase": "shares"}, sp.pack_map(shares))
            self._phase_done("shares")
        elif env.type == MsgType.KEY_SHARE:
            with self._lock:
                reasons = c.receive_shares(sp.unpack_map(env.body))
            for r in reasons:
                self.rejected += 1
                log.warning("rejected: %s", r)
            self._maybe_send_masked()
        elif env.type == MsgType.UNMASK_REQUEST:
            surv, drop = env.meta.get("survivors"), env.meta.get("dropped")
            if not isinstance(surv, list) or not isinstance(drop, list):
                raise WireError("UNMASK_REQUEST needs meta.survivors and meta.dropped lists")
            with self._lock:
                out = c.unmask([str(s) for s in surv], [str(d) for d in drop])
            self._reply(env, MsgType.UNMASK_SHARES, {"phase": "unmask"}, sp.pack_map(out))
            self._phase_done("unmask")
        else:
            raise WireError(f"unexpected {env.type.name} in a secagg round")
