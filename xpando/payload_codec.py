"""Private payloads: an AES-256-GCM payload codec for Temporal (README, "Private payloads").

With ``XPANDO_PAYLOAD_KEY`` set, every client and worker encrypts each payload it writes to
Temporal (workflow and activity inputs and results, signals, queries, updates, failure details)
and decrypts each one it reads, so whoever runs the Temporal cluster sees ciphertext in its
histories. Search attributes are not payloads the codec sees: they stay clear text for the
visibility store, and hold nothing secret (a domain, a status, node ids).

``XPANDO_PAYLOAD_KEY`` is ``<key id>:<base64 key>[,<key id>:<base64 key>...]``: each key is 32
random bytes in base64 (standard or URL-safe, padding optional), each key id 1-32 characters
of ``A-Z a-z 0-9 . _ -`` (starting with a letter or digit). The first key encrypts; every key
decrypts. An encrypted payload carries its key id in its metadata, so a key can be rotated
without losing what older keys wrote: put the new key first and keep the old one after it for
as long as histories written under it are read.

A payload is ``{"encoding": "binary/encrypted", "encryption-key-id": <id>}`` with data
``nonce (12 random bytes) || AES-GCM(key, nonce, the serialized original payload,
associated data = the key id)``. A payload without that encoding (a workflow started with
``temporal workflow start --input``, a history written before the key was set) is passed on as
it is.

The SDK runs the codec outside the workflow sandbox, on bytes the payload converter (pydantic,
:class:`xpando.temporal.PayloadConverter`) made or will read: neither sees the other.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError
from temporalio.api.common.v1 import Payload
from temporalio.converter import EncodingPayloadConverter, PayloadCodec
from temporalio.exceptions import ApplicationError

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # the size GCM is defined for
KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")

# ApplicationError types of a payload this process cannot read. Non-retryable: reading it again
# with the same keys gives the same answer, so a workflow that receives one fails at once,
# naming the key id, instead of retrying its workflow task for ever.
PAYLOAD_KEY_MISSING = "PayloadKeyMissing"  # encrypted, and this process has no key at all
PAYLOAD_KEY_UNKNOWN = "PayloadKeyUnknown"  # encrypted under a key id this process lacks
PAYLOAD_UNDECRYPTABLE = "PayloadUndecryptable"  # the key of that id does not open it


class PayloadKeyError(ApplicationError):
    """A payload this process cannot decrypt; its ``type`` says why."""

    def __init__(self, message: str, *, type: str, key_id: str | None = None) -> None:
        super().__init__(message, type=type, non_retryable=True)
        self.key_id = key_id


@dataclass(frozen=True)
class PayloadKeys:
    """The parsed ``XPANDO_PAYLOAD_KEY``: the id of the key that encrypts, and every key by id."""

    current: str
    keys: Mapping[str, bytes] = field(repr=False)  # key material: never in a repr or a log

    @classmethod
    def parse(cls, text: str) -> PayloadKeys | None:
        """``None`` for an empty text; ValueError naming the entry (by position and key id,
        never by its key) that is malformed."""
        entries = [entry.strip() for entry in text.split(",") if entry.strip()]
        if not entries:
            return None
        keys: dict[str, bytes] = {}
        for number, entry in enumerate(entries, start=1):
            key_id, sep, encoded = (part.strip() for part in entry.partition(":"))
            where = f"XPANDO_PAYLOAD_KEY entry {number}"
            if not sep or not KEY_ID.match(key_id):
                raise ValueError(
                    f"{where}: expected <key id>:<base64 key>, the key id 1-32 characters of "
                    "A-Z a-z 0-9 . _ - (e.g. 2025-06:<base64 of 32 random bytes>)"
                )
            if key_id in keys:
                raise ValueError(f"{where}: key id {key_id!r} is given twice")
            try:
                key = decode_base64(encoded)
            except ValueError:  # binascii.Error is one
                raise ValueError(f"{where} ({key_id}): the key is not base64") from None
            if len(key) != KEY_BYTES:
                raise ValueError(
                    f"{where} ({key_id}): an AES-256 key is {KEY_BYTES} bytes, this one is "
                    f"{len(key)} (make one with `openssl rand -base64 32`)"
                )
            keys[key_id] = key
        return cls(current=next(iter(keys)), keys=keys)


def decode_base64(text: str) -> bytes:
    """Standard or URL-safe base64, with or without its padding."""
    normal = text.replace("-", "+").replace("_", "/")
    return base64.b64decode(normal + "=" * (-len(normal) % 4), validate=True)


class PayloadCipher(PayloadCodec):
    """Encrypts every payload with the current key; decrypts with the key its metadata names."""

    def __init__(self, keys: PayloadKeys) -> None:
        self.current = keys.current
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys.keys.items()}

    @property
    def key_ids(self) -> list[str]:
        return list(self._ciphers)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(payload) for payload in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(payload) for payload in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        key_id = self.current.encode()
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self.current].encrypt(nonce, payload.SerializeToString(), key_id)
        return Payload(
            metadata={"encoding": ENCODING, KEY_ID_METADATA: key_id}, data=nonce + sealed
        )

    def decrypt(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            return payload  # written in clear text (by the CLI, or before the key was set)
        raw_id = payload.metadata.get(KEY_ID_METADATA, b"")
        key_id = raw_id.decode(errors="replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise PayloadKeyError(
                f"a payload is encrypted with key id {key_id!r}, which XPANDO_PAYLOAD_KEY does "
                f"not hold (it holds {', '.join(self._ciphers)}): add that key after the "
                "current one",
                type=PAYLOAD_KEY_UNKNOWN,
                key_id=key_id,
            )
        try:
            plain = cipher.decrypt(payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:], raw_id)
            return Payload.FromString(plain)
        except (InvalidTag, ValueError, DecodeError):
            raise PayloadKeyError(
                f"a payload encrypted with key id {key_id!r} does not open with the key of that "
                "id in XPANDO_PAYLOAD_KEY: another key was given that id, or the payload was "
                "altered",
                type=PAYLOAD_UNDECRYPTABLE,
                key_id=key_id,
            ) from None


class EncryptedPayloadRefusal(EncodingPayloadConverter):
    """The payload converter's answer to an encrypted payload that reached it undecrypted: this
    process has no ``XPANDO_PAYLOAD_KEY`` (with a key, the codec decrypts it before). Without
    it the SDK's error would be an unknown encoding, which retries a workflow task for ever.
    It converts no value to a payload."""

    @property
    def encoding(self) -> str:
        return ENCODING.decode()

    def to_payload(self, value: Any) -> Payload | None:
        return None

    def from_payload(self, payload: Payload, type_hint: type | None = None) -> Any:
        key_id = payload.metadata.get(KEY_ID_METADATA, b"").decode(errors="replace")
        raise PayloadKeyError(
            f"a payload is encrypted with key id {key_id!r}, and this process has no "
            "XPANDO_PAYLOAD_KEY: give it the same keys as the process that wrote it",
            type=PAYLOAD_KEY_MISSING,
            key_id=key_id,
        )
