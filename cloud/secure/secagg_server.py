"""Cloud side of secure aggregation (Bonawitz et al., CCS'17): relay shares, unmask the sum only.

The cloud relays the devices' public keys and AES-GCM-encrypted Shamir shares (it cannot read
them), sums the masked inputs mod 2^32, and asks the survivors for exactly one kind of share per
device: b-shares of survivors (to strip their self masks) and s-shares of devices that dropped
after sharing keys (to recompute and strip their pairwise masks). With threshold t it recovers
from up to |U2| - t dropouts at any step. It learns the sum of the weighted, clipped deltas and
nothing about any single one (semi-honest server; see the paper for the active variant).

SecAgg+ (Bell et al., CCS'20): the cloud announces a degree k (``secagg_neighbours``, default
O(log n)) and a fresh public graph seed with the model; everything above then runs within the
k-regular graph of :func:`converters.secagg_protocol.neighbour_graph` over U1, with the
threshold t counted per closed neighbourhood. A device's secrets are recovered from its
neighbours' shares only, so each neighbourhood must keep >= t survivors.
"""

from __future__ import annotations

import logging
import secrets

import numpy as np

from cloud.errors import RoundFailedError
from cloud.secure import SecureAggregator, SecureOutcome
from converters import secagg_protocol as sp
from converters.errors import ConfigError, WireError
from converters.wire import MsgType

log = logging.getLogger(__name__)

SEALED_SHARE_BYTES = 12 + 2 * sp.SHARE_BYTES + 16  # nonce + (b-share, s-share) + GCM tag


def too_few(round_: int, k: int, t: int) -> str:
    return f"round {round_}: {k} survivors < threshold {t}; the previous model stays"


def parse_shares(
    device: str, body: bytes, u1: set[str], neighbours: frozenset[str] | None = None
) -> dict[str, bytes]:
    """A device's encrypted shares: one sealed share per neighbour (default: everyone else)."""
    shares = sp.unpack_map(body, value_len=SEALED_SHARE_BYTES)
    want = u1 - {device} if neighbours is None else set(neighbours)
    if set(shares) != want:
        whom = (
            f"the other {len(u1) - 1} advertised devices"
            if want == u1 - {device}
            else f"its {len(want)} neighbours"
        )
        raise WireError(
            f"shares must be addressed to {whom}, "
            f"got {len(shares)} ({sorted(set(shares) ^ want)[:3]} differ)"
        )
    return shares


def parse_masked(body: bytes, n_values: int) -> np.ndarray:
    """A masked input: ``n_values`` little-endian uint32 words."""
    if len(body) != 4 * n_values:
        raise WireError(
            f"masked vector must have length {n_values} ({4 * n_values} bytes), "
            f"got {len(body) / 4:g} values"
        )
    return np.frombuffer(body, dtype="<u4").astype(np.uint32)


def parse_unmask(
    body: bytes, survivors: set[str], dropped: set[str], holds: set[str] | None = None
) -> dict[str, tuple[str, int]]:
    """A survivor's revealed shares: b for survivors, s for dropped devices, never the other.

    ``holds``: the devices whose shares this survivor can hold (its closed neighbourhood).
    """
    out = {}
    for v, raw in sp.unpack_map(body, value_len=1 + sp.SHARE_BYTES).items():
        if holds is not None and v not in holds:
            raise WireError(f"share for {v} from a device that is not its neighbour")
        kind = raw[:1].decode("ascii", "replace")
        want = "b" if v in survivors else "s" if v in dropped else None
        if kind != want:
            raise WireError(f"share for {v} must be of kind {want!r}, got {kind!r}")
        out[v] = (kind, sp.share_from_bytes(raw[1:]))
    return out


def shortfall(
    round_: int, threshold: int, graph: dict[str, frozenset[str]], u2, survivors
) -> str | None:
    """Why unmasking cannot succeed, or None: some U2 device with < t surviving share holders.

    Only survivors reveal shares, and a device's shares are held by its closed neighbourhood,
    so every device in U2 needs >= t survivors among itself and its neighbours.
    """
    alive = set(survivors)
    for v in sorted(u2):
        have = len((graph[v] | {v}) & alive)
        if have < threshold:
            return (
                f"round {round_}: {have} survivors in the neighbourhood of {v} < threshold "
                f"{threshold}; the previous model stays"
            )
    return None


