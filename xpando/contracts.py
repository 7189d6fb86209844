"""Workflow, activity and query contracts: one frozen pydantic input and result model per call.

Everything here is plain JSON so operators can start workflows with
``temporal workflow start --input '{...}'``. Secrets never appear in these models.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError


class Contract(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- text ----------------------------------------------------------------------------------------

# Characters that text sent to a database or a provider must not hold: NUL (PostgreSQL refuses
# it in text), lone surrogates (they have no UTF-8 encoding, so no JSON payload, database or
# provider call can carry them), and the other C0 controls but tab, newline and carriage return
# (terminal escapes, invisible in logs and the Web UI: no prompt or profile needs them).
# Control characters a database or provider cannot take (tab, newline and carriage return are
# fine); with the lone surrogates, what UNSAFE_TEXT finds.
UNSAFE_CONTROLS = r"\x00-\x08\x0b\x0c\x0e-\x1f"
UNSAFE_TEXT = re.compile(rf"[{UNSAFE_CONTROLS}\ud800-\udfff]")
# What the OpenAPI document says of such text: a JSON Schema (ECMA-262) pattern has no portable
# way to name a lone surrogate, so it names the control characters only.
SAFE_TEXT_PATTERN = rf"^[^{UNSAFE_CONTROLS}]*$"
INVALID_TEXT = "invalid_text"  # the error code of a refusal (API details, pydantic error type)
INVALID_TEXT_TYPE = "InvalidText"  # the type of the same refusal as a Temporal ApplicationError


def refuse_unsafe_text(value: object) -> object:
    """Refuse a string holding an :data:`UNSAFE_TEXT` character (naming it and where it is, never
    echoing it: a lone surrogate cannot even be written into the error's JSON)."""
    if isinstance(value, str) and (found := UNSAFE_TEXT.search(value)):
        raise PydanticCustomError(
            INVALID_TEXT,
            "text contains U+{codepoint} at position {position}: control characters other than "
            "tab, newline and carriage return, and lone surrogates, are refused",
            {"codepoint": f"{ord(found.group()):04X}", "position": found.start()},
        )
    return value


def _document_safe_text(schema: dict[str, Any]) -> None:
    """A CleanText field's JSON schema names the characters it refuses (a field with a pattern
    of its own says so in that pattern)."""
    schema.setdefault("pattern", SAFE_TEXT_PATTERN)


def scrub_unsafe_text(value: object) -> object:
    """Drop control characters and replace lone surrogates with U+FFFD."""
    if isinstance(value, str) and UNSAFE_TEXT.search(value):
        return UNSAFE_TEXT.sub(lambda m: "\ufffd" if m.group() >= "\ud800" else "", value)
    return value


# Text a person or a node sends in: refused when unsafe (before any other check of the field,
# so the error code is always ``invalid_text``). Silently changed text would be a prompt nobody
# asked, an approval note nobody wrote, or a signed profile that no longer matches its signature.
CleanText = Annotated[
    str, BeforeValidator(refuse_unsafe_text), Field(json_schema_extra=_document_safe_text)
]
# Text a provider or a corpus produced (answers, citations, error messages): nobody can correct
# it, and refusing it would fail a task over a provider's quirk, so it is made safe instead.
ScrubbedText = Annotated[str, BeforeValidator(scrub_unsafe_text)]


# --- shared pieces -------------------------------------------------------------------------------


class TaskStage(StrEnum):
    QUEUED = "queued"
    PLANNING = "planning"
    ROUTING = "routing"
    WAITING_FOR_EXPERTS = "waiting_for_experts"  # no live expert yet: routing again on a timer
    ANSWERING = "answering"
    AGGREGATING = "aggregating"
    RECORDING = "recording"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"  # cancelled through Temporal before its answers were aggregated

    @property
    def ended(self) -> bool:
        return self in (TaskStage.COMPLETED, TaskStage.FAILED, TaskStage.CANCELLED)


class AggregationStrategy(StrEnum):
    SYNTHESIZE = "synthesize"  # one answer written from the experts' answers
    CONSENSUS = "consensus"  # the majority cluster's best answer
    BEST = "best"  # the highest-scored single answer


class ContributionStatus(StrEnum):
    OK = "ok"  # the expert answered from relevant material
    NO_ANSWER = "no_answer"  # the expert ran but had nothing relevant to say
    FAILED = "failed"  # the call failed (after Temporal's retries)


class Citation(Contract):
    source: ScrubbedText = Field(
        description="Where the passage comes from (module path, URL, knowledge:<id>)"
    )
    text: ScrubbedText = Field(description="The passage as cited")
    score: float = Field(ge=0.0, description="Relevance of the passage to the prompt")


class KnowledgeSnippet(Contract):
    """A stored answer handed to experts as context (and searched by the offline provider)."""

    knowledge_id: str
    question: str
    answer: str
    domain: str | None = None
    confidence: float = Field(ge=0.0, le=1.0)


class NodeDomain(Contract):
    name: CleanText = Field(min_length=1, max_length=64)
    description: CleanText = Field("", max_length=2000)
    keywords: list[CleanText] = Field(default_factory=list, max_length=200)


class NodeProfile(Contract):
    """What a node says about itself when it registers."""

    node_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    region: CleanText = Field(min_length=1, max_length=32)
    provider: CleanText = Field(min_length=1, max_length=32)
    model: CleanText = Field(min_length=1, max_length=128)
    domains: list[NodeDomain] = Field(default_factory=list, max_length=16)
    capacity: int = Field(4, ge=1, le=1024)
    wallet: str | None = Field(
        None,
        pattern=r"^[1-9A-HJ-NP-Za-km-z]{32,44}$",
        description="Base58 Solana address the node's XPD payouts go to (its identity key)",
    )
    price_input_per_mtok: float = Field(0.0, ge=0, le=10_000, description="USD per 1M tokens in")
    price_output_per_mtok: float = Field(0.0, ge=0, le=10_000, description="USD per 1M tokens out")

    @property
    def task_queue(self) -> str:
        return node_task_queue(self.node_id)


def node_task_queue(node_id: str) -> str:
    return f"node.{node_id}"


# --- TaskWorkflow --------------------------------------------------------------------------------


class TaskInput(Contract):
    task_id: str
    prompt: CleanText = Field(min_length=1)
    k: int = Field(3, ge=1)
    domain: CleanText | None = None
    regions: list[CleanText] = Field(default_factory=list)
    submitted_at: datetime | None = None
    strategy: AggregationStrategy = AggregationStrategy.CONSENSUS
    fresh: bool = False  # True: do not answer from stored knowledge
    answer_policy: AnswerPolicy | None = None  # None: TaskWorkflow's defaults
    # Quorum fan-out: go on once this many experts answered (None: all k) or once the deadline
    # passed with at least one answer (None: no deadline); the experts still working are
    # cancelled.
    quorum: int | None = Field(None, ge=1)
    deadline_ms: int | None = Field(None, ge=1)
    # With no live expert to route to, wait this long for one (None: TaskWorkflow's default;
    # 0: fail at once). The API sets XPANDO_TASK_WAIT_FOR_EXPERTS_S.
    wait_for_experts_s: int | None = Field(None, ge=0, le=86_400)
    # Who submitted it: the name of the API key's principal (never the key); None when the
    # API runs without keys, or for a task started with the CLI or `temporal workflow start`.
    owner: CleanText | None = Field(None, max_length=128)
    # The id of that key (never the key itself): whose budget the record step charges.
    key_id: CleanText | None = Field(None, max_length=16)


class AnswerPolicy(Contract):
    """How hard TaskWorkflow tries each expert; a field left out takes the fan-out's constant
    (``workflows/fanout.py``). Operators and tests shorten these; the API does not expose them."""

    initial_interval_ms: int | None = Field(None, ge=1, description="First retry backoff")
    maximum_interval_ms: int | None = Field(None, ge=1, description="Largest retry backoff")
    maximum_attempts: int | None = Field(None, ge=1, description="Attempts on one node")
    hedge_after_ms: int | None = Field(
        None, ge=1, description="An expert still working after this gets a standby in parallel"
    )
    schedule_to_start_ms: int | None = Field(
        None,
        ge=1,
        description="An ask that no worker of its node has taken within this fails over to a "
        "standby at once (the node stopped, or every slot of it is busy)",
    )


class Contribution(Contract):
    """One expert's part in a task, from node to record: the node's ``answer`` activity returns
    it, the fan-out writes the failed ones, the aggregation scores it (``quality``)."""

    node_id: str
    region: str
    provider: str
    model: str
    status: ContributionStatus
    answer: ScrubbedText = ""
    citations: list[Citation] = Field(default_factory=list)
    relevance: float = Field(0.0, ge=0.0, le=1.0)
    quality: float = Field(0.0, ge=0.0, le=1.0)
    quality_reason: ScrubbedText = ""
    latency_ms: int = Field(0, ge=0)
    input_tokens: int = Field(0, ge=0)
    output_tokens: int = Field(0, ge=0)
    finish_reason: ScrubbedText | None = None
    error: ScrubbedText | None = None
    attempts: int = Field(1, ge=1)  # the activity attempt that answered
    cost_usd: float = Field(0.0, ge=0.0)  # from the node's prices; also for failed answers
    request_id: str | None = None  # the provider's id for the (last) call
    error_type: str | None = None  # e.g. ProviderRateLimited, DeadlineExceeded (see errors.py)


class TaskProgress(Contract):
    task_id: str
    stage: TaskStage
    domain: str | None = None
    chosen: list[str] = Field(default_factory=list)
    answered: int = 0
    failed: int = 0
    error: str | None = None


class TaskEventType(StrEnum):
    STAGE = "stage"  # the task entered a stage (each stage announced once)
    CONTRIBUTION = "contribution"  # an expert's ask ended: answered, failed or cancelled
    RESULT = "result"  # the task completed: the last event
    ERROR = "error"  # the task failed or was cancelled: the last event


class TaskError(Contract):
    type: str = Field(description="e.g. AllExpertsFailed, NoExpertsAvailable, Cancelled")
    message: str


class TaskEvent(Contract):
    """One entry of a task's event log, kept by TaskWorkflow and read with its ``events`` query:
    the ``/v1/tasks/{id}/events`` stream and ``xpando task submit --follow`` show these."""

    id: int = Field(ge=1, description="Position in the task's log: 1, 2, 3, … (no gaps)")
    type: TaskEventType
    at: datetime = Field(
        description="When the workflow logged it (its workflow task's time: a follower that read "
        "the event before that task was retried may have seen a slightly earlier one)"
    )
    stage: TaskStage | None = Field(None, description="stage events")
    routing: RoutingReport | None = Field(
        None,
        description="the answering stage's event: the routing decision that chose the experts, "
        "each candidate with its score terms",
    )
    contribution: Contribution | None = Field(None, description="contribution events")
    result: TaskResult | None = Field(None, description="the result event")
    error: TaskError | None = Field(None, description="the error event")


class TaskEventsInput(Contract):
    after: int = Field(0, ge=0, description="The last event id already seen (0: from the start)")


class TaskEvents(Contract):
    events: list[TaskEvent] = Field(default_factory=list)
    ended: bool = Field(False, description="The log holds its last event (result or error)")


class ProvenanceNode(Contract):
    node_id: str
    quality: float = Field(ge=0.0, le=1.0)


class Provenance(Contract):
    """Where a knowledge item's answer came from: one entry per task that produced or confirmed
    it."""

    task_id: str
    confidence: float = Field(ge=0.0, le=1.0)
    nodes: list[ProvenanceNode] = Field(default_factory=list)
    at: datetime | None = None


class KnowledgeReuse(Contract):
    """A task answered from stored knowledge instead of asking experts."""

    knowledge_id: str
    question: str
    answer: str
    domain: str | None = None
    similarity: float
    confidence: float = Field(ge=0.0, le=1.0)
    provenance: list[Provenance] = Field(default_factory=list)


class TaskResult(Contract):
    task_id: str
    prompt: str = ""
    answer: str
    confidence: float = Field(ge=0.0, le=1.0)
    domain: str | None = None
    contributions: list[Contribution]
    knowledge_used: list[str] = Field(default_factory=list)
    completed_at: datetime
    strategy: AggregationStrategy | None = None
    reused: KnowledgeReuse | None = None
    routing: RoutingReport | None = None  # why these experts (None: before routing reports)


# --- core activities -----------------------------------------------------------------------------


class PlanInput(Contract):
    task_id: str
    prompt: str
    domain: str | None = None
    max_context: int = 3
    fresh: bool = False


class PlanResult(Contract):
    domain: str | None
    context: list[KnowledgeSnippet] = Field(default_factory=list)
    reuse: KnowledgeReuse | None = None
    # A related item is known but not close enough to reuse: ask this many experts first.
    suggested_k: int | None = None


class RouteInput(Contract):
    task_id: str
    prompt: str
    k: int = Field(ge=1)
    standbys: int = Field(0, ge=0)
    domain: str | None = None
    regions: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)  # node ids already tried by this task


