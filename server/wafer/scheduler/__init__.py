"""The scheduler: which work runs next, on which model, in which lane, merged with what.

- `gate.ComputeGate`: models take turns on the CPU, interactive turns first.
- `model.ModelScheduler`: per model, one thread, two lanes, merged batches, bounded queues.
"""

from wafer.scheduler.gate import ComputeGate
from wafer.scheduler.model import BatchObserver, ModelScheduler, Scheduled, estimate_tokens

__all__ = ["BatchObserver", "ComputeGate", "ModelScheduler", "Scheduled", "estimate_tokens"]
