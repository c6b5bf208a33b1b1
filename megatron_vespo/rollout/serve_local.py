"""``megatron-vespo serve-local``: the local engine behind SGLang 0.5.23's HTTP API (the subset RL
rollouts and weight sync use), on aiohttp.

Model steps run in the engine's scheduler thread and blocking control calls (pause, weight loads,
collective receives) in threads of their own, so the event loop keeps answering while a batch runs
and a slow call (a rendezvous) can neither hold up another route nor delay shutdown.
Errors are HTTP 400 ``{"error": {"message": ...}}`` naming what is wrong, as SGLang answers them;
every field of a body is type-checked where the body enters (``_field``), and a body over
``--max-body-mb`` is answered 413 before it is read.
``LocalServer`` runs the same app in a background thread for tests and in-process use.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hmac
import ipaddress
import logging
import signal
import socket
import sys
import threading

import msgspec
from aiohttp import web

from megatron_vespo.rollout import protocol
from megatron_vespo.rollout.local_engine import DEFAULT_GROUP_NAME, LocalEngine
from megatron_vespo.rollout.protocol import INT64_MAX, INT64_MIN, brief

log = logging.getLogger("megatron_vespo.serve_local")

HEALTH_CHECK_TIMEOUT_S = 20.0  # SGLang's HEALTH_CHECK_TIMEOUT
# The largest legitimate body is a /generate batch: 64 prompts of 32k tokens are ~15 MB of JSON.
# Weight updates carry no tensor data over HTTP here (disk: a path; distributed: names and shapes;
# tensor: CUDA-IPC handles, refused on CPU), so one limit serves every route.
DEFAULT_MAX_BODY_MB = 32
DEFAULT_CONNECT_TIMEOUT_S = 30.0  # joining a weight-update group: the trainer's store is up within seconds
SHUTDOWN_GRACE_S = 3.0  # on stop, handlers still running after this are cancelled
# Bodies up to this size are decoded on the event loop (well under a millisecond); larger ones,
# and the validation of what they hold, in a thread.
_INLINE_BODY_BYTES = 1 << 18
_ENGINE = web.AppKey("engine", LocalEngine)
_API_KEY = web.AppKey("api_key", object)
_ADDRESS = web.AppKey("address", dict)

# the per-request fields of GenerateReqInput this server implements
_GENERATE_FIELDS = ("sampling_params", "rid", "return_logprob", "logprob_start_len", "return_routed_experts",
                    "routed_experts_start_len", "return_text_in_logprobs", "top_logprobs_num", "token_ids_logprob")


class BadRequest(ValueError):
    pass


class BodyTooLarge(Exception):
    pass


def _json(obj, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), status=status, content_type="application/json")


def _error(message: str, status: int = 400) -> web.Response:
    return _json({"error": {"message": message}}, status)


def _result(success: bool, message: str, **extra) -> web.Response:
    return _json({"success": success, "message": message, **extra}, 200 if success else 400)


def _too_large(limit: int, size: int | None = None) -> str:
    given = f" (this one is {size} bytes)" if size is not None else ""
    return (f"request body too large{given}: this server accepts at most {limit} bytes "
            f"({limit / 2**20:g} MiB; serve-local --max-body-mb)")


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The body, refused (BodyTooLarge) past ``limit`` bytes: at once when Content-Length says so,
    else as soon as a chunked body passes it, so nothing larger is ever held."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(_too_large(limit, request.content_length))
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(_too_large(limit))
        chunks.append(chunk)
    return b"".join(chunks)


def decode_body(raw: bytes) -> dict:
    """A request body -> its JSON object; anything else is a BadRequest naming the problem."""
    if not raw or raw.isspace():
        return {}
    try:
        body = msgspec.json.decode(raw)
    except RecursionError:
        raise BadRequest("request body is not accepted: its JSON is nested too deeply") from None
    except msgspec.DecodeError as err:  # includes ValidationError: a number out of a double's range
        raise BadRequest(f"request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


async def _in_thread(func, *args, **kwargs):
    """``func(*args, **kwargs)`` in a daemon thread of its own. Not the loop's default executor:
    its few workers (6 on 2 cores) would be taken by a handful of slow calls (a rendezvous) from
    every other route, and the interpreter joins its threads at exit, so a stuck one would keep a
    stopped server alive."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error):
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    def run():
        result, error = None, None
        try:
            result = func(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - handed to the awaiting handler
            error = err
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop has closed: nobody waits any more
            pass

    threading.Thread(target=run, name=f"serve-local-{getattr(func, '__name__', 'call')}", daemon=True).start()
    return await future


async def _off_loop_if_large(raw: bytes, func):
    """``func()`` inline for a small body, in a thread for a large one (decoding and validating
    millions of tokens takes long enough to hold up /health)."""
    if len(raw) <= _INLINE_BODY_BYTES:
        return func()
    return await _in_thread(func)


# what each kind of field must be, and the words that say so
_KINDS = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool) and INT64_MIN <= v <= INT64_MAX,
            "a 64-bit integer"),
    "list[str]": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "list[list[int]]": (lambda v: isinstance(v, list) and all(
        isinstance(x, list) and all(isinstance(d, int) and not isinstance(d, bool) and INT64_MIN <= d <= INT64_MAX
                                    for d in x) for x in v), "a list of lists of 64-bit integers"),
}


