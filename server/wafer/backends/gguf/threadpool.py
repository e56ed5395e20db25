"""A persistent ggml thread pool for a llama.cpp context, whose threads sleep between graphs.

Without one, ggml's CPU backend creates its worker threads at the start of every graph (every
llama_decode's micro-batch) and joins them at its end. llama-server attaches one pool to its context
for its whole life (`llama_attach_threadpool`) and saves that; measured through Wafer's stream engine
on 2 cores, 2 threads, a quiet machine: one stream 76.1 -> 78.7 tokens/s (+3.4 %), four streams
+1-2 %.

The pool's polling level is 0: between graphs its threads wait on a condition variable, not in a
spin loop, so a loaded model that serves nothing burns no CPU (a laptop's battery; the ONNX models
share the cores). Polling made no measurable speed difference here. The pool holds the model's
`threads`; a context told to use fewer (`llama_set_n_threads`, the stream engine following the
machine's load) runs each graph on that many of them, the rest asleep (ggml-cpu.c keeps a graph's
thread count beside its generation counter, and only threads below it take the graph).

llama-cpp-python binds neither the pool nor attaching it: the functions are called through the
library it loaded (libllama, which links ggml's CPU backend).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as llama_lib

# ggml.h's GGML_MAX_N_THREADS: the length of a pool's CPU mask.
_MAX_THREADS = 512


class _PoolParams(ctypes.Structure):
    """ggml.h's `struct ggml_threadpool_params`."""

    _fields_ = [
        ("cpumask", ctypes.c_bool * _MAX_THREADS),  # all false: the threads keep the process's affinity
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),  # enum ggml_sched_priority; 0 (normal) keeps the inherited priority
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


@functools.cache
def _library() -> ctypes.CDLL:
    """libllama with prototypes for the pool's functions: a handle of its own on the library
    llama-cpp-python loaded, so these prototypes do not touch llama-cpp-python's."""
    # `_lib` is llama-cpp-python's handle (private, but the only record of which file it loaded:
    # LLAMA_CPP_LIB_PATH may point elsewhere than the package's lib folder).
    lib = ctypes.CDLL(llama_lib._lib._name, mode=ctypes.RTLD_GLOBAL)
    lib.ggml_threadpool_params_init.argtypes = [ctypes.POINTER(_PoolParams), ctypes.c_int]
    lib.ggml_threadpool_params_init.restype = None
    lib.ggml_threadpool_new.argtypes = [ctypes.POINTER(_PoolParams)]
    lib.ggml_threadpool_new.restype = ctypes.c_void_p
    lib.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
    lib.ggml_threadpool_free.restype = None
    lib.llama_attach_threadpool.argtypes = [llama_cpp.llama_context_p_ctypes, ctypes.c_void_p, ctypes.c_void_p]
    lib.llama_attach_threadpool.restype = None
    lib.llama_detach_threadpool.argtypes = [llama_cpp.llama_context_p_ctypes]
    lib.llama_detach_threadpool.restype = None
    return lib


class ThreadPool:
    """`threads` ggml compute threads (the caller's own is the first: threads - 1 are started) that
    run the graphs of the contexts it is attached to and sleep between them."""

    def __init__(self, threads: int) -> None:
        lib = _library()
        params = _PoolParams()
        lib.ggml_threadpool_params_init(ctypes.byref(params), threads)
        params.poll = 0  # sleep between graphs, never spin (see the module docstring)
        self.threads = threads
        self.ptr: int | None = lib.ggml_threadpool_new(ctypes.byref(params))
        if not self.ptr:
            raise RuntimeError(f"ggml could not create a pool of {threads} threads")

    def attach(self, ctx: Any) -> None:
        """Run the graphs of llama_context `ctx` (its token steps and its prompt batches) here."""
        _library().llama_attach_threadpool(ctx, self.ptr, self.ptr)

    @staticmethod
    def detach(ctx: Any) -> None:
        """Give `ctx` back its per-graph threads."""
        _library().llama_detach_threadpool(ctx)

    def close(self) -> None:
        """Stop and join the pool's threads; after the contexts it served are detached or freed."""
        if self.ptr:
            _library().ggml_threadpool_free(self.ptr)
            self.ptr = None