class RouteCandidate(Contract):
    node_id: str
    region: str
    provider: str
    model: str
    task_queue: str
    score: float
    fit: float
    domains: list[str] = Field(default_factory=list)
    probe: bool = False  # a half-open breaker let this node through as its one probe
    reputation: float | None = None
    health: float | None = None
    explore: bool = False  # given a slot by exploration (a new node earning a reputation)


class RouteOutcome(StrEnum):
    CHOSEN = "chosen"
    STANDBY = "standby"
    SKIPPED = "skipped"


class RouteTerms(Contract):
    """One top candidate of a routing decision and every term of its score
    (``score = fit ** fit_power * max(reputation, floor) * health * diversity / price``; fit and
    reputation blend what the node declares with what it has shown: ``xpando/routing/index.py``)."""

    node_id: str
    region: str
    provider: str
    domain: str | None = None  # the node's domain that fits the prompt best
    # fit = declared_fit + w * (learned_fit - declared_fit), w = evidence / (evidence + kappa)
    fit: float
    declared_fit: float = 0.0  # cosine of prompt and domain texts in [0, 1]; 1: a named domain
    learned_fit: float | None = None  # mean quality of its scored answers near the prompt
    evidence: float = 0.0  # similarity-weighted count of those answers (0: none, prior only)
    reputation: float  # in this topic: max(global, prior) blended with learned_fit like fit
    contributions: int = 0  # scored contributions behind the reputation
    health: float  # 1 healthy; halved per consecutive failure, half-open probe, load
    price: float  # the divisor: (1 + USD per 1M tokens / price_ref) ** price_weight
    diversity: float = 1.0  # factor for providers/regions already chosen
    score: float
    outcome: RouteOutcome
    reason: str = ""  # why skipped (or "exploration")


