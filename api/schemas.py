"""Request and response bodies of the HTTP API (with limits)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    computed_field,
)
from pydantic_core import PydanticCustomError

from xpando.auth.keys import NAME_PATTERN, Scope
from xpando.contracts import (
    UNSAFE_CONTROLS,
    AggregationStrategy,
    BreakerView,
    CleanText,
    Contribution,
    ContributionStatus,
    KnowledgeReuse,
    NodeAction,
    NodeDomain,
    NodeProfile,
    Provenance,
    RoutingReport,
    SignedNodeRequest,
    TaskEvent,
    TaskEventType,
    TaskResult,
    TaskStage,
    refuse_unsafe_text,
)
from xpando.contracts_payouts import PayoutSagaResult

PROMPT_MAX_CHARS = 8000
K_MIN, K_MAX = 1, 9
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# Clean text that is refused when blank: it is stripped before the limits apply, and the pattern
# tells clients so (no unsafe control character, and one character that is not whitespace).
NOT_BLANK = rf"^[^{UNSAFE_CONTROLS}]*[^\s{UNSAFE_CONTROLS}][^{UNSAFE_CONTROLS}]*$"

# The text check comes after the constraints here so that the pattern stays in the OpenAPI
# schema; it still runs first (a before-validator), so a control character is ``invalid_text``.
Region = Annotated[
    str,
    StringConstraints(min_length=1, max_length=32, pattern=r"^[a-z0-9-]+$"),
    BeforeValidator(refuse_unsafe_text),
]
Domain = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9-]+$"),
    BeforeValidator(refuse_unsafe_text),
]


def _json_number(value: Any) -> Any:
    """A JSON number, as the schema says: pydantic would otherwise read ``"3"`` or ``true`` as
    one. An integral float such as ``3.0`` stays accepted where an integer belongs (JSON Schema
    counts it as one)."""
    if isinstance(value, str | bool):
        raise PydanticCustomError("number_type", "Input should be a JSON number")
    return value


ExpertCount = Annotated[int, Field(ge=K_MIN, le=K_MAX), BeforeValidator(_json_number)]

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _rfc3339(value: Any) -> Any:
    """A date-time as the schema says (RFC 3339, with its offset): pydantic would also read a
    number of seconds (``since=0.5``), a bare date or a time without a zone."""
    if isinstance(value, str) and not _RFC3339.match(value):
        raise PydanticCustomError("datetime_type", "Input should be an RFC 3339 date-time")
    return value


DateTimeParam = Annotated[datetime, BeforeValidator(_rfc3339)]
DeadlineS = Annotated[float, Field(gt=0, le=600), BeforeValidator(_json_number)]


class TaskCreate(BaseModel):
    # Numbers and flags take JSON's own types only ("3", true or 0 are refused where a number or a
    # boolean belongs, not converted).
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    prompt: CleanText = Field(
        min_length=1,
        max_length=PROMPT_MAX_CHARS,
        pattern=NOT_BLANK,
        description="The question or task for the experts",
    )
    k: ExpertCount | None = Field(
        None,
        description="How many experts to ask (default: XPANDO_DEFAULT_K)",
    )
    domain: Domain | None = None
    regions: list[Region] = Field(
        default_factory=list, max_length=8, description="Only route to nodes in these regions"
    )
    strategy: AggregationStrategy | None = Field(
        None, description="synthesize, consensus or best (default: XPANDO_AGGREGATION_STRATEGY)"
    )
    fresh: bool = Field(
        False, strict=True, description="Ask the experts even if stored knowledge matches"
    )
    quorum: ExpertCount | None = Field(
        None,
        description="Go on once this many experts answered; the rest are cancelled "
        "(default XPANDO_TASK_QUORUM; at most k)",
    )
    deadline_s: DeadlineS | None = Field(
        None,
        description="After this, go on with the answers there are (default XPANDO_TASK_DEADLINE_S)",
    )


class Links(BaseModel):
    self: str
    ui: str


class TaskAccepted(BaseModel):
    task_id: str
    status: str = "accepted"
    links: Links


class TaskView(BaseModel):
    task_id: str
    status: str = Field(
        description="running, completed, failed, cancelled, terminated, timed_out (or unknown)"
    )
    stage: str | None = None
    domain: str | None = None
    prompt: str | None = None
    answer: str | None = None
    confidence: float | None = None
    chosen: list[str] = Field(default_factory=list)
    contributions: list[Contribution] = Field(default_factory=list)
    knowledge_used: list[str] = Field(default_factory=list)
    strategy: AggregationStrategy | None = None
    reused: KnowledgeReuse | None = Field(
        None, description="Set when the answer came from stored knowledge (no provider cost)"
    )
    routing: RoutingReport | None = Field(
        None, description="Why these experts: each chosen, standby and top skipped candidate"
    )
    error: str | None = None
    completed_at: datetime | None = None
    links: Links

    @computed_field(description="What the task's provider calls cost in USD (all contributions)")
    def cost_usd(self) -> float:
        return round(sum(c.cost_usd for c in self.contributions), 8)


class TaskStatus(StrEnum):
    """A task's status in the listing: ``running`` and ``waiting`` (for a live expert) while
    its workflow runs, then the status it was recorded with."""

    RUNNING = "running"
    WAITING = "waiting"
    COMPLETED = TaskStage.COMPLETED.value
    FAILED = TaskStage.FAILED.value
    CANCELLED = TaskStage.CANCELLED.value


class TaskSummary(BaseModel):
    task_id: str
    status: TaskStatus
    domain: str | None = Field(None, description="general when the task named none")
    owner: str | None = Field(None, description="The name of the principal that submitted it")
    nodes: list[str] = Field(default_factory=list, description="The experts asked")
    submitted_at: datetime = Field(description="When its workflow started")
    completed_at: datetime | None = Field(None, description="When it was recorded")
    links: Links


class TaskList(BaseModel):
    tasks: list[TaskSummary] = Field(description="Newest first; a page may hold fewer than limit")
    next_cursor: str | None = Field(
        None, description="Pass as cursor= for the next page; null on the last one"
    )


# A page's cursor: its last task's submission time (microseconds since the Unix epoch) and id.
# Clients pass it back as it is; any string of this shape is a place in the listing.
CURSOR_PATTERN = r"^-?[0-9]{1,18}~[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FIRST, _LAST = datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)


class TaskCursor(BaseModel):
    """Where a page of GET /v1/tasks ended: its last task's key."""

    submitted_at: datetime
    task_id: str

    def encode(self) -> str:
        micros = (self.submitted_at - _EPOCH) // timedelta(microseconds=1)
        return f"{micros}~{self.task_id}"

    @classmethod
    def decode(cls, cursor: str) -> TaskCursor:
        """Raises ValueError for a string not of CURSOR_PATTERN's shape; a time past either
        end of the calendar is that end."""
        if not re.fullmatch(CURSOR_PATTERN, cursor):
            raise ValueError(f"not a cursor of this listing: {cursor[:40]!r}")
        micros, task_id = cursor.split("~", 1)
        try:
            at = _EPOCH + timedelta(microseconds=int(micros))
        except OverflowError:
            at = _FIRST if micros.startswith("-") else _LAST
        return cls(submitted_at=at, task_id=task_id)


