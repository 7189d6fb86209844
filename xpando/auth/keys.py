"""API keys: their format, their digest, their scopes and the principal a valid key stands for.

A key is ``xpd_<key id>_<secret>``: ``key id`` (12 hex characters) finds its row and may be shown
anywhere (lists, logs, memos); ``secret`` is 32 random bytes from :mod:`secrets` (256 bits,
URL-safe base64). Only the SHA-256 digest of the whole key is stored. A plain hash is enough
here, unlike for passwords: a slow hash (bcrypt, argon2) protects low-entropy secrets against
guessing, but no one can enumerate 2**256 candidates, so it would only add milliseconds to every
request. Digests are compared with :func:`hmac.compare_digest`.

Pure functions only (no database): :mod:`xpando.logs` uses :func:`redact` on every log line.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

KEY_PREFIX = "xpd_"
KEY_ID_LENGTH = 12
SECRET_BYTES = 32
KEY_RE = re.compile(r"^xpd_(?P<key_id>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_-]{43})$")
# Anywhere in a text (a log line, a URL someone pasted a key into).
KEY_IN_TEXT = re.compile(r"xpd_(?P<key_id>[0-9a-f]{12})_[A-Za-z0-9_-]{43}")
# A principal's name: what approvals record and logs show.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
DEV_KEY_FILE = "dev-api-key"


class Scope(StrEnum):
    TASKS_WRITE = "tasks:write"  # submit (and cancel) tasks
    TASKS_READ = "tasks:read"
    KNOWLEDGE_READ = "knowledge:read"
    NODES_READ = "nodes:read"
    PAYOUTS_READ = "payouts:read"
    PAYOUTS_APPROVE = "payouts:approve"  # settle an epoch, approve its payouts
    METRICS_READ = "metrics:read"  # scrape /metrics (give Prometheus a key with only this)
    # /codec: decrypt (and encrypt) Temporal payloads for the Web UI and the CLI; a key with it
    # reads every prompt and answer in Temporal's history
    CODEC_DECODE = "codec:decode"
    ADMIN = "admin"  # manage keys; holds every other scope too


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """A key's own limits (``xpando/auth/limits.py``): ``None`` takes the deployment's default
    (``XPANDO_LIMIT_*``), 0 is no limit."""

    requests_per_minute: int | None = None
    tasks_per_minute: int | None = None
    concurrent_tasks: int | None = None
    budget_usd_per_day: float | None = None

    def over(self, defaults: KeyLimits) -> KeyLimits:
        """These limits, each one not set taken from ``defaults``."""
        return KeyLimits(
            **{
                name: getattr(defaults, name)
                if getattr(self, name) is None
                else getattr(self, name)
                for name in LIMIT_NAMES
            }
        )


LIMIT_NAMES = ("requests_per_minute", "tasks_per_minute", "concurrent_tasks", "budget_usd_per_day")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a valid key stands for: set on ``request.state.principal`` by every protected route."""

    key_id: str
    name: str
    scopes: frozenset[str]
    limits: KeyLimits = KeyLimits()

    @property
    def is_admin(self) -> bool:
        return Scope.ADMIN in self.scopes

    def allows(self, scope: str) -> bool:
        return self.is_admin or scope in self.scopes


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key as issued: ``key`` is shown once and never stored."""

    key_id: str
    key: str
    digest: str


def new_key() -> NewKey:
    key_id = secrets.token_hex(KEY_ID_LENGTH // 2)
    key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"
    return NewKey(key_id=key_id, key=key, digest=digest(key))


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str | None:
    """The key id of a well-formed key; ``None`` for anything else."""
    found = KEY_RE.fullmatch(key)
    return found["key_id"] if found else None


def matches(key: str, stored_digest: str) -> bool:
    """Whether ``key`` is the key ``stored_digest`` was made from, in constant time."""
    return hmac.compare_digest(digest(key), stored_digest)


def redact(text: str) -> str:
    """``text`` with every API key in it replaced by its key id (``xpd_<id>_…``)."""
    if KEY_PREFIX not in text:
        return text
    return KEY_IN_TEXT.sub(lambda m: f"{KEY_PREFIX}{m['key_id']}_[redacted]", text)


def dev_key_path(data_dir: Path) -> Path:
    """Where ``xpando dev`` keeps its admin key (mode 0600)."""
    return data_dir / DEV_KEY_FILE


def write_key_file(path: Path, key: str) -> None:
    """Write ``key`` to ``path`` readable by its owner only: the file is created 0600 under a
    temporary name and renamed into place, so the key is never readable by others, even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, f"{key}\n".encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_key_file(path: Path) -> str | None:
    """The key in ``path``, or ``None`` when it is missing or holds no well-formed key."""
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        return None
    return key if KEY_RE.fullmatch(key) else None
