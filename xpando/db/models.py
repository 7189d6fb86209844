"""SQLModel tables. Every write is keyed by a business key so a retried activity writes once."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Index, LargeBinary, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def _ts(*, nullable: bool = False, index: bool = False) -> Any:
    return Field(
        default=None,
        sa_column=Column(DateTime(timezone=True), nullable=nullable, index=index),
    )


class Node(SQLModel, table=True):
    __tablename__ = "nodes"

    node_id: str = Field(primary_key=True, max_length=64)
    region: str = Field(index=True, max_length=32)
    provider: str = Field(max_length=32)
    model: str = Field(max_length=128)
    task_queue: str = Field(max_length=80)
    capacity: int = 4
    domains: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))
    wallet: str | None = Field(default=None, max_length=64)  # base58 payout address (XPD)
    registered_at: datetime = _ts()
    updated_at: datetime = _ts()
    # Signed identity and routing state (nullable: rows from before these columns have none).
    public_key: str | None = Field(default=None, max_length=64)  # bound by the first signed request
    status: str | None = Field(default=None, max_length=16)  # None/active | deregistered
    deregistered_at: datetime | None = _ts(nullable=True)
    price_input_per_mtok: float | None = None
    price_output_per_mtok: float | None = None
    reputation: float | None = None  # None: the prior (XPANDO_REPUTATION_PRIOR)
    reputation_n: int | None = None  # contributions that updated it
    # Any change that routing must see (profile, status, reputation): the routing index's
    # incremental refresh reads rows changed since its last look.
    changed_at: datetime | None = _ts(nullable=True, index=True)


class Task(SQLModel, table=True):
    """A task as recorded when it ended (completed, failed or cancelled)."""

    __tablename__ = "tasks"
    __table_args__ = (
        # GET /v1/tasks pages newest first by (submitted_at, task_id): a keyset, not an offset.
        Index("ix_tasks_submitted_at_task_id", "submitted_at", "task_id"),
        # The admission check counts a key's tasks still holding part of its budget.
        Index("ix_tasks_key_hold", "key_id", "hold_usd"),
    )

    task_id: str = Field(primary_key=True, max_length=128)
    prompt: str = Field(sa_column=Column(Text, nullable=False))
    domain: str | None = Field(default=None, index=True, max_length=64)
    status: str = Field(index=True, max_length=16)
    answer: str = Field(default="", sa_column=Column(Text, nullable=False))
    confidence: float = 0.0
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = _ts(index=True)
    completed_at: datetime | None = _ts(nullable=True)
    # Nullable: rows written before these columns have none (and are not listed).
    owner: str | None = Field(default=None, index=True, max_length=128)  # a principal's name
    submitted_at: datetime | None = _ts(nullable=True)  # the workflow's StartTime
    # The API key that submitted it (``xpando/auth/spend.py``): written with the row at submit,
    # before the workflow starts. None: started another way (CLI, tests, operators).
    key_id: str | None = Field(default=None, max_length=16)
    # Its worst-case provider cost, held against the key's daily budget while it runs; None once
    # the record step charged what it cost (``charged_usd``: the sum of its contributions').
    hold_usd: float | None = None
    charged_usd: float | None = None


class Contribution(SQLModel, table=True):
    __tablename__ = "contributions"
    __table_args__ = (UniqueConstraint("task_id", "node_id", name="uq_contribution_task_node"),)

    id: int | None = Field(default=None, primary_key=True)
    task_id: str = Field(index=True, max_length=128, foreign_key="tasks.task_id")
    node_id: str = Field(index=True, max_length=64)
    region: str = Field(max_length=32)
    provider: str = Field(max_length=32)
    model: str = Field(max_length=128)
    status: str = Field(max_length=16)
    answer: str = Field(default="", sa_column=Column(Text, nullable=False))
    citations: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))
    relevance: float = 0.0
    quality: float = 0.0
    quality_reason: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    latency_ms: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = Field(default=None, max_length=32)
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    attempts: int = 1
    # provider accounting (nullable: rows written before these columns existed have none)
    cost_usd: float | None = None
    request_id: str | None = Field(default=None, max_length=128)
    error_type: str | None = Field(default=None, max_length=64)
    created_at: datetime = _ts()


class Knowledge(SQLModel, table=True):
    __tablename__ = "knowledge"

    knowledge_id: str = Field(primary_key=True, max_length=160)
    task_id: str = Field(unique=True, max_length=128)  # the task that first produced it
    question: str = Field(sa_column=Column(Text, nullable=False))
    answer: str = Field(sa_column=Column(Text, nullable=False))
    domain: str | None = Field(default=None, index=True, max_length=64)
    # Confidence when last confirmed; the effective confidence decays from confirmed_at.
    confidence: float = 0.0
    nodes: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    # One entry per task that produced or confirmed it: {task_id, confidence, nodes, at}.
    provenance: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))
    support: int = 1  # independent tasks that agree with it
    status: str = Field(default="active", index=True, max_length=16)  # active | merged | stale
    merged_into: str | None = Field(default=None, max_length=160)
    embedding: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    embedder: str | None = Field(default=None, max_length=64)
    uses: int = 0
    confirmed_at: datetime | None = _ts(nullable=True)
    created_at: datetime = _ts(index=True)
    updated_at: datetime = _ts(index=True)


class Breaker(SQLModel, table=True):
    """A circuit breaker, shared by every process that routes (see ``xpando/breakers.py``).

    ``state`` is ``closed`` or ``open``; an open breaker whose ``open_until`` has passed is
    half-open, and ``probe_until`` (with ``probe_task``) is the lease of its one probe.
    """

    __tablename__ = "breakers"

    key: str = Field(primary_key=True, max_length=200)  # node:<id> | provider:<name>@<region>
    scope: str = Field(max_length=16)  # node | provider
    state: str = Field(default="closed", index=True, max_length=16)
    consecutive_failures: int = 0
    opened_at: datetime | None = _ts(nullable=True)
    open_until: datetime | None = _ts(nullable=True)
    probe_until: datetime | None = _ts(nullable=True)
    probe_task: str | None = Field(default=None, max_length=128)
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    updated_at: datetime = _ts()


class ExpertOutcome(SQLModel, table=True):
    """Every ask of an expert as it ended (one row per ask; the event id makes reports
    idempotent). The breakers are derived from these; operators can query them directly."""

    __tablename__ = "expert_outcomes"

    event_id: str = Field(primary_key=True, max_length=300)
    task_id: str = Field(index=True, max_length=128)
    node_id: str = Field(index=True, max_length=64)
    provider: str = Field(max_length=32)
    region: str = Field(max_length=32)
    ok: bool
    error_type: str | None = Field(default=None, max_length=64)
    created_at: datetime = _ts(index=True)


class NodeNonce(SQLModel, table=True):
    """Nonces of signed node requests, kept until their timestamp would be refused anyway: the
    primary key turns a replayed request into a conflict."""

    __tablename__ = "node_nonces"

    public_key: str = Field(primary_key=True, max_length=64)
    nonce: str = Field(primary_key=True, max_length=64)
    digest: str = Field(max_length=64)  # sha256 of the signature: the same request, retried
    node_id: str = Field(max_length=64)
    expires_at: datetime = _ts(index=True)


class DomainVector(SQLModel, table=True):
    """Embeddings of node domain texts, content-addressed (sha256 of embedder name + text): a
    text is embedded once for the whole network, at registration."""

    __tablename__ = "domain_vectors"

    key: str = Field(primary_key=True, max_length=64)
    embedder: str = Field(max_length=64)
    vector: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = _ts()


class ReputationEvent(SQLModel, table=True):
    """One contribution's effect on its node's reputation: once per task + node, so a retried
    record never moves a reputation twice."""

    __tablename__ = "reputation_events"

    task_id: str = Field(primary_key=True, max_length=128)
    node_id: str = Field(primary_key=True, max_length=64)
    quality: float
    created_at: datetime = _ts()


class ApiKey(SQLModel, table=True):
    """An API key (``xpando/auth/keys.py``): its id, its principal and scopes, and the SHA-256
    digest of the key — never the key itself. A revoked key keeps its row, so an approval or a
    log line that names its id still says whose it was."""

    __tablename__ = "api_keys"

    key_id: str = Field(primary_key=True, max_length=16)
    name: str = Field(index=True, max_length=64)  # the principal: who uses it
    scopes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    digest: str = Field(max_length=64)
    created_by: str | None = Field(default=None, max_length=64)
    created_at: datetime = _ts()
    expires_at: datetime | None = _ts(nullable=True)
    revoked_at: datetime | None = _ts(nullable=True)
    # Its own limits (``xpando/auth/limits.py``); None: the deployment's XPANDO_LIMIT_* value.
    requests_per_minute: int | None = None
    tasks_per_minute: int | None = None
    concurrent_tasks: int | None = None
    budget_usd_per_day: float | None = None


class KeySpend(SQLModel, table=True):
    """What a key's tasks cost at the providers on one UTC day (``day``: ``YYYY-MM-DD``), added
    to by the record step once per task (``tasks.charged_usd`` says what was charged)."""

    __tablename__ = "key_spend"

    key_id: str = Field(primary_key=True, max_length=16)
    day: str = Field(primary_key=True, max_length=10)
    spent_usd: float = 0.0
    tasks: int = 0  # tasks charged that day
    updated_at: datetime = _ts()


class RateCounter(SQLModel, table=True):
    """A per-minute counter of the database backend of the limiter (``xpando/auth/limits.py``):
    ``count`` hits in the window that ends at ``resets_at`` (Unix seconds)."""

    __tablename__ = "rate_counters"

    bucket: str = Field(primary_key=True, max_length=64)
    count: int = 0
    resets_at: float = 0.0


class Topic(SQLModel, table=True):
    """A topic region of routing's learned fit (``xpando/routing/index.py``): the prompt vector
    of the task that opened it. Written once, never changed: every core worker that loads the
    topics sees the same regions."""

    __tablename__ = "routing_topics"

    topic_id: str = Field(primary_key=True, max_length=64)  # derived from the opening task id
    embedder: str = Field(max_length=64)
    vector: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = _ts(index=True)


class NodeTopic(SQLModel, table=True):
    """What a node's scored contributions in one topic region add up to: their count and the
    sum of their quality. Moved once per task + node with the reputation event, so a retried
    record never counts twice."""

    __tablename__ = "node_topics"

    node_id: str = Field(primary_key=True, max_length=64)
    topic_id: str = Field(primary_key=True, max_length=64)
    n: float = 0.0
    quality_sum: float = 0.0
    updated_at: datetime = _ts(index=True)