class TaskCancelled(BaseModel):
    task_id: str
    status: Literal["cancelled", "cancelling"] = Field(
        description="cancelled; cancelling when the task has not ended yet (no core worker "
        "answered in time): it will, and GET /v1/tasks/{task_id} will say so"
    )
    answered: list[str] = Field(
        default_factory=list, description="The experts that had answered (ok or no_answer)"
    )
    unanswered: list[str] = Field(
        default_factory=list, description="The experts asked that had not (cancelled or failed)"
    )
    contributions: list[Contribution] = Field(default_factory=list)
    links: Links


class NodeView(BaseModel):
    node_id: str
    region: str
    provider: str
    model: str
    task_queue: str
    capacity: int
    domains: list[NodeDomain]
    live: bool
    registered_at: datetime | None
    updated_at: datetime | None
    breaker: BreakerView | None = Field(
        None, description="This node's circuit breaker (closed, open, half_open)"
    )
    provider_breaker: BreakerView | None = Field(
        None, description="The breaker of this node's provider in its region"
    )
    status: str = Field("active", description="active, or deregistered (not routed to)")
    public_key: str | None = Field(
        None, description="The node's identity (base58 ed25519), bound at its first signed request"
    )
    wallet: str | None = Field(None, description="Where its XPD payouts go (its public key)")
    reputation: float = Field(
        description="Moving average of its contributions' quality (the prior until it has some)"
    )
    contributions: int = Field(0, description="Scored contributions behind the reputation")
    price_input_per_mtok: float = 0.0
    price_output_per_mtok: float = 0.0


