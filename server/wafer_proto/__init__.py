"""Stubs generated from protos/ (package wafer.v1)."""
