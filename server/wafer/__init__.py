"""Wafer: a gRPC inference server for small text models, next to the user's data."""

__version__ = "0.1.0"