# The two bodies a signed node request takes over HTTP: the same signed message, narrowed so the
# OpenAPI document says which action each route takes and that a registration carries a profile.
class RegisterNodeBody(SignedNodeRequest):
    action: Literal[NodeAction.REGISTER]
    profile: NodeProfile


class DeregisterNodeBody(SignedNodeRequest):
    action: Literal[NodeAction.DEREGISTER]
    profile: None = None


class NodeRegistered(BaseModel):
    node_id: str
    status: str = Field(description="active (registered or updated) or deregistered")
    created: bool
    public_key: str
    registered_at: datetime


class NodeList(BaseModel):
    nodes: list[NodeView]
    count: int


class ErrorDetail(BaseModel):
    field: str = Field(description="Where in the request, e.g. ``prompt`` or ``query.limit``")
    code: str = Field(description="What is wrong with it, e.g. ``string_too_long``")
    message: str


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable, for programs: e.g. ``task_not_found``")
    message: str = Field(description="For people: what went wrong and what to do")
    details: list[ErrorDetail] = Field(default_factory=list)


class ErrorBody(BaseModel):
    """Every error response: ``{"error": {"code", "message", "details"}}``."""

    error: ErrorInfo


class Health(BaseModel):
    status: str = Field(description="ok or unhealthy")
    temporal: str = Field(description="ok, or error: what went wrong")
    database: str = Field(description="ok, or error: what went wrong")


class Readiness(BaseModel):
    status: str = Field(description="ready or not_ready")
    missing: list[str] = Field(
        description="What is not there yet: temporal, database and/or experts (empty when ready)"
    )
    temporal: str = Field(description="ok, or error: what went wrong")
    database: str = Field(description="ok, or error: what went wrong")
    experts: str = Field(description="ok (a registered expert node is live), or what is missing")


class KnowledgeView(BaseModel):
    knowledge_id: str
    question: str
    answer: str
    domain: str | None
    confidence: float = Field(description="Effective confidence (decayed since confirmed)")
    support: int = Field(description="Independent tasks that agree with this item")
    status: str = Field(description="active, merged (into merged_into) or stale")
    merged_into: str | None = None
    uses: int = Field(description="Tasks answered from this item")
    similarity: float | None = None
    provenance: list[Provenance]
    created_at: datetime | None
    updated_at: datetime | None


class KnowledgeList(BaseModel):
    items: list[KnowledgeView]
    count: int


# --- payouts -------------------------------------------------------------------------------------


class PayoutView(BaseModel):
    payout_id: str = Field(description="xpd-<epoch>-<node_id>; also the memo of its transfer")
    epoch: int
    node_id: str
    wallet: str | None
    points: int
    earned: int = Field(description="This epoch's share, in base units")
    carried_in: int = Field(description="Carried over from earlier epochs, in base units")
    amount: int = Field(description="earned + carried_in: what this payout transfers")
    status: str
    reason: str | None = None
    carried_into: str | None = None
    signature: str | None = None
    signatures: list[str] = Field(default_factory=list)
    attempts: int = 0
    slot: int | None = None
    error: str | None = None
    created_at: datetime | None = None
    signed_at: datetime | None = None
    sent_at: datetime | None = None
    confirmed_at: datetime | None = None


class PayoutList(BaseModel):
    payouts: list[PayoutView]
    count: int
    total: int


class EpochLinks(Links):
    payouts: str


class EpochView(BaseModel):
    epoch: int
    status: str
    workflow_id: str
    stage: str | None = None
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    emission: int = 0
    accruals: int = 0
    payouts: int = 0
    total: int = 0
    payable: int = 0
    reserved: int | None = None
    released: int = 0
    paid: int = 0
    carried_over: int = 0
    approval_required: bool = False
    approver: str | None = None
    approved_at: datetime | None = None
    reconciled: bool | None = None
    reconcile_report: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    closed_at: datetime | None = None
    settled_at: datetime | None = None
    links: EpochLinks


class SettleAccepted(BaseModel):
    epoch: int
    workflow_id: str
    status: str = Field(description="started, running, completed, failed, …")
    result: PayoutSagaResult | None = None
    links: EpochLinks


