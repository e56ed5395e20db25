"""Backends: one module per inference engine, all behind wafer.backends.base.Backend."""
