"""Server settings: one typed object, read once in `main` from defaults, environment (WAFER_*)
and command-line flags (highest first: flags, environment, defaults), then passed down."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def check_token(token: str, source: str) -> str:
    """The bearer token, stripped; refuses one a client could not send or that is surely a mistake.
    Messages name the source, never the token."""
    token = token.strip()
    if not token:
        raise ValueError(f"{source} is empty")
    # gRPC metadata values are printable ASCII; whitespace inside means two tokens or a pasted
    # line break, and a client could never match it.
    if not all("!" <= ch <= "~" for ch in token):
        raise ValueError(f"{source} must be printable ASCII without spaces")
    return token


def read_token_file(path: Path) -> str:
    """The token in `path` (surrounding whitespace, such as the final newline, stripped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the auth token file {path}: {exc}") from exc
    return check_token(text, f"the auth token file {path}")


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "wafer"


class Settings(BaseSettings):
    # hide_input_in_errors: a validation error would otherwise print the raw input, and a
    # model-level error prints every field's input, the auth token (e.g. WAFER_AUTH_TOKEN) included.
    model_config = SettingsConfigDict(env_prefix="WAFER_", extra="forbid", hide_input_in_errors=True)

    address: str = Field(
        default="127.0.0.1:50051",
        description="Where to listen: host:port (port 0 picks a free one) or unix:///absolute/path.",
    )
    http_address: str | None = Field(
        default=None,
        description="host:port of the OpenAI-compatible HTTP endpoint (/v1/embeddings, /v1/chat/completions, ...); "
        "off when unset. Port 0 picks a free one.",
    )
    models_file: Path = Field(default=Path("models.yaml"), description="The model catalog.")
    data_dir: Path = Field(
        default_factory=_default_data_dir, description="The vector store and the model cache live here."
    )
    model_cache_dir: Path | None = Field(
        default=None, description="Where hf:// sources are downloaded; default: <data_dir>/models."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1, gt=0, description="CPU threads per model.")
    max_inputs_per_request: int = Field(default=1024, gt=0, le=100_000)
    max_input_bytes: int = Field(
        default=4 * 1024 * 1024, gt=0, description="Largest single input text or prompt, in bytes."
    )
    max_message_bytes: int = Field(
        default=64 * 1024 * 1024, gt=0, description="Largest gRPC message, and largest HTTP request body."
    )
    max_payload_bytes: int = Field(
        default=64 * 1024,
        gt=0,
        description="Largest payload of one stored document, as JSON, in bytes (searches return payloads).",
    )
    default_max_new_tokens: int = Field(default=256, gt=0, description="Generate's max_tokens when unset.")
    max_new_tokens_limit: int = Field(default=4096, gt=0, description="Largest max_tokens a call may ask.")
    unload_drain_timeout_seconds: float = Field(default=30.0, gt=0)
    memory_budget_mb: int | None = Field(
        default=None,
        gt=0,
        description="Memory loaded models may take together (RSS measured at load), in MiB. Over it, "
        "idle unpinned models are unloaded least recently used first, or the load is refused; default: off.",
    )
    memory_wait_seconds: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="How long a load waits for models busy with requests to become idle (and evictable) "
        "before it is refused for lack of memory.",
    )
    malloc_arena_max: int = Field(
        default=2,
        ge=0,
        le=1024,
        description="Cap on glibc malloc arenas, so memory freed by unloads is reused instead of "
        "scattered over per-thread heaps; 0 leaves glibc's default (8 per core).",
    )
    keep_alive_check_seconds: float = Field(
        default=1.0, gt=0, le=3600, description="How often models' keep_alive_seconds are checked."
    )
    shutdown_grace_seconds: float = Field(
        default=10.0, ge=0, description="On SIGTERM, how long running calls may take to finish."
    )
    default_deadline_seconds: float = Field(
        default=300.0, gt=0, description="Deadline of a call whose client set none."
    )

    # The vector store and the embedding cache.
    store: Literal["edge", "local", "url"] = Field(
        default="edge",
        description=(
            "Vector store engine: edge (qdrant-edge, embedded, in <data_dir>/edge; the fastest), local "
            "(qdrant-client's embedded local mode, in <data_dir>/qdrant) or url (a Qdrant server at qdrant_url)."
        ),
    )
    edge_max_open_collections: int = Field(
        default=32,
        ge=1,
        le=100_000,
        description=(
            "Edge collections kept open at once (each runs a qdrant-edge search thread and, once reopened, "
            "holds about 32 MiB); the least recently used is closed and opened again on its next call."
        ),
    )
    qdrant_url: str | None = Field(default=None, description="The Qdrant server when store=url.")
    qdrant_api_key: SecretStr | None = Field(default=None, description="API key of the Qdrant server, if it wants one.")
    embedding_cache: bool = Field(
        default=True, description="Keep computed embeddings in <data_dir>/embedding-cache.sqlite and reuse them."
    )
    embedding_cache_max_entries: int = Field(
        default=500_000,
        gt=0,
        description="Embeddings the cache keeps; the least recently used go first (about 1.6 kB each at 384-d).",
    )

    # Observability.
    metrics_address: str | None = Field(
        default=None, description="host:port of the Prometheus endpoint (/metrics); off when unset."
    )

    # Transport security and access.
    tls_cert_file: Path | None = Field(default=None, description="Server certificate chain (PEM); enables TLS.")
    tls_key_file: Path | None = Field(default=None, description="Private key of tls_cert_file (PEM).")
    tls_client_ca_file: Path | None = Field(
        default=None, description="CA bundle (PEM) that client certificates must chain to; enables mutual TLS."
    )
    auth_token: SecretStr | None = Field(
        default=None, description="Bearer token required on admin RPCs (prefer auth_token_file)."
    )
    auth_token_file: Path | None = Field(default=None, description="File holding the bearer token.")
    auth_all_rpcs: bool = Field(default=False, description="Require the token on every RPC, not only admin ones.")
    allow_remote_admin: bool = Field(
        default=False,
        description="Allow binding a non-loopback address while admin RPCs are open (no token).",
    )

    # Background jobs (the Jobs service).
    jobs_allowed_roots: list[Path] = Field(
        default_factory=list,
        description="Folders whose files jobs may read (JSONL, SQLite), besides the data folder; "
        "a JSON list in the environment, e.g. WAFER_JOBS_ALLOWED_ROOTS='[\"/srv/corpora\"]'.",
    )
    jobs_max_running: int = Field(
        default=1, gt=0, le=64, description="Jobs that run at once; the others wait in the queue."
    )
    jobs_batch_size: int = Field(
        default=64, gt=0, le=100_000, description="Documents per micro-batch of a job whose request sets none."
    )
    jobs_default_idle_seconds: float = Field(
        default=30.0, ge=0, description="Seconds without interactive traffic that count as idle (when_idle jobs)."
    )
    jobs_policy_poll_seconds: float = Field(
        default=1.0, gt=0, le=3600, description="How often a waiting job checks its run policy again."
    )
    jobs_sqlite_query_seconds: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="Longest one step of a job's SQLite query may run (opening it, counting it, fetching "
        "one batch); past it the job fails, and SubmitJob's check of the query is refused.",
    )
    jobs_sqlite_max_rows: int = Field(
        default=100_000_000, gt=0, description="Most rows a job's SQLite query may return; past it the job fails."
    )
    jobs_max_line_bytes: int = Field(
        default=16 * 1024 * 1024, gt=0, description="Longest line of a job's JSONL file, in bytes."
    )
    power_supply_root: Path = Field(
        default=Path("/sys/class/power_supply"),
        description="Where the power probe of when_charging jobs reads supplies (Linux sysfs layout).",
    )

    @field_validator(
        "data_dir",
        "models_file",
        "model_cache_dir",
        "tls_cert_file",
        "tls_key_file",
        "tls_client_ca_file",
        "auth_token_file",
        "power_supply_root",
    )
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("auth_token")
    @classmethod
    def _token_usable(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        return SecretStr(check_token(value.get_secret_value(), "auth_token"))

    @field_validator("auth_token_file")
    @classmethod
    def _token_file_usable(cls, value: Path | None) -> Path | None:
        # Read now so a wrong path fails before anything starts; the server reads it again at start.
        if value is not None:
            read_token_file(value.expanduser())
        return value

    @model_validator(mode="after")
    def _security_consistent(self) -> Self:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both to enable TLS, or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs TLS: set tls_cert_file and tls_key_file too")
        if self.store == "url" and not self.qdrant_url:
            raise ValueError("store=url needs qdrant_url (WAFER_QDRANT_URL), e.g. http://127.0.0.1:6333")
        if self.auth_all_rpcs and self.auth_token is None and self.auth_token_file is None:
            raise ValueError("auth_all_rpcs needs a token: set auth_token_file (or auth_token / WAFER_AUTH_TOKEN)")
        return self

    @property
    def hub_cache_dir(self) -> Path:
        return self.model_cache_dir or self.data_dir / "models"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / ("edge" if self.store == "edge" else "qdrant")

    @property
    def embedding_cache_file(self) -> Path:
        return self.data_dir / "embedding-cache.sqlite"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"
