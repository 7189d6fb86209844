"""Baseline: xpando's tables as the first release has them.

Revision ID: 0001
Revises:
Create Date: 2026-12-01

The tables are spelled out here, frozen, rather than read from the models: the models move on
with each later migration, the baseline does not. ``xpando.db.migrate`` also reads ``BASELINE``
to adopt a database that earlier code made with ``create_all`` (no ``alembic_version``).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BASELINE = sa.MetaData()

sa.Table(
    "accruals",
    BASELINE,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("task_id", sa.String(length=128), nullable=False),
    sa.Column("node_id", sa.String(length=64), nullable=False),
    sa.Column("quality_ppm", sa.Integer(), nullable=False),
    sa.Column("earned_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("settled_epoch", sa.Integer(), nullable=True),
    sa.Column("payout_id", sa.String(length=160), nullable=True),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("task_id", "node_id", name="uq_accrual_task_node"),
    sa.Index("ix_accruals_earned_at", "earned_at"),
    sa.Index("ix_accruals_node_id", "node_id"),
    sa.Index("ix_accruals_payout_id", "payout_id"),
    sa.Index("ix_accruals_settled_epoch", "settled_epoch"),
    sa.Index("ix_accruals_task_id", "task_id"),
)

sa.Table(
    "api_keys",
    BASELINE,
    sa.Column("key_id", sa.String(length=16), nullable=False),
    sa.Column("name", sa.String(length=64), nullable=False),
    sa.Column("scopes", sa.JSON(), nullable=False),
    sa.Column("digest", sa.String(length=64), nullable=False),
    sa.Column("created_by", sa.String(length=64), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint("key_id"),
    sa.Index("ix_api_keys_name", "name"),
)

sa.Table(
    "breakers",
    BASELINE,
    sa.Column("key", sa.String(length=200), nullable=False),
    sa.Column("scope", sa.String(length=16), nullable=False),
    sa.Column("state", sa.String(length=16), nullable=False),
    sa.Column("consecutive_failures", sa.Integer(), nullable=False),
    sa.Column("opened_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("open_until", sa.DateTime(timezone=True), nullable=True),
    sa.Column("probe_until", sa.DateTime(timezone=True), nullable=True),
    sa.Column("probe_task", sa.String(length=128), nullable=True),
    sa.Column("last_error", sa.Text(), nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("key"),
    sa.Index("ix_breakers_state", "state"),
)

sa.Table(
    "domain_vectors",
    BASELINE,
    sa.Column("key", sa.String(length=64), nullable=False),
    sa.Column("embedder", sa.String(length=64), nullable=False),
    sa.Column("vector", sa.LargeBinary(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("key"),
)

sa.Table(
    "expert_outcomes",
    BASELINE,
    sa.Column("event_id", sa.String(length=300), nullable=False),
    sa.Column("task_id", sa.String(length=128), nullable=False),
    sa.Column("node_id", sa.String(length=64), nullable=False),
    sa.Column("provider", sa.String(length=32), nullable=False),
    sa.Column("region", sa.String(length=32), nullable=False),
    sa.Column("ok", sa.Boolean(), nullable=False),
    sa.Column("error_type", sa.String(length=64), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("event_id"),
    sa.Index("ix_expert_outcomes_created_at", "created_at"),
    sa.Index("ix_expert_outcomes_node_id", "node_id"),
    sa.Index("ix_expert_outcomes_task_id", "task_id"),
)

sa.Table(
    "knowledge",
    BASELINE,
    sa.Column("knowledge_id", sa.String(length=160), nullable=False),
    sa.Column("task_id", sa.String(length=128), nullable=False),
    sa.Column("question", sa.Text(), nullable=False),
    sa.Column("answer", sa.Text(), nullable=False),
    sa.Column("domain", sa.String(length=64), nullable=True),
    sa.Column("confidence", sa.Float(), nullable=False),
    sa.Column("nodes", sa.JSON(), nullable=True),
    sa.Column("provenance", sa.JSON(), nullable=True),
    sa.Column("support", sa.Integer(), nullable=False),
    sa.Column("status", sa.String(length=16), nullable=False),
    sa.Column("merged_into", sa.String(length=160), nullable=True),
    sa.Column("embedding", sa.LargeBinary(), nullable=True),
    sa.Column("embedder", sa.String(length=64), nullable=True),
    sa.Column("uses", sa.Integer(), nullable=False),
    sa.Column("confirmed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("knowledge_id"),
    sa.UniqueConstraint("task_id"),
    sa.Index("ix_knowledge_created_at", "created_at"),
    sa.Index("ix_knowledge_domain", "domain"),
    sa.Index("ix_knowledge_status", "status"),
    sa.Index("ix_knowledge_updated_at", "updated_at"),
)

sa.Table(
    "node_nonces",
    BASELINE,
    sa.Column("public_key", sa.String(length=64), nullable=False),
    sa.Column("nonce", sa.String(length=64), nullable=False),
    sa.Column("digest", sa.String(length=64), nullable=False),
    sa.Column("node_id", sa.String(length=64), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("public_key", "nonce"),
    sa.Index("ix_node_nonces_expires_at", "expires_at"),
)

sa.Table(
    "nodes",
    BASELINE,
    sa.Column("node_id", sa.String(length=64), nullable=False),
    sa.Column("region", sa.String(length=32), nullable=False),
    sa.Column("provider", sa.String(length=32), nullable=False),
    sa.Column("model", sa.String(length=128), nullable=False),
    sa.Column("task_queue", sa.String(length=80), nullable=False),
    sa.Column("capacity", sa.Integer(), nullable=False),
    sa.Column("domains", sa.JSON(), nullable=True),
    sa.Column("wallet", sa.String(length=64), nullable=True),
    sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("public_key", sa.String(length=64), nullable=True),
    sa.Column("status", sa.String(length=16), nullable=True),
    sa.Column("deregistered_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("price_input_per_mtok", sa.Float(), nullable=True),
    sa.Column("price_output_per_mtok", sa.Float(), nullable=True),
    sa.Column("reputation", sa.Float(), nullable=True),
    sa.Column("reputation_n", sa.Integer(), nullable=True),
    sa.Column("changed_at", sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint("node_id"),
    sa.Index("ix_nodes_changed_at", "changed_at"),
    sa.Index("ix_nodes_region", "region"),
)

sa.Table(
    "payout_epochs",
    BASELINE,
    sa.Column("epoch", sa.Integer(), autoincrement=False, nullable=False),
    sa.Column("workflow_id", sa.String(length=160), nullable=False),
    sa.Column("status", sa.String(length=24), nullable=False),
    sa.Column("starts_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("ends_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("emission", sa.BigInteger(), nullable=False),
    sa.Column("points", sa.BigInteger(), nullable=False),
    sa.Column("accruals", sa.Integer(), nullable=False),
    sa.Column("payouts", sa.Integer(), nullable=False),
    sa.Column("total", sa.BigInteger(), nullable=False),
    sa.Column("payable", sa.BigInteger(), nullable=False),
    sa.Column("reserved", sa.BigInteger(), nullable=True),
    sa.Column("released", sa.BigInteger(), nullable=False),
    sa.Column("paid", sa.BigInteger(), nullable=False),
    sa.Column("carried_over", sa.BigInteger(), nullable=False),
    sa.Column("approval_required", sa.Boolean(), nullable=False),
    sa.Column("approver", sa.String(length=64), nullable=True),
    sa.Column("approved_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("reconciled", sa.Boolean(), nullable=True),
    sa.Column("reconcile_report", sa.JSON(), nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("closed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("epoch"),
    sa.Index("ix_payout_epochs_status", "status"),
)

sa.Table(
    "payouts",
    BASELINE,
    sa.Column("payout_id", sa.String(length=160), nullable=False),
    sa.Column("epoch", sa.Integer(), nullable=False),
    sa.Column("node_id", sa.String(length=64), nullable=False),
    sa.Column("wallet", sa.String(length=64), nullable=True),
    sa.Column("points", sa.BigInteger(), nullable=False),
    sa.Column("earned", sa.BigInteger(), nullable=False),
    sa.Column("carried_in", sa.BigInteger(), nullable=False),
    sa.Column("amount", sa.BigInteger(), nullable=False),
    sa.Column("status", sa.String(length=16), nullable=False),
    sa.Column("reason", sa.String(length=64), nullable=True),
    sa.Column("carried_into", sa.String(length=160), nullable=True),
    sa.Column("signature", sa.String(length=100), nullable=True),
    sa.Column("tx", sa.Text(), nullable=True),
    sa.Column("blockhash", sa.String(length=64), nullable=True),
    sa.Column("last_valid_height", sa.BigInteger(), nullable=True),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("signatures", sa.JSON(), nullable=True),
    sa.Column("slot", sa.BigInteger(), nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("signed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("confirmed_at", sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint("payout_id"),
    sa.UniqueConstraint("epoch", "node_id", name="uq_payout_epoch_node"),
    sa.Index("ix_payouts_carried_into", "carried_into"),
    sa.Index("ix_payouts_epoch", "epoch"),
    sa.Index("ix_payouts_node_id", "node_id"),
    sa.Index("ix_payouts_signature", "signature"),
    sa.Index("ix_payouts_status", "status"),
)

sa.Table(
    "reputation_events",
    BASELINE,
    sa.Column("task_id", sa.String(length=128), nullable=False),
    sa.Column("node_id", sa.String(length=64), nullable=False),
    sa.Column("quality", sa.Float(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("task_id", "node_id"),
)

sa.Table(
    "tasks",
    BASELINE,
    sa.Column("task_id", sa.String(length=128), nullable=False),
    sa.Column("prompt", sa.Text(), nullable=False),
    sa.Column("domain", sa.String(length=64), nullable=True),
    sa.Column("status", sa.String(length=16), nullable=False),
    sa.Column("answer", sa.Text(), nullable=False),
    sa.Column("confidence", sa.Float(), nullable=False),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint("task_id"),
    sa.Index("ix_tasks_created_at", "created_at"),
    sa.Index("ix_tasks_domain", "domain"),
    sa.Index("ix_tasks_status", "status"),
)

sa.Table(
    "contributions",
    BASELINE,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("task_id", sa.String(length=128), nullable=False),
    sa.Column("node_id", sa.String(length=64), nullable=False),
    sa.Column("region", sa.String(length=32), nullable=False),
    sa.Column("provider", sa.String(length=32), nullable=False),
    sa.Column("model", sa.String(length=128), nullable=False),
    sa.Column("status", sa.String(length=16), nullable=False),
    sa.Column("answer", sa.Text(), nullable=False),
    sa.Column("citations", sa.JSON(), nullable=True),
    sa.Column("relevance", sa.Float(), nullable=False),
    sa.Column("quality", sa.Float(), nullable=False),
    sa.Column("quality_reason", sa.Text(), nullable=False),
    sa.Column("latency_ms", sa.Integer(), nullable=False),
    sa.Column("input_tokens", sa.Integer(), nullable=False),
    sa.Column("output_tokens", sa.Integer(), nullable=False),
    sa.Column("finish_reason", sa.String(length=32), nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("cost_usd", sa.Float(), nullable=True),
    sa.Column("request_id", sa.String(length=128), nullable=True),
    sa.Column("error_type", sa.String(length=64), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(
        ["task_id"],
        ["tasks.task_id"],
    ),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("task_id", "node_id", name="uq_contribution_task_node"),
    sa.Index("ix_contributions_node_id", "node_id"),
    sa.Index("ix_contributions_task_id", "task_id"),
)


def upgrade() -> None:
    BASELINE.create_all(op.get_bind(), checkfirst=False)


def downgrade() -> None:
    BASELINE.drop_all(op.get_bind(), checkfirst=False)