def _field(body: dict, name: str, kind: str, route: str, default=None, required: bool = False):
    """``body[name]`` checked to be of ``kind`` (SGLang's type of that field); null or absent gives
    ``default``, or a BadRequest naming the field when it is required."""
    value = body.get(name)
    check, words = _KINDS[kind]
    if value is None:
        if required:
            raise BadRequest(f"{route} needs {name} ({words})")
        return default
    if not check(value):
        raise BadRequest(f"{route}: {name} must be {words}, got {brief(value)}")
    return value


def _ip(text: str):
    """An IP address; an IPv4-mapped IPv6 one (a dual-stack socket's peer) as the IPv4 it is."""
    address = ipaddress.ip_address(text)
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_generate_body(body: dict) -> tuple[list[dict], bool]:
    """GenerateReqInput (single or batch) -> keyword arguments of LocalEngine.prepare per request,
    and whether it was a batch. Raises BadRequest naming the offending field."""
    if _field(body, "stream", "bool", "generate", default=False):
        raise BadRequest("stream=true is not supported by the local engine; send stream=false")
    if body.get("input_embeds") is not None:
        raise BadRequest("input_embeds is not supported by the local engine; send input_ids or text")
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise BadRequest("exactly one of input_ids and text must be given")
    if input_ids is not None:
        if not isinstance(input_ids, list) or not input_ids:
            raise BadRequest("input_ids must be a non-empty list of token ids (or a list of such lists)")
        is_batch = isinstance(input_ids[0], list)
        inputs = [{"input_ids": x} for x in input_ids] if is_batch else [{"input_ids": input_ids}]
    else:
        is_batch = isinstance(text, list)
        inputs = [{"text": x} for x in text] if is_batch else [{"text": text}]
    if is_batch and not inputs:
        raise BadRequest("an empty batch")
    n = len(inputs)

    def per_item(name):
        value = body.get(name)
        if is_batch and isinstance(value, list) and name != "token_ids_logprob":
            if len(value) != n:
                raise BadRequest(f"{name} has {len(value)} entries for a batch of {n} requests")
            return value
        if name == "rid" and is_batch and value is not None:
            raise BadRequest("rid must be a list with one id per request in a batch")
        return [value] * n

    columns = {name: per_item(name) for name in _GENERATE_FIELDS}
    requests = []
    for i, item in enumerate(inputs):
        for name in _GENERATE_FIELDS:
            value = columns[name][i]
            if value is None:
                continue
            if name == "top_logprobs_num":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise BadRequest(f"top_logprobs_num must be an integer, got {brief(value)}")
                if value:
                    raise BadRequest("top_logprobs_num > 0 is not supported by the local engine")
            elif name == "token_ids_logprob":
                raise BadRequest("token_ids_logprob is not supported by the local engine")
            else:
                item[name] = value
        if "sampling_params" in item and not isinstance(item["sampling_params"], dict):
            raise BadRequest(f"sampling_params must be a JSON object, got {item['sampling_params']!r}")
        requests.append(item)
    return requests, is_batch


