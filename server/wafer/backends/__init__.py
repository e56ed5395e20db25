"""Backends: one module per inference engine, all behind wafer.backends.base.Backend."""

from __future__ import annotations

from wafer.backends.base import Backend


def available_backends() -> dict[str, type[Backend]]:
    """The backend table the registry loads models with: one mapping, one place."""
    from wafer.backends.cde import CdeBackend
    from wafer.backends.gguf import GgufBackend
    from wafer.backends.onnx import OnnxBackend

    return {"onnx": OnnxBackend, "gguf": GgufBackend, "cde": CdeBackend}
