"""``wafer search``, ``wafer collections`` and ``wafer health``."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from wafer_client.cli._common import (
    app,
    client_for,
    echo_json,
    options_of,
    reporting_errors,
    short,
)


def _filter_value(text: str) -> str | int | bool:
    """A --filter value as the payload most likely holds it: true/false, a whole number, else text."""
    if text in ("true", "false"):
        return text == "true"
    try:
        return int(text)
    except ValueError:
        return text


def _parse_filters(items: list[str]) -> dict[str, str | int | bool]:
    conditions: dict[str, str | int | bool] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--filter")
        conditions[key] = _filter_value(value)
    return conditions


@app.command()
def search(
    ctx: typer.Context,
    *,
    query: Annotated[str, typer.Argument(help="The query.")],
    collection: Annotated[str, typer.Option("--collection", "-c", help="Collection to search.")],
    top_k: Annotated[int, typer.Option(min=1, help="How many documents to return.")] = 10,
    filters: Annotated[
        list[str] | None,
        typer.Option(
            "--filter",
            metavar="KEY=VALUE",
            help="Only documents whose payload field KEY equals VALUE (true/false and whole numbers "
            "are typed); repeat to require several.",
        ),
    ] = None,
    rerank_model: Annotated[str, typer.Option(help="Rerank the nearest chunks with this model.")] = "",
    rerank_top_n: Annotated[int, typer.Option(min=0, help="How many chunks to rerank [default: max(top-k, 20)].")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Search a collection for the documents nearest a query, optionally reranked."""
    conditions = _parse_filters(filters or [])
    with reporting_errors(), client_for(ctx) as client:
        result = client.search(
            collection,
            query,
            top_k=top_k,
            filter=conditions or None,
            rerank_model=rerank_model,
            rerank_top_n=rerank_top_n,
        )
    if as_json:
        echo_json(
            {
                "model": result.model,
                "rerank_model": result.rerank_model,
                "hits": [
                    {
                        "id": h.id,
                        "score": h.score,
                        "rerank_score": h.rerank_score,
                        "text": h.text,
                        "payload": h.payload,
                        "chunk": h.chunk,
                        "chunks": h.chunks,
                        "start": h.start,
                        "end": h.end,
                    }
                    for h in result.hits
                ],
            }
        )
        return
    models = escape(result.model) + (f", reranked by {escape(result.rerank_model)}" if result.rerank_model else "")
    table = Table(title=f"{escape(collection)} ({models})", show_edge=False)
    table.add_column("rank", justify="right")
    table.add_column("id")
    table.add_column("score", justify="right")
    if result.rerank_model:
        table.add_column("rerank", justify="right")
    table.add_column("text")
    table.add_column("payload")
    for rank, hit in enumerate(result.hits, start=1):
        payload = json.dumps(hit.payload, ensure_ascii=False) if hit.payload else ""
        # A long document shows the chunk that matched, marked with its number.
        text = hit.matched_text if hit.chunks > 1 else hit.text
        label = f"[{hit.chunk + 1}/{hit.chunks}] " if hit.chunks > 1 else ""
        rerank = [f"{hit.rerank_score:.4f}" if hit.rerank_score is not None else ""] if result.rerank_model else []
        table.add_row(
            str(rank),
            escape(hit.id),
            f"{hit.score:.4f}",
            *rerank,
            escape(label + short(text)),
            escape(short(payload, 40)),
        )
    Console().print(table)


@app.command()
def collections(
    ctx: typer.Context, *, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """The collections in the index."""
    with reporting_errors(), client_for(ctx) as client:
        found = client.list_collections()
    if as_json:
        echo_json([asdict(c) for c in found])
        return
    table = Table(show_edge=False)
    for name in ("name", "model", "dims", "documents", "context"):
        table.add_column(name, justify="right" if name in ("dims", "documents") else "left")
    for c in found:
        table.add_row(escape(c.name), escape(c.model), str(c.dimensions), str(c.documents), c.context_id[:12])
    Console().print(table)


# Health


@app.command()
def health(
    ctx: typer.Context,
    *,
    service: Annotated[str, typer.Option(help="One service, e.g. wafer.v1.Inference [default: all].")] = "",
) -> None:
    """Ask whether the server is serving; exits 0 only if it is."""
    opts = options_of(ctx)
    # A probe should answer quickly or not at all, so a shorter deadline than other commands.
    timeout = opts.timeout if opts.timeout is not None else 5.0
    with reporting_errors(), client_for(ctx) as client:
        status = client.health(service, timeout=timeout)
    typer.echo(status)
    if status != "SERVING":
        raise typer.Exit(1)


# Jobs
