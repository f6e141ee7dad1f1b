"""An OpenAI-compatible HTTP server over any backend: `fanformer serve`.

API: OpenAI's legacy completions (https://platform.openai.com/docs/api-reference/completions)
and models endpoints, server-sent events for `stream: true` as OpenAI sends them
(`data: {chunk}` lines, then `data: [DONE]`), plus llama.cpp's llama-server `/health`,
`/tokenize` and `/detokenize`. Built on FastAPI and uvicorn; the decoding is
runtime/scheduler.py's batching worker. Every error, a malformed body included, is an
HTTP 4xx (503 when the queue is full) with OpenAI's body `{"error": {"message", "type",
"param", "code"}}`; a 500 means a bug.

Defaults for what a request leaves out come from the model's generation_config.json
(temperature, top_p, top_k, repetition_penalty, max_new_tokens), then OpenAI's (16 new
tokens). A request without a seed gets a random one; choice i of a request with seed s is
sampled with seed s + i, so choice i equals `generate(backend, [prompt], config)` with
that seed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import threading
import time
import uuid

from fanformer.errors import FANformerError
from fanformer.runtime.backend import Backend
from fanformer.runtime.generation import GenerationConfig
from fanformer.runtime.scheduler import Event, Job, QueueFull, Scheduler, Sequence

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException
except ImportError as err:  # the `serve` extra
    raise FANformerError(f"the server needs FastAPI and uvicorn ({err}); pip install 'fanformer[serve]'") from None

log = logging.getLogger(__name__)

OPENAI_DEFAULT_MAX_TOKENS = 16  # the completions API's own default
MAX_N = 16  # choices per prompt
MAX_LOGPROBS = 5  # as OpenAI
MAX_STOP = 4  # stop strings, as OpenAI
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


class APIError(Exception):
    """A request the server refuses: HTTP `status` with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body()}, self.status)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


# --- Request bodies ----------------------------------------------------------------------

class CompletionRequest(BaseModel):
    """POST /v1/completions. Fields OpenAI has that this server does not implement are
    refused when set to anything but their neutral value; `top_k` and
    `repetition_penalty` are extensions (llama-server and vLLM take them too)."""

    model_config = ConfigDict(extra="allow")

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    stream: bool = False
    stream_options: dict | None = None
    best_of: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict | None = None
    suffix: str | None = None
    user: str | None = None

    def unsupported(self) -> str | None:
        """The first field set to something this server does not do, or None."""
        neutral = {"best_of": (None, 1), "frequency_penalty": (None, 0), "presence_penalty": (None, 0),
                   "logit_bias": (None, {}), "suffix": (None,)}
        return next((name for name, values in neutral.items() if getattr(self, name) not in values), None)


class TokenizeRequest(BaseModel):
    content: str
    add_special: bool = False  # accepted for llama-server's clients: this tokenizer adds no specials
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    tokens: list[int]


# --- The app -----------------------------------------------------------------------------

