"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over the generation engine.

Each request takes one of `max_concurrency` engines for its whole run, and so has a KV cache of its own; the others
wait their turn. A streaming client that disconnects sets a flag that its run checks after every token,
so its slot frees at once. Errors use OpenAI's body (`{"error": {"message", "type", "param", "code"}}`) and a 4xx
status; bad input never becomes a 500.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gptlab.api import LLM
from gptlab.errors import GptlabError
from gptlab.generate import Engine, SamplingParams, TextStream

PLAYGROUND = Path(__file__).with_name("playground.html")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # unknown fields are ignored, as OpenAI does

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Request):
    prompt: str | list[str]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Server:
    """The model, its tokenizer and the admission of requests; the FastAPI app is built around one."""

    def __init__(self, llm: LLM, model_name: str, max_concurrency: int = 1, max_prompt_chars: int = 100_000) -> None:
        self.llm = llm
        self.model_name = model_name
        # One engine per slot: a request takes one for its whole run, so no two runs share an engine's cached
        # state (on a GPU an engine keeps its CUDA-graph KV cache between calls).
        self.engines: queue.Queue[Engine] = queue.Queue()
        for _ in range(max_concurrency):
            self.engines.put(Engine(llm.model, llm.tokenizer))
        self.max_prompt_chars = max_prompt_chars
        self.created = int(time.time())
        self.abandoned = 0  # runs stopped early because their client went away

    # -- requests -> prompts -----------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], max_tokens: int) -> list[list[int]]:
        """Token ids of the prompts (a BOS first where the model's tokenizer adds one), after checking each against
        the size limit and the context."""
        out = []
        for p in prompts:
            if len(p) > self.max_prompt_chars:
                raise APIError(400, f"the prompt has {len(p)} characters; this server takes at most "
                                    f"{self.max_prompt_chars}", "prompt", "prompt_too_long")
            out.append(self.check_length(self.llm.engine.encode(p), max_tokens))
        return out

    def check_length(self, ids: list[int], max_tokens: int) -> list[int]:
        ctx = self.llm.engine.context
        n = max(1, len(ids))
        if n + max_tokens > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} in the completion).",
                           "max_tokens", "context_length_exceeded")
        return ids

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        """The conversation through the model's chat template (gptlab's own for a model without one)."""
        if sum(len(m.content) for m in messages) > self.max_prompt_chars:
            raise APIError(400, f"the messages have more than {self.max_prompt_chars} characters", "messages",
                           "prompt_too_long")
        return self.llm.tokenizer.encode_chat([m.model_dump() for m in messages], add_generation_prompt=True)

    # -- generation (runs in a worker thread) ------------------------------------------------------------------
    def generate(self, prompts: Sequence[list[int]], req: _Request, max_tokens: int, stop: list[str],
                 stop_ids: Sequence[int], emit: Callable[[int, str], None], cancelled: threading.Event
                 ) -> list[TextStream]:
        """Generate `req.n` choices for each prompt (choice i*n+j is prompt i's j-th); `emit(choice, piece)` as text
        becomes final. Holds a slot for the whole run; returns each choice's stream (text, tokens, finish reason)."""
        params = SamplingParams(temperature=req.temperature, top_p=req.top_p if req.top_p < 1 else None,
                                seed=req.seed)
        batch = [p for p in prompts for _ in range(req.n)]
        rows = [TextStream(self.llm.tokenizer, stop, stop_ids) for _ in batch]
        engine = self.engines.get()  # waits for a free slot
        try:
            for choice, piece in engine.stream_rows(batch, rows, max_tokens, params):
                if cancelled.is_set():
                    self.abandoned += 1
                    break
                emit(choice, piece)
        finally:
            self.engines.put(engine)
        return rows


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(server: Server, api_key: str | None = None):  # -> fastapi.FastAPI
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="gptlab", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return JSONResponse(APIError(400, "the request body is not valid JSON").body(), status_code=400)
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        return JSONResponse(APIError(400, message, ".".join(loc) or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(GptlabError)
    async def user_error(_: Request, e: GptlabError) -> JSONResponse:
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                err = APIError(401, "Incorrect API key provided.", code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/")
    async def playground() -> FileResponse:
        return FileResponse(PLAYGROUND, media_type="text/html")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "gptlab"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "prompt must not be empty", "prompt")
        max_tokens = req.max_tokens or 16
        ids = server.encode_prompts(prompts, max_tokens)
        return await respond(req, ids, max_tokens, req.stops(), server.llm.tokenizer.stop_ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        tok = server.llm.tokenizer
        ids = server.encode_chat(req.messages)
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, server.llm.engine.context - len(ids))
        server.check_length(ids, max_tokens)
        return await respond(req, [ids], max_tokens, req.stops() + tok.chat_stop_strings, tok.chat_stop_ids,
                             chat=True)

    async def respond(req: _Request, prompts: list[list[int]], max_tokens: int, stop: list[str],
                      stop_ids: Sequence[int], chat: bool):
        prompt_lengths = [max(1, len(p)) for p in prompts]
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        base = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": server.model_name}
        if req.stream:
            return StreamingResponse(stream(req, prompts, max_tokens, stop, stop_ids, chat, base),
                                     media_type="text/event-stream")
        cancelled = threading.Event()
        rows = await asyncio.to_thread(server.generate, prompts, req, max_tokens, stop, stop_ids, lambda *_: None,
                                       cancelled)
        choices = []
        for i, row in enumerate(rows):
            choice: dict[str, Any] = {"index": i, "finish_reason": row.finish_reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": row.text}
            else:
                choice.update(text=row.text, logprobs=None)
            choices.append(choice)
        completion_tokens = sum(len(r.token_ids) for r in rows)
        prompt_tokens = sum(prompt_lengths) * req.n
        return {**base, "choices": choices, "usage": {"prompt_tokens": prompt_tokens,
                                                      "completion_tokens": completion_tokens,
                                                      "total_tokens": prompt_tokens + completion_tokens}}

    async def stream(req: _Request, prompts: list[list[int]], max_tokens: int, stop: list[str],
                     stop_ids: Sequence[int], chat: bool, base: dict[str, Any]) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        base = {**base, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text:
                    delta["content"] = text
                return {**base, "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
            return {**base, "choices": [{"index": index, "text": text or "", "logprobs": None,
                                         "finish_reason": finish}]}

        def work() -> None:
            try:
                rows = server.generate(prompts, req, max_tokens, stop, stop_ids,
                                       lambda i, p: loop.call_soon_threadsafe(queue.put_nowait, ("piece", i, p)),
                                       cancelled)
                loop.call_soon_threadsafe(queue.put_nowait, ("done", rows, None))
            except Exception as e:  # reported in the stream; the connection is already 200
                loop.call_soon_threadsafe(queue.put_nowait, ("error", e, None))

        loop.run_in_executor(None, work)
        try:
            if chat:
                for i in range(len(prompts) * req.n):
                    yield _sse(chunk(i, None, None, role=True))
            while True:
                kind, a, b = await queue.get()
                if kind == "piece":
                    yield _sse(chunk(a, b, None))
                elif kind == "done":
                    for i, row in enumerate(a):
                        yield _sse(chunk(i, None, row.finish_reason))
                    yield _sse("[DONE]")
                    return
                else:
                    yield _sse(APIError(500, f"generation failed: {a}", kind="server_error").body())
                    return
        finally:
            cancelled.set()  # a client that went away frees its slot at the next token

    return app


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_concurrency: int = 1, device: str | None = None, dtype: str | None = None) -> None:
    """Load a checkpoint and serve it until interrupted."""
    import uvicorn

    from gptlab.api import load

    llm = load(checkpoint, device=device, dtype=dtype)
    llm.tokenizer.check_chat_template()  # a template that does not render is a start-up error, not a 400 per request
    server = Server(llm, Path(checkpoint).resolve().name, max_concurrency=max_concurrency)
    uvicorn.run(create_app(server, api_key), host=host, port=port, log_level="info")
