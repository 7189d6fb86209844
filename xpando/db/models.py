"""SQLModel tables. Every write is keyed by a business key so a retried activity writes once."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Text, UniqueConstraint
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


class Task(SQLModel, table=True):
    __tablename__ = "tasks"

    task_id: str = Field(primary_key=True, max_length=128)
    prompt: str = Field(sa_column=Column(Text, nullable=False))
    domain: str | None = Field(default=None, index=True, max_length=64)
    status: str = Field(index=True, max_length=16)
    answer: str = Field(default="", sa_column=Column(Text, nullable=False))
    confidence: float = 0.0
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = _ts(index=True)
    completed_at: datetime | None = _ts(nullable=True)


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
    latency_ms: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = Field(default=None, max_length=32)
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    attempts: int = 1
    created_at: datetime = _ts()


class Knowledge(SQLModel, table=True):
    __tablename__ = "knowledge"

    knowledge_id: str = Field(primary_key=True, max_length=160)
    task_id: str = Field(unique=True, max_length=128)
    question: str = Field(sa_column=Column(Text, nullable=False))
    answer: str = Field(sa_column=Column(Text, nullable=False))
    domain: str | None = Field(default=None, index=True, max_length=64)
    confidence: float = 0.0
    nodes: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    created_at: datetime = _ts(index=True)
    updated_at: datetime = _ts()
