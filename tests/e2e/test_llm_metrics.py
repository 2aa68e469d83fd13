"""End-to-end: the vLLM-named LLM metrics and the per-model metric switches on Triton's /metrics
(docs/configuration.md, "Metrics"), and the first token streamed as a response of its own.

A server of its own (so counts are exact) serves SmolLM2 three times: ``m_all`` (both metric
sets, the defaults), ``m_no_vllm`` (``enable_vllm_metrics: false``) and ``m_no_trtllm``
(``enable_trtllm_metrics: false``). Requests use the token interface with ``ignore_eos``, so
prompt and generation lengths are known exactly.
"""

import queue
import re
import time

import pytest
import tritonclient.grpc as grpcclient

from conftest import _gguf, _serve, _write_model
from test_triton import _grpc_inputs, _stream

MAX_MODEL_LEN = 1000
MODELS = {
    "m_all": [],
    "m_no_vllm": [("enable_vllm_metrics", "false")],
    "m_no_trtllm": [("enable_trtllm_metrics", "false")],
}

# vLLM's bucket boundaries (docs/configuration.md).
TTFT_LE = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10,
           20, 40, 80, 160, 640, 2560]
TPOT_LE = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20,
           40, 80]
LATENCY_LE = [0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960,
              1920, 7680]
TOKENS_LE = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]  # 1-2-5 up to MAX_MODEL_LEN
HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": TTFT_LE,
    "vllm:time_per_output_token_seconds": TPOT_LE,
    "vllm:e2e_request_latency_seconds": LATENCY_LE,
    "vllm:request_queue_time_seconds": LATENCY_LE,
    "vllm:request_prompt_tokens": TOKENS_LE,
    "vllm:request_generation_tokens": TOKENS_LE,
}
COUNTERS = ["vllm:prompt_tokens_total", "vllm:generation_tokens_total"]
GAUGES = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc",
          "vllm:kv_cache_usage_perc"]
TRTLLM = ["nv_trt_llm_kv_cache_block_metrics", "nv_trt_llm_request_metrics"]


@pytest.fixture(scope="module")
def metrics_server(tmp_path_factory):
    gguf = _gguf()
    root = tmp_path_factory.mktemp("triton_metrics")
    repo = root / "models"
    for name, extra in MODELS.items():
        params = [("model_path", str(gguf)), ("device", "cpu"), ("weight_format", "f32"),
                  ("max_num_seqs", "8"), ("max_tokens_in_paged_kv_cache", "8192"),
                  ("max_model_len", str(MAX_MODEL_LEN)), ("exclude_input_in_output", "true"),
                  *extra]
        body = ",\n".join(f'  {{ key: "{k}", value: {{ string_value: "{v}" }} }}' for k, v in params)
        _write_model(repo, name, f"""backend: "ferrum"
max_batch_size: 64
model_transaction_policy {{ decoupled: true }}
parameters [
{body}
]
""")
    with _serve(root, repo, load=list(MODELS), ready=list(MODELS)) as srv:
        yield srv


def samples(text):
    """[(name, labels dict, value)] of every sample line of a Prometheus text page."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z_:][\w:]*)\{([^}]*)\}\s+(\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            out.append((m.group(1), labels, float(m.group(3))))
    return out


def series(text, model):
    """{(name, frozenset(labels without model/version)): value} of one model's samples."""
    out = {}
    for name, labels, value in samples(text):
        if labels.get("model") != model:
            continue
        assert labels.get("version") == "1", (name, labels)
        rest = frozenset((k, v) for k, v in labels.items() if k not in ("model", "version"))
        assert (name, rest) not in out, f"duplicate series {name} {labels}"
        out[(name, rest)] = value
    return out


def families(text, model):
    """Names of ferrum's custom metric families (histograms by their base name) with series of
    `model` (Triton's own `nv_inference_*` left out)."""
    names = {name for name, _ in series(text, model)}
    return {re.sub(r"_(bucket|sum|count)$", "", n) if n.startswith("vllm:") else n
            for n in names if n.startswith(("vllm:", "nv_trt_llm_"))}


def histogram(s, family):
    """(count, sum, [(le, cumulative count)]) of one histogram in `series` output."""
    buckets = sorted(
        ((float(dict(labels)["le"]), v) for (n, labels), v in s.items() if n == family + "_bucket"),
        key=lambda b: b[0],
    )
    return s[(family + "_count", frozenset())], s[(family + "_sum", frozenset())], buckets


