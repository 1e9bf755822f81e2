"""Optional encryption at rest: AES-256-GCM around a whole encoded cassette.

Set ``TIMETRACER_ENCRYPTION_KEY`` (32 bytes as 64 hex characters or base64) and every cassette
written is encrypted; the loader recognises an encrypted cassette by its magic prefix::

    $ export TIMETRACER_ENCRYPTION_KEY=$(python -c "import os;print(os.urandom(32).hex())")

Layout: ``MAGIC | key id (8 bytes) | nonce (12 bytes) | ciphertext + tag``. The key id (a hash
of the key) tells "encrypted with another key" apart from "damaged"; GCM authenticates the
header and the ciphertext, so any flipped byte is an error, never wrong data.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Mapping

from timetracer_otel.errors import CassetteError, ConfigError

MAGIC = b"TTENC1\x00"
_KEY_ID_LEN = 8
_NONCE_LEN = 12
_HEADER_LEN = len(MAGIC) + _KEY_ID_LEN + _NONCE_LEN
ENV_KEY = "TIMETRACER_ENCRYPTION_KEY"


def parse_key(text: str) -> bytes:
    """The 32-byte key from its hex or base64 text; a one-line ConfigError otherwise."""
    text = text.strip()
    raw: bytes | None = None
    if len(text) == 64:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raw = None
    if raw is None:
        try:
            alt = b"-_" if "-" in text or "_" in text else None  # urlsafe base64 too
            raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=alt, validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) != 32:
        raise ConfigError(
            f"{ENV_KEY} must be 32 bytes written as 64 hex characters or base64; generate one "
            "with: python -c \"import os;print(os.urandom(32).hex())\""
        )
    return raw


def env_key(env: Mapping[str, str] | None = None) -> bytes | None:
    """The encryption key from the environment, or None when encryption is off."""
    text = (os.environ if env is None else env).get(ENV_KEY, "").strip()
    return parse_key(text) if text else None


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"timetracer-key-id\x00" + key).digest()[:_KEY_ID_LEN]


def is_encrypted(data: bytes) -> bool:
    return data[: len(MAGIC)] == MAGIC


def encrypt(data: bytes, key: bytes) -> bytes:
    """``data`` sealed with AES-256-GCM under ``key`` (a fresh random nonce each time)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    header = MAGIC + key_id(key)
    nonce = os.urandom(_NONCE_LEN)
    return header + nonce + AESGCM(key).encrypt(nonce, data, header)


def decrypt(data: bytes, key: bytes | None, source: str = "<bytes>") -> bytes:
    """The plaintext of an encrypted cassette; a one-line CassetteError for a missing or wrong
    key or a damaged file."""
    if key is None:
        raise CassetteError(
            f"{source} is encrypted; set {ENV_KEY} to the key it was recorded with."
        )
    if len(data) < _HEADER_LEN + 16:
        raise CassetteError(f"{source} is an encrypted cassette cut short; record it again or restore it.")
    header = data[: len(MAGIC) + _KEY_ID_LEN]
    if header[len(MAGIC):] != key_id(key):
        raise CassetteError(
            f"{source} was encrypted with a different key; set {ENV_KEY} to the key it was recorded with."
        )
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = data[len(header) : _HEADER_LEN]
    try:
        return AESGCM(key).decrypt(nonce, data[_HEADER_LEN:], header)
    except InvalidTag:
        raise CassetteError(
            f"{source} failed decryption (the file was changed or damaged after it was written); "
            "record it again or restore it."
        ) from None
