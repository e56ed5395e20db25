"""``wafer embed``, ``wafer rerank`` and ``wafer generate``."""

from __future__ import annotations

import math
import sys
from dataclasses import asdict
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from wafer_client.cli._common import (
    PREVIEW,
    app,
    client_for,
    echo_json,
    reporting_errors,
    short,
)
from wafer_client.types import ChatMessage, GenerationChunk


@app.command()
def embed(
    ctx: typer.Context,
    *,
    texts: Annotated[list[str], typer.Argument(metavar="TEXT", help="Texts to embed.")],
    model: Annotated[str, typer.Option(help="Model name [default: the server's embedder].")] = "",
    query: Annotated[bool, typer.Option("--query", help="Embed as search queries, not documents.")] = False,
    dimensions: Annotated[int, typer.Option(min=0, help="Keep the first N dimensions.")] = 0,
    truncate: Annotated[bool, typer.Option(help="Cut texts longer than the model's window.")] = False,
    pool_chunks: Annotated[
        bool, typer.Option(help="Read long texts whole: average the vectors of their overlapping windows.")
    ] = False,
    context_collection: Annotated[
        str, typer.Option(help="Contextual models (cde): embed in the context stored with this collection.")
    ] = "",
    context_document: Annotated[
        list[str] | None,
        typer.Option(help="Contextual models (cde): a corpus document to build the context from (repeatable)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON with the full vectors.")] = False,
) -> None:
    """Embed texts and show the vectors."""
    with reporting_errors(), client_for(ctx) as client:
        result = client.embed(
            texts,
            model=model,
            input_type="query" if query else "document",
            dimensions=dimensions,
            truncate=truncate,
            pool_chunks=pool_chunks,
            context_collection=context_collection,
            context_documents=context_document or (),
        )
    if as_json:
        echo_json(
            {
                "model": result.model,
                "dimensions": result.dimensions,
                "embeddings": result.vectors.tolist(),
                "cached": result.cached,
                "context_id": result.context_id,
                "usage": asdict(result.usage),
                "timings": asdict(result.timings),
            }
        )
        return
    console = Console()
    console.print(
        f"[bold]{escape(result.model)}[/]: {len(result)} x {result.dimensions}, "
        f"{result.usage.prompt_tokens} tokens, {result.timings.inference_ms:.1f} ms"
        + (f", {result.cached} from the cache" if result.cached else "")
        + (f", context {result.context_id[:12]}" if result.context_id else "")
    )
    table = Table(show_edge=False)
    table.add_column("#", justify="right")
    table.add_column("text")
    table.add_column("norm", justify="right")
    table.add_column(f"first {PREVIEW} values")
    for i, (text, vector) in enumerate(zip(texts, result.vectors, strict=False)):
        preview = " ".join(f"{v:+.4f}" for v in vector[:PREVIEW].tolist())
        norm = math.sqrt(float((vector.astype("float64") ** 2).sum()))
        table.add_row(str(i), escape(short(text, 40)), f"{norm:.3f}", preview + " …")
    console.print(table)


@app.command()
def rerank(
    ctx: typer.Context,
    *,
    query: Annotated[str, typer.Argument(help="The query.")],
    documents: Annotated[list[str], typer.Argument(metavar="DOC", help="Documents to rank.")],
    model: Annotated[str, typer.Option(help="Model name [default: the server's reranker].")] = "",
    top_n: Annotated[int, typer.Option(min=0, help="Keep the best N [default: all].")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Rank documents by relevance to a query, best first."""
    with reporting_errors(), client_for(ctx) as client:
        result = client.rerank(query, documents, model=model, top_n=top_n)
    if as_json:
        echo_json(
            {
                "model": result.model,
                "results": [
                    {"index": hit.index, "score": hit.score, "document": documents[hit.index]} for hit in result.results
                ],
                "usage": asdict(result.usage),
            }
        )
        return
    table = Table(title=f"{escape(result.model)}: {escape(short(query, 40))}", show_edge=False)
    table.add_column("rank", justify="right")
    table.add_column("index", justify="right")
    table.add_column("score", justify="right")
    table.add_column("document")
    for rank, hit in enumerate(result.results, start=1):
        text = documents[hit.index] if hit.index < len(documents) else hit.document
        table.add_row(str(rank), str(hit.index), f"{hit.score:.4f}", escape(short(text)))
    Console().print(table)


def _usage_line(last: GenerationChunk | None) -> str:
    if last is None:
        return "no output"
    parts = [last.model or "?"]
    if last.usage is not None:
        parts.append(f"{last.usage.prompt_tokens} prompt + {last.usage.completion_tokens} completion tokens")
    if last.finish_reason is not None:
        parts.append(f"finish: {last.finish_reason}")
    if last.timings is not None:
        parts.append(f"first token {last.timings.time_to_first_token_ms:.0f} ms")
        if last.usage is not None and last.timings.inference_ms > 0:
            rate = last.usage.completion_tokens / (last.timings.inference_ms / 1000)
            parts.append(f"{rate:.1f} tokens/s")
    return " · ".join(parts)


@app.command()
def generate(
    ctx: typer.Context,
    *,
    prompt: Annotated[str, typer.Argument(help="The user's message (the raw text to continue with --raw).")],
    model: Annotated[str, typer.Option(help="Model name [default: the server's generator].")] = "",
    max_tokens: Annotated[int, typer.Option(min=0, help="Most tokens to generate.")] = 0,
    temperature: Annotated[float | None, typer.Option(min=0, max=2, help="0 is greedy.")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Seed for reproducible sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop before this string (repeatable).")] = None,
    system: Annotated[str | None, typer.Option(help="System message (chat only).")] = None,
    chat: Annotated[
        bool, typer.Option("--chat/--raw", help="Use the model's chat template, or continue the raw text.")
    ] = True,
) -> None:
    """Generate text, printed as it streams; usage goes to stderr at the end."""
    if system is not None and not chat:
        raise typer.BadParameter("--system needs the chat template; drop --raw")
    messages: list[ChatMessage] | None = None
    if chat:
        messages = [ChatMessage("system", system)] if system is not None else []
        messages.append(ChatMessage("user", prompt))
    last: GenerationChunk | None = None
    with reporting_errors(), client_for(ctx) as client:
        try:
            for chunk in client.generate(
                None if messages is not None else prompt,
                messages=messages,
                model=model,
                max_tokens=max_tokens,
                temperature=temperature,
                seed=seed,
                stop=stop or (),
            ):
                sys.stdout.write(chunk.text)
                # Flushed per delta: the point of streaming is seeing text as it comes.
                sys.stdout.flush()
                last = chunk
        finally:
            # Whatever happened, end the line so the shell prompt (or the error) starts clean.
            sys.stdout.write("\n")
            sys.stdout.flush()
    typer.echo(_usage_line(last), err=True)
