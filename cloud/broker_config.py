"""Generates a production Mosquitto config: password file, per-device ACL, optional TLS."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

from cloud.errors import BrokerError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Mosquitto 2.x's own defaults for $7$ (PBKDF2-SHA512) hashes.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12


def mosquitto_hash(
    password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """Returns ``$7$<iterations>$<b64 salt>$<b64 PBKDF2-SHA512>`` as mosquitto_passwd writes it."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def _write_private(path: Path, text: str) -> None:
    # Created 0600 from the start so the secrets are never briefly world-readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _hand_to_broker_user(user: str | None, out: Path, *files: Path) -> None:
    if user is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return
    for f in files:
        os.chown(f, pw.pw_uid, pw.pw_gid)
    out.chmod(out.stat().st_mode | 0o011)


def acl_text(*, cloud_user: str = "cloud", prefix: str = "edgesplit") -> str:
    """The ACL: the cloud reads/writes everything under ``prefix``; a device only its own topics.

    Devices read ``ctrl`` and their own ``down``, write their own ``up``, ``steps`` (split
    steps to the cloud's step workers) and ``infer`` (a large inference request to the worker
    that took its claim) and read/write their own ``presence`` (not others': who else is online
    is the cloud's business).
    """
    return (
        "# edgesplit ACL. %u is the authenticated username (= device id).\n"
        f"pattern read {prefix}/ctrl\n"
        f"pattern read {prefix}/down/%u\n"
        f"pattern write {prefix}/up/%u\n"
        f"pattern readwrite {prefix}/presence/%u\n"
        f"pattern write {prefix}/steps/%u\n"
        f"pattern write {prefix}/steps/%u/+\n"
        f"pattern write {prefix}/infer/%u/+\n"
        f"\nuser {cloud_user}\n"
        f"topic readwrite {prefix}/#\n"
    )


def write_mosquitto_config(
    out_dir: str | os.PathLike,
    *,
    devices: list[str],
    port: int = 1883,
    tls: bool = False,
    cafile: str | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    cloud_user: str = "cloud",
    prefix: str = "edgesplit",
    bind: str = "",
    use_mosquitto_passwd: bool | None = None,
    broker_user: str | None = "mosquitto",
) -> dict:
    """Writes ``mosquitto.conf``, ``passwd``, ``acl`` and ``credentials`` (0600) into ``out_dir``.

    Args:
        out_dir: directory to create or reuse.
        devices: device ids; each becomes a username with its own topics.
        port: listener port.
        tls: serve TLS (needs cafile, certfile, keyfile); otherwise passwords cross the network
            in clear, so only use it on a trusted network or loopback.
        cafile: CA certificate for the listener.
        certfile: broker certificate.
        keyfile: broker private key. The three TLS files must be readable by the broker's
            user (Mosquitto started as root reads them after dropping to ``mosquitto``).
        cloud_user: username of the cloud service (full access under ``prefix``).
        prefix: topic prefix shared with ``converters.topics.Topics``.
        bind: listener address ("" = all interfaces).
        use_mosquitto_passwd: hash with ``mosquitto_passwd -b`` (None: if it is installed) or
            in Python (same $7$ PBKDF2-SHA512 format).
        broker_user: Mosquitto started as root drops to this user *before* reading passwd and
            acl, so when we run as root and the user exists they are chowned to it (still 0600)
            and ``out_dir`` gets o+x (traverse, not list). None skips this.

    Returns:
        ``{"conf", "passwd", "acl", "credentials_file"}`` paths and ``"credentials"``:
        ``{username: password}`` with fresh random passwords.

    Raises:
        ValueError: for a bad device id, a duplicate, a clash with cloud_user, or bad TLS args.
        BrokerError: if mosquitto_passwd was requested and failed.
    """
    problems = [
        f"device id {d!r} must match {_NAME.pattern}" for d in devices if not _NAME.match(d)
    ]
    if not devices:
        problems.append("devices must be non-empty, got []")
    if len(set(devices)) != len(devices):
        problems.append(f"devices must be unique, got {devices}")
    if cloud_user in devices:
        problems.append(f"cloud_user {cloud_user!r} must not also be a device id")
    if not _NAME.match(cloud_user):
        problems.append(f"cloud_user {cloud_user!r} must match {_NAME.pattern}")
    if not re.match(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$", prefix):
        problems.append(f"prefix must be topic levels without wildcards, got {prefix!r}")
    if not 0 < port < 65536:
        problems.append(f"port must be in 1..65535, got {port}")
    if tls and not (cafile and certfile and keyfile):
        problems.append("tls=True needs cafile, certfile and keyfile")
    tls_files = {"cafile": cafile, "certfile": certfile, "keyfile": keyfile}
    for name, path in tls_files.items():
        if path and not tls:
            problems.append(f"{name} needs tls=True (--tls), got {path!r}")
        elif path and not os.path.isfile(path):
            problems.append(f"{name} must be an existing file, got {path!r}")
    if not re.match(r"^[A-Za-z0-9.:_-]*$", bind):
        problems.append(f"bind must be an IP address or host name, got {bind!r}")
    if problems:
        raise ValueError("; ".join(problems))

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    creds = {u: secrets.token_urlsafe(18) for u in [cloud_user, *devices]}
    passwd, acl, conf = out / "passwd", out / "acl", out / "mosquitto.conf"
    cred_file = out / "credentials"

    if use_mosquitto_passwd is None:
        use_mosquitto_passwd = shutil.which("mosquitto_passwd") is not None
    _write_private(passwd, "")
    if use_mosquitto_passwd:
        tool = shutil.which("mosquitto_passwd")
        if tool is None:
            raise BrokerError("use_mosquitto_passwd=True but mosquitto_passwd is not on PATH")
        for user, pw in creds.items():
            r = subprocess.run([tool, "-b", str(passwd), user, pw], capture_output=True, text=True)
            if r.returncode != 0:
                raise BrokerError(f"mosquitto_passwd failed for {user!r}: {r.stderr.strip()}")
    else:
        _write_private(passwd, "".join(f"{u}:{mosquitto_hash(p)}\n" for u, p in creds.items()))
    os.chmod(passwd, 0o600)
    _write_private(acl, acl_text(cloud_user=cloud_user, prefix=prefix))
    _write_private(cred_file, "".join(f"{u}:{p}\n" for u, p in creds.items()))
    _hand_to_broker_user(broker_user, out, passwd, acl)

    lines = [
        "# Generated by `edgesplit broker-config`; run with: mosquitto -c mosquitto.conf",
        "per_listener_settings false",
        f"listener {port}{' ' + bind if bind else ''}",
        "allow_anonymous false",
        f"password_file {passwd}",
        f"acl_file {acl}",
        "persistence false",
        # Mosquitto drops QoS>0 messages beyond this per client; edgesplit's window stays far below.
        "max_queued_messages 1000",
        # Otherwise Nagle + delayed ACK add ~40 ms to every QoS 1 exchange through the broker.
        "set_tcp_nodelay true",
    ]
    if tls:
        lines += [
            f"cafile {cafile}",
            f"certfile {certfile}",
            f"keyfile {keyfile}",
            "tls_version tlsv1.2",
        ]
    _write_private(conf, "\n".join(lines) + "\n")
    return {
        "conf": str(conf),
        "passwd": str(passwd),
        "acl": str(acl),
        "credentials_file": str(cred_file),
        "credentials": creds,
    }
