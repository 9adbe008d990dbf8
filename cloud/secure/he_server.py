"""Cloud side of Paillier HE aggregation (Phong et al., IEEE TIFS 2018): sum what it cannot read.

Key setup (first HE round): the cloud collects every selected device's X25519 public key, asks
the first selected device to generate the federation Paillier key pair (>= 2048 bits) and relays
the public key plus the AES-GCM-encrypted copies of the secret key that device made for its
peers; the cloud never holds the secret key. Each round the cloud checks every device's
ciphertexts (federation key fingerprint, membership in Z*_{n^2}, count), multiplies them
(:func:`kernels.paillier.sum_ciphertexts`) and sends the encrypted sum to one surviving device,
which returns the averaged plaintext update: the cloud learns the aggregate only.
"""

from __future__ import annotations

import base64
import logging
import math

import numpy as np

from cloud.errors import RoundFailedError
from cloud.secure import SecureAggregator, SecureOutcome
from converters import secagg_protocol as sp
from converters.errors import ConfigError, WireError
from converters.wire import Envelope, MsgType

log = logging.getLogger(__name__)

HE_FRAC_BITS = 24  # resolution 2^-24; a sum of k inputs is within k * 2^-25 of the float sum


class HeAggregator(SecureAggregator):
    """``secure="he-paillier"``: key setup once, then encrypted updates summed by the cloud."""

    handles = frozenset({MsgType.KEY_ADVERTISE, MsgType.HE_PUBLIC_CONTEXT, MsgType.CIPHERTEXT})

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        bits = self.config.he_key_bits
        if not isinstance(bits, int) or bits < 2048 or bits % 2:
            raise ConfigError(f"he_key_bits must be an even int >= 2048, got {bits!r}")
        self.public_key = None  # kernels.PaillierPublicKey, relayed from the key holder
        self.key_holders: set[str] = set()
        self._x25519: dict[str, bytes] = {}  # devices' public X25519 keys (key transport)
        self._round_cfg: dict = {}

    # -- key setup ---------------------------------------------------------------------------

    def _distribute(self, selected: list[str], state, deadline: float) -> None:
        """Gets the federation key onto every selected device that lacks it.

        First HE round: the first selected device generates the key pair. Later rounds: a
        device holding it encrypts the secret for newcomers. Either way the cloud only relays
        X25519 public keys, the Paillier public key and AES-GCM ciphertexts.
        """
        need = [d for d in selected if d not in self.key_holders]
        if not need:
            return
        self._open(state, "he-hello", need, lambda d, env: _x25519_key(env.body))
        self._send([(d, MsgType.KEY_ADVERTISE, {"phase": "he-hello"}, b"") for d in need], state)
        fresh = self._collect(state, deadline)
        self._x25519.update(fresh)
        if self.public_key is None:
            if not fresh:
                raise RoundFailedError(f"round {state.round}: no device answered the HE key setup")
            holder = sorted(fresh)[0]
            meta = {"phase": "generate", "bits": self.config.he_key_bits}
        else:
            with state.cond:
                holders = sorted(set(selected) & self.key_holders - state.dropped)
            if not holders or not fresh:
                return  # devices without the key answer MODEL with an ERROR and are dropped
            holder, meta = holders[0], {"phase": "share"}
        self._open(state, "generated", [holder], self._parse_generated)
        self._send([(holder, MsgType.HE_PUBLIC_CONTEXT, meta, sp.pack_map(fresh))], state)
        got = self._collect(state, deadline)
        if holder not in got:
            if self.public_key is None:
                raise RoundFailedError(f"round {state.round}: key holder {holder} did not answer")
            return
        pk, shares = got[holder]
        others = sorted(set(fresh) & set(shares) - {holder})
        self._open(state, "installed", others, lambda d, env: env.meta.get("fingerprint"))
        meta = {
            "phase": "install",
            "holder": holder,
            "holder_key": base64.b64encode(self._x25519[holder]).decode("ascii"),
            "fingerprint": pk.fingerprint,
        }
        self._send([(d, MsgType.HE_PUBLIC_CONTEXT, meta, shares[d]) for d in others], state)
        acks = self._collect(state, deadline)
        if self.public_key is None:
            log.info("HE federation key %s (%d bits) generated on %s", pk.fingerprint, pk.bits,
                     holder)  # fmt: skip
        self.public_key = pk
        self.key_holders |= {holder} | {d for d, fp in acks.items() if fp == pk.fingerprint}
        log.info("HE federation key installed on %d device(s)", len(self.key_holders))

    def _parse_generated(self, device: str, env: Envelope):
        from kernels import PaillierPublicKey
        from kernels.errors import KernelInputError

        try:
            pk = PaillierPublicKey.from_bytes(base64.b64decode(env.meta["public_key"]))
        except (KernelInputError, ValueError) as exc:
            raise WireError(f"federation public key: {exc}") from None
        if pk.fingerprint != env.meta.get("fingerprint"):
            raise WireError(f"public key fingerprint {pk.fingerprint} != announced")
        if self.public_key is not None and pk.fingerprint != self.public_key.fingerprint:
            raise WireError(f"key holder sent key {pk.fingerprint}, federation key is "
                            f"{self.public_key.fingerprint}")  # fmt: skip
        return pk, sp.unpack_map(env.body)

    # -- rounds ------------------------------------------------------------------------------

    def prepare(self, selected: list[str], state, params: dict, deadline: float) -> None:
        self._distribute(selected, state, deadline)
        n_values = self._n_values = sum(int(np.size(v)) for v in params.values())
        spec = self._spec(len(selected))
        n_cts = spec.n_plaintexts(n_values)

        def parse_update(device: str, env: Envelope):
            from kernels import deserialize_ciphertexts

            cts = deserialize_ciphertexts(self.public_key, env.body)
            if len(cts) != n_cts:
                raise WireError(f"ciphertext count must be {n_cts}, got {len(cts)}")
            return cts, dict(env.meta.get("metrics") or {})

        self._open(state, "update", selected, parse_update)

    def _spec(self, n_devices: int):
        from kernels import PackingSpec

        clip = self.config.secure_clip
        # Offset 2^(value_bits-1) must exceed clip * 2^frac so every weighted value fits.
        value_bits = HE_FRAC_BITS + max(0, math.ceil(math.log2(clip))) + 2
        return PackingSpec.for_key(
            self.public_key,
            value_bits=value_bits,
            frac_bits=HE_FRAC_BITS,
            max_summands=max(2, n_devices),
        )

    def client_config(self, selected: list[str]) -> dict:
        """Clip, weight total and packing layout; called after :meth:`prepare` made the key."""
        spec = self._spec(len(selected))
        self._round_cfg = {
            **super().client_config(selected),
            "secure_clip": self.config.secure_clip,
            "he_fingerprint": self.public_key.fingerprint,
            "he_value_bits": spec.value_bits,
            "he_frac_bits": spec.frac_bits,
            "he_max_summands": spec.max_summands,
        }
        return self._round_cfg

    def run(self, state, params: dict[str, np.ndarray], deadline: float) -> SecureOutcome:
        from kernels import serialize_ciphertexts, sum_ciphertexts

        r = state.round
        updates = self._collect(state, deadline)
        if len(updates) < self.config.min_clients:
            return SecureOutcome(
                None,
                reason=f"round {r}: {len(updates)} encrypted updates < min_clients "
                f"{self.config.min_clients}; the previous model stays",
            )
        contributors = sorted(updates)
        summed = sum_ciphertexts(self.public_key, [updates[d][0] for d in contributors])
        body = serialize_ciphertexts(self.public_key, summed)
        meta = {
            "phase": "decrypt",
            "n_values": self._n_values,
            "n_summands": len(contributors),
            "weight": self._weight(contributors, self._round_cfg["secure_total_samples"]),
            **{k: v for k, v in self._round_cfg.items() if k.startswith("he_")},
        }
        n_values = self._n_values

        def parse_plain(device: str, env: Envelope) -> np.ndarray:
            if len(env.body) != 8 * n_values:
                raise WireError(
                    f"decrypted update must be {n_values} float64, got {len(env.body)} B"
                )
            vec = np.frombuffer(env.body, dtype="<f8").astype(np.float64)
            if not np.all(np.isfinite(vec)):
                raise WireError("decrypted update has non-finite values")
            return vec

        # Any surviving key holder can decrypt; try the next if one vanishes.
        for device in [d for d in contributors if d in self.key_holders]:
            with state.cond:
                if device in state.dropped:
                    continue
            self._open(state, "decrypted", [device], parse_plain)
            self._send([(device, MsgType.CIPHERTEXT, meta, body)], state)
            got = self._collect(state, deadline)
            if device in got:
                metrics = {d: updates[d][1] for d in contributors}
                return SecureOutcome(got[device], contributors=contributors, metrics=metrics)
            log.warning("round %d: %s did not return the decrypted sum; trying another", r, device)
        return SecureOutcome(
            None,
            reason=f"round {r}: no surviving device decrypted the sum; the previous model stays",
        )


def _x25519_key(body: bytes) -> bytes:
    if len(body) != sp.KEY_BYTES:
        raise WireError(f"X25519 public key must be {sp.KEY_BYTES} bytes, got {len(body)}")
    return bytes(body)