def unmask_sum(
    *,
    run_id: str,
    round_: int,
    threshold: int,
    adverts: dict[str, bytes],
    u2: list[str],
    masked: dict[str, np.ndarray],
    responses: dict[str, dict[str, tuple[str, int]]],
    graph: dict[str, frozenset[str]] | None = None,
) -> np.ndarray:
    """Sum of the survivors' unmasked inputs mod 2^32 (pure; the unit-tested core).

    Args:
        adverts: U1's ``c_pk || s_pk``; evaluation points come from its sorted order.
        u2: devices that shared keys (everyone masked with all of them).
        masked: U3's masked inputs.
        responses: each responding survivor's parsed shares.
        graph: the SecAgg+ neighbour graph over U1; None: complete (plain SecAgg).

    Raises:
        RoundFailedError: fewer than t responses or shares, or a recovered key that does not
            match its advertised public key.
    """
    from kernels.masking import add_masks, expand_mask, sum_mod

    survivors = sorted(masked)
    dropped = sorted(set(u2) - set(masked))
    if len(responses) < threshold:
        raise RoundFailedError(too_few(round_, len(responses), threshold))
    xs = sp.holder_indices(adverts)

    def recover(v: str, kind: str) -> bytes:
        pts = {xs[u]: r[v][1] for u, r in responses.items() if v in r and r[v][0] == kind}
        if len(pts) < threshold:
            raise RoundFailedError(
                f"round {round_}: {len(pts)} {kind}-shares of {v} < threshold {threshold}; "
                "the previous model stays"
            )
        secret = sp.reconstruct_secret(pts, threshold=threshold)
        if secret >= 2 ** (8 * sp.KEY_BYTES):
            raise RoundFailedError(f"round {round_}: recovered {kind}-secret of {v} is invalid")
        return secret.to_bytes(sp.KEY_BYTES, "big")

    total = sum_mod(np.stack([masked[u] for u in survivors]))
    n = int(total.shape[0])
    corrections = [(expand_mask(recover(u, "b"), n), -1) for u in survivors]
    for v in dropped:
        s_v = sp.private_key_from_bytes(recover(v, "s"))
        if sp.public_bytes(s_v) != adverts[v][32:]:
            raise RoundFailedError(f"round {round_}: recovered mask key of {v} does not match")
        for u in survivors:
            if graph is not None and u not in graph[v]:
                continue  # u and v are not neighbours: they never masked with each other
            lo, hi = sorted((u, v))
            seed = sp.agree(s_v, adverts[u][32:], info=sp.context(run_id, round_, "mask", lo, hi))
            corrections.append((expand_mask(seed, n), -1 if u < v else 1))
    return add_masks(total, corrections)