class RoutingReport(Contract):
    formula: str
    considered: int = 0  # nodes that could serve the task (active, in its regions, not tried)
    candidates: list[RouteTerms] = Field(default_factory=list)


class RouteResult(Contract):
    chosen: list[RouteCandidate]
    standbys: list[RouteCandidate] = Field(default_factory=list)
    considered: int = 0
    domain: str | None = None
    report: RoutingReport | None = None


class AnswerInput(Contract):
    task_id: str
    prompt: str
    node_id: str
    context: list[KnowledgeSnippet] = Field(default_factory=list)


class AggregateInput(Contract):
    task_id: str
    prompt: str
    contributions: list[Contribution]
    strategy: AggregationStrategy = AggregationStrategy.CONSENSUS


class AggregateResult(Contract):
    answer: ScrubbedText
    confidence: float = Field(ge=0.0, le=1.0)
    contributions: list[Contribution]
    strategy: AggregationStrategy = AggregationStrategy.CONSENSUS
    note: ScrubbedText | None = None  # e.g. why synthesis fell back to consensus


class RecordInput(Contract):
    task_id: str
    prompt: str
    domain: str | None
    status: TaskStage
    answer: ScrubbedText = ""
    confidence: float = 0.0
    error: ScrubbedText | None = None
    contributions: list[Contribution] = Field(default_factory=list)
    reused_knowledge_id: str | None = None
    owner: str | None = None  # TaskInput.owner
    key_id: str | None = None  # TaskInput.key_id
    submitted_at: datetime | None = None  # when Temporal started the workflow (its StartTime)
    outcomes: list[ExpertOutcomeInput] = Field(
        default_factory=list,
        description="Asks that ended well, counted for the circuit breakers with the record",
    )
    publish: KnowledgeItemInput | None = Field(
        default=None, description="What the task learned, for the domain's KnowledgeWorkflow"
    )
    started_at: datetime | None = Field(
        default=None, description="When the task's workflow started (its latency metric)"
    )


