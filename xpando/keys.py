"""Ed25519 keypairs in the Solana CLI file format (a JSON array of the 64 secret-key bytes).

A node's identity and payout address is one such keypair at ``<data_dir>/keys/<node_id>.json``;
the embedded chain's treasury is ``<data_dir>/keys/treasury.json``. Files are created with mode
0600 (only the owner may read a secret key) and never rewritten once they exist.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from solders.keypair import Keypair
from solders.pubkey import Pubkey

BASE58 = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{32,44}$")


class KeyFileError(ValueError):
    """A key file exists but cannot be used (shown to the operator)."""


def node_key_path(data_dir: Path, node_id: str) -> Path:
    return data_dir / "keys" / f"{node_id}.json"


def treasury_key_path(data_dir: Path) -> Path:
    return data_dir / "keys" / "treasury.json"


def parse_keypair(text: str) -> Keypair:
    """A keypair from a Solana CLI JSON array or a base58 secret key (64 bytes)."""
    text = text.strip()
    try:
        if text.startswith("["):
            raw = bytes(json.loads(text))
            if len(raw) != 64:
                raise ValueError(f"expected 64 bytes, got {len(raw)}")
            return Keypair.from_bytes(raw)
        return Keypair.from_base58_string(text)
    except (ValueError, TypeError) as err:
        raise KeyFileError(
            f"not a Solana keypair (JSON array of 64 bytes or base58): {err}"
        ) from err


def load_keypair(path: Path) -> Keypair:
    try:
        return parse_keypair(path.read_text())
    except KeyFileError as err:
        raise KeyFileError(f"{path}: {err}") from err


def load_or_create_keypair(path: Path) -> Keypair:
    """The keypair at ``path``; a new one written there (mode 0600) if the file is missing.

    Creation is atomic (``O_EXCL``): two processes starting at once end up with the same key.
    """
    if path.exists():
        return load_keypair(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keypair = Keypair()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_keypair(path)
    with os.fdopen(fd, "w") as fh:
        fh.write(keypair.to_json())
    return keypair


def is_valid_address(value: str) -> bool:
    """A base58 string that decodes to a 32-byte public key."""
    if not BASE58.match(value):
        return False
    try:
        Pubkey.from_string(value)
    except ValueError:
        return False
    return True
