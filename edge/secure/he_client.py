"""Device side of Paillier HE aggregation (Phong et al., IEEE TIFS 2018): devices share a key.

The federation's Paillier key pair (>= 2048 bits, primes from the OS CSPRNG, see
:mod:`kernels.paillier_keys`) is generated on one device, never on the cloud. That device
encrypts ``export_secret()`` to every other device under AES-256-GCM keyed by
HKDF-SHA256(X25519(holder, peer)) (RFC 7748 / RFC 5869 / SP 800-38D via ``cryptography``); the
cloud relays those ciphertexts and the public key only. Each round a device clips and weights
its update delta, packs it (:class:`kernels.PackingSpec`), encrypts it and sends the
ciphertexts; the cloud adds them homomorphically and asks one surviving device to decrypt the
sum, which returns the *average* update: the cloud learns the aggregate only, as in Phong et al.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Callable

import numpy as np

from converters import secagg_protocol as sp
from converters.errors import WireError
from converters.wire import Envelope, MsgType

log = logging.getLogger(__name__)

Reply = Callable[[Envelope, MsgType, dict, bytes], None]


def packing_spec(public_key, cfg: dict):
    """The :class:`kernels.PackingSpec` announced by the cloud in the round config."""
    from kernels import PackingSpec

    return PackingSpec.for_key(
        public_key,
        value_bits=int(cfg["he_value_bits"]),
        frac_bits=int(cfg["he_frac_bits"]),
        max_summands=int(cfg["he_max_summands"]),
    )


def key_context(run_id: str, holder: str, peer: str) -> bytes:
    return sp.context(run_id, 0, "he-federation-key", holder, peer)


class HeSession:
    """One device's part in HE aggregation; holds the federation key pair once installed.

    Args:
        device_id: this device.
        num_samples: its training set size (FedAvg weight numerator).
        reply: ``reply(request_env, type, meta, body)`` sends on the device's uplink.
    """

    def __init__(self, *, device_id: str, num_samples: int, reply: Reply) -> None:
        self.id, self.num_samples, self._reply = device_id, num_samples, reply
        self._lock = threading.Lock()
        self._x25519 = sp.generate_private_key()  # receives the federation secret key
        self.keypair = None  # kernels.PaillierKeyPair once generated or installed
        self._pool = None  # kernels.RandomnessPool: encryption randomness made while idle
        self.rejected = 0
        # Distributed DP hook: noise(vector) -> vector adds this device's noise share.
        self.noise: Callable[[np.ndarray], np.ndarray] | None = None

    def close(self) -> None:
        """Stops the background randomness precomputation."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def on_model(self, env: Envelope) -> None:
        """A round starts: precompute this round's encryption randomness while training runs.

        The n-th residue exponentiations then leave the critical path (one modular
        multiplication per encryption once trained). Filling here rather than right after the
        previous round keeps the refill off the cores while the cloud waits for a decryption.
        """
        with self._lock:
            pool = self._pool
        if pool is not None and len(pool) < pool.capacity:
            threading.Thread(target=pool.fill, name=f"he-randomness-{self.id}", daemon=True).start()

    def _b64(self, raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    def on_message(self, env: Envelope) -> None:
        """Key setup and decryption requests from the cloud.

        Raises:
            WireError: a malformed request, a share failing its AES-GCM tag, a fingerprint
                mismatch, or a decryption request before the key is installed.
        """
        phase = env.meta.get("phase")
        if env.type == MsgType.KEY_ADVERTISE and phase == "he-hello":
            body = sp.public_bytes(self._x25519)
            self._reply(env, MsgType.KEY_ADVERTISE, {"phase": "he-hello"}, body)
        elif env.type == MsgType.HE_PUBLIC_CONTEXT and phase in ("generate", "share"):
            self._generate(env)
        elif env.type == MsgType.HE_PUBLIC_CONTEXT and phase == "install":
            self._install(env)
        elif env.type == MsgType.CIPHERTEXT and phase == "decrypt":
            self._decrypt(env)
        else:
            raise WireError(f"unexpected {env.type.name} phase={phase!r} in an HE round")

    def _generate(self, env: Envelope) -> None:
        from kernels import PaillierKeyPair

        peers = sp.unpack_map(env.body, value_len=sp.KEY_BYTES)
        if env.meta.get("phase") == "share":  # newcomers: encrypt the key we already hold
            with self._lock:
                keypair = self.keypair
            if keypair is None:
                raise WireError("share: this device holds no federation key")
        else:
            bits = env.meta.get("bits")
            if not isinstance(bits, int) or bits < 2048:
                raise WireError(f"generate: bits must be an int >= 2048, got {bits!r}")
            keypair = PaillierKeyPair.generate(bits)
        secret = keypair.export_secret()
        shares = {}
        for peer, pk in peers.items():
            if peer == self.id:
                continue
            key = sp.agree(self._x25519, pk, info=key_context(env.run_id, self.id, peer))
            shares[peer] = sp.seal(key, secret, aad=key_context(env.run_id, self.id, peer))
        with self._lock:
            self.keypair = keypair
        public = keypair.public_only()
        meta = {
            "phase": "generated",
            "public_key": self._b64(public.to_bytes()),
            "fingerprint": public.fingerprint,
        }
        self._reply(env, MsgType.HE_PUBLIC_CONTEXT, meta, sp.pack_map(shares))

    def _install(self, env: Envelope) -> None:
        from kernels import PaillierKeyPair
        from kernels.errors import KernelInputError

        holder, holder_pk, fp = (env.meta.get(k) for k in ("holder", "holder_key", "fingerprint"))
        if not (isinstance(holder, str) and isinstance(holder_pk, str) and isinstance(fp, str)):
            raise WireError("install needs meta.holder, meta.holder_key and meta.fingerprint")
        key = sp.agree(
            self._x25519,
            base64.b64decode(holder_pk),
            info=key_context(env.run_id, holder, self.id),
        )
        secret = sp.open_sealed(
            key,
            env.body,
            aad=key_context(env.run_id, holder, self.id),
            what=f"federation key share from {holder}",
        )
        try:
            keypair = PaillierKeyPair.import_secret(secret)
        except KernelInputError as exc:
            raise WireError(f"federation key from {holder}: {exc}") from None
        if keypair.public.fingerprint != fp:
            raise WireError(
                f"federation key fingerprint {keypair.public.fingerprint} != announced {fp}"
            )
        with self._lock:
            self.keypair = keypair
        self._reply(env, MsgType.HE_PUBLIC_CONTEXT, {"phase": "installed", "fingerprint": fp}, b"")

    def submit_update(self, env: Envelope, old: dict, new: dict, metrics: dict) -> None:
        """Clip, weight, pack and encrypt the update delta; send it as CIPHERTEXT."""
        from kernels import encode_pack, encrypt_batch, serialize_ciphertexts

        cfg = env.meta["config"]
        with self._lock:
            keypair = self.keypair
        if keypair is None or keypair.public.fingerprint != cfg.get("he_fingerprint"):
            raise WireError(
                f"round {env.round}: no federation key {cfg.get('he_fingerprint')} on {self.id}"
            )
        weight = self.num_samples / int(cfg["secure_total_samples"])
        clip = float(cfg["secure_clip"])
        vec = sp.weighted_clipped_delta(new, old, weight=weight, clip=clip)
        if self.noise is not None:
            vec = np.clip(self.noise(vec), -clip, clip)
        spec = packing_spec(keypair.public, cfg)
        pts = encode_pack(vec, spec)
        cts = encrypt_batch(keypair, pts, randomness_pool=self._randomness(keypair))
        self._arm_pool(keypair, len(pts))
        meta = {"phase": "update", "metrics": metrics}
        self._reply(env, MsgType.CIPHERTEXT, meta, serialize_ciphertexts(keypair.public, cts))

    def _randomness(self, keypair):
        """The randomness pool filled since the last round, or None (first round, new key)."""
        with self._lock:
            pool = self._pool
        if pool is not None and pool.fingerprint == keypair.public.fingerprint:
            return pool
        return None

    def _arm_pool(self, keypair, count: int) -> None:
        """Keeps a pool of ``count`` encryption randomness values for the next rounds."""
        from kernels import RandomnessPool

        with self._lock:
            old = self._pool
            if old is not None and old.fingerprint == keypair.public.fingerprint:
                return
            self._pool = RandomnessPool(keypair, capacity=count, background=False)
        if old is not None:
            old.close()

    def _decrypt(self, env: Envelope) -> None:
        from kernels import decrypt_batch, deserialize_ciphertexts, unpack_decode
        from kernels.errors import KernelInputError

        with self._lock:
            keypair = self.keypair
        if keypair is None:
            raise WireError(f"round {env.round}: decrypt request but no federation key installed")
        m = env.meta
        n_values, n_summands, total = m.get("n_values"), m.get("n_summands"), m.get("weight")
        if not (isinstance(n_values, int) and isinstance(n_summands, int)):
            raise WireError("decrypt needs int meta.n_values and meta.n_summands")
        if not isinstance(total, (int, float)) or not 0 < total <= 1:
            raise WireError(f"decrypt meta.weight must be in (0, 1], got {total!r}")
        try:
            cts = deserialize_ciphertexts(keypair.public, env.body)
            pts = decrypt_batch(keypair, cts)
            spec = packing_spec(keypair.public, m)
            summed = unpack_decode(pts, spec, n_values=n_values, n_summands=n_summands)
        except (KernelInputError, ValueError, KeyError) as exc:
            raise WireError(f"decrypt request: {exc}") from None
        avg = (summed / float(total)).astype("<f8")
        self._reply(env, MsgType.CIPHERTEXT, {"phase": "decrypted"}, avg.tobytes())