class SecAggAggregator(SecureAggregator):
    """``secure="secagg"``: the four SecAgg steps on top of one MODEL broadcast."""

    handles = frozenset(
        {MsgType.KEY_ADVERTISE, MsgType.KEY_SHARE, MsgType.MASKED_UPDATE, MsgType.UNMASK_SHARES}
    )

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        cfg = self.config
        if not isinstance(cfg.secure_threshold, int) or cfg.secure_threshold < 0:
            raise ConfigError(f"secure_threshold must be an int >= 0, got {cfg.secure_threshold!r}")
        self._round_cfg: dict = {}

    def client_config(self, selected: list[str]) -> dict:
        plan = sp.FixedPointPlan.for_devices(len(selected), clip=self.config.secure_clip)
        k = sp.neighbour_count(len(selected), self.config.secagg_neighbours)
        self._round_cfg = {
            **super().client_config(selected),
            # Shares live in closed neighbourhoods of k + 1 (k = n - 1: plain SecAgg).
            "secure_threshold": sp.threshold_for(k + 1, self.config.secure_threshold),
            "secure_neighbours": max(1, k),
            "secure_graph_seed": secrets.token_hex(16),  # public: fixes the round's graph
            "secure_clip": plan.clip,
            "secure_frac_bits": plan.frac_bits,
            "secure_devices": len(selected),
        }
        log.info(
            "secagg: t=%d of k+1=%d (n=%d), frac_bits=%d, sum precision %.3g",
            self._round_cfg["secure_threshold"], k + 1, len(selected), plan.frac_bits,
            plan.precision,
        )  # fmt: skip
        return self._round_cfg

    def prepare(self, selected: list[str], state, params: dict, deadline: float) -> None:
        # Devices advertise as soon as MODEL arrives, so the phase opens before it is sent.
        self._open(state, "advertise", selected, lambda d, env: _key_pair(env.body))

    def run(self, state, params: dict[str, np.ndarray], deadline: float) -> SecureOutcome:
        cfg, r = self._round_cfg, state.round
        t = cfg["secure_threshold"]
        n_values = sum(int(np.size(v)) for v in params.values())

        adverts = self._collect(state, deadline)
        if len(adverts) < t:
            return SecureOutcome(None, reason=too_few(r, len(adverts), t))
        u1 = set(adverts)
        graph = sp.neighbour_graph(
            u1,
            k=cfg["secure_neighbours"],
            seed=cfg["secure_graph_seed"],
            run_id=self.config.run_id,
            round_=r,
        )
        if any(len(nb) + 1 < t for nb in graph.values()):
            return SecureOutcome(None, reason=too_few(r, len(adverts), t))
        self._open(state, "shares", u1, lambda d, env: parse_shares(d, env.body, u1, graph[d]))
        key_list = sp.pack_map(adverts)
        self._send([(u, MsgType.KEY_ADVERTISE, {"phase": "keys"}, key_list) for u in u1], state)
        shares = self._collect(state, deadline)
        if len(shares) < t:
            return SecureOutcome(None, reason=too_few(r, len(shares), t))

        u2 = sorted(shares)
        self._open(state, "masked", u2, lambda d, env: (parse_masked(env.body, n_values), env))
        forwards = [
            (v, MsgType.KEY_SHARE, {"phase": "shares"},
             sp.pack_map({u: shares[u][v] for u in u2 if v in shares[u]}))
            for v in u2
        ]  # fmt: skip
        self._send(forwards, state)
        masked = self._collect(state, deadline)
        if len(masked) < t:
            return SecureOutcome(None, reason=too_few(r, len(masked), t))

        survivors = sorted(masked)
        dropped = sorted(set(u2) - set(survivors))
        reason = shortfall(r, t, graph, u2, survivors)
        if reason:
            return SecureOutcome(None, reason=reason)
        s_set, d_set = set(survivors), set(dropped)
        self._open(
            state,
            "unmask",
            survivors,
            lambda d, env: parse_unmask(env.body, s_set, d_set, graph[d] | {d}),
        )
        requests = []
        for u in survivors:  # each survivor hears only about its own neighbourhood
            near = graph[u] | {u}
            meta = {
                "phase": "unmask",
                "survivors": [v for v in survivors if v in near],
                "dropped": [v for v in dropped if v in near],
            }
            requests.append((u, MsgType.UNMASK_REQUEST, meta, b""))
        self._send(requests, state)
        responses = self._collect(state, deadline)
        try:
            total = unmask_sum(
                run_id=self.config.run_id,
                round_=r,
                threshold=t,
                adverts=adverts,
                u2=u2,
                masked={u: v[0] for u, v in masked.items()},
                responses=responses,
                graph=graph,
            )
        except RoundFailedError as exc:
            return SecureOutcome(None, reason=str(exc))
        from kernels.masking import dequantize_sum

        summed = dequantize_sum(total, frac_bits=cfg["secure_frac_bits"], n_summands=len(survivors))
        weight = self._weight(survivors, cfg["secure_total_samples"])
        metrics = {u: dict(v[1].meta.get("metrics") or {}) for u, v in masked.items()}
        if dropped:
            log.info("round %d: recovered masks of dropped devices %s", r, dropped)
        return SecureOutcome(summed / weight, contributors=survivors, metrics=metrics)


def _key_pair(body: bytes) -> bytes:
    if len(body) != 2 * sp.KEY_BYTES:
        raise WireError(f"advertised keys must be {2 * sp.KEY_BYTES} bytes, got {len(body)}")
    return bytes(body)
