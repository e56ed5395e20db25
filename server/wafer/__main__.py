"""`python -m wafer ...` is the `wafer` command."""

from wafer_client.cli import app

app()
