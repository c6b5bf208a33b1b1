"""serve-local against hostile or broken input (issue 17): every bad body is refused where it enters,
with an error naming what is wrong, and nothing else is harmed: requests in flight finish, the
server stays healthy, and a stopped server exits within seconds whatever it was waiting on."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from megatron_vespo.comm import StandaloneGroup
from megatron_vespo.rollout import serve_local
from megatron_vespo.rollout.local_engine import LocalEngine
from megatron_vespo.rollout.serve_local import LocalServer
from tests.conftest import ROOT, _env
from tests.engines import http, one_thread  # noqa: F401 -- an autouse fixture
from tests.hf_models import make_hf_model

CONNECT_TIMEOUT_S = 1.0  # the server's weight-sync connect timeout here: dead addresses fail in seconds
MAX_BODY_MB = 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("serve_local_input") / "qwen3")
    make_hf_model("qwen3", path)
    return path


@pytest.fixture(scope="module")
def engine(model_dir):
    with LocalEngine(model_dir, dtype="float32", max_batch=16) as eng:
        yield eng


@pytest.fixture(scope="module")
def server(engine):
    with LocalServer(engine=engine, app_options={"max_body_mb": MAX_BODY_MB,
                                                 "connect_timeout_s": CONNECT_TIMEOUT_S}) as srv:
        yield srv



def message(answer) -> str:
    body = answer[1]
    return body["error"]["message"] if "error" in body else body["message"]


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_healthy(url):
    """The server still answers, and still generates."""
    assert http(url, "/health", timeout=5)[0] == 200
    status, answer = http(url, "/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}})
    assert status == 200 and len(answer["output_ids"]) == 2


def start_long_requests(url, n, tokens, prefix):
    answers = {}

    def post(i):
        answers[i] = http(url, "/generate", {"input_ids": [5, 6, 7 + i], "rid": f"{prefix}{i}",
                                             "sampling_params": {"max_new_tokens": tokens, "ignore_eos": True,
                                                                 "temperature": 0.8, "sampling_seed": i}}, timeout=120)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return answers, threads


# ----------------------------------------------------------------------------- 1: huge integers
def test_huge_top_k_is_refused_and_the_others_finish(server, engine):
    answers, threads = start_long_requests(server.url, 3, 400, "partway")
    wait_for(lambda: all(engine.inflight().get(f"partway{i}", 0) >= 5 for i in range(3)))
    status, body = http(server.url, "/generate", {"input_ids": [1, 2], "sampling_params": {
        "top_k": 100000000000000000000, "temperature": 1.0}})
    assert status == 400 and "sampling_params.top_k must fit in 64 bits" in body["error"]["message"]
    for t in threads:
        t.join(timeout=60)
    for i in range(3):
        status, answer = answers[i]
        assert status == 200 and answer["meta_info"]["finish_reason"] == {"type": "length", "length": 400}
    assert_healthy(server.url)


def test_top_k_past_the_vocabulary_means_all_of_it(engine):
    params = {"max_new_tokens": 8, "temperature": 0.9, "sampling_seed": 11}
    everything = engine.generate([4, 5, 6], {**params, "top_k": engine.vocab_size}, return_logprob=True)
    largest = engine.generate([4, 5, 6], {**params, "top_k": 2**63 - 1}, return_logprob=True)
    assert largest["output_ids"] == everything["output_ids"]
    assert largest["meta_info"]["output_token_logprobs"] == everything["meta_info"]["output_token_logprobs"]


def test_one_bad_row_cannot_abort_the_rows_sharing_its_step(engine):
    """A fault in the shared sampling step (a value validation would have refused, put in behind its
    back) aborts only its own request: the others finish, drawing what they draw alone."""
    params = [{"max_new_tokens": 20, "temperature": 0.8, "top_k": 5, "sampling_seed": i, "ignore_eos": True}
              for i in range(3)]
    prepared = [engine.prepare(input_ids=[3, 4, 5 + i], sampling_params=p, rid=f"row{i}")
                for i, p in enumerate(params)]
    bad = engine.prepare(input_ids=[9, 9], sampling_params={"max_new_tokens": 20}, rid="row-bad")
    bad.sampling = dataclasses.replace(bad.sampling, temperature=10**400)  # overflows torch.tensor
    futures = engine.enqueue(prepared[:2] + [bad] + prepared[2:])  # one batch, one shared step
    results = [f.result(timeout=60) for f in futures]
    bad_answer = results.pop(2)
    assert bad_answer["meta_info"]["finish_reason"]["type"] == "abort"
    assert "sampling failed" in bad_answer["meta_info"]["finish_reason"]["message"]
    for i, answer in enumerate(results):
        assert answer["meta_info"]["finish_reason"] == {"type": "length", "length": 20}
        alone = engine.generate([3, 4, 5 + i], params[i])
        assert answer["output_ids"] == alone["output_ids"]


# ----------------------------------------------------------------------------- 8: wrong types
DIGITS_401 = int("1" + "0" * 400)
WRONG = [
    ("/abort_request", {"rid": ["a"]}, "abort_request: rid must be a string"),
    ("/abort_request", {"abort_all": "yes"}, "abort_all must be a boolean"),
    ("/generate", {"input_ids": [1], "sampling_params": {"temperature": DIGITS_401}},
     "sampling_params.temperature must be a finite number, got a 401-digit integer"),
    ("/generate", {"input_ids": [1], "sampling_params": {"top_p": DIGITS_401}}, "sampling_params.top_p must be a finite"),
    ("/generate", {"input_ids": [1], "sampling_params": {"max_new_tokens": DIGITS_401}},
     "sampling_params.max_new_tokens must fit in 64 bits"),
    ("/generate", {"input_ids": [1], "sampling_params": {"sampling_seed": 2**64}}, "sampling_params.sampling_seed"),
    ("/generate", {"input_ids": [1], "sampling_params": {"stop_token_ids": [DIGITS_401]}}, "stop_token_ids"),
    ("/generate", {"input_ids": [1, DIGITS_401]}, "input_ids has token ids outside"),
    ("/generate", {"input_ids": [1], "stream": "no"}, "stream must be a boolean"),
    ("/generate", {"input_ids": [1], "top_logprobs_num": "0"}, "top_logprobs_num must be an integer"),
    ("/generate", {"input_ids": [1], "logprob_start_len": DIGITS_401}, "logprob_start_len"),
    ("/generate", {"input_ids": [1], "rid": {"a": 1}}, "rid must be a non-empty string"),
    ("/pause_generation", {"mode": ["abort"]}, "mode must be a string"),
    ("/continue_generation", {"torch_empty_cache": "yes"}, "torch_empty_cache must be a boolean"),
    ("/update_weights_from_disk", {"model_path": 5}, "model_path must be a string"),
    ("/update_weights_from_disk", {}, "update_weights_from_disk needs model_path"),
    ("/update_weights_from_disk", {"model_path": "/x", "abort_all_requests": "false"},
     "abort_all_requests must be a boolean"),
    ("/update_weights_from_disk", {"model_path": "/x", "weight_version": 3}, "weight_version must be a string"),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "rank_offset": 1, "world_size": 2},
     "needs master_port"),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": "29500", "rank_offset": 1,
                                    "world_size": 2}, "master_port must be a 64-bit integer"),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 70000, "rank_offset": 1,
                                    "world_size": 2, "backend": "gloo"}, "master_port must be in [1, 65535]"),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 29500, "rank_offset": 1,
                                    "world_size": DIGITS_401}, "world_size must be a 64-bit integer"),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 29500, "rank_offset": 1,
                                    "world_size": 2**40, "backend": "gloo"}, "world_size must be in [2, 65536]"),
    ("/init_weights_update_group", {"master_address": ["127.0.0.1"], "master_port": 29500, "rank_offset": 1,
                                    "world_size": 2}, "master_address must be a string"),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 29500, "rank_offset": True,
                                    "world_size": 2}, "rank_offset must be a 64-bit integer"),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 29500, "rank_offset": 1,
                                    "world_size": 2, "group_name": {"x": 1}}, "group_name must be a string"),
    ("/update_weights_from_distributed", {"names": [1], "dtypes": ["float32"], "shapes": [[1]]},
     "names must be a list of strings"),
    ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["float32"], "shapes": [[DIGITS_401]]},
     "shapes must be a list of lists of 64-bit integers"),
    ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["float32"], "shapes": [[1]],
                                          "group_name": ["g"]}, "group_name must be a string"),
    ("/destroy_weights_update_group", {"group_name": ["g"]}, "group_name must be a string"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": "abc"},
     "serialized_named_tensors must be a list of strings"),
    ("/update_weight_version", {"new_version": 1}, "new_version must be a string"),
    ("/update_weight_version", {"new_version": "v", "abort_all_requests": "no"}, "abort_all_requests must be a boolean"),
]


@pytest.mark.parametrize("path, body, expected", WRONG, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(WRONG)])
def test_wrong_types_and_huge_numbers_are_400_naming_the_field(server, path, body, expected):
    status, answer = http(server.url, path, body)
    assert status == 400 and expected in message((status, answer)), (status, answer)


@pytest.mark.parametrize("raw, expected", [
    (b'{"rid": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"rid": "a", "abort_all": 1e400}', "not valid JSON: Number out of range"),
    (b'["rid"]', "must be a JSON object, got list"),
    (b'{"rid": ', "not valid JSON"),
], ids=["nested-100k", "float-out-of-range", "not-an-object", "truncated"])
@pytest.mark.parametrize("path", ["/abort_request", "/generate", "/init_weights_update_group"])
def test_unparseable_bodies_are_400(server, path, raw, expected):
    status, answer = http(server.url, path, raw=raw)
    assert status == 400 and expected in answer["error"]["message"], (status, answer)


def test_requests_in_flight_survive_a_volley_of_bad_input(server, engine):
    answers, threads = start_long_requests(server.url, 3, 300, "volley")
    wait_for(lambda: all(engine.inflight().get(f"volley{i}", 0) >= 5 for i in range(3)))
    for path, body, _ in WRONG:
        assert http(server.url, path, body)[0] == 400
    for t in threads:
        t.join(timeout=60)
    assert all(answers[i][1]["meta_info"]["finish_reason"]["type"] == "length" for i in range(3))
    assert_healthy(server.url)


# ----------------------------------------------------------------------------- 9: model_path
def test_update_weights_from_disk_refuses_what_is_not_a_model_directory(server, engine, model_dir, tmp_path,
                                                                        monkeypatch):
    loads = []
    monkeypatch.setattr(engine, "_load_model", lambda path: loads.append(path))
    (tmp_path / "empty").mkdir()
    assert not os.path.isdir("gpt2")
    answers, threads = start_long_requests(server.url, 1, 300, "disk")
    wait_for(lambda: engine.inflight().get("disk0", 0) >= 5)
    for path, words in (("gpt2", "'gpt2' is not a local directory"),
                        (os.path.join(model_dir, "config.json"), "config.json' is not a local directory"),
                        (str(tmp_path / "empty"), "has no config.json")):
        start = time.monotonic()
        status, body = http(server.url, "/update_weights_from_disk", {"model_path": path, "abort_all_requests": True})
        assert status == 400 and body["success"] is False and words in body["message"], body
        assert time.monotonic() - start < 2  # refused, not tried
    assert loads == []  # nothing was loaded, nothing was looked up
    threads[0].join(timeout=60)
    # refused before its side effects: abort_all_requests did not abort the request in flight
    assert answers[0][1]["meta_info"]["finish_reason"]["type"] == "length"
    assert_healthy(server.url)


# ----------------------------------------------------------------------------- 5: large bodies
def test_bodies_over_the_limit_are_413_unread(server):
    limit = MAX_BODY_MB * 2**20
    big = json.dumps({"input_ids": [1] * (limit // 2)}).encode()
    assert len(big) > limit
    status, body = http(server.url, "/generate", raw=big)
    assert status == 413 and "at most 1048576 bytes" in body["error"]["message"]
    assert "--max-body-mb" in body["error"]["message"]
    # chunked (no Content-Length): refused once it passes the limit
    status, body = http(server.url, "/abort_request", raw=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]))
    assert status == 413 and "too large" in body["error"]["message"]
    # announced larger than the limit: answered before a byte of the body is sent
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(b"POST /update_weights_from_tensor HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n")
        head = conn.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413") and "1000000000 bytes" in head
    assert_healthy(server.url)


def test_large_bodies_are_parsed_off_the_event_loop(server, monkeypatch):
    """Decoding and validating a large body runs in a thread: /health answers meanwhile (the
    decode is slowed down here, as a body of millions of tokens would be)."""
    threads = []
    real = serve_local.decode_body

    def decode(raw):
        threads.append(threading.current_thread().name)
        if len(raw) > 100_000:
            time.sleep(1.5)
        return real(raw)

    monkeypatch.setattr(serve_local, "decode_body", decode)
    big = {"input_ids": [[1, 2, 3]] * 40_000 + [[1000]], "sampling_params": {"max_new_tokens": 0}}  # ~0.5 MB
    answer = {}
    sender = threading.Thread(target=lambda: answer.update(big=http(server.url, "/generate", big, timeout=60)))
    sender.start()
    wait_for(lambda: threads, timeout=10)
    start = time.monotonic()
    assert http(server.url, "/health", timeout=10)[0] == 200
    assert time.monotonic() - start < 0.5, "/health waited for the body being decoded"
    sender.join(timeout=60)
    status, body = answer["big"]  # validated in full: the last request is the bad one
    assert status == 400 and "input_ids has token ids outside [0, 128): [1000]" in body["error"]["message"]
    assert http(server.url, "/abort_request", {"rid": "nobody"})[0] == 200
    assert threads[0] != "local-engine-http" and threads[-1] == "local-engine-http", threads  # small: inline


# ----------------------------------------------------------------------------- 3: weight-update group
def test_init_weights_update_group_is_bounded_and_starves_nothing(server, engine):
    """A dead master address fails within about 2 x the connect timeout; meanwhile a second join is
    refused at once and every other route answers at once."""
    body = {"master_address": "localhost", "master_port": closed_port(), "rank_offset": 1, "world_size": 2,
            "backend": "gloo", "group_name": "dead"}
    result = {}
    start = time.monotonic()
    join = threading.Thread(target=lambda: result.update(
        answer=http(server.url, "/init_weights_update_group", body), seconds=time.monotonic() - start))
    join.start()
    wait_for(lambda: engine._joining, timeout=5)
    for _ in range(6):  # the six calls: none may pile up behind the first
        status, answer = http(server.url, "/init_weights_update_group", {**body, "group_name": "second"}, timeout=5)
        assert status == 400 and "still being joined" in answer["message"]
    for path, payload, expected in (("/pause_generation", {"mode": "abort"}, 200),
                                    ("/continue_generation", {}, 200),
                                    ("/update_weights_from_disk", {"model_path": "gpt2"}, 400),
                                    ("/flush_cache", {}, 200), ("/server_info", None, 200)):
        t0 = time.monotonic()
        assert http(server.url, path, payload, timeout=5)[0] == expected
        assert time.monotonic() - t0 < 1.0, path
    assert engine._joining  # all of that answered while the join was still waiting
    assert_healthy(server.url)
    join.join(timeout=30)
    status, answer = result["answer"]
    assert status == 400 and answer["success"] is False and "joining 'dead'" in answer["message"]
    assert result["seconds"] < 4 * CONNECT_TIMEOUT_S + 5
    assert not engine._joining


def test_master_address_must_be_the_callers(server):
    for address in ("192.0.2.200", "8.8.8.8", "::2"):
        start = time.monotonic()
        status, answer = http(server.url, "/init_weights_update_group", {
            "master_address": address, "master_port": 29500, "rank_offset": 1, "world_size": 2, "backend": "gloo"})
        assert status == 400 and "is not the address this request came from (127.0.0.1)" in answer["error"]["message"]
        assert time.monotonic() - start < 1.0  # refused, never connected to
    status, answer = http(server.url, "/init_weights_update_group", {
        "master_address": "no-such-host.invalid", "master_port": 29500, "rank_offset": 1, "world_size": 2})
    assert status == 400 and "does not resolve" in answer["error"]["message"]


def test_allow_master_address_lets_a_named_address_through(engine):
    body = {"master_address": "198.51.100.7", "master_port": 29500, "rank_offset": 1, "world_size": 2,
            "backend": "gloo"}
    with LocalServer(engine=engine, app_options={"connect_timeout_s": 0.5,
                                                 "allow_master_addresses": ("198.51.100.7",)}) as srv:
        status, answer = http(srv.url, "/init_weights_update_group", body)
        # past the address check: the server tried to join there (nobody listens at that test address)
        assert status == 400 and "joining 'weight_update_group' at 198.51.100.7:29500 failed" in answer["message"]
        status, answer = http(srv.url, "/init_weights_update_group", {**body, "master_address": "198.51.100.8"})
        assert status == 400 and "is not the address this request came from" in answer["error"]["message"]


def _external_address():
    """This machine's address on its first non-loopback interface, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # UDP: only the route is looked up
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_a_trainer_on_another_address_joins_and_cannot_redirect(engine):
    """The trainer's rank 0 on another host reaches the server from its own address and names that
    address as master (trainer._reachable_address): it joins. It cannot make the server connect to
    the server's own loopback, nor anywhere but itself."""
    external = _external_address()
    if external is None:
        pytest.skip("no non-loopback interface to call from")
    with LocalServer(engine=engine, host="0.0.0.0", app_options={"connect_timeout_s": 5.0}) as srv:
        url = f"http://{external}:{srv.port}"
        base = {"master_port": closed_port(), "rank_offset": 1, "world_size": 2, "backend": "gloo"}
        status, answer = http(url, "/init_weights_update_group", {**base, "master_address": "127.0.0.1"})
        assert status == 400 and f"came from ({external})" in answer["error"]["message"]
        with socket.socket() as s:
            s.bind((external, 0))
            port = s.getsockname()[1]
        result = {}
        join = threading.Thread(target=lambda: result.update(answer=http(url, "/init_weights_update_group", {
            **base, "master_address": external, "master_port": port, "group_name": "remote"})))
        join.start()
        group = StandaloneGroup(external, port, 0, 2, backend="gloo", group_name="remote", timeout_s=30)
        join.join(timeout=30)
        assert result["answer"][0] == 200 and result["answer"][1]["success"], result
        assert group.world_size == 2
        assert http(url, "/destroy_weights_update_group", {"group_name": "remote"})[0] == 200


