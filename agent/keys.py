"""CURVE keys and their fingerprints (Z85 text, 40 characters), for master and agent.

A fingerprint is what people compare out of band: ``sha256:`` and the hex digest of the raw
32-byte public key. The secret key file is 0600 and written whole or not at all.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from .fileio import write_atomic


def fingerprint(public_key: bytes | str) -> str:
    """The public fingerprint people compare: ``sha256:`` and the hex digest of the raw key."""
    from zmq.utils import z85

    if isinstance(public_key, str):
        public_key = public_key.encode()
    if len(public_key) != 40:
        raise ValueError("a CURVE public key is 40 Z85 characters")
    return "sha256:" + hashlib.sha256(z85.decode(public_key)).hexdigest()


def is_public_key(value: Any) -> bool:
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes) or len(value) != 40:
        return False
    try:
        from zmq.utils import z85

        z85.decode(value)
    except Exception:
        return False
    return True


def load_or_create_keypair(directory: str, name: str) -> tuple[bytes, bytes]:
    """Load ``name.pub``/``name.key`` from ``directory``, creating them (secret key 0600) on first use."""
    import zmq

    pub_path = os.path.join(directory, f"{name}.pub")
    key_path = os.path.join(directory, f"{name}.key")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if os.path.exists(key_path):
        with open(key_path, "rb") as fh:
            secret = fh.read().strip()
        public = zmq.curve_public(secret)
        if os.stat(key_path).st_mode & 0o077:
            os.chmod(key_path, 0o600)  # someone loosened it: a secret key stays owner-only
        if not os.path.exists(pub_path):
            write_atomic(pub_path, public + b"\n", 0o644)
        return public, secret
    public, secret = zmq.curve_keypair()
    write_atomic(key_path, secret + b"\n", 0o600)
    write_atomic(pub_path, public + b"\n", 0o644)
    return public, secret
