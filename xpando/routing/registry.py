"""Signed node registration: the one code path behind ``POST /v1/nodes``, ``DELETE /v1/nodes/{id}``
and ``NodeRegistrationWorkflow`` (what ``xpando worker node`` starts).

Order of checks: the request's shape, signature and timestamp (``xpando/identity.py``, no I/O);
then the node's domains are embedded (once per distinct text, network-wide); then one database
transaction consumes the nonce and applies the request under the node's key
(``xpando/db/nodes.py``). A request refused at any step writes nothing but cached embeddings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from xpando.contracts import NodeAction, SignedNodeRequest
from xpando.db import SessionFactory
from xpando.db import nodes as node_queries
from xpando.embedding import Embedder
from xpando.identity import RegistrationRejected, request_digest, verify_request
from xpando.logs import get_logger
from xpando.routing.index import domain_text, ensure_domain_vectors

log = get_logger(__name__)

# Expired nonces are purged at most this often (per process).
NONCE_PURGE_EVERY_S = 60.0


@dataclass(frozen=True)
class Registered:
    node_id: str
    action: NodeAction
    created: bool
    registered_at: datetime
    public_key: str
    replayed: bool = False  # the very same request was applied before (a retry)


class NodeRegistry:
    """Verifies and applies signed node requests."""

    def __init__(
        self, *, sessions: SessionFactory, embedder: Embedder, max_skew_s: float = 300.0
    ) -> None:
        self._sessions = sessions
        self._embedder = embedder
        self._max_skew_s = max_skew_s
        self._purged_at = 0.0
        self._vectors_known: dict[str, None] = {}  # domain vector keys known to be stored

    async def apply(
        self,
        request: SignedNodeRequest,
        *,
        received_at: datetime | None = None,
        origin: str = "",
    ) -> Registered:
        """Apply ``request``, checking its timestamp against ``received_at`` (default now: the
        workflow path passes the time Temporal accepted it, so a node that registers while the
        core is down is not refused as stale when the core comes up).

        Raises :class:`RegistrationRejected`. Any second use of a nonce is ``nonce_reused``;
        ``same_request`` tells when it was this very request from the same ``origin`` (the
        workflow run that carries it), which :meth:`apply_idempotent` accepts as a retry."""
        now = datetime.now(UTC)
        received = received_at or now
        verify_request(request, now=received.timestamp(), max_skew_s=self._max_skew_s)
        if request.profile is not None and request.profile.domains:
            texts = {domain_text(d.model_dump()) for d in request.profile.domains}
            stored = await ensure_domain_vectors(
                self._sessions, self._embedder, texts, known=self._vectors_known
            )
            self._vectors_known.update(dict.fromkeys(stored))
        expires = datetime.fromtimestamp(request.timestamp, UTC) + timedelta(
            seconds=self._max_skew_s + 1
        )
        try:
            async with self._sessions() as session:
                applied = await node_queries.apply_signed_request(
                    session=session,
                    request=request,
                    digest=request_digest(request, origin),
                    nonce_expires_at=max(expires, now + timedelta(seconds=1)),
                    now=now,
                )
        except node_queries.NonceReused as err:
            raise RegistrationRejected(
                "nonce_reused",
                f"nonce {request.nonce} was already used by this key"
                + (" (this very request was applied before)" if err.same_request else ""),
                same_request=err.same_request,
            ) from err
        except node_queries.KeyMismatch as err:
            raise RegistrationRejected(
                "node_key_mismatch",
                f"node {request.node_id!r} is registered under another key ({err.bound_key}); "
                "only that key can update or deregister it",
            ) from err
        except node_queries.NodeNotFound as err:
            raise RegistrationRejected(
                "node_not_found", f"node {request.node_id!r} is not registered"
            ) from err
        await self._purge(now)
        log.info(
            "node deregistered" if request.action == NodeAction.DEREGISTER else "node registered",
            node_id=request.node_id,
            public_key=request.public_key,
            created=applied.created,
        )
        return Registered(
            node_id=applied.node_id,
            action=request.action,
            created=applied.created,
            registered_at=applied.registered_at,
            public_key=request.public_key,
        )

    async def apply_idempotent(
        self, request: SignedNodeRequest, *, origin: str, received_at: datetime | None = None
    ) -> Registered:
        """:meth:`apply`, where a retry from the same ``origin`` (its nonce consumed by this very
        request from there) is a success: what a retried activity needs. The same request from
        anywhere else is still a replay."""
        try:
            return await self.apply(request, received_at=received_at, origin=origin)
        except RegistrationRejected as err:
            if not err.same_request:
                raise
            return Registered(
                node_id=request.node_id,
                action=request.action,
                created=False,
                registered_at=received_at or datetime.now(UTC),
                public_key=request.public_key,
                replayed=True,
            )

    async def _purge(self, now: datetime) -> None:
        if time.monotonic() - self._purged_at < NONCE_PURGE_EVERY_S:
            return
        self._purged_at = time.monotonic()
        async with self._sessions() as session:
            await node_queries.purge_nonces(session=session, now=now)
