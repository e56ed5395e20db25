"""The channel under each client: how it opens, which stubs it serves, how it closes. The one part of
the two clients written twice by hand; their calls (``_async.py``, and ``_sync.py`` generated from it
by ``tools/unasync.py``) use only ``_inference``, ``_models``, ``_index``, ``_jobs`` and
``_health_check``."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Self, Unpack

import grpc

from wafer_client import _health
from wafer_client._base import BaseClient, ClientOptions
from wafer_proto.v1 import index_pb2_grpc, inference_pb2_grpc, jobs_pb2_grpc, models_pb2_grpc


class _Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.inference = inference_pb2_grpc.InferenceStub(channel)
        self.models = models_pb2_grpc.ModelsStub(channel)
        self.index = index_pb2_grpc.IndexStub(channel)
        self.jobs = jobs_pb2_grpc.JobsStub(channel)
        self.health: grpc.aio.UnaryUnaryMultiCallable[str, str] = channel.unary_unary(
            _health.CHECK_METHOD,
            request_serializer=_health.serialize_request,
            response_deserializer=_health.deserialize_status,
        )


class AsyncConnection(BaseClient):
    """A grpc.aio channel, opened on first use and bound to that event loop."""

    def __init__(self, address: str | None = None, **options: Unpack[ClientOptions]) -> None:
        super().__init__(address, **options)
        # Connected on first use: a grpc.aio channel belongs to the loop running when it is made, and a
        # client is often constructed before any loop runs (module level, app factories).
        self._stubs: _Stubs | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _connect(self) -> _Stubs:
        loop = asyncio.get_running_loop()
        if self._stubs is None:
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(self.address, self._credentials, options=self._options)
            else:
                channel = grpc.aio.insecure_channel(self.address, options=self._options)
            self._stubs = _Stubs(channel)
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError(
                "this AsyncWaferClient is bound to the event loop it was first used in; "
                "create one client per event loop"
            )
        return self._stubs

    @property
    def _inference(self) -> inference_pb2_grpc.InferenceAsyncStub:
        return self._connect().inference

    @property
    def _models(self) -> models_pb2_grpc.ModelsAsyncStub:
        return self._connect().models

    @property
    def _index(self) -> index_pb2_grpc.IndexAsyncStub:
        return self._connect().index

    @property
    def _jobs(self) -> jobs_pb2_grpc.JobsAsyncStub:
        return self._connect().jobs

    @property
    def _health_check(self) -> grpc.aio.UnaryUnaryMultiCallable[str, str]:
        return self._connect().health

    async def close(self) -> None:
        stubs, self._stubs, self._loop = self._stubs, None, None
        if stubs is not None:
            await stubs.channel.close(None)

    # httpx spells it aclose; accept both so code moving between the two reads naturally.
    aclose = close

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class SyncConnection(BaseClient):
    """A blocking channel, opened at once; share it across threads."""

    def __init__(self, address: str | None = None, **options: Unpack[ClientOptions]) -> None:
        super().__init__(address, **options)
        if self._credentials is not None:
            self._channel = grpc.secure_channel(self.address, self._credentials, options=self._options)
        else:
            self._channel = grpc.insecure_channel(self.address, options=self._options)
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._models = models_pb2_grpc.ModelsStub(self._channel)
        self._index = index_pb2_grpc.IndexStub(self._channel)
        self._jobs = jobs_pb2_grpc.JobsStub(self._channel)
        self._health_check: grpc.UnaryUnaryMultiCallable[str, str] = self._channel.unary_unary(
            _health.CHECK_METHOD,
            request_serializer=_health.serialize_request,
            response_deserializer=_health.deserialize_status,
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
