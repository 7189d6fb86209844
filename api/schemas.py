"""Request and response bodies of the HTTP API (with limits)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, computed_field

from xpando.contracts import (
    AggregationStrategy,
    BreakerView,
    Contribution,
    KnowledgeReuse,
    NodeDomain,
    Provenance,
    RoutingReport,
)

PROMPT_MAX_CHARS = 8000
K_MIN, K_MAX = 1, 9
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"

Region = Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[a-z0-9-]+$")]


class TaskCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    prompt: str = Field(
        min_length=1,
        max_length=PROMPT_MAX_CHARS,
        description="The question or task for the experts",
    )
    k: int | None = Field(
        None, ge=K_MIN, le=K_MAX, description="How many experts to ask (default: XPANDO_DEFAULT_K)"
    )
    domain: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[a-z0-9-]+$")
    regions: list[Region] = Field(
        default_factory=list, max_length=8, description="Only route to nodes in these regions"
    )
    strategy: AggregationStrategy | None = Field(
        None, description="synthesize, consensus or best (default: XPANDO_AGGREGATION_STRATEGY)"
    )
    fresh: bool = Field(False, description="Ask the experts even if stored knowledge matches")
    quorum: int | None = Field(
        None,
        ge=K_MIN,
        le=K_MAX,
        description="Go on once this many experts answered; the rest are cancelled "
        "(default XPANDO_TASK_QUORUM; at most k)",
    )
    deadline_s: float | None = Field(
        None,
        gt=0,
        le=600,
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
    status: str = Field(description="running, completed, failed, canceled, terminated, timed_out")
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


class NodeRegistered(BaseModel):
    node_id: str
    status: str = Field(description="active (registered or updated) or deregistered")
    created: bool
    public_key: str
    registered_at: datetime


class NodeList(BaseModel):
    nodes: list[NodeView]
    count: int


class Health(BaseModel):
    status: str
    temporal: str
    database: str


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
