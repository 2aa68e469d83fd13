"""End-to-end tests of libtriton_ferrum.so inside a real tritonserver (see conftest.py).

Every request uses SmolLM2-135M with a few tokens, so the whole suite takes a few minutes on two
CPU cores. Greedy decoding is deterministic, which lets outputs be compared across endpoints,
clients, concurrency and the `ferrum` CLI.
"""

import json
import os
import queue
import re
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import PANIC_TOKEN, REPO, TINY_ARCH_MODELS

PROMPT = "The capital of France is"
MODEL = "smollm2"  # decoupled, max_batch_size 64 (tensorrtllm shapes)
MODEL_NB = "smollm2_nb"  # not decoupled, max_batch_size 0 (vLLM shapes)


def greedy(server, prompt, max_tokens=8, model=MODEL, **extra):
    r = server.generate(model, {"text_input": prompt, "max_tokens": max_tokens, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def assert_serving(server):
    assert server.healthy()
    out = greedy(server, PROMPT, max_tokens=2)
    assert out["num_output_tokens"] == 2


# ---- HTTP generate / generate_stream -------------------------------------------------------


def test_generate_returns_text_and_metadata(server):
    out = greedy(server, PROMPT, max_tokens=8)
    assert out["model_name"] == MODEL
    assert isinstance(out["text_output"], str) and out["text_output"].strip()
    assert out["finish_reason"] == "length"
    assert out["num_output_tokens"] == 8
    assert out["num_input_tokens"] > 0
    # The shipped model excludes the prompt; the request can ask for it back.
    full = greedy(server, PROMPT, max_tokens=8, exclude_input_in_output=False)
    assert full["text_output"] == PROMPT + out["text_output"]


def test_generate_stream_deltas_concatenate_to_generate(server):
    whole = greedy(server, PROMPT, max_tokens=10)["text_output"]
    chunks = server.generate_stream(MODEL, {"text_input": PROMPT, "max_tokens": 10, "stream": True})
    assert len(chunks) >= 2, chunks
    assert all("error" not in c for c in chunks), chunks
    assert "".join(c["text_output"] for c in chunks) == whole
    assert chunks[-1]["finish_reason"] == "length"
    assert all("finish_reason" not in c for c in chunks[:-1])


def test_non_streaming_request_on_generate_stream_gives_one_chunk(server):
    chunks = server.generate_stream(MODEL, {"text_input": PROMPT, "max_tokens": 4})
    assert len(chunks) == 1 and chunks[0]["num_output_tokens"] == 4


def test_greedy_matches_the_ferrum_cli(server):
    cli = Path(os.environ.get("FERRUM_CLI", REPO / "target" / "release" / "ferrum"))
    if not cli.exists():
        pytest.fail(f"{cli} is missing: build it with `cargo build --release`")
    gguf = os.environ.get("FERRUM_SMOLLM2_GGUF", str(REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    res = subprocess.run(
        # The shipped smollm2 config uses weight_format f32.
        [str(cli), "generate", "--model", gguf, "--prompt", PROMPT, "--max-tokens", "12", "--json", "--weight-format", "f32"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    expected = json.loads(res.stdout)
    out = greedy(server, PROMPT, max_tokens=12)
    assert out["text_output"] == expected["text"]
    assert out["finish_reason"] == expected["finish_reason"]


def test_chat_template(server):
    out = greedy(server, "What is the capital of France?", max_tokens=16, apply_chat_template=True)
    assert "Paris" in out["text_output"], out


# ---- tritonclient gRPC ------------------------------------------------------------------------


def _grpc_inputs(batched, **tensors):
    """tritonclient inputs; `batched` adds the leading batch dimension of 1."""
    out = []
    for name, (dtype, value) in tensors.items():
        arr = np.array(value, dtype=np.object_ if dtype == "BYTES" else dtype)
        arr = arr.reshape((1,) + arr.shape) if batched else arr
        if arr.ndim == 0:
            arr = arr.reshape(1)
        inp = grpcclient.InferInput(name, list(arr.shape), dtype if dtype == "BYTES" else grpcclient.np_to_triton_dtype(arr.dtype))
        inp.set_data_from_numpy(arr)
        out.append(inp)
    return out


def _stream(server, model, inputs, stop_after=None, linger=0.0, first=None):
    """Runs one request over a gRPC stream; returns (results, error). With `stop_after`, closes
    the stream (cancelling the request) after that many responses. With `linger` (seconds), keeps
    listening that long after the final response (or error) and fails if anything else comes.
    `first` (a threading.Event) is set when the first response with an output arrives."""
    responses = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer(model, inputs, request_id="r1", enable_empty_final_response=True)
    results, error = [], None
    while True:
        result, err = responses.get(timeout=300)
        if err is not None:
            error = err
            break
        final = result.get_response().parameters.get("triton_final_response")
        if result.as_numpy("text_output") is not None or result.as_numpy("output_ids") is not None:
            results.append(result)
            if first is not None:
                first.set()
        if stop_after is not None and len(results) >= stop_after:
            client.stop_stream(cancel_requests=True)
            client.close()
            return results, None
        if final is not None and final.bool_param:
            break
    if linger:
        time.sleep(linger)
        assert responses.empty(), f"responses after the final one: {list(responses.queue)}"
    client.stop_stream()
    client.close()
    return results, error


def test_grpc_streaming_text(server):
    whole = greedy(server, PROMPT, max_tokens=8)["text_output"]
    inputs = _grpc_inputs(
        True,
        text_input=("BYTES", [PROMPT]),
        max_tokens=("int32", [8]),
        stream=("bool", [True]),
    )
    results, error = _stream(server, MODEL, inputs)
    assert error is None, error
    text = "".join(r.as_numpy("text_output").reshape(-1)[0].decode() for r in results)
    assert text == whole
    assert results[-1].as_numpy("finish_reason").reshape(-1)[0] == b"length"


def _tokenize(text):
    """SmolLM2's token ids of `text`, from the `ferrum` CLI."""
    return json.loads(
        subprocess.run(
            [str(REPO / "target" / "release" / "ferrum"), "tokenize", "--model",
             os.environ.get("FERRUM_SMOLLM2_GGUF", str(REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")),
             "--text", text],
            capture_output=True, text=True, check=True, timeout=120,
        ).stdout
    )


def test_token_interface(server):
    # The tensorrt_llm model's interface: input_ids/input_lengths/request_output_len → output_ids.
    ids = _tokenize(PROMPT)
    inputs = _grpc_inputs(
        True,
        input_ids=("int32", ids),
        input_lengths=("int32", [len(ids)]),
        request_output_len=("int32", [6]),
        exclude_input_in_output=("bool", [False]),
    )
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results, error = _stream(server, MODEL, inputs)
    assert error is None, error
    assert len(results) == 1
    out = results[0].as_numpy("output_ids")
    assert out.shape == (1, 1, len(ids) + 6)
    assert list(out[0, 0, : len(ids)]) == ids
    assert results[0].as_numpy("sequence_length").reshape(-1)[0] == len(ids) + 6
    client.close()
    # Streaming: one token per response, the same tokens.
    inputs = _grpc_inputs(
        True,
        input_ids=("int32", ids),
        input_lengths=("int32", [len(ids)]),
        request_output_len=("int32", [6]),
        streaming=("bool", [True]),
    )
    results, error = _stream(server, MODEL, inputs)
    assert error is None, error
    streamed = [int(t) for r in results for t in r.as_numpy("output_ids").reshape(-1)]
    assert streamed == list(out[0, 0, len(ids):])


@pytest.mark.parametrize("model", sorted(TINY_ARCH_MODELS))
def test_other_architectures_give_transformers_greedy_tokens(server, model):
    # GPT-2 (learned positions, Conv1D), Falcon (grouped KV, two norms) and BLOOM (ALiBi): the
    # backend is architecture-agnostic. All golden cases at once, so they batch in flight.
    golden = json.loads((REPO / "tests" / "fixtures" / "golden" / f"{TINY_ARCH_MODELS[model]}.json").read_text())

    def run(case):
        ids = case["prompt_ids"]
        inputs = _grpc_inputs(
            True,
            input_ids=("int32", ids),
            input_lengths=("int32", [len(ids)]),
            request_output_len=("int32", [len(case["greedy_ids"])]),
        )
        results, error = _stream(server, model, inputs)
        assert error is None, error
        return [int(t) for r in results for t in r.as_numpy("output_ids").reshape(-1)]

    with ThreadPoolExecutor(len(golden["cases"])) as pool:
        outputs = list(pool.map(run, golden["cases"]))
    for case, got in zip(golden["cases"], outputs):
        assert got == case["greedy_ids"], (model, case["prompt_ids"])


def test_vllm_interface_on_unbatched_model(server):
    params = json.dumps({"max_tokens": 5, "temperature": 0, "top_k": -1})
    out = server.generate(MODEL_NB, {"text_input": PROMPT, "sampling_parameters": params})
    assert out.status_code == 200, out.text
    body = out.json()
    assert body["num_output_tokens"] == 5
    assert body["text_output"] == greedy(server, PROMPT, max_tokens=5)["text_output"]
    # vLLM-style request parameters (no sampling_parameters tensor) on the generate endpoint.
    out = server.generate(MODEL_NB, {"text_input": PROMPT, "parameters": {"max_tokens": 3}})
    assert out.status_code == 200, out.text
    assert out.json()["num_output_tokens"] == 3
    # tritonclient with the vLLM backend's unbatched shapes ([1]).
    client = grpcclient.InferenceServerClient(server.grpc_url)
    res = client.infer(MODEL_NB, _grpc_inputs(False, text_input=("BYTES", [PROMPT]), sampling_parameters=("BYTES", [params])))
    assert res.as_numpy("text_output").reshape(-1)[0].decode() == body["text_output"]
    client.close()


def test_kv_cache_reuse_serves_shared_prefixes_with_unchanged_answers(server):
    # smollm2_nb reuses cached prefixes (enable_kv_cache_reuse: true); smollm2 does not. A long
    # shared "system prompt" with different questions, sequential then concurrent, and repeats.
    system = (
        "You are a helpful assistant. Answer in one short sentence, with facts only, and never "
        "repeat the question. Use plain words. "
    ) * 3
    questions = ["The capital of France is", "Water boils at", "The largest planet is", "1, 2, 3, 4,"]
    prompts = [system + q for q in questions] + [system + questions[0]]
    want = [greedy(server, p, max_tokens=6)["text_output"] for p in prompts]

    def nb(p):
        r = server.generate(MODEL_NB, {"text_input": p, "parameters": {"max_tokens": 6}})
        assert r.status_code == 200, r.text
        return r.json()["text_output"]

    assert [nb(p) for p in prompts] == want
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(nb, prompts * 2)) == want * 2
    # tensorrtllm_backend's `reused` gauge counts the blocks taken from the cache (the system
    # prompt is ~50 tokens: 3 whole blocks of 16, reused by 14 of the 15 requests at least).
    reused = lambda: metric(server, KV_FAMILY, MODEL_NB, kv_cache_block_type="reused")  # noqa: E731
    _poll(server, reused, lambda v: v is not None and v >= 14 * 3, timeout=2)
    assert metric(server, KV_FAMILY, MODEL, kv_cache_block_type="reused") == 0
    assert metric(server, KV_FAMILY, MODEL_NB, kv_cache_block_type="fraction") is not None


# ---- stop conditions and seeds -----------------------------------------------------------------


def test_stop_strings(server):
    base = greedy(server, PROMPT, max_tokens=16)
    text = base["text_output"]
    assert "." in text, text
    cut = greedy(server, PROMPT, max_tokens=16, stop_words=["."])
    assert cut["finish_reason"] == "stop"
    assert cut["text_output"] == text[: text.index(".")]


def test_bad_words_are_never_generated(server):
    answer = greedy(server, PROMPT, max_tokens=8)["text_output"]
    assert answer.startswith(" Paris"), answer
    # vLLM's key bans the word as written and after a space; the tensor takes it as written.
    for extra in ({"sampling_parameters": json.dumps({"bad_words": ["Paris"]})}, {"bad_words": [" Paris"]}):
        for model in (MODEL, MODEL_NB):
            out = greedy(server, PROMPT, max_tokens=8, model=model, **extra)["text_output"]
            assert "Paris" not in out and out != answer, (model, extra, out)


def test_end_id_and_stop_token_ids(server):
    tok = json.loads(
        subprocess.run(
            [str(REPO / "target" / "release" / "ferrum"), "generate", "--model",
             os.environ.get("FERRUM_SMOLLM2_GGUF", str(REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")),
             "--prompt", PROMPT, "--max-tokens", "3", "--json", "--weight-format", "f32"],
            capture_output=True, text=True, check=True, timeout=300,
        ).stdout
    )["output_ids"]
    third = tok[2]
    out = greedy(server, PROMPT, max_tokens=8, end_id=third)
    assert out["finish_reason"] == "stop" and out["num_output_tokens"] == 3
    params = json.dumps({"max_tokens": 8, "stop_token_ids": [third]})
    out = server.generate(MODEL_NB, {"text_input": PROMPT, "sampling_parameters": params}).json()
    assert out["finish_reason"] == "stop" and out["num_output_tokens"] == 3
    # ignore_eos / min_tokens keep going past a stop id.
    out = greedy(server, PROMPT, max_tokens=8, end_id=third, min_tokens=5)
    assert out["num_output_tokens"] >= 5


def test_seeds_reproduce(server):
    body = {"text_input": "Once upon a time", "max_tokens": 12, "temperature": 1.0, "top_p": 0.95}
    a = server.generate(MODEL, {**body, "seed": 1234}).json()["text_output"]
    b = server.generate(MODEL, {**body, "seed": 1234}).json()["text_output"]
    c = server.generate(MODEL, {**body, "random_seed": 1234}).json()["text_output"]
    assert a == b == c
    others = {server.generate(MODEL, {**body, "seed": s}).json()["text_output"] for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds should not all give the same sample"


# ---- concurrency --------------------------------------------------------------------------------


def test_32_concurrent_mixed_requests_match_solo_greedy(server):
    prompts = ["The capital of France is", "Water boils at", "1, 2, 3, 4,", "def add(a, b):"]
    solo = {p: greedy(server, p, max_tokens=6)["text_output"] for p in prompts}

    def one(i):
        p = prompts[i % len(prompts)]
        if i % 2:
            chunks = server.generate_stream(MODEL, {"text_input": p, "max_tokens": 6, "stream": True})
            return p, "".join(c["text_output"] for c in chunks)
        return p, greedy(server, p, max_tokens=6)["text_output"]

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert len(results) == 32
    for p, text in results:
        assert text == solo[p], (p, text, solo[p])


# ---- cancellation -------------------------------------------------------------------------------


def test_cancelled_stream_is_aborted_in_the_engine(server):
    before = server.stats(MODEL)
    inputs = _grpc_inputs(
        True,
        text_input=("BYTES", ["Tell me a very long story about a dragon."]),
        max_tokens=("int32", [2000]),
        stream=("bool", [True]),
        ignore_eos=("bool", [True]),
    )
    t0 = time.time()
    results, _ = _stream(server, MODEL, inputs, stop_after=2)
    assert len(results) == 2
    # The engine stops the request within a step: the cancelled request is reported as failed
    # well before 2000 tokens could have been generated.
    deadline = time.time() + 30
    while time.time() < deadline:
        fail = server.stats(MODEL)["inference_stats"]["fail"]["count"]
        if fail > before["inference_stats"]["fail"]["count"]:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the cancelled request was not finished")
    assert time.time() - t0 < 60
    assert_serving(server)


# ---- a panicking engine (FERRUM_INJECT_PANIC_TOKEN) ---------------------------------------------


def test_a_panic_in_the_engine_fails_requests_in_flight_once_and_the_model_serves_again(panic_server):
    srv = panic_server
    before = greedy(srv, PROMPT, max_tokens=8)["text_output"]
    story = "Tell me a very long story about a dragon."
    ids = _tokenize(PROMPT)
    assert PANIC_TOKEN not in ids + _tokenize(story)
    long = _grpc_inputs(
        True,
        text_input=("BYTES", [story]),
        max_tokens=("int32", [2000]),
        stream=("bool", [True]),
        ignore_eos=("bool", [True]),
    )
    poisoned = _grpc_inputs(
        True,
        input_ids=("int32", ids + [PANIC_TOKEN]),
        input_lengths=("int32", [len(ids) + 1]),
        request_output_len=("int32", [8]),
    )
    # Three streams generate (2000 tokens each: minutes on a CPU) when the poisoned prompt comes.
    # Each request must end with exactly one error naming the panic, and nothing after it.
    with ThreadPoolExecutor(3) as pool:
        started = [threading.Event() for _ in range(3)]
        running = [pool.submit(_stream, srv, MODEL, long, linger=1.0, first=s) for s in started]
        assert all(s.wait(timeout=120) for s in started), "the long requests generate"
        results, error = _stream(srv, MODEL, poisoned, linger=1.0)
        assert results == [] and error is not None
        assert "generation failed: engine failed: panic in step: injected panic" in str(error), error
        assert f"holds token {PANIC_TOKEN} (FERRUM_INJECT_PANIC_TOKEN)" in str(error), error
        for f in running:
            results, error = f.result(timeout=300)
            assert error is not None, "a long request ended without the panic's error"
            assert "engine failed: panic in step: injected panic" in str(error), error
            assert "the engine is restarting, retry the request" in str(error), error
            assert 1 <= len(results) < 2000
    assert srv.proc.poll() is None, "the server survives"
    assert re.search(
        r"^E.*ferrum: model 'smollm2': engine failed at .* UTC: panic in step: injected panic.*"
        r"its 4 request\(s\) in flight got an error.*rebuilding the engine",
        srv.log(),
        re.M,
    ), srv.log()[-4000:]
    # Until the rebuild is done a request is refused (UNAVAILABLE, saying why); then the model
    # gives the answers it gave before.
    deadline = time.time() + 180
    while True:
        r = srv.generate(MODEL, {"text_input": PROMPT, "max_tokens": 8})
        if r.status_code == 200:
            break
        assert "the model is not serving: the engine is restarting after it failed at" in r.text, r.text
        assert "panic in step: injected panic" in r.text, r.text
        assert time.time() < deadline, "the engine did not serve again within 180 s"
        time.sleep(0.2)
    assert r.json()["text_output"] == before
    assert "engine rebuilt in" in srv.log()
    assert srv.healthy()


# ---- custom metrics (tensorrtllm_backend families) ----------------------------------------------

KV_FAMILY = "nv_trt_llm_kv_cache_block_metrics"
REQ_FAMILY = "nv_trt_llm_request_metrics"


def metric_series(text, family):
    """{frozenset(labels.items()): value} of one family in Prometheus text format."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+)\{([^}]*)\}\s+(\S+)$", line)
        if not m or m.group(1) != family:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        key = frozenset(labels.items())
        assert key not in out, f"duplicate series {line}"
        out[key] = float(m.group(3))
    return out


def metric(server, family, model, **labels):
    """The value of one series, or None when it is not exported."""
    want = {"model": model, "version": "1", **labels}
    for key, value in metric_series(server.metrics(), family).items():
        if dict(key) == want:
            return value
    return None


def kv_capacity(config_text):
    return int(re.search(r'"max_tokens_in_paged_kv_cache".*?string_value:\s*"(\d+)"', config_text).group(1))


def test_kv_cache_metrics_match_the_configured_capacity(server):
    for model in (MODEL, MODEL_NB):
        capacity = kv_capacity((server.repo / model / "config.pbtxt").read_text())
        max_blocks = metric(server, KV_FAMILY, model, kv_cache_block_type="max")
        tokens_per = metric(server, KV_FAMILY, model, kv_cache_block_type="tokens_per")
        assert max_blocks is not None and tokens_per is not None, server.metrics()
        assert max_blocks * tokens_per == capacity, (model, max_blocks, tokens_per, capacity)
        assert tokens_per == 16  # the default block_size
        # Idle (the gauges are refreshed every 100 ms, so a previous test's request may linger
        # for one refresh): nothing used, everything free, no requests.
        idle = lambda: (  # noqa: E731
            metric(server, KV_FAMILY, model, kv_cache_block_type="used"),
            metric(server, KV_FAMILY, model, kv_cache_block_type="free"),
            metric(server, REQ_FAMILY, model, request_type="active"),
            metric(server, REQ_FAMILY, model, request_type="waiting"),
        )
        _poll(server, idle, lambda v: v == (0, max_blocks, 0, 0), timeout=2)
    assert metric(server, REQ_FAMILY, MODEL, request_type="max") == 32  # max_num_seqs of the config
    assert metric(server, REQ_FAMILY, MODEL_NB, request_type="max") == 64  # the default


def _poll(server, what, predicate, timeout):
    """Polls a metric until predicate(value) holds; returns the values seen."""
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        seen.append(what())
        if predicate(seen[-1]):
            return seen
        time.sleep(0.05)
    pytest.fail(f"metric never satisfied the condition within {timeout}s; values seen: {seen[-20:]}")


def test_cancellation_mid_stream_frees_kv_blocks(server):
    """Issue 4: cancelling a stream frees its KV blocks, observed through Triton's metrics."""
    used = lambda: metric(server, KV_FAMILY, MODEL, kv_cache_block_type="used")  # noqa: E731
    active = lambda: metric(server, REQ_FAMILY, MODEL, request_type="active")  # noqa: E731
    assert used() == 0
    inputs = _grpc_inputs(
        True,
        text_input=("BYTES", ["Tell me a very long story about a dragon."]),
        max_tokens=("int32", [2000]),
        stream=("bool", [True]),
        ignore_eos=("bool", [True]),
    )
    responses = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer(MODEL, inputs, enable_empty_final_response=True)
    try:
        for _ in range(2):
            result, err = responses.get(timeout=120)
            assert err is None, err
        # While the stream runs, its prompt + tokens hold blocks (refreshed every 100 ms).
        _poll(server, used, lambda v: v is not None and v > 0, timeout=10)
        assert active() == 1
        assert metric(server, REQ_FAMILY, MODEL, request_type="scheduled") == 1
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    t0 = time.time()
    _poll(server, used, lambda v: v == 0, timeout=5)
    assert time.time() - t0 < 5
    assert active() == 0
    free = metric(server, KV_FAMILY, MODEL, kv_cache_block_type="free")
    assert free == metric(server, KV_FAMILY, MODEL, kv_cache_block_type="max")
    assert_serving(server)


def test_metrics_are_deleted_on_unload_and_recreated_on_load(server):
    def models_exported():
        return {dict(k)["model"] for k in metric_series(server.metrics(), KV_FAMILY)}

    assert {MODEL, MODEL_NB} <= models_exported()
    assert server.unload(MODEL_NB).status_code == 200
    deadline = time.time() + 60
    while MODEL_NB in models_exported() and time.time() < deadline:
        time.sleep(0.2)
    # The unloaded model's series are gone; the other model's (same families) are untouched.
    exported = models_exported()
    assert MODEL_NB not in exported and MODEL in exported, exported
    assert metric(server, KV_FAMILY, MODEL, kv_cache_block_type="max") is not None
    assert server.load(MODEL_NB).status_code == 200
    # One series per label set again (metric_series asserts no duplicates), with fresh values.
    assert metric(server, KV_FAMILY, MODEL_NB, kv_cache_block_type="max") * 16 == 16384
    assert metric(server, KV_FAMILY, MODEL_NB, kv_cache_block_type="used") == 0
    assert_serving(server)


# ---- statistics ---------------------------------------------------------------------------------


def test_stats_count_requests(server):
    before = server.stats(MODEL_NB)
    for _ in range(3):
        greedy(server, PROMPT, max_tokens=2, model=MODEL_NB)
    bad = server.generate(MODEL_NB, {"text_input": PROMPT, "max_tokens": 0})
    assert bad.status_code == 400
    after = server.stats(MODEL_NB)
    s0, s1 = before["inference_stats"], after["inference_stats"]
    assert s1["success"]["count"] - s0["success"]["count"] == 3
    assert s1["fail"]["count"] - s0["fail"]["count"] == 1
    assert after["inference_count"] - before["inference_count"] == 3
    assert after["execution_count"] - before["execution_count"] == 4
    assert s1["compute_infer"]["ns"] > s0["compute_infer"]["ns"]


# ---- bad inputs ---------------------------------------------------------------------------------

BAD_HTTP = [
    ({"max_tokens": 4}, ["text_input"]),
    ({"text_input": "", "max_tokens": 4}, ["empty"]),
    ({"text_input": PROMPT, "max_tokens": 0}, ["max_tokens", "0"]),
    ({"text_input": PROMPT, "max_tokens": -5}, ["max_tokens", "-5"]),
    ({"text_input": PROMPT, "max_tokens": 100000}, ["max_tokens", "100000", "context"]),
    ({"text_input": PROMPT, "max_tokens": 4, "top_p": 1.5}, ["top_p", "1.5"]),
    ({"text_input": PROMPT, "max_tokens": 4, "top_p": 0}, ["top_p", "(0, 1]"]),
    ({"text_input": PROMPT, "max_tokens": 4, "temperature": -1}, ["temperature", "-1"]),
    ({"text_input": PROMPT, "max_tokens": 4, "beam_width": 2}, ["beam_width", "2"]),
    ({"text_input": PROMPT, "sampling_parameters": json.dumps({"max_tokns": 3})}, ["sampling_parameters", "max_tokns"]),
    ({"text_input": PROMPT, "sampling_parameters": "{not json"}, ["sampling_parameters", "JSON"]),
    ({"text_input": "hello " * 9000, "max_tokens": 4}, ["prompt", "exceeds", "context"]),
    # A misspelt key becomes a request parameter: an error naming it and the closest name, not
    # the default length.
    ({"text_input": PROMPT, "max_token": 3}, ["max_token", "did you mean 'max_tokens'"]),
    ({"text_input": PROMPT, "max_tokens": 3, "frobnicate": 1}, ["frobnicate", "request parameters"]),
]


@pytest.mark.parametrize("body,needles", BAD_HTTP, ids=[str(i) for i in range(len(BAD_HTTP))])
def test_bad_generate_requests_get_clear_errors(server, body, needles):
    for model in (MODEL, MODEL_NB):
        r = server.generate(model, body)
        assert r.status_code == 400, (model, r.text)
        err = r.json()["error"]
        for n in needles:
            assert n in err, (model, err, n)
    assert_serving(server)


def test_bad_tensors_over_grpc(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    cases = [
        # wrong dtype: max_tokens as FP32 (Triton checks declared dtypes)
        (_grpc_inputs(False, text_input=("BYTES", [PROMPT]), max_tokens=("float32", [4.0])), ["max_tokens"]),
        # wrong shape: two prompts in one unbatched request
        (_grpc_inputs(False, text_input=("BYTES", [PROMPT, PROMPT])), ["text_input"]),
        # invalid UTF-8
        (_grpc_inputs(False, text_input=("BYTES", [b"\xff\xfe bad"])), ["text_input", "UTF-8"]),
        # stream on a non-decoupled model
        (_grpc_inputs(False, text_input=("BYTES", [PROMPT]), stream=("bool", [True])), ["stream", "decoupled"]),
    ]
    for inputs, needles in cases:
        with pytest.raises(Exception) as e:
            client.infer(MODEL_NB, inputs)
        for n in needles:
            assert n in str(e.value), (str(e.value), n)
    client.close()
    # Batch of 2 on the batched model.
    arr = np.array([[PROMPT], [PROMPT]], dtype=np.object_)
    inp = grpcclient.InferInput("text_input", list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    results, error = _stream(server, MODEL, [inp])
    assert error is not None and "batch size 2" in str(error), error
    assert_serving(server)


# ---- model lifecycle ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model,needles",
    [
        ("bad_missing", ["model_path", "does_not_exist.gguf"]),
        ("bad_corrupt", ["model.gguf"]),
        ("bad_param", ["max_num_seqs", "many"]),
    ],
)
def test_broken_model_folders_fail_to_load_clearly(server, model, needles):
    r = server.load(model)
    assert r.status_code == 400, r.text
    for n in needles:
        assert n in r.text, (r.text, n)
    assert_serving(server)


def test_unload_reload_20_times_without_leaks(server):
    def cycle():
        assert server.unload(MODEL_NB).status_code == 200
        deadline = time.time() + 60
        while time.time() < deadline:
            idx = server_index(server)
            if idx.get(MODEL_NB) in ("UNAVAILABLE", None):
                break
            time.sleep(0.1)
        r = server.load(MODEL_NB)
        assert r.status_code == 200, r.text
        assert greedy(server, PROMPT, max_tokens=1, model=MODEL_NB)["num_output_tokens"] == 1

    # 20 cycles. The first ones warm up allocator arenas (RSS alternates between two levels as
    # glibc's two arenas take turns, see conftest.py); after that RSS must show no trend.
    samples = []
    for _ in range(20):
        cycle()
        samples.append((server.pid_threads(), server.pid_rss_kib()))
    threads = [t for t, _ in samples]
    rss = [r for _, r in samples]
    early, late = sorted(rss[2:8])[3], sorted(rss[-6:])[3]  # medians: one arena spike is no trend
    # Bounds: no thread growth after the first cycle; the median RSS of the last 6 cycles within
    # 1.5 GiB of cycles 3-8. One engine is ~540 MiB of f32 weights plus its KV cache, so an
    # engine (or its weights) not freed on unload would add >= 540 MiB per cycle, 6.5 GiB over the
    # 12 cycles in between; a leak of a quarter of an engine per cycle still crosses 1.5 GiB. A
    # finer bound is not stable here: with MALLOC_ARENA_MAX=2 glibc's RSS plateau shifts by up to
    # ~450 MiB between runs during the first ~15 cycles (measured over 40 cycles: it levels off
    # without a trend), and by 608 MiB once in the full suite (after the other tests ran in the
    # same server, 2026-11-25), which the former 512 MiB bound failed on.
    assert max(threads[1:]) <= threads[1], threads
    assert late - early < 1536 * 1024, rss


def server_index(server):
    import requests

    r = requests.post(f"{server.url}/v2/repository/index", json={}, timeout=30)
    return {m["name"]: m.get("state") for m in r.json()}


def test_unload_with_a_request_in_flight_completes_it_then_unloads(server):
    # Triton keeps a model alive until its in-flight requests are released, so an unload lets a
    # running stream finish (exactly one final response) and only then finalizes the model.
    inputs = _grpc_inputs(
        True,
        text_input=("BYTES", ["Tell me a long story."]),
        max_tokens=("int32", [24]),
        stream=("bool", [True]),
        ignore_eos=("bool", [True]),
    )
    responses = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer(MODEL, inputs, enable_empty_final_response=True)
    responses.get(timeout=120)  # generation has started
    unloader = threading.Thread(target=lambda: server.unload(MODEL))
    unloader.start()
    num_final, num_tokens, error = 0, 1, None
    while num_final == 0:
        result, err = responses.get(timeout=120)
        if err is not None:
            error = err
            break
        final = result.get_response().parameters.get("triton_final_response")
        if result.as_numpy("text_output") is not None:
            num_tokens += 1
        num_final += int(final is not None and final.bool_param)
    unloader.join(timeout=120)
    client.stop_stream()
    client.close()
    assert error is None, error
    assert num_final == 1
    assert num_tokens >= 2
    deadline = time.time() + 60
    while server_index(server).get(MODEL) == "READY" and time.time() < deadline:
        time.sleep(0.2)
    assert server_index(server).get(MODEL) != "READY"
    assert server.load(MODEL).status_code == 200
    assert_serving(server)
