"""Background jobs: embed a corpus (inline, JSONL, SQLite) into a collection, with checkpoints."""

from wafer.jobs.manager import InlineSource, JobManager, JobOptions, JobRequest
from wafer.jobs.policy import PolicyChecker, RunPolicy
from wafer.jobs.power import PowerProbe
from wafer.jobs.runner import JobStatus
from wafer.jobs.sources import JsonlSource, SqliteSource
from wafer.jobs.state import JobState

__all__ = [
    "InlineSource",
    "JobManager",
    "JobOptions",
    "JobRequest",
    "JobState",
    "JobStatus",
    "JsonlSource",
    "PolicyChecker",
    "PowerProbe",
    "RunPolicy",
    "SqliteSource",
]
