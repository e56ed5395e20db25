"""The scheduler: which work runs next, on which model, in which lane, merged with what.

- `gate.ComputeGate`: models take turns on the CPU, interactive turns first.
- `model.ModelScheduler`: per model, one thread, two lanes, merged batches, bounded queues.
- `handle.ModelHandle`: a loaded model as callers see it; its methods queue work on the model's
  thread, and none hands out the backend.
"""

from wafer.scheduler.gate import ComputeGate
from wafer.scheduler.handle import ModelHandle
from wafer.scheduler.model import BatchObserver, ModelScheduler, Scheduled, estimate_tokens

__all__ = ["BatchObserver", "ComputeGate", "ModelHandle", "ModelScheduler", "Scheduled", "estimate_tokens"]
