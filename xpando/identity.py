"""Node identity: a node's ed25519 (Solana) keypair signs everything it says about itself.

A node's public key is its identity and its payout address (``NodeProfile.wallet``); the keypair
lives at ``<data_dir>/keys/<node_id>.json`` (or comes from ``XPANDO_NODE_KEY``). Registering,
updating a profile and deregistering are one request shape, :class:`SignedNodeRequest`, sent
either to ``POST /v1/nodes`` / ``DELETE /v1/nodes/{id}`` or by ``xpando worker node`` through
``NodeRegistrationWorkflow``; both end in the same verification (``xpando/routing/registry.py``).

What is signed (``signing_message``)::

    b"xpando/node-registration/v1\\n" + canonical JSON of the request without "signature"

Canonical JSON: the request as JSON (``model_dump(mode="json", exclude_defaults=True)``, so a
field left at its default is left out on both sides and a server that adds an optional field
still accepts older clients), keys sorted, no whitespace (``separators=(",", ":")``), UTF-8,
numbers as Python's ``json`` writes them. The domain tag keeps a registration signature from ever
being valid as a Solana transaction or any other message signed with the same key.

Checks, each with a stable error code (:class:`RegistrationRejected`):

* ``invalid_signature`` — the signature does not verify under ``public_key``;
* ``stale_timestamp`` — ``timestamp`` (unix seconds) is more than the allowed skew
  (``XPANDO_NODE_SIGNATURE_MAX_SKEW_S``) away from the time the request was received;
* ``nonce_reused`` — this key already used this nonce (nonces are remembered until their
  timestamp is stale anyway);
* ``node_key_mismatch`` — the node id is bound to another key (the first signed registration
  binds it; only that key may update or deregister it);
* ``wallet_mismatch`` — the profile names a payout wallet other than the signing key;
* ``invalid_registration`` — the request contradicts itself (e.g. profile for another node id);
* ``node_not_found`` — deregistering a node that was never registered.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Any

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature

from xpando.contracts import NodeAction, NodeProfile, SignedNodeRequest

DOMAIN_TAG = b"xpando/node-registration/v1\n"
NONCE_BYTES = 16


class RegistrationRejected(Exception):
    """A signed node request that must not be applied; ``code`` is stable (API and activity)."""

    STATUS = {
        "invalid_signature": 401,
        "stale_timestamp": 401,
        "nonce_reused": 409,
        "node_key_mismatch": 403,
        "wallet_mismatch": 422,
        "invalid_registration": 422,
        "node_not_found": 404,
    }

    def __init__(self, code: str, message: str, *, same_request: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.same_request = same_request  # nonce_reused by this very request (a retry)

    @property
    def status(self) -> int:
        return self.STATUS.get(self.code, 400)

    @property
    def type(self) -> str:
        """The ApplicationError type of the same rejection (``nonce_reused`` → ``NonceReused``)."""
        return "".join(part.capitalize() for part in self.code.split("_"))


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signing_message(request: SignedNodeRequest) -> bytes:
    body = request.model_dump(mode="json", exclude_defaults=True, exclude={"signature"})
    return DOMAIN_TAG + canonical_json(body)


def request_digest(request: SignedNodeRequest, origin: str = "") -> str:
    """Identifies one signed request (its signature covers everything in it) as submitted from
    ``origin`` (the workflow run that carries it; "" over HTTP)."""
    return hashlib.sha256(f"{request.signature}\n{origin}".encode()).hexdigest()


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def sign_request(
    keypair: Keypair,
    *,
    action: NodeAction,
    node_id: str,
    profile: NodeProfile | None = None,
    timestamp: int | None = None,
    nonce: str | None = None,
) -> SignedNodeRequest:
    """A request signed by ``keypair`` (a register request's profile gets the key as wallet)."""
    public_key = str(keypair.pubkey())
    if profile is not None and profile.wallet is None:
        profile = profile.model_copy(update={"wallet": public_key})
    unsigned = SignedNodeRequest(
        action=action,
        node_id=node_id,
        public_key=public_key,
        nonce=nonce or new_nonce(),
        timestamp=int(time.time()) if timestamp is None else timestamp,
        profile=profile,
        signature="1" * 64,  # placeholder: not part of the signed message
    )
    signature = keypair.sign_message(signing_message(unsigned))
    return unsigned.model_copy(update={"signature": str(signature)})


def verify_request(request: SignedNodeRequest, *, now: float, max_skew_s: float) -> None:
    """Check the request's signature, shape and timestamp (no database); raise
    :class:`RegistrationRejected` on the first failure. Nonces are checked by the caller.
    The signature comes first: an unsigned caller learns nothing about what else is wrong."""
    try:
        public_key = Pubkey.from_string(request.public_key)
        signature = Signature.from_string(request.signature)
    except ValueError as err:
        raise RegistrationRejected(
            "invalid_signature", f"malformed public key or signature: {err}"
        ) from err
    if not signature.verify(public_key, signing_message(request)):
        raise RegistrationRejected(
            "invalid_signature",
            f"the signature does not verify under {request.public_key} "
            "(signed message: b'xpando/node-registration/v1\\n' + canonical JSON)",
        )
    if request.action == NodeAction.REGISTER:
        if request.profile is None:
            raise RegistrationRejected(
                "invalid_registration", "a register request must carry the node's profile"
            )
        if request.profile.node_id != request.node_id:
            raise RegistrationRejected(
                "invalid_registration",
                f"the profile is for node {request.profile.node_id!r}, "
                f"the request for {request.node_id!r}",
            )
    elif request.profile is not None:
        raise RegistrationRejected(
            "invalid_registration", "a deregister request carries no profile"
        )
    skew = now - request.timestamp
    if abs(skew) > max_skew_s:
        raise RegistrationRejected(
            "stale_timestamp",
            f"timestamp {request.timestamp} is {abs(skew):.0f}s "
            f"{'old' if skew > 0 else 'in the future'}; at most {max_skew_s:g}s is accepted",
        )
    profile = request.profile
    if profile is not None and profile.wallet is not None and profile.wallet != request.public_key:
        raise RegistrationRejected(
            "wallet_mismatch",
            f"the profile's wallet {profile.wallet} is not the signing key {request.public_key}: "
            "a node is paid at its identity key",
        )