def test_distributed_update_refuses_shapes_larger_than_the_model(server, engine):
    """Every tensor is allocated before any is checked against the model: shapes asking for more
    than the whole model are refused before anything is allocated or received."""
    port = closed_port()
    result = {}
    join = threading.Thread(target=lambda: result.update(answer=http(server.url, "/init_weights_update_group", {
        "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2, "backend": "gloo",
        "group_name": "big"})))
    join.start()
    group = StandaloneGroup("127.0.0.1", port, 0, 2, backend="gloo", group_name="big", timeout_s=30)
    join.join(timeout=30)
    assert result["answer"][0] == 200, result
    assert http(server.url, "/begin_weight_update", {})[0] == 200
    original = engine.hf_weight("model.norm.weight")
    try:
        start = time.monotonic()
        status, answer = http(server.url, "/update_weights_from_distributed", {
            "names": ["model.embed_tokens.weight"] * 2, "dtypes": ["float32"] * 2,
            "shapes": [[10**6, 10**6], [1]], "group_name": "big"})
        assert status == 400 and "more than the served model's" in answer["message"]
        assert "refused before receiving anything" in answer["message"] and time.monotonic() - start < 2
        # the group still works: a real bucket goes through
        weight = engine.hf_weight("model.norm.weight") + 1.0
        post = threading.Thread(target=lambda: result.update(update=http(server.url, "/update_weights_from_distributed", {
            "names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [list(weight.shape)], "group_name": "big"})))
        post.start()
        group.broadcast_(weight.clone(), src=0)
        post.join(timeout=30)
        assert result["update"][0] == 200, result
        torch.testing.assert_close(engine.hf_weight("model.norm.weight"), weight)
    finally:
        engine.update_from_named_tensors([("model.norm.weight", original)])  # the module's engine, as it was
        assert http(server.url, "/end_weight_update", {})[0] == 200
        assert http(server.url, "/destroy_weights_update_group", {"group_name": "big"})[0] == 200


# ----------------------------------------------------------------------------- SIGTERM, as a process
@pytest.mark.slow
def test_sigterm_stops_the_server_within_seconds_with_calls_in_flight(model_dir):
    proc = subprocess.Popen([sys.executable, "-m", "megatron_vespo", "serve-local", "--model", model_dir,
                             "--port", "0", "--dtype", "float32", "--weight-sync-connect-timeout", "60",
                             "--max-body-mb", "1"],
                            env=_env(), cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("serving" in line for line in lines) or proc.poll() is not None, timeout=180)
        assert proc.poll() is None, "".join(lines)
        url = next(line for line in lines if "serving" in line).split(" on ")[-1].strip()
        port = int(url.rsplit(":", 1)[1])
        # a generation in flight, a join that would wait ~2 minutes, an upload stalled halfway
        answers, threads = start_long_requests(url, 1, 30000, "sigterm")
        dead = {"master_address": "127.0.0.1", "master_port": closed_port(), "rank_offset": 1, "world_size": 2,
                "backend": "gloo"}

        def join_dead():
            try:
                answers["join"] = http(url, "/init_weights_update_group", dead, timeout=120)
            except OSError as err:  # the stopping server cancels the handler: the connection closes unanswered
                answers["join"] = err

        join = threading.Thread(target=join_dead, daemon=True)
        join.start()
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"input_ids\": ")
        time.sleep(1.0)
        assert http(url, "/health", timeout=5)[0] == 200  # all of that in flight, and healthy
        assert http(url, "/pause_generation", {"mode": "in_place"}, timeout=10)[0] == 200
        assert http(url, "/continue_generation", {}, timeout=10)[0] == 200
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.monotonic() - start
        stalled.close()
        assert proc.returncode == 0, "".join(lines)
        assert took < 10, f"serve-local took {took:.1f} s to stop after SIGTERM"
        threads[0].join(timeout=10)
        status, answer = answers[0]  # answered, not left hanging: aborted by the shutdown
        assert status == 200 and answer["meta_info"]["finish_reason"]["type"] == "abort"
        join.join(timeout=10)
        assert "join" in answers  # and the join's caller was let go too
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
