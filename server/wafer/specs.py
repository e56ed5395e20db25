"""The model catalog: what `models.yaml` declares, validated once at start.

A spec says where a model's files come from and how to use it (pooling, prompts, windows);
it says nothing about whether the model is loaded: that is the registry's business.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from wafer.errors import InvalidArgumentError


class Task(StrEnum):
    EMBED = "embed"
    RERANK = "rerank"
    GENERATE = "generate"


class Pooling(StrEnum):
    """How token states become one vector. Must match the model's own training config."""

    MEAN = "mean"
    CLS = "cls"
    LAST = "last"
    # The graph already outputs one vector per text.
    NONE = "none"


class LoadPolicy(StrEnum):
    STARTUP = "startup"
    ON_DEMAND = "on_demand"


class RerankMethod(StrEnum):
    # Bi-encoder: cosine between the query's and each document's embedding.
    COSINE = "cosine"
    # LLM judge: probability that the answer to "does the document answer the query" is "yes".
    RELEVANCE = "relevance"


DEFAULT_RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
# Roles of a spec's extra files: names a backend declares, e.g. `projection_head`.
_FILE_ROLE = re.compile(r"[a-z][a-z0-9_]{0,63}")


class BatchingSpec(BaseModel):
    """How the scheduler merges and cuts this model's work (see wafer.scheduler.model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(default=32, gt=0, description="Most inputs merged into one backend call.")
    max_batch_tokens: int = Field(
        default=4096, gt=0, description="Most (estimated) tokens merged into one backend call."
    )
    batch_unit_ms: float = Field(
        default=10.0,
        gt=0,
        le=10_000,
        description="Target run time of one batch-lane micro-batch: about the longest an interactive "
        "request waits behind batch work.",
    )
    queue_capacity: int = Field(
        default=4096, gt=0, description="Inputs that may wait in each lane before RESOURCE_EXHAUSTED."
    )
    quiet_seconds: float = Field(
        default=2.0,
        ge=0,
        description="After this long without interactive work, batch work on an interruptible backend "
        "runs in full batches (interrupted if interactive work arrives).",
    )


class GenerationSpec(BaseModel):
    """How a GGUF model serves several generation streams at once (see wafer.backends.gguf.streams)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    parallel: int = Field(
        default=4,
        gt=0,
        le=64,
        description="Streams decoded together, each a sequence of one llama.cpp context; more wait in the queue.",
    )
    kv_cells: int | None = Field(
        default=None,
        gt=0,
        description="KV cache cells (tokens) of each stream: its prompt plus its reply. The cache holds "
        "parallel + 1 times this (one more sequence for reranking). Default and most: context_length.",
    )
    prompt_cache: bool = Field(
        default=True,
        description="Keep each finished stream's prompt in its sequence's cells, so a later prompt that "
        "starts the same way (a system prompt, a chat history) decodes only the rest.",
    )
    flash_attention: bool = Field(
        default=False,
        description="Decode with llama.cpp's flash attention kernel: faster, but a stream's tokens then "
        "depend on the streams decoded beside it and on the thread count (see docs/architecture.md, "
        "'Generation'). Off, each stream's tokens are those it gets alone.",
    )
    stream_interval_ms: float = Field(
        default=40.0,
        ge=0,
        le=1000,
        description="Text a stream generates within this long of its last message travels in its next "
        "message: its first text and its end go at once. Each message costs the server and the client "
        "CPU that decoding would use; 0 sends one message per token.",
    )