class Server:
    """The app over one backend: `app` is the ASGI application, `scheduler` its worker."""

    def __init__(self, backend: Backend, model_name: str, max_batch: int = 16, max_queue: int = 64):
        self.backend, self.model_name = backend, model_name
        self.defaults = backend.generation_defaults or {}
        self.scheduler = Scheduler(backend, max_batch=max_batch, max_queue=max_queue)
        self.created = int(time.time())
        self.app = self._build()

    def close(self) -> None:
        self.scheduler.close()

    def _build(self) -> FastAPI:
        app = FastAPI(title="fanformer", summary=f"OpenAI-compatible completions for {self.model_name}")

        @app.exception_handler(APIError)
        async def api_error(request, err: APIError):
            return err.response()

        @app.exception_handler(RequestValidationError)
        async def invalid(request, err: RequestValidationError):
            first = err.errors()[0]
            where = [str(p) for p in first.get("loc", ()) if p != "body"]
            if first.get("type") == "json_invalid":
                return error_response(400, f"the request body is not valid JSON: {first.get('msg')}")
            return error_response(400, f"{'.'.join(where) or 'body'}: {first.get('msg')}",
                                  param=where[0] if where else None)

        @app.exception_handler(FANformerError)
        async def user_error(request, err: FANformerError):
            return error_response(400, str(err))

        @app.exception_handler(Exception)
        async def bug(request, err: Exception):  # never bad input: that is a 4xx above
            log.error("request failed", exc_info=err)
            return error_response(500, f"internal error: {type(err).__name__}: {err}", kind="server_error")

        @app.exception_handler(HTTPException)
        async def http_error(request, err: HTTPException):
            kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
            return error_response(err.status_code, str(err.detail), kind=kind)

        @app.get("/health")
        async def health():
            return {"status": "ok", **self.scheduler.load()}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{name:path}")
        async def model(name: str):
            self._check_model(name)
            return self._model_card()

        @app.post("/tokenize")
        async def tokenize(body: TokenizeRequest):
            ids = self._encode(body.content, "content")
            if body.with_pieces:
                return {"tokens": [{"id": i, "piece": self.backend.tokenizer.decode([i])} for i in ids]}
            return {"tokens": ids}

        @app.post("/detokenize")
        async def detokenize(body: DetokenizeRequest):
            self._check_ids(body.tokens, "tokens")
            return {"content": self.backend.tokenizer.decode(body.tokens, skip_special_tokens=False)}

        @app.post("/v1/chat/completions")
        async def chat():
            raise APIError(400, f"{self.model_name} has no chat template (it is a base model, trained on plain "
                           "text): use /v1/completions with a prompt to continue", code="chat_not_supported")

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request):
            return await self._complete(body, request)

        return app

    # --- Requests ------------------------------------------------------------------------

    def _model_card(self) -> dict:
        info = self.backend.info
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "fanformer",
                "format": info.format, "max_seq_len": info.max_seq_len, "dtype": info.dtype}

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist: this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def _encode(self, text: str, param: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escaped in the JSON ("\\udcff"): no text to tokenize
            raise APIError(400, f"{param}: the text is not valid Unicode (a lone surrogate)", param=param) from None
        return self.backend.tokenizer.encode(text).ids

    def _check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.backend.info.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise APIError(400, f"{param}: token ids must lie in [0, {vocab})", param=param)

    def _prompts(self, prompt) -> list[list[int]]:
        """Token ids of each prompt: a string, a list of strings, token ids or lists of them."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt: give at least one prompt", param="prompt")
        prompts = []
        for p in prompt:
            ids = self._encode(p, "prompt") if isinstance(p, str) else list(p)
            self._check_ids(ids, "prompt")
            if not ids:
                raise APIError(400, "prompt: an empty prompt has nothing to continue", param="prompt")
            prompts.append(ids)
        return prompts

    def _config(self, body: CompletionRequest, prompt_len: int, seed: int) -> GenerationConfig:
        """The request's sampling, then generation_config.json's, then GenerationConfig's."""
        d = self.defaults
        temperature = body.temperature
        if temperature is None:
            temperature = 0.0 if d.get("do_sample") is False else d.get("temperature")
        context = self.backend.info.max_seq_len
        max_tokens = body.max_tokens
        if max_tokens is None:  # a default never asks for more than the context leaves
            max_tokens = min(d.get("max_new_tokens") or OPENAI_DEFAULT_MAX_TOKENS, max(1, context - prompt_len))
        if prompt_len >= context:
            raise APIError(400, f"the prompt is {prompt_len} tokens, but the model's context is {context}: "
                           "shorten it", param="prompt", code="context_length_exceeded")
        if prompt_len + max_tokens > context:
            raise APIError(400, f"this model's context is {context} tokens; the prompt ({prompt_len}) and "
                           f"max_tokens ({max_tokens}) ask for {prompt_len + max_tokens}: ask for at most "
                           f"{context - prompt_len} tokens", param="max_tokens", code="context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP or any(not s for s in stop):
            raise APIError(400, f"stop: at most {MAX_STOP} non-empty strings", param="stop")
        chosen = dict(max_new_tokens=max_tokens, temperature=temperature,
                      top_p=body.top_p if body.top_p is not None else d.get("top_p"),
                      top_k=body.top_k if body.top_k is not None else d.get("top_k"),
                      repetition_penalty=body.repetition_penalty if body.repetition_penalty is not None
                      else d.get("repetition_penalty"), stop=tuple(stop), seed=seed)
        try:
            return GenerationConfig(**{k: v for k, v in chosen.items() if v is not None})
        except FANformerError as err:  # a default from generation_config.json out of range
            raise APIError(400, str(err)) from None

    async def _complete(self, body: CompletionRequest, request: Request):
        self._check_model(body.model)
        unsupported = body.unsupported()
        if unsupported:
            raise APIError(400, f"{unsupported} is not supported by this server; leave it out", param=unsupported)
        count = 1 if isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int)) \
            else len(body.prompt)
        if count * body.n > self.scheduler.max_queue:  # before tokenizing what could never run
            raise APIError(400, f"{count} prompts x n={body.n} is more sequences than the queue holds "
                           f"({self.scheduler.max_queue}); send fewer at a time", param="n")
        prompts = self._prompts(body.prompt)
        base_seed = body.seed if body.seed is not None else secrets.randbelow(2 ** 62)
        sequences = []
        for p, ids in enumerate(prompts):
            for i in range(body.n):
                config = self._config(body, len(ids), base_seed + i)
                sequences.append(Sequence(p * body.n + i, ids, config, self.backend.info.vocab_size,
                                          logprobs=body.logprobs, prompt_logprobs=body.echo and body.logprobs is not None))
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(batch: list[Event]) -> None:  # called in the scheduler's thread, once a step
            try:
                loop.call_soon_threadsafe(events.put_nowait, batch)
            except RuntimeError:  # the loop is closed: the server is stopping
                pass

        job = Job(sequences, emit)
        try:
            self.scheduler.submit(job)
        except QueueFull as err:
            raise APIError(503, str(err), code="server_busy", kind="server_error") from None
        response = Response(self, body, sequences)
        if body.stream:
            return StreamingResponse(self._stream(job, events, response), media_type="text/event-stream")
        return await self._collect(job, events, response, request)

    async def _collect(self, job: Job, events: asyncio.Queue, response: "Response", request: Request):
        """Wait for every choice, dropping the job if the client disconnects meanwhile."""
        disconnect = asyncio.ensure_future(_disconnected(request))
        try:
            while not response.done():
                next_batch = asyncio.ensure_future(events.get())
                await asyncio.wait([next_batch, disconnect], return_when=asyncio.FIRST_COMPLETED)
                if not next_batch.done():
                    next_batch.cancel()
                    self.scheduler.cancel(job)
                    return error_response(499, "the client closed the request")
                for event in next_batch.result():
                    response.add(event)
        finally:
            disconnect.cancel()
        if response.error:
            raise response.error
        return response.body()

    async def _stream(self, job: Job, events: asyncio.Queue, response: "Response"):
        """Server-sent events; a client that goes away ends the generator, which drops the job.
        Steps that queued up while the client read are sent as one chunk per choice."""
        try:
            if response.echo:
                for seq in response.sequences:
                    yield _sse(response.chunk(seq.index, response.prompt_text(seq), response.prompt_logprobs(seq)))
            while not response.done():
                batch = await events.get()
                while not events.empty():
                    batch += events.get_nowait()
                merged: dict[int, Event] = {}
                for event in batch:
                    response.add(event)
                    if event.error:
                        break
                    into = merged.setdefault(event.index, Event(event.index))
                    into.text += event.text
                    into.tokens += event.tokens
                    into.finish = event.finish
                if response.error:
                    yield _sse({"error": response.error.body()})
                    break
                for event in merged.values():
                    yield _sse(response.chunk(event.index, event.text, response.logprobs_of(event.index, event.tokens),
                                              FINISH.get(event.finish)))
            if (response.stream_options or {}).get("include_usage"):
                yield _sse({**response.header(), "choices": [], "usage": response.usage()})
            yield "data: [DONE]\n\n"
        finally:
            self.scheduler.cancel(job)  # a no-op once every sequence has finished


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone: after the body, ASGI's receive() waits for that."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


