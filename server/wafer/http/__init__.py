"""The OpenAI-compatible HTTP door: `/v1/embeddings`, `/v1/rerank`, `/v1/chat/completions`,
`/v1/completions` and `/v1/models` onto the same engine as gRPC.

Like the servicers it only translates (`convert.py`); errors go through one table (`errors.py`),
and every request gets the same request id, auth policy, drain, log line and metrics as an RPC
(`app.py`). `server.py` serves it with uvicorn on the gRPC server's event loop.
"""