class PlanRouteInput(Contract):
    """``plan`` then, unless stored knowledge answers the task, ``route`` (one local activity)."""

    plan: PlanInput
    route: RouteInput  # k is lowered to the plan's suggested_k when it suggests fewer experts


class PlanRouteResult(Contract):
    plan: PlanResult
    route: RouteResult | None = None  # None: answered from knowledge


class FinishInput(Contract):
    """``aggregate`` then ``record`` (one local activity): the record's answer, confidence,
    contributions and knowledge item come from the aggregation."""

    aggregate: AggregateInput
    record: RecordInput
    # Candidates' domains by node: with name_domain, the task's domain is the winner's first.
    domains: dict[str, list[str]] = Field(default_factory=dict)
    name_domain: bool = False
    publish: bool = Field(True, description="Hand a confident answer to the KnowledgeWorkflow")


class FinishResult(Contract):
    aggregated: AggregateResult
    domain: str | None = None


class RecordResult(Contract):
    task_id: str
    contributions_written: int
    knowledge_id: str | None = None


# --- node registration ---------------------------------------------------------------------------


class NodeAction(StrEnum):
    REGISTER = "register"  # register, or update the profile of, a node
    DEREGISTER = "deregister"  # leave the network: no longer routed to


class SignedNodeRequest(Contract):
    """A node's registration, profile update or deregistration, signed by its identity key.

    The body of ``POST /v1/nodes`` and ``DELETE /v1/nodes/{id}``, and what ``xpando worker node``
    sends through NodeRegistrationWorkflow. What is signed: ``xpando/identity.py``."""

    action: NodeAction
    node_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    public_key: str = Field(
        pattern=r"^[1-9A-HJ-NP-Za-km-z]{32,44}$",
        description="Base58 ed25519 (Solana) public key: the node's identity and wallet",
    )
    nonce: str = Field(
        min_length=16, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="Never reused"
    )
    timestamp: int = Field(ge=0, lt=2**40, description="Unix seconds when signed")
    profile: NodeProfile | None = Field(None, description="register only")
    signature: str = Field(
        pattern=r"^[1-9A-HJ-NP-Za-km-z]{64,90}$", description="Base58 ed25519 signature"
    )