class Response:
    """The completion being assembled from the scheduler's events."""

    def __init__(self, server: Server, body: CompletionRequest, sequences: list[Sequence]):
        self.tokenizer = server.backend.tokenizer
        self.model, self.sequences = server.model_name, sequences
        self.echo, self.want_logprobs, self.stream_options = body.echo, body.logprobs is not None, body.stream_options
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.texts = {s.index: "" for s in sequences}
        self.tokens = {s.index: [] for s in sequences}
        self.finish: dict[int, str] = {}
        self.error: APIError | None = None
        self.offsets = {s.index: len(self.prompt_text(s)) if self.echo else 0 for s in sequences}

    def done(self) -> bool:
        return self.error is not None or len(self.finish) == len(self.sequences)

    def add(self, event: Event) -> None:
        if event.error:  # a FANformerError is about the request; anything else is a bug
            self.error = APIError(500 if event.internal else 400, event.error,
                                  kind="server_error" if event.internal else "invalid_request_error")
            return
        self.texts[event.index] += event.text
        self.tokens[event.index] += event.tokens
        if event.finish:
            self.finish[event.index] = FINISH[event.finish]

    def prompt_text(self, seq: Sequence) -> str:
        return self.tokenizer.decode(seq.prompt_ids, skip_special_tokens=True)

    def header(self) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}

    def chunk(self, index: int, text: str, logprobs: dict | None, finish: str | None = None) -> dict:
        return {**self.header(), "choices": [{"text": text, "index": index, "logprobs": logprobs,
                                              "finish_reason": finish}]}

    def _logprobs(self, tokens: list, start: int) -> dict:
        """OpenAI's logprobs object over `tokens` (TokenInfo, or None for the first prompt
        token, which has no prediction), text offsets counted from `start`."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = start
        for entry, token_id in tokens:
            piece = self.tokenizer.decode([token_id], skip_special_tokens=False)
            out["tokens"].append(piece)
            out["text_offset"].append(offset)
            offset += len(piece)
            out["token_logprobs"].append(None if entry is None else entry.logprob)
            out["top_logprobs"].append(None if entry is None else
                                       {self.tokenizer.decode([i], skip_special_tokens=False): lp for i, lp in entry.top})
        return out

    def prompt_logprobs(self, seq: Sequence) -> dict | None:
        if not self.want_logprobs:
            return None
        return self._logprobs(list(zip(seq.prompt_tokens, seq.prompt_ids)), 0)

    def logprobs_of(self, index: int, tokens: list) -> dict | None:
        """Logprobs of tokens just streamed (offsets continue from those sent before)."""
        if not self.want_logprobs:
            return None
        out = self._logprobs([(t, t.id) for t in tokens], self.offsets[index])
        self.offsets[index] += sum(len(p) for p in out["tokens"])
        return out

    def body(self) -> dict:
        choices = []
        for seq in self.sequences:
            text = self.texts[seq.index]
            logprobs = None
            if self.want_logprobs:
                prompt = self.prompt_text(seq) if self.echo else ""
                logprobs = self._logprobs([(t, t.id) for t in self.tokens[seq.index]], len(prompt))
                if self.echo:
                    head = self.prompt_logprobs(seq)
                    logprobs = {key: head[key] + logprobs[key] for key in logprobs}
            choices.append({"text": (self.prompt_text(seq) if self.echo else "") + text, "index": seq.index,
                            "logprobs": logprobs, "finish_reason": self.finish[seq.index]})
        return {**self.header(), "choices": choices, "usage": self.usage()}

    def usage(self) -> dict:
        prompt = sum(len(ids) for ids in {id(s.prompt_ids): s.prompt_ids for s in self.sequences}.values())
        completion = sum(len(s.out.ids) for s in self.sequences)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# --- Running it --------------------------------------------------------------------------

def serve(backend: Backend, model_name: str, host: str = "127.0.0.1", port: int = 8080, max_batch: int = 16,
          max_queue: int = 64) -> None:
    """Serve until interrupted (Ctrl-C)."""
    listening = _listen(host, port)
    server = Server(backend, model_name, max_batch=max_batch, max_queue=max_queue)
    log.info("serving %s (%s) at http://%s:%d/v1", model_name, backend.info.format, host, listening.getsockname()[1])
    try:
        config = uvicorn.Config(server.app, log_level="info", timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[listening])
    finally:
        server.close()
        listening.close()


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is one clear error, not uvicorn's exit."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listening = socket.socket(family, kind, proto)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind(address)
    except OSError as err:
        raise FANformerError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --port "
                             "or --host") from None
    return listening


class ServerThread:
    """The server on a free loopback port in a background thread, for tests and benchmarks:
    `with ServerThread(backend, "m") as url: ...` (url is http://127.0.0.1:PORT/v1)."""

    def __init__(self, backend: Backend, model_name: str, **options):
        self.server = Server(backend, model_name, **options)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(self.server.app, log_level="warning", timeout_graceful_shutdown=1)
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise FANformerError("the server did not start")
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)
        self.server.close()
        self.socket.close()