def value(s, family):
    return s[(family, frozenset())]


def bucket_deltas(before, after):
    """{le: cumulative count added} between two `histogram(...)[2]` readings."""
    return {le: a - b for (le, a), (_, b) in zip(after, before)}


def token_request(ids, max_tokens, stream):
    return _grpc_inputs(
        True,
        input_ids=("int32", ids),
        input_lengths=("int32", [len(ids)]),
        request_output_len=("int32", [max_tokens]),
        ignore_eos=("bool", [True]),
        streaming=("bool", [stream]),
    )


def wait_for(server, model, predicate, timeout=10):
    """Polls the model's series until predicate(series) holds; returns them."""
    deadline = time.time() + timeout
    while True:
        s = series(server.metrics(), model)
        if predicate(s) or time.time() > deadline:
            return s
        time.sleep(0.05)


def test_vllm_histograms_and_counters_count_known_requests(metrics_server):
    srv, model = metrics_server, "m_all"
    before = series(srv.metrics(), model)
    # (prompt ids, max_tokens, streaming): 22 prompt tokens, 14 generated, 11 intervals.
    requests = [([1000, 1001, 1002], 1, False),
                ([2000 + i for i in range(7)], 4, True),
                ([3000 + i for i in range(12)], 9, True)]
    for ids, max_tokens, stream in requests:
        results, error = _stream(srv, model, token_request(ids, max_tokens, stream))
        assert error is None, error
        tokens = [int(t) for r in results for t in r.as_numpy("output_ids").reshape(-1)]
        assert len(tokens) == max_tokens
        # Streaming, every token is a response of its own (the first one too).
        assert len(results) == (max_tokens if stream else 1)

    def done(s):
        return (s[("vllm:e2e_request_latency_seconds_count", frozenset())]
                - before[("vllm:e2e_request_latency_seconds_count", frozenset())] == 3
                and value(s, "vllm:generation_tokens_total")
                - value(before, "vllm:generation_tokens_total") == 14)

    after = wait_for(srv, model, done)
    assert done(after), after
    got = {f: histogram(after, f) for f in HISTOGRAMS}
    was = {f: histogram(before, f) for f in HISTOGRAMS}
    counts = {f: got[f][0] - was[f][0] for f in HISTOGRAMS}
    assert counts == {
        "vllm:time_to_first_token_seconds": 3,
        "vllm:time_per_output_token_seconds": 0 + 3 + 8,
        "vllm:e2e_request_latency_seconds": 3,
        "vllm:request_queue_time_seconds": 3,
        "vllm:request_prompt_tokens": 3,
        "vllm:request_generation_tokens": 3,
    }
    sums = {f: got[f][1] - was[f][1] for f in HISTOGRAMS}
    assert sums["vllm:request_prompt_tokens"] == 3 + 7 + 12
    assert sums["vllm:request_generation_tokens"] == 1 + 4 + 9
    assert value(after, "vllm:prompt_tokens_total") - value(before, "vllm:prompt_tokens_total") == 22
    # Per request, the first token plus the intervals between tokens is the whole latency, and
    # the queue ends before the first token.
    ttft, tpot, e2e = (sums["vllm:time_to_first_token_seconds"],
                       sums["vllm:time_per_output_token_seconds"],
                       sums["vllm:e2e_request_latency_seconds"])
    assert ttft > 0 and tpot > 0 and abs(ttft + tpot - e2e) < 1e-3, sums
    assert 0 <= sums["vllm:request_queue_time_seconds"] <= ttft, sums
    # Token counts fall into the 1-2-5 buckets exactly (cumulative counts per `le`).
    prompt = bucket_deltas(was["vllm:request_prompt_tokens"][2], got["vllm:request_prompt_tokens"][2])
    assert [prompt[le] for le in (1, 2, 5, 10, 20, 1000)] == [0, 0, 1, 2, 3, 3], prompt
    generated = bucket_deltas(was["vllm:request_generation_tokens"][2],
                              got["vllm:request_generation_tokens"][2])
    assert [generated[le] for le in (1, 2, 5, 10, 1000)] == [1, 1, 2, 3, 3], generated
    # Every histogram: vLLM's boundaries plus +Inf, cumulative, +Inf = count.
    for family, bounds in HISTOGRAMS.items():
        count, _, buckets = got[family]
        assert [le for le, _ in buckets] == [float(b) for b in bounds] + [float("inf")], family
        cumulative = [c for _, c in buckets]
        assert cumulative == sorted(cumulative) and cumulative[-1] == count, (family, buckets)


