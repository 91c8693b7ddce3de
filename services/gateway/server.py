"""The gRPC gateway: a thin async adapter from `clsa.v1.Generation` to a GenerationBackend.

Validates every request at the edge (INVALID_ARGUMENT naming the field; nothing invalid reaches a
worker), streams outputs, and ends a request when its client cancels or its deadline passes (the
backend frees its KV). Also serves `grpc.health.v1` and server reflection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.api.stubs import load
from services.engine import RequestOutput
from services.engine.errors import InvalidRequestError, OutOfBlocksError
from services.gateway.backend import AdmissionQueueFull, BackendUnavailable, GenerationBackend
from services.gateway.convert import check_limits, finish_reason_to_proto, request_from_proto
from services.gateway.metrics import GatewayMetrics

pb2, pb2_grpc = load()
SERVICE_NAME = "clsa.v1.Generation"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_BACKGROUND: set[asyncio.Task] = set()


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes did not parse (invalid UTF-8 in a string field, not protobuf at all):
    handed to the servicer, which answers INVALID_ARGUMENT, instead of gRPC's bare INTERNAL."""

    error: str


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as e:  # noqa: BLE001 - DecodeError and whatever else the parser raises
            return Undecodable(f"{type(e).__name__}: {e}")

    return deserialize


def add_generation_service(servicer: GenerationServicer, server: Any) -> None:
    """The generated registration, with request parsers that report bad bytes to the servicer."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=_lenient(pb2.GenerateRequest.FromString),
            response_serializer=pb2.GenerateResponse.SerializeToString),
        "Complete": grpc.unary_unary_rpc_method_handler(
            servicer.Complete, request_deserializer=_lenient(pb2.GenerateRequest.FromString),
            response_serializer=pb2.GenerateResponse.SerializeToString),
        "Tokenize": grpc.unary_unary_rpc_method_handler(
            servicer.Tokenize, request_deserializer=_lenient(pb2.TokenizeRequest.FromString),
            response_serializer=pb2.TokenizeResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, request_deserializer=pb2.GetModelInfoRequest.FromString,
            response_serializer=pb2.ModelInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE_NAME, handlers)


class GenerationServicer(pb2_grpc.GenerationServicer):  # type: ignore[misc, name-defined]
    def __init__(self, backend: GenerationBackend, metrics: GatewayMetrics) -> None:
        self.backend = backend
        self.metrics = metrics

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:  # noqa: N802
        async for message in self._run(request, context):
            yield message

    async def Complete(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        token_ids: list[int] = []
        text: list[str] = []
        last = None
        async for message in self._run(request, context):
            token_ids.extend(message.token_ids)
            text.append(message.text)
            last = message
        assert last is not None
        last.ClearField("token_ids")
        last.token_ids.extend(token_ids)
        last.text = "".join(text)
        return last

    async def Tokenize(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request: not a valid clsa.v1.TokenizeRequest ({request.error})")
        return pb2.TokenizeResponse(token_ids=self.backend.tokenize(request.text))

    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        m = self.backend.model_summary()
        modes = [pb2.ATTENTION_MODE_CLSA, pb2.ATTENTION_MODE_DENSE] if m.arch == "yoco" else [pb2.ATTENTION_MODE_DENSE]
        return pb2.ModelInfo(model=m.model, fingerprint=m.fingerprint, arch=m.arch, vocab_size=m.vocab_size,
                             max_seq_len=m.max_seq_len, n_layers=m.n_layers, index_topk=m.index_topk,
                             swa_window=m.swa_window, attention_modes=modes)

    async def _run(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """Count the request under its final status around the generation itself."""
        status: str | None = "OK"
        try:
            async for message in self._generate(request, context):
                yield message
        except grpc.aio.AbortError:
            status = None  # counted by _abort, before the client heard it
            raise
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            status = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
            raise
        finally:
            if status is not None:
                self.metrics.requests.labels(status=status).inc()

    async def _abort(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
        """End the request with `code`, counted first: abort sends the status before it raises, so a
        client that scrapes the metrics as soon as it hears the error must find it counted."""
        self.metrics.requests.labels(status=code.name).inc()
        await context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")

    async def _generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """Validate, generate, convert; every failure becomes a status code with a message."""
        start = time.perf_counter()
        if isinstance(request, Undecodable):
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                              f"request: not a valid clsa.v1.GenerateRequest ({request.error})")
        model = self.backend.model_summary()
        try:
            req = request_from_proto(pb2, request, model.vocab_size)
            req = check_limits(req, model.vocab_size, model.max_seq_len, lambda text: len(self.backend.tokenize(text)))
        except InvalidRequestError as e:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        first_token_s: float | None = None
        last_s = start
        stage_ms: dict[str, float] = {}
        try:
            async for out in self.backend.generate(req):
                now = time.perf_counter()
                if first_token_s is None:
                    first_token_s = now - start
                    self.metrics.ttft.observe(first_token_s)
                else:
                    self.metrics.itl.observe(now - last_s)
                last_s = now
                stage_ms.update(out.stage_ms)
                self.metrics.tokens.inc(len(out.new_token_ids))
                if out.finished:
                    self._observe_stages(stage_ms, first_token_s, now - start)
                yield self._message(out, first_token_s, start, stage_ms)
        except InvalidRequestError as e:
            code = grpc.StatusCode.ALREADY_EXISTS if e.param == "request_id" else grpc.StatusCode.INVALID_ARGUMENT
            await self._abort(context, code, str(e))
        except (AdmissionQueueFull, OutOfBlocksError) as e:
            await self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except BackendUnavailable as e:
            await self._abort(context, grpc.StatusCode.UNAVAILABLE, str(e))
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001 -- the client hears which stage failed, not a traceback
            await self._abort(context, grpc.StatusCode.INTERNAL, f"decode: {type(e).__name__}: {e}")

    def _observe_stages(self, stage_ms: dict[str, float], ttft_s: float, total_s: float) -> None:
        self.metrics.prefill.observe(stage_ms.get("prefill", ttft_s * 1e3) / 1e3)
        if "queue" in stage_ms:
            self.metrics.queue.observe(stage_ms["queue"] / 1e3)
        if "transfer" in stage_ms:
            self.metrics.transfer.observe(stage_ms["transfer"] / 1e3)
        self.metrics.decode.observe(total_s - ttft_s)

    @staticmethod
    def _message(out: RequestOutput, first_token_s: float, start: float, stage_ms: dict[str, float]) -> Any:
        message = pb2.GenerateResponse(request_id=out.request_id, token_ids=out.new_token_ids, text=out.text_delta)
        if out.finished:
            message.finish_reason = finish_reason_to_proto(pb2, out.finish_reason)
            message.usage.prompt_tokens = out.prompt_tokens
            message.usage.completion_tokens = len(out.token_ids)
            ttft_ms = first_token_s * 1e3
            message.timings.ttft_ms = ttft_ms
            # In-process there is no queue or transfer, and prefill is the whole wait for the first token.
            message.timings.queue_ms = stage_ms.get("queue", 0.0)
            message.timings.prefill_ms = stage_ms.get("prefill", ttft_ms)
            message.timings.transfer_ms = stage_ms.get("transfer", 0.0)
            message.timings.decode_ms = (time.perf_counter() - start) * 1e3 - ttft_ms
        return message


async def start_server(backend: GenerationBackend, port: int = 0, host: str = "127.0.0.1",
                       metrics: GatewayMetrics | None = None) -> tuple[Any, int]:
    """A started grpc.aio server with the Generation service, health and reflection; returns it and
    its bound port (a free one when `port` is 0)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    servicer = GenerationServicer(backend, metrics or GatewayMetrics(backend))
    add_generation_service(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await _set_health(health_servicer, backend)
    task = asyncio.create_task(_watch_health(health_servicer, backend))
    _BACKGROUND.add(task)  # a task needs a strong reference to keep running
    task.add_done_callback(_BACKGROUND.discard)
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound


async def _set_health(servicer: Any, backend: GenerationBackend) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if backend.is_serving() else \
        health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)


async def _watch_health(servicer: Any, backend: GenerationBackend, period_s: float = 0.5) -> None:
    """SERVING only while the backend can take requests."""
    while True:
        await _set_health(servicer, backend)
        await asyncio.sleep(period_s)