class ApproveBody(BaseModel):
    """The approver is the caller's key's principal, not a field: no one can approve in
    another's name. Unknown fields (an ``approver``) are refused."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    note: CleanText = Field("", max_length=500, description="Why, for the record")


class PendingEarnings(BaseModel):
    accruals: int = Field(description="Scored contributions not yet in a closed epoch")
    quality_ppm: int = Field(description="Their summed quality (parts per million)")


class EarningsView(BaseModel):
    node_id: str
    wallet: str | None
    pending: PendingEarnings
    earned: int = Field(description="All epochs' shares, in base units")
    paid: int = Field(description="Confirmed on chain, in base units")
    carried_over: int = Field(description="Owed, waiting for a later epoch (see reasons)")
    in_flight: int = Field(description="In an epoch being paid right now")
    payouts: list[PayoutView]


# --- API keys ------------------------------------------------------------------------------------


MAX_KEY_LIFETIME_S = 10 * 365 * 86400
KeyLifetime = Annotated[int, Field(ge=1, le=MAX_KEY_LIFETIME_S), BeforeValidator(_json_number)]


LimitCount = Annotated[int, Field(ge=0, le=1_000_000_000), BeforeValidator(_json_number)]
LimitUsd = Annotated[float, Field(ge=0, le=1_000_000_000), BeforeValidator(_json_number)]


class KeyLimitsBody(BaseModel):
    """A key's limits; 0 is no limit. Creating a key, a field left out takes the deployment's
    default (``XPANDO_LIMIT_*``); a key's view shows the limits that apply to it."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: LimitCount | None = Field(
        None, description="Requests a minute (429 rate_limited)"
    )
    tasks_per_minute: LimitCount | None = Field(
        None, description="Tasks submitted a minute (429 task_rate_limited)"
    )
    concurrent_tasks: LimitCount | None = Field(
        None, description="Tasks running at once (429 concurrency_limited)"
    )
    budget_usd_per_day: LimitUsd | None = Field(
        None, description="Provider spend a UTC day, in USD (402 budget_exceeded)"
    )


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1,
        max_length=64,
        pattern=NAME_PATTERN,
        description="Who uses the key: the principal its approvals record and logs show",
    )
    scopes: list[Scope] = Field(
        min_length=1, max_length=len(Scope), description="What the key may do (admin: all)"
    )
    expires_in_s: KeyLifetime | None = Field(
        None, description="Seconds until the key stops working (at most 10 years); none: never"
    )
    limits: KeyLimitsBody | None = Field(
        None, description="Its own limits, where they differ from the deployment's"
    )


class KeyView(BaseModel):
    key_id: str = Field(description="The key's public id: the 12 characters after xpd_")
    name: str
    scopes: list[Scope]
    status: Literal["active", "revoked", "expired"]
    created_by: str | None = Field(None, description="The principal (or command) that issued it")
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    limits: KeyLimitsBody = Field(description="The limits that apply to it (0: none)")


class KeyCreated(KeyView):
    key: str = Field(
        description="The key itself (xpd_<key id>_<secret>): shown this once; only its SHA-256 "
        "digest is stored"
    )


class KeyList(BaseModel):
    keys: list[KeyView]
    count: int


# --- examples (OpenAPI) --------------------------------------------------------------------------
# Built from the models themselves, so an example cannot drift from the schema it illustrates.

