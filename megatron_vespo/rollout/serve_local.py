"""``megatron-vespo serve-local``: the local engine behind SGLang 0.5.23's HTTP API (the subset RL
rollouts and weight sync use), on aiohttp.

Model steps run in the engine's scheduler thread and blocking control calls (pause, weight loads,
collective receives) in executor threads, so the event loop keeps answering while a batch runs.
Errors are HTTP 400 ``{"error": {"message": ...}}`` naming what is wrong, as SGLang answers them.
``LocalServer`` runs the same app in a background thread for tests and in-process use.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hmac
import logging
import signal
import sys
import threading

import msgspec
from aiohttp import web

from megatron_vespo.rollout import protocol
from megatron_vespo.rollout.local_engine import DEFAULT_GROUP_NAME, LocalEngine

log = logging.getLogger("megatron_vespo.serve_local")

HEALTH_CHECK_TIMEOUT_S = 20.0  # SGLang's HEALTH_CHECK_TIMEOUT
MAX_BODY_BYTES = 1 << 30
_ENGINE = web.AppKey("engine", LocalEngine)
_API_KEY = web.AppKey("api_key", object)
_ADDRESS = web.AppKey("address", dict)

# the per-request fields of GenerateReqInput this server implements
_GENERATE_FIELDS = ("sampling_params", "rid", "return_logprob", "logprob_start_len", "return_routed_experts",
                    "routed_experts_start_len", "return_text_in_logprobs", "top_logprobs_num", "token_ids_logprob")


class BadRequest(ValueError):
    pass


def _json(obj, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), status=status, content_type="application/json")


def _error(message: str, status: int = 400) -> web.Response:
    return _json({"error": {"message": message}}, status)


def _result(success: bool, message: str, **extra) -> web.Response:
    return _json({"success": success, "message": message, **extra}, 200 if success else 400)


async def _body(request: web.Request) -> dict:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as err:
        raise BadRequest(f"request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


async def _in_thread(func, *args, **kwargs):
    return await asyncio.get_running_loop().run_in_executor(None, lambda: func(*args, **kwargs))


def parse_generate_body(body: dict) -> tuple[list[dict], bool]:
    """GenerateReqInput (single or batch) -> keyword arguments of LocalEngine.prepare per request,
    and whether it was a batch. Raises BadRequest naming the offending field."""
    if body.get("stream"):
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


def create_app(engine: LocalEngine, api_key: str | None = None) -> web.Application:
    @web.middleware
    async def guard(request: web.Request, handler):
        if api_key and request.path != "/health":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error("Unauthorized: this server needs 'Authorization: Bearer <api key>'", 401)
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except ValueError as err:  # BadRequest and the engine's validation errors
            return _error(str(err))
        except Exception as err:
            log.exception("%s %s failed", request.method, request.path)
            return _error(f"{type(err).__name__}: {err}", 500)

    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY_BYTES)
    app[_ENGINE] = engine
    app[_API_KEY] = api_key
    app[_ADDRESS] = {}

    async def generate(request):
        requests, is_batch = parse_generate_body(await _body(request))
        prepared = [engine.prepare(**r) for r in requests]  # all validated before any is queued
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
        mode = (await _body(request)).get("mode", "abort")
        await _in_thread(engine.pause, mode)
        return _json({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(request):
        await _body(request)
        engine.resume()
        return _json({"message": "Generation continued successfully.", "status": "ok"})

    async def abort_request(request):
        body = await _body(request)
        engine.abort(body.get("rid") or None, abort_all=bool(body.get("abort_all", False)))
        return web.Response(status=200)

    async def begin_weight_update(request):
        await _body(request)
        return _result(*engine.begin_weight_update())

    async def end_weight_update(request):
        await _body(request)
        return _result(*engine.end_weight_update())

    async def update_weights_from_disk(request):
        body = await _body(request)
        if not isinstance(body.get("model_path"), str) or not body["model_path"]:
            raise BadRequest("update_weights_from_disk needs model_path (a Hugging Face model directory)")
        answer = await _in_thread(engine.update_from_disk, body["model_path"], body.get("weight_version"),
                                  bool(body.get("abort_all_requests", False)))
        return _result(answer["success"], answer["message"], num_paused_requests=answer["num_paused_requests"])

    async def init_weights_update_group(request):
        body = await _body(request)
        missing = [k for k in ("master_address", "master_port", "rank_offset", "world_size") if k not in body]
        if missing:
            raise BadRequest(f"init_weights_update_group needs {missing}")
        # blocks in the rendezvous until the trainer (rank 0) joins: keep it off the event loop
        return _result(*await _in_thread(
            engine.init_weights_update_group, body["master_address"], body["master_port"], body["rank_offset"],
            body["world_size"], body.get("group_name", DEFAULT_GROUP_NAME), body.get("backend", "nccl")))

    async def update_weights_from_distributed(request):
        body = await _body(request)
        missing = [k for k in ("names", "dtypes", "shapes") if k not in body]
        if missing:
            raise BadRequest(f"update_weights_from_distributed needs {missing}")
        return _result(*await _in_thread(
            engine.update_weights_from_distributed, body["names"], body["dtypes"], body["shapes"],
            group_name=body.get("group_name", DEFAULT_GROUP_NAME), weight_version=body.get("weight_version"),
            abort_all_requests=bool(body.get("abort_all_requests", False)), load_format=body.get("load_format")))

    async def destroy_weights_update_group(request):
        body = await _body(request)
        return _result(*engine.destroy_weights_update_group(body.get("group_name", DEFAULT_GROUP_NAME)))

    async def update_weights_from_tensor(request):
        await _body(request)
        if not engine.weight_update_session_open:
            return _result(False, "update_weights_from_tensor must run between begin_weight_update() and "
                                  "end_weight_update()")
        return _result(False, "update_weights_from_tensor carries CUDA IPC handles and cannot be served on CPU; "
                              "use update_weights_from_distributed (backend gloo) or update_weights_from_disk")

    async def update_weight_version(request):
        body = await _body(request)
        if not isinstance(body.get("new_version"), str):
            raise BadRequest("update_weight_version needs new_version (a string)")
        if body.get("abort_all_requests", True):
            engine.abort(abort_all=True, message="aborted by update_weight_version")
        engine.set_weight_version(body["new_version"])
        return _result(True, f"Weight version updated to {body['new_version']}.")

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
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its requests
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    app[_ADDRESS].update({"host": host, "port": bound})
    return runner, bound


class LocalServer:
    """The server in a background thread with its own event loop, for tests and in-process use.

    ``with LocalServer(model_dir, dtype="float32") as server: server.url``. Port 0 binds a free
    port. Pass ``engine=`` to serve an existing LocalEngine (it is then not closed on exit)."""

    def __init__(self, model_dir: str | None = None, port: int = 0, host: str = "127.0.0.1",
                 api_key: str | None = None, engine: LocalEngine | None = None, **engine_kwargs):
        if (model_dir is None) == (engine is None):
            raise ValueError("LocalServer needs exactly one of model_dir and engine")
        self.model_dir, self.host, self.port, self.api_key = model_dir, host, port, api_key
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
                    _start_site(create_app(self.engine, self.api_key), self.host, self.port))
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


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = LocalEngine(args.model, dtype=args.dtype, max_batch=args.max_batch, seed=args.seed,
                             weight_version=args.weight_version, num_threads=args.num_threads)
    except (FileNotFoundError, ValueError) as err:
        print(f"serve-local: {err}", file=sys.stderr)
        return 2

    async def serve() -> None:
        runner, port = await _start_site(create_app(engine, args.api_key), args.host, args.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"serving {args.model} on http://{args.host}:{port}", file=sys.stderr, flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(serve())
    finally:
        engine.close()
    return 0