class ModelSpec(BaseModel):
    """One entry of `models.yaml`."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    name: str = Field(description="Name clients use; the key in models.yaml.")
    backend: str = Field(description="Backend that runs the model: 'onnx' or 'gguf'.")
    source: str = Field(
        description="Weights: a path (relative to models.yaml), pkg://distribution/path/in/dist, "
        "or hf://org/repo/path/in/repo[@revision]."
    )
    tokenizer: str | None = Field(
        default=None, description="tokenizer.json for ONNX models, in the same forms as `source`."
    )
    files: dict[str, str] = Field(
        default_factory=dict,
        description="More files the backend reads, by role (e.g. `projection_head`), in the same forms as "
        "`source`; which roles a backend requires or accepts is its own (docs/models-yaml.md).",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Settings of the model's backend (e.g. gguf's `attention`), checked against that "
        "backend's options when the catalog is loaded and when a spec arrives over the API.",
    )
    tasks: Annotated[list[Task], Field(min_length=1)]
    dimensions: int | None = Field(default=None, gt=0, description="Embedding dimension.")
    matryoshka_dimensions: list[int] = Field(
        default_factory=list,
        description="Dimensions the model was trained to be cut to; empty allows any prefix.",
    )
    max_tokens: int = Field(default=512, gt=0, description="Longest input read for embed/rerank, in tokens.")
    context_length: int | None = Field(
        default=None, gt=0, description="GGUF context window for generation; default: the model's own."
    )
    pooling: Pooling = Pooling.MEAN
    normalize: bool = True
    query_prompt: str = Field(default="", description="Prefix for INPUT_TYPE_QUERY inputs.")
    document_prompt: str = Field(default="", description="Prefix for INPUT_TYPE_DOCUMENT inputs.")
    rerank_method: RerankMethod | None = Field(
        default=None, description="Default: cosine for embedding models, relevance for generative ones."
    )
    rerank_instruction: str = DEFAULT_RERANK_INSTRUCTION
    load: LoadPolicy = LoadPolicy.ON_DEMAND
    threads: int | None = Field(default=None, gt=0, description="CPU threads; default: the server's.")
    instances: int | None = Field(
        default=None,
        gt=0,
        le=64,
        description="Copies of the model, each on its own thread with threads/instances of the CPU "
        "threads; default: chosen from the threads for backends that scale out (onnx), else 1.",
    )
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    pinned: bool = Field(
        default=False, description="Never unloaded to make room under the memory budget, nor after idle time."
    )
    keep_alive_seconds: float | None = Field(
        default=None, gt=0, description="Unload after this many seconds without requests; default: never."
    )
    description: str = ""
    requires: str = Field(
        default="", description="What must be true before this model can load, told to whoever tries."
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        bad_roles = [role for role in self.files if not _FILE_ROLE.fullmatch(role)]
        if bad_roles:
            raise ValueError(f"file roles must be lower-case identifiers, not {', '.join(map(repr, bad_roles))}")
        if Task.EMBED in self.tasks and self.dimensions is None:
            raise ValueError("an embedding model needs `dimensions`")
        if any(d > (self.dimensions or 0) for d in self.matryoshka_dimensions):
            raise ValueError("matryoshka_dimensions must not exceed `dimensions`")
        cosine_rerank = Task.RERANK in self.tasks and self.effective_rerank_method is RerankMethod.COSINE
        if cosine_rerank and Task.EMBED not in self.tasks:
            raise ValueError("cosine reranking needs the model to embed")
        return self

    @property
    def effective_rerank_method(self) -> RerankMethod:
        if self.rerank_method is not None:
            return self.rerank_method
        return RerankMethod.RELEVANCE if Task.GENERATE in self.tasks else RerankMethod.COSINE


def spec_from_text(name: str, text: str, *, base: ModelSpec | None) -> ModelSpec:
    """A spec sent over the API: a YAML or JSON mapping of models.yaml fields. With a `base` (the
    model's current spec) the mapping only needs the fields that change."""
    try:
        fields = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgumentError(f"spec for model {name!r} is not YAML or JSON: {exc}") from exc
    if not isinstance(fields, dict) or not fields:
        raise InvalidArgumentError(f"spec for model {name!r} must be a non-empty mapping of models.yaml fields")
    if fields.get("name", name) != name:
        raise InvalidArgumentError(f"spec for model {name!r} names another model, {fields['name']!r}")
    merged = {**(base.model_dump(exclude_unset=True) if base is not None else {}), **fields, "name": name}
    try:
        return ModelSpec.model_validate(merged)
    except ValidationError as exc:
        raise InvalidArgumentError(f"spec for model {name!r} is invalid:\n{exc}") from exc


class Catalog(BaseModel):
    """All of `models.yaml`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    defaults: dict[Task, str] = Field(default_factory=dict)
    models: dict[str, ModelSpec]
    # Folder that relative sources are resolved against: the folder of models.yaml.
    base_dir: Path = Path()

    @model_validator(mode="before")
    @classmethod
    def _names_from_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            data = dict(data)
            data["models"] = {
                name: {"name": name, **spec} if isinstance(spec, dict) else spec
                for name, spec in data["models"].items()
            }
        return data

    @model_validator(mode="after")
    def _check_defaults(self) -> Self:
        for task, name in self.defaults.items():
            spec = self.models.get(name)
            if spec is None:
                raise ValueError(f"default model {name!r} for {task.value} is not in `models`")
            if task not in spec.tasks:
                raise ValueError(f"default model {name!r} for {task.value} does not do {task.value}")
        return self

    def default_for(self, task: Task) -> str | None:
        """The model that answers `task` when a request names none."""
        if task in self.defaults:
            return self.defaults[task]
        return next((spec.name for spec in self.models.values() if task in spec.tasks), None)

    @classmethod
    def from_yaml(cls, path: Path) -> Catalog:
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidArgumentError(f"cannot read models file {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise InvalidArgumentError(f"models file {path} must be a mapping with a `models` key")
        try:
            return cls.model_validate({**raw, "base_dir": path.resolve().parent})
        except ValidationError as exc:
            raise InvalidArgumentError(f"models file {path} is invalid:\n{exc}") from exc