_EXAMPLE_TASK = "task-5f0c9a1e2b7d4c3e8a9f6b1d2c3e4f50"
_EXAMPLE_AT = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
_EXAMPLE_LINKS = Links(
    self=f"http://127.0.0.1:8000/v1/tasks/{_EXAMPLE_TASK}",
    ui=f"http://127.0.0.1:8233/namespaces/default/workflows/{_EXAMPLE_TASK}",
)
_EXAMPLE_CONTRIBUTIONS = [
    Contribution(
        node_id="cooking-eu-1",
        region="eu-west",
        provider="openai",
        model="gpt-4o-mini",
        status=ContributionStatus.OK,
        answer="About six minutes in boiling water.",
        relevance=0.92,
        quality=0.88,
        latency_ms=840,
        input_tokens=212,
        output_tokens=64,
        finish_reason="stop",
        cost_usd=0.00007,
    ),
    Contribution(
        node_id="cooking-us-1",
        region="us-east",
        provider="anthropic",
        model="claude-3-5-haiku",
        status=ContributionStatus.FAILED,
        latency_ms=1210,
        error_type="Cancelled",
        error="Cancelled: the task was cancelled before this expert answered",
    ),
]
EXAMPLE_TASK_ACCEPTED = TaskAccepted(task_id=_EXAMPLE_TASK, links=_EXAMPLE_LINKS)
EXAMPLE_TASK_VIEW = TaskView(
    task_id=_EXAMPLE_TASK,
    status="completed",
    stage="completed",
    domain="cooking",
    prompt="How many minutes to boil a soft egg?",
    answer="About six minutes in boiling water.",
    confidence=0.81,
    chosen=["cooking-eu-1", "cooking-us-1"],
    contributions=_EXAMPLE_CONTRIBUTIONS[:1],
    strategy=AggregationStrategy.CONSENSUS,
    completed_at=_EXAMPLE_AT,
    links=_EXAMPLE_LINKS,
)
EXAMPLE_TASK_LIST = TaskList(
    tasks=[
        TaskSummary(
            task_id=_EXAMPLE_TASK,
            status=TaskStatus.COMPLETED,
            domain="cooking",
            owner="alice",
            nodes=["cooking-eu-1", "cooking-us-1"],
            submitted_at=_EXAMPLE_AT,
            completed_at=_EXAMPLE_AT,
            links=_EXAMPLE_LINKS,
        )
    ],
    next_cursor=TaskCursor(submitted_at=_EXAMPLE_AT, task_id=_EXAMPLE_TASK).encode(),
)
EXAMPLE_TASK_CANCELLED = TaskCancelled(
    task_id=_EXAMPLE_TASK,
    status="cancelled",
    answered=["cooking-eu-1"],
    unanswered=["cooking-us-1"],
    contributions=_EXAMPLE_CONTRIBUTIONS,
    links=_EXAMPLE_LINKS,
)
EXAMPLE_TASK_CANCELLING = TaskCancelled(
    task_id=_EXAMPLE_TASK, status="cancelling", links=_EXAMPLE_LINKS
)
EXAMPLE_TASK_EVENTS = [
    TaskEvent(id=1, type=TaskEventType.STAGE, at=_EXAMPLE_AT, stage=TaskStage.PLANNING),
    TaskEvent(id=2, type=TaskEventType.STAGE, at=_EXAMPLE_AT, stage=TaskStage.ANSWERING),
    TaskEvent(
        id=3,
        type=TaskEventType.CONTRIBUTION,
        at=_EXAMPLE_AT,
        contribution=_EXAMPLE_CONTRIBUTIONS[0],
    ),
    TaskEvent(id=4, type=TaskEventType.STAGE, at=_EXAMPLE_AT, stage=TaskStage.AGGREGATING),
    TaskEvent(id=5, type=TaskEventType.STAGE, at=_EXAMPLE_AT, stage=TaskStage.COMPLETED),
    TaskEvent(
        id=6,
        type=TaskEventType.RESULT,
        at=_EXAMPLE_AT,
        result=TaskResult(
            task_id=_EXAMPLE_TASK,
            prompt="How many minutes to boil a soft egg?",
            answer="About six minutes in boiling water.",
            confidence=0.81,
            domain="cooking",
            contributions=_EXAMPLE_CONTRIBUTIONS[:1],
            completed_at=_EXAMPLE_AT,
        ),
    ),
]


def example(model: BaseModel, description: str | None = None) -> dict[str, Any]:
    """A ``responses=`` entry whose JSON body example is ``model``."""
    entry: dict[str, Any] = {
        "content": {"application/json": {"example": model.model_dump(mode="json")}}
    }
    if description is not None:
        entry["description"] = description
    return entry


# --- the codec endpoint (Temporal's remote codec protocol) -------------------------------------

# Protobuf JSON's bytes: base64, standard or URL-safe, padded or not.
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/_-]{4})*(?:[A-Za-z0-9+/_-]{2}(?:==)?|[A-Za-z0-9+/_-]{3}=?)?$"
# Temporal refuses a payload over 2 MiB (its default blob size limit): this is its base64.
PAYLOAD_MAX_BASE64 = (2 * 1024 * 1024 + 2) // 3 * 4
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=1024, pattern=BASE64_PATTERN)]


class CodecPayload(BaseModel):
    """A ``temporal.api.common.v1.Payload`` in protobuf JSON."""

    metadata: dict[MetadataKey, MetadataValue] = Field(
        default_factory=dict, max_length=16, description="e.g. encoding: base64 of json/plain"
    )
    data: str = Field(
        "",
        max_length=PAYLOAD_MAX_BASE64,
        pattern=BASE64_PATTERN,
        description="The payload's bytes, base64",
    )


class CodecPayloads(BaseModel):
    """``{"payloads": [...]}``: the body and the answer of ``/codec/encode`` and ``/codec/decode``,
    the ``temporal.api.common.v1.Payloads`` message in protobuf JSON."""

    payloads: list[CodecPayload] = Field(default_factory=list, max_length=100)
