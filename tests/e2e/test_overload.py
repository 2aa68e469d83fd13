"""Overload through a real tritonserver (see conftest.py): a burst of streaming requests beyond
``max_num_seqs + max_queue_size`` gets exactly the refusals its bound allows, every admitted
request completes with one final response, a request waiting past its queue timeout ends with an
error naming it, and the model serves normally afterwards. Runs on ``smollm2_busy`` (2 seats, 2
places behind them), loaded here and unloaded at the end.

Triton 2.51 carries no error code on its streaming paths (generate_stream answers HTTP 400 with
the message in the SSE data, a gRPC stream only an error message; non-streaming generate on a
decoupled model answers 400 too), so the UNAVAILABLE code is checked where Triton keeps it: a
gRPC infer call on a model that is not decoupled (``smollm2_busy_nb``, one seat, no place).
"""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import BUSY_MAX_NUM_SEQS, BUSY_MAX_QUEUE_SIZE, BUSY_MODEL, BUSY_MODEL_NB
from test_triton import REQ_FAMILY, _grpc_inputs, _poll, metric

# Long enough (tens of ms per step on two CPU cores) that no admitted request ends while the
# burst arrives.
LONG_TOKENS = 64


@pytest.fixture(scope="module")
def busy(server):
    r = server.load(BUSY_MODEL)
    assert r.status_code == 200, r.text
    yield server
    assert server.unload(BUSY_MODEL).status_code == 200


def stream_request(server, body, start=None):
    """One generate_stream call, after `start` is set: (200, the parsed SSE chunks) or (the HTTP
    status, the error body)."""
    if start is not None:
        assert start.wait(timeout=60)
    r = requests.post(f"{server.url}/v2/models/{BUSY_MODEL}/generate_stream", json=body, stream=True, timeout=600)
    if r.status_code != 200:
        return r.status_code, r.text
    lines = [line for line in r.iter_lines(decode_unicode=True) if line and line.startswith("data:")]
    return r.status_code, [json.loads(line[len("data:"):]) for line in lines]


def long_body(i, max_tokens=LONG_TOKENS):
    return {"text_input": f"Story number {i}: once upon a time", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}


def assert_completed(chunks, max_tokens=LONG_TOKENS):
    """A streamed answer: no error, exactly one chunk with a finish reason, and it is the last."""
    assert all("error" not in c for c in chunks), chunks
    assert [i for i, c in enumerate(chunks) if "finish_reason" in c] == [len(chunks) - 1], chunks
    assert chunks[-1]["finish_reason"] == "length"
    # Each streamed response counts its own tokens (the OpenAI frontend sums them).
    assert sum(c.get("num_output_tokens", 0) for c in chunks) == max_tokens


def assert_serves(server):
    assert server.healthy()
    r = server.generate(BUSY_MODEL, {"text_input": "The capital of France is", "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["num_output_tokens"] == 4


def test_a_burst_beyond_the_bound_gets_exactly_its_refusals_and_the_rest_complete(busy):
    server = busy
    bound = BUSY_MAX_NUM_SEQS + BUSY_MAX_QUEUE_SIZE
    num_requests = 2 * bound
    start = threading.Event()
    with ThreadPoolExecutor(num_requests) as pool:
        futures = [pool.submit(stream_request, server, long_body(i), start) for i in range(num_requests)]
        start.set()
        outcomes = [f.result(timeout=600) for f in futures]
    refused = [body for status, body in outcomes if status != 200]
    admitted = [body for status, body in outcomes if status == 200]
    assert (len(admitted), len(refused)) == (bound, num_requests - bound), outcomes
    for body in refused:
        assert "busy" in body, body
        assert f"max_num_seqs ({BUSY_MAX_NUM_SEQS}) + max_queue_size ({BUSY_MAX_QUEUE_SIZE})" in body, body
    for chunks in admitted:
        assert_completed(chunks)
    # Every place is free again: the model answers at once and the server stays healthy.
    assert_serves(server)


def test_a_request_waiting_past_its_queue_timeout_is_unavailable(busy):
    server = busy
    scheduled = lambda: metric(server, REQ_FAMILY, BUSY_MODEL, request_type="scheduled")  # noqa: E731
    with ThreadPoolExecutor(BUSY_MAX_NUM_SEQS) as pool:
        # Longer than the burst's: they must outlast the metric poll and the 100 ms wait.
        running = [pool.submit(stream_request, server, long_body(i, 4 * LONG_TOKENS)) for i in range(BUSY_MAX_NUM_SEQS)]
        # Both seats taken (the gauges refresh every 100 ms); a third request waits behind them
        # with a bound of 100 ms of its own.
        _poll(server, scheduled, lambda v: v == BUSY_MAX_NUM_SEQS, timeout=60)
        r = server.generate(BUSY_MODEL, {"text_input": "Hello", "max_tokens": 4, "queue_timeout_microseconds": 100000})
        assert r.status_code != 200, r.text
        assert "queue timeout: the request waited" in r.text, r.text
        assert "the request's queue_timeout_microseconds (100000)" in r.text, r.text
        for f in running:
            status, chunks = f.result(timeout=600)
            assert status == 200, chunks
            assert_completed(chunks, 4 * LONG_TOKENS)
    assert_serves(server)


@pytest.fixture(scope="module")
def busy_nb(server):
    r = server.load(BUSY_MODEL_NB)
    assert r.status_code == 200, r.text
    yield server
    assert server.unload(BUSY_MODEL_NB).status_code == 200


def test_a_busy_refusal_carries_the_unavailable_code(busy_nb):
    server = busy_nb
    client = grpcclient.InferenceServerClient(server.grpc_url)
    long = _grpc_inputs(
        False,
        text_input=("BYTES", ["Story: once upon a time"]),
        max_tokens=("int32", [4 * LONG_TOKENS]),
        ignore_eos=("bool", [True]),
    )
    scheduled = lambda: metric(server, REQ_FAMILY, BUSY_MODEL_NB, request_type="scheduled")  # noqa: E731
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.infer, BUSY_MODEL_NB, long)
        _poll(server, scheduled, lambda v: v == 1, timeout=60)
        short = _grpc_inputs(False, text_input=("BYTES", ["Hello"]), max_tokens=("int32", [2]))
        with pytest.raises(InferenceServerException) as refused:
            client.infer(BUSY_MODEL_NB, short)
        assert refused.value.status() == "StatusCode.UNAVAILABLE", refused.value
        assert "busy: 1 requests in flight, the most is max_num_seqs (1) + max_queue_size (0)" in str(refused.value)
        result = running.result(timeout=600)
        assert result.as_numpy("finish_reason")[0] == b"length"
    client.close()
    r = server.generate(BUSY_MODEL_NB, {"text_input": "Hello", "max_tokens": 2})
    assert r.status_code == 200, r.text