class RegisterNodeInput(Contract):
    profile: NodeProfile | None = None  # histories before signed registration; now refused
    signed: SignedNodeRequest | None = None
    received_at: datetime | None = None  # set by the workflow: when Temporal accepted it


class RegisterNodeResult(Contract):
    node_id: str
    created: bool
    registered_at: datetime
    action: NodeAction = NodeAction.REGISTER
    public_key: str | None = None


# --- knowledge (Mother Core) ---------------------------------------------------------------------


class KnowledgeItemInput(Contract):
    """A completed task's answer, sent to its domain's KnowledgeWorkflow."""

    task_id: str
    question: str
    answer: str
    domain: str
    confidence: float = Field(ge=0.0, le=1.0)
    nodes: list[ProvenanceNode] = Field(default_factory=list)
    completed_at: datetime


class KnowledgeStats(Contract):
    domain: str
    received: int = 0
    items: int = 0  # active items in the domain after the last consolidation
    added: int = 0
    merges: int = 0
    stale: int = 0
    skipped: int = 0  # items the database refused (see ConsolidateResult.skipped)
    consolidations: int = 0
    runs: int = 1  # workflow runs so far (continue-as-new starts a new run)
    pending: int = 0  # received, not yet consolidated
    last_consolidation: datetime | None = None


class KnowledgeWorkflowInput(Contract):
    domain: str
    stats: KnowledgeStats | None = None
    pending: list[KnowledgeItemInput] = Field(default_factory=list)
    batch_size: int = Field(50, ge=1)
    max_consolidations_per_run: int = Field(500, ge=1)


class ConsolidateInput(Contract):
    domain: str
    items: list[KnowledgeItemInput] = Field(default_factory=list)
    sweep: bool = False  # also mark items whose confidence decayed below the floor


class ConsolidateResult(Contract):
    added: int = 0
    merged: int = 0
    stale: int = 0
    skipped: int = 0  # refused by the database (e.g. text it cannot hold): not stored, not retried
    items: int = 0


class PublishKnowledgeResult(Contract):
    workflow_id: str


# --- circuit breakers ----------------------------------------------------------------------------


class BreakerState(StrEnum):
    CLOSED = "closed"  # routed to normally
    OPEN = "open"  # skipped by routing until the cool-down ends
    HALF_OPEN = "half_open"  # cool-down over: the next task may send one probe


class ExpertOutcomeInput(Contract):
    """One ask of one expert, reported by TaskWorkflow as soon as it ends."""

    event_id: str = Field(description="Unique per ask (workflow id, node, sequence): idempotency")
    task_id: str
    node_id: str
    provider: str
    region: str
    ok: bool
    error_type: str | None = None
    error: ScrubbedText | None = None


class BreakerView(Contract):
    key: str  # node:<node_id> or provider:<provider>@<region>
    state: BreakerState
    consecutive_failures: int = 0
    open_until: datetime | None = None
    probe_in_flight: bool = False
    last_error: str | None = None
    updated_at: datetime | None = None


class ExpertOutcomeResult(Contract):
    recorded: bool  # False: a retried report that had already been counted
    breakers: list[BreakerView] = Field(default_factory=list)


RecordInput.model_rebuild()  # refers to contracts defined after it
FinishInput.model_rebuild()
TaskEvent.model_rebuild()
