"""The HTTP side of compaction in vLLM's API server, installed through vLLM's own `--middleware` option.

One pure ASGI middleware:
- validates the per-request compaction keys of any JSON POST (`vllm_xargs.kv_compaction_*`, and `vllm_xargs`
  itself) against the server's settings with `request_config`, the same code as the engine's admission hook
  (integration/request_validation.py), but on the raw JSON; a bad value is an HTTP 400 in vLLM's error shape whose
  `param` names the field, and the request never reaches vLLM's handlers;
- serves GET /v1/compaction/stats (the scheduler's stats file) and GET /v1/compaction/config;
- adds `usage.kv_compaction = {logical_tokens, physical_tokens, compactions}` to /v1/completions and
  /v1/chat/completions responses: non-streaming ones, and the final usage chunk of streaming ones (sent when
  stream_options.include_usage is set);
- registers the Prometheus collector for /metrics.

vLLM adds `--middleware` classes outside its CORS and API-key middlewares, so the responses made here go through
the same two (vLLM's own classes, configured from the same args): without the bearer key they are 401 exactly like
vLLM's endpoints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vllm_compact.config import CompactionConfig, config_from_env
from vllm_compact.core.request_overrides import (
    ENABLED_KEY,
    METHOD_KEY,
    METHODS,
    RATIO_KEY,
    RequestOverrideError,
    request_config,
)
from vllm_compact.core.stats_file import STATS_PATH_ENV
from vllm_compact.head_table import describe_head_budgets
from vllm_compact.server.kv_usage import KVUsage, ResponseShape, StatsReader, final_usage
from vllm_compact.server.metrics import register_collector

STATS_PATH = "/v1/compaction/stats"
CONFIG_PATH = "/v1/compaction/config"
# path -> whether its `prompt` may be a list of prompts (one engine request each)
USAGE_PATHS = {"/v1/completions": True, "/v1/chat/completions": False}


def error_body(message: str, param: str | None, status: int) -> dict:
    """vLLM's own error JSON ({"error": {message, type, param, code}})."""
    from http import HTTPStatus

    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    err_type = "BadRequestError" if status == 400 else HTTPStatus(status).phrase
    return create_error_response(message, err_type, HTTPStatus(status), param).model_dump()


def per_request_help(config: CompactionConfig) -> dict:
    return {
        ENABLED_KEY: "false turns compaction off for this request (true only where the server has it on)",
        RATIO_KEY: f"a number >= {config.ratio} (the server's ratio): a request may only compact more",
        METHOD_KEY: "one of " + ", ".join(METHODS),
    }


class CompactionMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.config = config_from_env() or CompactionConfig(enabled=False)
        self.stats = StatsReader(os.environ.get(STATS_PATH_ENV))
        register_collector(self.stats)
        self._guard: Callable[[ASGIApp], ASGIApp] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        method = scope["method"]
        if method in ("GET", "HEAD") and path in (STATS_PATH, CONFIG_PATH):
            endpoint = self._stats_endpoint if path == STATS_PATH else self._config_endpoint
            await self._guarded(scope, endpoint)(scope, receive, send)
        elif method == "POST" and "json" in Headers(scope=scope).get("content-type", ""):
            await self._post(scope, receive, send, path)
        else:
            await self.app(scope, receive, send)

    # ---- vLLM's CORS and API-key behaviour for the responses made here ------------------------------------------

    def _guarded(self, scope: Scope, endpoint: ASGIApp) -> ASGIApp:
        if self._guard is None:
            self._guard = _vllm_guard(scope)
        return self._guard(endpoint)

    # ---- endpoints ----------------------------------------------------------------------------------------------

    async def _stats_endpoint(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            payload = self.stats.read()
        except ValueError as e:
            payload, problem = None, f"the compaction stats file is unreadable: {e}"
        else:
            problem = "no compaction stats yet: the engine has not written its first stats file"
        if payload is None:
            response = JSONResponse(error_body(problem, None, 503), status_code=503)
        else:
            response = JSONResponse(payload)
        await response(scope, receive, send)

    async def _config_endpoint(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = {"config": self.config.model_dump(), "per_request": per_request_help(self.config),
                "head_budgets": describe_head_budgets(self.config.head_budget_file)}
        await JSONResponse(body)(scope, receive, send)

    # ---- requests that carry a body -----------------------------------------------------------------------------

    async def _post(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        body = await _read_body(receive)
        request = _json_object(body)
        problem = self._override_problem(request)
        if problem is not None:
            response = JSONResponse(error_body(str(problem), problem.param, 400), status_code=400)
            await self._guarded(scope, response)(scope, _replay(body, receive), send)
            return
        shape = ResponseShape.of(request, USAGE_PATHS[path]) if request and path in USAGE_PATHS else None
        if shape is not None:
            send = UsageRewriter(send, lambda response_id: final_usage(self.stats, response_id, shape))
        await self.app(scope, _replay(body, receive), send)

    def _override_problem(self, request: dict | None) -> RequestOverrideError | None:
        """The one validation path (request_config), on the raw JSON: a JSON `true` is still a boolean here, where
        vLLM's request model would turn it into 1 before the engine's admission hook sees it."""
        if not request or request.get("vllm_xargs") is None:
            return None
        try:
            request_config(self.config, request["vllm_xargs"])
        except RequestOverrideError as e:
            return e
        return None


def _vllm_guard(scope: Scope) -> Callable[[ASGIApp], ASGIApp]:
    """Wrap an endpoint in vLLM's CORS and API-key middlewares, configured as vLLM configures its own."""
    from vllm import envs
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    args = scope["app"].state.args
    tokens = [key for key in (args.api_key or [envs.VLLM_API_KEY]) if key]

    def guard(endpoint: ASGIApp) -> ASGIApp:
        inner = AuthenticationMiddleware(endpoint, tokens=tokens) if tokens else endpoint
        return CORSMiddleware(
            inner,
            allow_origins=args.allowed_origins,
            allow_credentials=args.allow_credentials,
            allow_methods=args.allowed_methods,
            allow_headers=args.allowed_headers,
        )

    return guard


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # disconnected before the body was complete
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hands the body read here to the app once, then the client's own messages (disconnects) as they come."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _json_object(body: bytes) -> dict | None:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None  # vLLM answers malformed JSON itself
    return value if isinstance(value, dict) else None


class UsageRewriter:
    """A `send` that adds `usage.kv_compaction` to a completion response on its way out.

    JSON responses (200) are held until complete, then re-sent with the field and a corrected content-length.
    Event streams pass through; the final usage chunk (empty `choices`, non-null `usage`) gets the field.
    """

    def __init__(self, send: Send, lookup: Callable[[str], Awaitable[KVUsage | None]]) -> None:
        self.send = send
        self.lookup = lookup
        self.mode = "pass"
        self.start: Message | None = None
        self.held: list[bytes] = []
        self.pending = b""  # an incomplete server-sent event

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            content_type = Headers(raw=message.get("headers", [])).get("content-type", "")
            if message["status"] == 200 and content_type.startswith("application/json"):
                self.mode, self.start = "json", message
                return
            self.mode = "sse" if content_type.startswith("text/event-stream") else "pass"
            await self.send(message)
        elif message["type"] == "http.response.body" and self.mode == "json":
            await self._json_body(message)
        elif message["type"] == "http.response.body" and self.mode == "sse":
            await self._sse_body(message)
        else:
            await self.send(message)

    async def _json_body(self, message: Message) -> None:
        self.held.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = await self._with_usage(b"".join(self.held))
        headers = [(k, v) for k, v in self.start["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def _sse_body(self, message: Message) -> None:
        data = self.pending + message.get("body", b"")
        *events, self.pending = data.split(b"\n\n")
        out = [await self._event_with_usage(event) + b"\n\n" for event in events]
        more = message.get("more_body", False)
        if not more and self.pending:
            out.append(self.pending)
            self.pending = b""
        if out or not more:
            await self.send({"type": "http.response.body", "body": b"".join(out), "more_body": more})

    async def _event_with_usage(self, event: bytes) -> bytes:
        if not event.startswith(b"data: {") or b'"usage"' not in event:
            return event
        chunk = _json_object(event[len(b"data: ") :])
        if chunk is None or chunk.get("choices") or not isinstance(chunk.get("usage"), dict):
            return event  # not the final usage chunk
        return b"data: " + await self._with_usage(event[len(b"data: ") :])

    async def _with_usage(self, body: bytes) -> bytes:
        response = _json_object(body)
        if response is None or not isinstance(response.get("usage"), dict) or "id" not in response:
            return body
        usage = await self.lookup(str(response["id"]))
        if usage is None:
            return body
        response["usage"]["kv_compaction"] = usage
        return json.dumps(response, separators=(",", ":")).encode()