def create_app(engine: LocalEngine, api_key: str | None = None, *, max_body_mb: float = DEFAULT_MAX_BODY_MB,
               connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
               allow_master_addresses: tuple[str, ...] = ()) -> web.Application:
    """The app. ``max_body_mb``: larger bodies are answered 413. ``connect_timeout_s``: how long
    /init_weights_update_group tries to join. ``allow_master_addresses``: IP addresses accepted as
    master_address besides the caller's own (see ``master_address_for``)."""
    max_body = int(max_body_mb * 2**20)
    if max_body < 1 or connect_timeout_s <= 0:
        raise ValueError(f"max_body_mb and connect_timeout_s must be positive, got {max_body_mb}, {connect_timeout_s}")
    extra_masters = frozenset(_ip(a) for a in allow_master_addresses)

    @web.middleware
    async def guard(request: web.Request, handler):
        if api_key and request.path != "/health":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error("Unauthorized: this server needs 'Authorization: Bearer <api key>'", 401)
        try:
            if request.content_length is not None and request.content_length > max_body:
                raise BodyTooLarge(_too_large(max_body, request.content_length))  # every route, read or not
            return await handler(request)
        except web.HTTPException:
            raise
        except BodyTooLarge as err:
            response = _error(str(err), 413)
            # no keep-alive: aiohttp discards what is left of the body (for at most its lingering
            # time, 10 s, so a client that sends it all still reads this answer), then closes
            response.force_close()
            return response
        except ValueError as err:  # BadRequest and the engine's validation errors
            return _error(str(err))
        except Exception as err:
            log.exception("%s %s failed", request.method, request.path)
            return _error(f"{type(err).__name__}: {err}", 500)

    app = web.Application(middlewares=[guard], client_max_size=max_body)
    app[_ENGINE] = engine
    app[_API_KEY] = api_key
    app[_ADDRESS] = {}

    async def body_of(request) -> dict:
        raw = await _read_body(request, max_body)
        return await _off_loop_if_large(raw, lambda: decode_body(raw))

    async def master_address_for(request, address: str) -> str:
        """The IP to join the weight-update group at: ``address`` (as resolved) when it is the
        address this request came from, or, for a caller on this machine, a loopback address, or one
        of ``allow_master_addresses``. The trainer's rank 0 makes this call and hosts the group's
        store, and it names the address it reaches the server from (trainer._reachable_address: the
        source address of its route to the server, which is what the server sees as the peer), so
        the rule holds across hosts; and no caller can point the server at a third host."""
        if not request.remote:
            raise BadRequest("init_weights_update_group: the caller's address is unknown, so master_address "
                             "cannot be checked")
        peer = _ip(request.remote)
        try:
            candidates = [_ip(address)]
        except ValueError:  # a host name: resolved here, and the server connects to the address checked
            try:
                infos = await asyncio.wait_for(_in_thread(socket.getaddrinfo, address, None, type=socket.SOCK_STREAM),
                                               connect_timeout_s)
            except (OSError, UnicodeError, asyncio.TimeoutError) as err:
                raise BadRequest(f"init_weights_update_group: master_address {address!r} does not resolve: "
                                 f"{type(err).__name__}: {err}") from None
            candidates = list(dict.fromkeys(_ip(info[4][0].split("%")[0]) for info in infos))
        for ip in candidates:
            if ip == peer or ip in extra_masters or (peer.is_loopback and ip.is_loopback):
                return str(ip)
        raise BadRequest(
            f"init_weights_update_group: master_address {address!r} ({', '.join(map(str, candidates))}) is not the "
            f"address this request came from ({peer}): the trainer process that calls this hosts the group; "
            f"name its address as this server sees it, or start the server with --allow-master-address")

    async def generate(request):
        raw = await _read_body(request, max_body)

        def prepare():  # all validated before any is queued
            requests, is_batch = parse_generate_body(decode_body(raw))
            return [engine.prepare(**r) for r in requests], is_batch

        prepared, is_batch = await _off_loop_if_large(raw, prepare)
        futures = engine.enqueue(prepared)
        try:
            answers = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except asyncio.CancelledError:  # the client went away: free the engine
            for r in prepared:
                engine.abort(r.rid, message="client disconnected")
            raise
        return _json(answers if is_batch else answers[0])

    async def health(request):
        return web.Response(status=200)

    async def health_generate(request):
        if engine.inflight():  # busy serving: progress is the health signal, as in SGLang
            return web.Response(status=200)
        future = engine.submit(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0.0},
                               rid=f"HEALTH_CHECK_{id(request)}_{request.remote}")
        try:
            answer = await asyncio.wait_for(asyncio.wrap_future(future), HEALTH_CHECK_TIMEOUT_S)
        except asyncio.TimeoutError:
            return web.Response(status=503)
        ok = answer["meta_info"]["finish_reason"]["type"] != "abort"
        return web.Response(status=200 if ok else 503)

    async def model_info(request):
        return _json(engine.model_info())

    async def server_info(request):
        info = engine.server_info()
        info.update(app[_ADDRESS])
        info["internal_states"] = [{"inflight_requests": len(engine.inflight()), "paused": engine.paused,
                                    "num_forwards": engine.num_forwards}]
        return _json(info)

    async def loads(request):
        # SGLang 0.5.23's /v1/loads (one entry per data-parallel rank), with the counts it reports
        return _json({"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                      "version": protocol.SGLANG_VERSION, "loads": [{"dp_rank": 0, **engine.loads()}]})

    async def flush_cache(request):
        if engine.flush_cache():
            return web.Response(text="Cache flushed.\nPlease check backend logs for more details. (When there are "
                                     "running or waiting requests, the operation will not be performed.)\n")
        return web.Response(status=400, text="Cache not flushed because there are pending requests.\n")

    async def pause_generation(request):
        mode = _field(await body_of(request), "mode", "str", "pause_generation", default="abort")
        await _in_thread(engine.pause, mode)
        return _json({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(request):
        _field(await body_of(request), "torch_empty_cache", "bool", "continue_generation")
        engine.resume()
        return _json({"message": "Generation continued successfully.", "status": "ok"})

    async def abort_request(request):
        body = await body_of(request)
        rid = _field(body, "rid", "str", "abort_request", default="")
        abort_all = _field(body, "abort_all", "bool", "abort_request", default=False)
        engine.abort(rid or None, abort_all=abort_all)
        return web.Response(status=200)

    async def begin_weight_update(request):
        await body_of(request)
        return _result(*engine.begin_weight_update())

    async def end_weight_update(request):
        await body_of(request)
        return _result(*engine.end_weight_update())

    async def update_weights_from_disk(request):
        body, route = await body_of(request), "update_weights_from_disk"
        model_path = _field(body, "model_path", "str", route, required=True)
        weight_version = _field(body, "weight_version", "str", route)
        abort_all = _field(body, "abort_all_requests", "bool", route, default=False)
        _field(body, "load_format", "str", route)
        _field(body, "flush_cache", "bool", route)
        # the engine refuses anything but a local model directory before loading (no hub look-ups)
        answer = await _in_thread(engine.update_from_disk, model_path, weight_version, abort_all)
        return _result(answer["success"], answer["message"], num_paused_requests=answer["num_paused_requests"])

    async def init_weights_update_group(request):
        body, route = await body_of(request), "init_weights_update_group"
        address = _field(body, "master_address", "str", route, required=True)
        port = _field(body, "master_port", "int", route, required=True)
        rank_offset = _field(body, "rank_offset", "int", route, required=True)
        world_size = _field(body, "world_size", "int", route, required=True)
        group_name = _field(body, "group_name", "str", route, default=DEFAULT_GROUP_NAME)
        backend = _field(body, "backend", "str", route, default="nccl")
        ip = await master_address_for(request, address)
        # blocks in the rendezvous until the trainer (rank 0) joins, at most about 2 x connect_timeout_s
        return _result(*await _in_thread(engine.init_weights_update_group, ip, port, rank_offset, world_size,
                                         group_name, backend, connect_timeout_s=connect_timeout_s))

    async def update_weights_from_distributed(request):
        body, route = await body_of(request), "update_weights_from_distributed"
        names = _field(body, "names", "list[str]", route, required=True)
        dtypes = _field(body, "dtypes", "list[str]", route, required=True)
        shapes = _field(body, "shapes", "list[list[int]]", route, required=True)
        for key in ("flush_cache", "torch_empty_cache"):
            _field(body, key, "bool", route)
        _field(body, "selector", "str", route)
        return _result(*await _in_thread(
            engine.update_weights_from_distributed, names, dtypes, shapes,
            group_name=_field(body, "group_name", "str", route, default=DEFAULT_GROUP_NAME),
            weight_version=_field(body, "weight_version", "str", route),
            abort_all_requests=_field(body, "abort_all_requests", "bool", route, default=False),
            load_format=_field(body, "load_format", "str", route)))

    async def destroy_weights_update_group(request):
        body = await body_of(request)
        return _result(*engine.destroy_weights_update_group(
            _field(body, "group_name", "str", "destroy_weights_update_group", default=DEFAULT_GROUP_NAME)))

    async def update_weights_from_tensor(request):
        body, route = await body_of(request), "update_weights_from_tensor"
        _field(body, "serialized_named_tensors", "list[str]", route, required=True)
        for key, kind in (("load_format", "str"), ("flush_cache", "bool"), ("abort_all_requests", "bool"),
                          ("weight_version", "str")):
            _field(body, key, kind, route)
        if not engine.weight_update_session_open:
            return _result(False, "update_weights_from_tensor must run between begin_weight_update() and "
                                  "end_weight_update()")
        return _result(False, "update_weights_from_tensor carries CUDA IPC handles and cannot be served on CPU; "
                              "use update_weights_from_distributed (backend gloo) or update_weights_from_disk")

    async def update_weight_version(request):
        body, route = await body_of(request), "update_weight_version"
        new_version = _field(body, "new_version", "str", route, required=True)
        if _field(body, "abort_all_requests", "bool", route, default=True):
            engine.abort(abort_all=True, message="aborted by update_weight_version")
        engine.set_weight_version(new_version)
        return _result(True, f"Weight version updated to {new_version}.")

    routes = [
        ("POST", "/generate", generate), ("PUT", "/generate", generate),
        ("GET", "/health", health), ("GET", "/health_generate", health_generate),
        ("GET", "/model_info", model_info), ("GET", "/get_model_info", model_info),
        ("GET", "/server_info", server_info), ("GET", "/get_server_info", server_info), ("GET", "/v1/loads", loads),
        ("GET", "/flush_cache", flush_cache), ("POST", "/flush_cache", flush_cache),
        ("POST", "/pause_generation", pause_generation), ("POST", "/continue_generation", continue_generation),
        ("POST", "/abort_request", abort_request),
        ("POST", "/begin_weight_update", begin_weight_update), ("POST", "/end_weight_update", end_weight_update),
        ("POST", "/update_weights_from_disk", update_weights_from_disk),
        ("POST", "/init_weights_update_group", init_weights_update_group),
        ("POST", "/update_weights_from_distributed", update_weights_from_distributed),
        ("POST", "/destroy_weights_update_group", destroy_weights_update_group),
        ("POST", "/update_weights_from_tensor", update_weights_from_tensor),
        ("POST", "/update_weight_version", update_weight_version),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    return app


async def _start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its requests.
    # shutdown_timeout: a stopping server cancels the handlers still running after the grace (one
    # waiting on a rendezvous or a broadcast would otherwise hold the stop for 60 s)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    app[_ADDRESS].update({"host": host, "port": bound})
    return runner, bound


class LocalServer:
    """The server in a background thread with its own event loop, for tests and in-process use.

    ``with LocalServer(model_dir, dtype="float32") as server: server.url``. Port 0 binds a free
    port. Pass ``engine=`` to serve an existing LocalEngine (it is then not closed on exit).
    ``app_options`` are create_app's (max_body_mb, connect_timeout_s, allow_master_addresses)."""

    def __init__(self, model_dir: str | None = None, port: int = 0, host: str = "127.0.0.1",
                 api_key: str | None = None, engine: LocalEngine | None = None, app_options: dict | None = None,
                 **engine_kwargs):
        if (model_dir is None) == (engine is None):
            raise ValueError("LocalServer needs exactly one of model_dir and engine")
        self.model_dir, self.host, self.port, self.api_key = model_dir, host, port, api_key
        self._app_options = dict(app_options or {})
        self._engine_kwargs = engine_kwargs
        self._owns_engine = engine is None
        self.engine = engine
        self.url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    def start(self) -> "LocalServer":
        if self.engine is None:
            self.engine = LocalEngine(self.model_dir, **self._engine_kwargs)
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def run():
            asyncio.set_event_loop(self._loop)
            try:
                self._runner, self.port = self._loop.run_until_complete(
                    _start_site(create_app(self.engine, self.api_key, **self._app_options), self.host, self.port))
            except BaseException as err:  # noqa: BLE001 - reported to the starting thread
                failure.append(err)
                started.set()
                return
            started.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="local-engine-http", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._close_engine()
            raise failure[0]
        self.url = f"http://{self.host}:{self.port}"
        log.info("serving %s on %s", self.model_dir or self.engine.model_path, self.url)
        return self

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        self._thread = None
        self._close_engine()

    def _close_engine(self):
        if self._owns_engine and self.engine is not None:
            self.engine.close()
            self.engine = None

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000, help="0 binds a free port (printed when ready)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)")
    parser.add_argument("--max-batch", type=int, default=64, help="most requests decoded together in one batch")
    parser.add_argument("--seed", type=int, default=0, help="seeds requests that carry no sampling_seed")
    parser.add_argument("--weight-version", default="default", help="reported in every answer's meta_info")
    parser.add_argument("--num-threads", type=int, default=1,
                        help="torch intra-op threads. 1 suits the small models this engine serves: with more, "
                             "OpenMP threads stall whenever other processes share the cores; raise it for a "
                             "larger model on an otherwise idle machine")
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB,
                        help="larger request bodies are answered 413 unread (a /generate batch of 64 prompts "
                             "of 32k tokens is about 15 MB)")
    parser.add_argument("--weight-sync-connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT_S,
                        help="seconds /init_weights_update_group tries to reach the trainer's store and the "
                             "other ranks (torch tries twice: a dead address fails after about twice this)")
    parser.add_argument("--allow-master-address", action="append", default=[], type=_ip_argument, metavar="IP",
                        help="also accept this IP as master_address in /init_weights_update_group (by default "
                             "only the caller's own address, and loopback for a caller on this machine); "
                             "repeatable")


def _ip_argument(text: str) -> str:
    try:
        return str(_ip(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.max_body_mb <= 0 or args.weight_sync_connect_timeout <= 0:
        print("serve-local: --max-body-mb and --weight-sync-connect-timeout must be positive", file=sys.stderr)
        return 2
    try:
        engine = LocalEngine(args.model, dtype=args.dtype, max_batch=args.max_batch, seed=args.seed,
                             weight_version=args.weight_version, num_threads=args.num_threads)
    except (FileNotFoundError, ValueError) as err:
        print(f"serve-local: {err}", file=sys.stderr)
        return 2

    async def serve() -> None:
        app = create_app(engine, args.api_key, max_body_mb=args.max_body_mb,
                         connect_timeout_s=args.weight_sync_connect_timeout,
                         allow_master_addresses=tuple(args.allow_master_address))
        runner, port = await _start_site(app, args.host, args.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"serving {args.model} on http://{args.host}:{port}", file=sys.stderr, flush=True)
        try:
            await stop.wait()
            log.info("stopping: aborting the requests in flight")
            # closing the engine answers every request in flight (aborted), so their handlers finish
            # now; handlers still waiting on a control call are cancelled after SHUTDOWN_GRACE_S, and
            # the threads of those calls are daemons: none of them holds up the exit
            await _in_thread(engine.close)
        finally:
            await runner.cleanup()

    try:
        asyncio.run(serve())
    finally:
        engine.close()
    return 0