def test_vllm_gauges_follow_a_running_request_and_a_cancelled_one_counts_only_its_tokens(
        metrics_server):
    srv, model = metrics_server, "m_all"
    before = series(srv.metrics(), model)
    for g in GAUGES:
        assert value(before, g) == 0, (g, before)
    responses = queue.Queue()
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer(model, token_request(list(range(100, 140)), 900, True),
                              enable_empty_final_response=True)
    try:
        for _ in range(3):
            _, err = responses.get(timeout=120)
            assert err is None, err
        running = wait_for(srv, model, lambda s: value(s, "vllm:num_requests_running") == 1
                           and value(s, "vllm:gpu_cache_usage_perc") > 0)
        assert value(running, "vllm:num_requests_running") == 1, running
        assert value(running, "vllm:num_requests_waiting") == 0
        usage = value(running, "vllm:gpu_cache_usage_perc")
        # At least the 40-token prompt's 3 blocks of 16 out of 8192 / 16 = 512.
        assert 3 / 512 <= usage < 1
        assert value(running, "vllm:kv_cache_usage_perc") == usage
        # The same engine statistics as tensorrtllm's fraction (refreshed together; a scrape may
        # fall between the two sets' updates, hence one block of slack).
        fraction = running[("nv_trt_llm_kv_cache_block_metrics",
                            frozenset({("kv_cache_block_type", "fraction")}))]
        assert abs(fraction - usage) <= 1 / 512 + 1e-12, (fraction, usage)
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    ttft = "vllm:time_to_first_token_seconds_count"
    after = wait_for(srv, model, lambda s: value(s, "vllm:num_requests_running") == 0
                     and s[(ttft, frozenset())] - before[(ttft, frozenset())] == 1)
    assert value(after, "vllm:num_requests_running") == 0
    assert value(after, "vllm:gpu_cache_usage_perc") == 0
    # The cancelled request observed its first token and intervals, no request-level histogram.
    assert after[(ttft, frozenset())] - before[(ttft, frozenset())] == 1
    e2e = ("vllm:e2e_request_latency_seconds_count", frozenset())
    assert after[e2e] == before[e2e]
    generated = value(after, "vllm:generation_tokens_total") - value(before, "vllm:generation_tokens_total")
    tpot = ("vllm:time_per_output_token_seconds_count", frozenset())
    assert generated >= 3 and after[tpot] - before[tpot] <= generated - 1


def test_each_metric_set_is_switched_per_model(metrics_server):
    srv = metrics_server
    for model in MODELS:
        results, error = _stream(srv, model, token_request([5, 6, 7, 8], 3, False))
        assert error is None, error
    vllm = set(HISTOGRAMS) | set(COUNTERS) | set(GAUGES)
    s = wait_for(srv, "m_no_trtllm", lambda s: s.get(("vllm:e2e_request_latency_seconds_count",
                                                     frozenset())) == 1)
    assert histogram(s, "vllm:request_generation_tokens")[:2] == (1, 3)
    page = srv.metrics()
    assert families(page, "m_all") == vllm | set(TRTLLM)
    assert families(page, "m_no_vllm") == set(TRTLLM)
    assert families(page, "m_no_trtllm") == vllm
    # Both sets exist in the server (m_all), only without the switched-off model's series.
    names = {name for name, _, _ in samples(page)}
    assert set(TRTLLM) <= names and "vllm:time_to_first_token_seconds_count" in names


def test_the_first_token_is_a_response_of_its_own_even_with_its_text_held_back(metrics_server):
    srv, model = metrics_server, "m_all"
    body = {"text_input": "The capital of France is", "max_tokens": 6, "ignore_eos": True,
            "stream": True}
    free = [c["text_output"] for c in srv.generate_stream(model, body)]
    assert free[0], f"the first token has text: {free}"
    # A stop string that begins with the first token's text and never matches: that text is held
    # back until the second token rules the match out.
    held = srv.generate_stream(model, {**body, "stop_words": [free[0] + "\u2603"]})
    assert all("error" not in c for c in held), held
    texts = [c["text_output"] for c in held]
    assert texts[0] == "", texts
    assert len(texts) == len(free) and "".join(texts) == "".join(free), (texts, free)
