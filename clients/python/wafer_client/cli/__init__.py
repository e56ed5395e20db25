"""The ``wafer`` command: run the server, or talk to one.

Client commands print results for people (rich tables) or, with ``--json``, for programs. A failed
call prints ``error: <CODE>: <details>`` on stderr and exits 1, without a traceback.

One module per group of sub-commands; importing them registers their commands on ``app``, in the
order ``wafer --help`` lists them. ``serve`` belongs to the server (``wafer.cli``) and comes first.
"""

from __future__ import annotations

from wafer_client.cli._common import add_contributed_commands, app

add_contributed_commands()

# Imported for their commands, after `serve`: the order of registration is the order of --help.
from wafer_client.cli import inference, models, search, jobs  # noqa: E402, I001
from wafer_client.cli.jobs import parse_source  # noqa: E402

__all__ = ["app", "inference", "jobs", "models", "parse_source", "search"]
