"""Wafer's Python client: ``WaferClient`` (blocking) and ``AsyncWaferClient`` (asyncio).

    from wafer_client import WaferClient

    with WaferClient("127.0.0.1:50051") as client:
        vectors = client.embed(["a text", "another"]).vectors      # float32 [2, d]
        for chunk in client.generate("Once upon a time", max_tokens=32):
            print(chunk.text, end="", flush=True)

Failed calls raise :class:`WaferError` subclasses (see :mod:`wafer_client.errors`).
"""

from wafer_client._async import AsyncWaferClient
from wafer_client._base import DEFAULT_ADDRESS, USE_CLIENT_DEFAULT, ClientOptions, RetryPolicy
from wafer_client._sync import WaferClient
from wafer_client.errors import (
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    WaferError,
)
from wafer_client.types import (
    ChatMessage,
    CollectionInfo,
    Completion,
    Document,
    EmbedResult,
    GenerationChunk,
    Job,
    JsonlSource,
    ModelInfo,
    PullProgress,
    RerankHit,
    RerankResult,
    SearchHit,
    SearchResult,
    SqliteSource,
    StoredDocument,
    Timings,
    UpsertResult,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ADDRESS",
    "USE_CLIENT_DEFAULT",
    "AsyncWaferClient",
    "CancelledError",
    "ChatMessage",
    "ClientOptions",
    "CollectionInfo",
    "Completion",
    "DeadlineExceededError",
    "Document",
    "EmbedResult",
    "FailedPreconditionError",
    "GenerationChunk",
    "InternalError",
    "InvalidArgumentError",
    "Job",
    "JsonlSource",
    "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "PullProgress",
    "RerankHit",
    "RerankResult",
    "ResourceExhaustedError",
    "RetryPolicy",
    "SearchHit",
    "SearchResult",
    "SqliteSource",
    "StoredDocument",
    "Timings",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UpsertResult",
    "Usage",
    "WaferClient",
    "WaferError",
    "__version__",
]
