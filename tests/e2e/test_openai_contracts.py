"""Triton's OpenAI-compatible frontend and TensorRT-LLM's llmapi model, replayed against ferrum.

The frontend (server repo, python/openai) runs Triton in process and cannot be installed here,
so these tests build its requests tensor for tensor as its request builders do and read the
responses back the way it reads them. Sources (triton-inference-server/server@e1db8a6, read, not
copied):

- python/openai/openai_frontend/engine/utils/triton.py: ``_create_vllm_generate_request`` (the vLLM
  contract: a model whose backend is ``vllm``, or ``--backend vllm``) and
  ``_create_trtllm_generate_request`` (every other backend, so ferrum's by default);
  ``_get_output`` / ``_to_string`` (``text_output``: one UTF-8 string per response),
  ``_get_usage_from_response`` and ``_StreamingUsageAccumulator`` (usage needs both
  ``num_input_tokens`` and ``num_output_tokens`` on a response; a stream's ``num_output_tokens`` are
  summed), ``_get_logprobs_from_response`` and ``_get_openai_*_logprobs_from_vllm_response`` (the
  ``logprobs`` JSON, the selected token being the lowest rank),
  ``_validate_triton_responses_non_streaming`` (1 or 2 responses, the last one final);
- engine/triton_engine.py: ``_build_model_metadata`` (the echo tensor is the first input named
  ``exclude_input_in_output`` or ``sampling_param_exclude_input_from_output``), ``chat`` (the
  prompt is the tokenizer's chat template applied by the frontend), ``completion``;
- schemas/openai.py: the request fields and their defaults (which ``model_dump(exclude_none=True)``
  puts into ``sampling_parameters``).

The llmapi model's interface: NVIDIA/TensorRT-LLM triton_backend/all_models/llmapi/tensorrt_llm/
config.pbtxt and 1/helpers.py. Models: see ``contracts_server`` in conftest.py.
"""

import json
import queue

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient

PROMPT = "The capital of France is"
QUESTION = "What is the capital of France?"
# SmolLM2's chat template (ChatML) applied to one user message with add_generation_prompt=True,
# as the frontend's tokenizer.apply_chat_template renders it (the system line is the template's
# default).
CHAT_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
)


# ---- the frontend's request builders ---------------------------------------------------------


def _tensor(name, value, dtype):
    arr = np.array(value, dtype=np.object_ if dtype == "BYTES" else dtype)
    inp = grpcclient.InferInput(name, list(arr.shape), "BYTES" if dtype == "BYTES" else grpcclient.np_to_triton_dtype(arr.dtype))
    inp.set_data_from_numpy(arr)
    return inp


def vllm_request(prompt, *, chat, stream, max_tokens, temperature=0.0, echo=None, stop=None, seed=None,
                 logprobs=None, top_logprobs=None, extra=None):
    """`_create_vllm_generate_request`: shapes [1] (no batch dimension)."""
    # model_dump(exclude=..., exclude_none=True): the request's non-None fields, schema defaults
    # included (frequency_penalty 0, ignore_eos False, n 1, presence_penalty 0, top_p 1;
    # temperature is set here, 0 for greedy answers the tests can compare).
    sp = {"frequency_penalty": 0.0, "ignore_eos": False, "n": 1, "presence_penalty": 0.0,
          "temperature": temperature, "top_p": 1.0}
    if stop is not None:
        sp["stop"] = stop
    if seed is not None:
        sp["seed"] = seed
    sp["max_tokens"] = max_tokens
    request_logprobs = False
    if chat:
        # logprobs (bool) + top_logprobs (int) → vLLM's logprobs count (1 when not given).
        if logprobs:
            sp["logprobs"] = top_logprobs if top_logprobs is not None else 1
            request_logprobs = True
    elif logprobs is not None and logprobs > 0:
        sp["logprobs"] = logprobs
        request_logprobs = True
    sp.update(extra or {})
    # A chat request has no `echo`; a completion's defaults to False.
    exclude_input_in_output = True
    if not chat and echo is not None:
        exclude_input_in_output = not echo
    return [
        _tensor("return_logprobs", [request_logprobs], np.bool_),
        _tensor("text_input", [prompt], "BYTES"),
        _tensor("stream", [stream], np.bool_),
        _tensor("exclude_input_in_output", [exclude_input_in_output], np.bool_),
        _tensor("sampling_parameters", [json.dumps(sp)], "BYTES"),
        _tensor("return_num_input_tokens", [True], np.bool_),
        _tensor("return_num_output_tokens", [True], np.bool_),
    ]


def trtllm_request(prompt, *, chat, stream, max_tokens, echo_tensor, temperature=0.0, echo=False, stop=None,
                   seed=None, top_p=1.0, tool_schema=None):
    """`_create_trtllm_generate_request`: shapes [1, 1] ([[value]])."""
    inputs = [
        _tensor("text_input", [[prompt]], "BYTES"),
        _tensor("stream", [[stream]], np.bool_),
        _tensor("max_tokens", [[max_tokens]], np.int32),
    ]
    if stop:
        inputs.append(_tensor("stop_words", [stop if isinstance(stop, list) else [stop]], "BYTES"))
    # top_p, the penalties and temperature have non-None schema defaults, so they always go.
    inputs += [
        _tensor("top_p", [[top_p]], np.float32),
        _tensor("frequency_penalty", [[0.0]], np.float32),
        _tensor("presence_penalty", [[0.0]], np.float32),
    ]
    if seed is not None:
        inputs.append(_tensor("seed", [[seed]], np.uint64))
    inputs.append(_tensor("temperature", [[temperature]], np.float32))
    # Echo only for completions (chat requests have no `echo`; a completion's defaults to False).
    if not chat and echo_tensor is not None:
        inputs.append(_tensor(echo_tensor, [[not echo]], np.bool_))
    if tool_schema is not None:
        # A named or required tool choice.
        inputs.append(_tensor("guided_decoding_guide_type", [["json_schema"]], "BYTES"))
        inputs.append(_tensor("guided_decoding_guide", [[tool_schema]], "BYTES"))
    inputs += [
        _tensor("return_num_input_tokens", [[True]], np.bool_),
        _tensor("return_num_output_tokens", [[True]], np.bool_),
    ]
    return inputs


def echo_tensor_name(server, model):
    """`_build_model_metadata`: the first declared input with one of the two echo names."""
    config = requests.get(f"{server.url}/v2/models/{model}/config", timeout=30).json()
    assert config["backend"] == "ferrum"  # not "vllm": the frontend picks the TensorRT-LLM builder
    for inp in config["input"]:
        if inp["name"] in ("exclude_input_in_output", "sampling_param_exclude_input_from_output"):
            return inp["name"]
    return None


# ---- sending, and reading back as the frontend does --------------------------------------------


def infer(server, model, inputs):
    """Every response of one request (a dict of output name → numpy array, plus `final`), or the
    error message. Decoupled models answer over a gRPC stream, as the frontend's async_infer."""
    got = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    client.async_stream_infer(model, inputs, enable_empty_final_response=True)
    responses = []
    try:
        while True:
            result, error = got.get(timeout=300)
            if error is not None:
                return responses, str(error)
            resp = result.get_response()
            outputs = {o.name: result.as_numpy(o.name) for o in resp.outputs}
            final = resp.parameters["triton_final_response"].bool_param
            responses.append({"outputs": outputs, "final": final})
            if final:
                return responses, None
    finally:
        client.stop_stream()
        client.close()


def text_of(resp):
    """`_get_output` / `_to_string`: exactly one string, strict UTF-8; "" without text_output."""
    arr = resp["outputs"].get("text_output")
    if arr is None:
        return ""
    assert arr.size == 1, f"the frontend needs 1 string per response, got {arr.size}"
    return arr.reshape(-1)[0].decode("utf-8")


def usage_of(resp):
    """`_get_usage_from_response`: (prompt_tokens, completion_tokens), or None unless both
    counts are there (UINT32 or INT32)."""
    o = resp["outputs"]
    if "num_input_tokens" not in o or "num_output_tokens" not in o:
        return None
    for name in ("num_input_tokens", "num_output_tokens"):
        assert o[name].dtype in (np.uint32, np.int32), (name, o[name].dtype)
    return int(o["num_input_tokens"].reshape(-1)[0]), int(o["num_output_tokens"].reshape(-1)[0])


def streamed_usage(responses):
    """`_StreamingUsageAccumulator`: prompt tokens of the first response with usage, completion
    tokens summed over all."""
    usages = [u for u in map(usage_of, responses) if u is not None]
    assert usages, "no response carries usage"
    return usages[0][0], sum(c for _, c in usages)


def selected_logprobs(resp):
    """`_get_openai_chat_format_logprobs_from_vllm_response`: per token of the response, the
    entries sorted by rank, the first being the selected token; None without logprobs."""
    arr = resp["outputs"].get("logprobs")
    if arr is None:
        return None
    assert arr.size == 1
    raw = arr.reshape(-1)[0].decode("utf-8")
    if raw == "null":
        return None
    out = []
    for per_token in json.loads(raw):
        assert per_token, "an empty logprobs entry"
        entries = sorted(per_token.items(), key=lambda kv: kv[1].get("rank", 1 << 62))
        for token_id, e in entries:
            assert int(token_id) >= 0 and set(e) == {"logprob", "rank", "decoded_token"}, e
            assert e["logprob"] <= 0.0 and isinstance(e["decoded_token"], str)
        out.append(entries)
    return out


def one_answer(responses, error):
    """`_validate_triton_responses_non_streaming`: 1 or 2 responses, the last final."""
    assert error is None, error
    assert 1 <= len(responses) <= 2 and responses[-1]["final"], responses
    return responses[0]


def stream_answer(responses, error):
    assert error is None, error
    assert responses and responses[-1]["final"] and not any(r["final"] for r in responses[:-1])
    return "".join(text_of(r) for r in responses)


@pytest.fixture(scope="module")
def reference(contracts_server):
    """Greedy answers of the plain generate endpoint (prompt excluded by default)."""
    def gen(prompt, n):
        r = contracts_server.generate("trtllm", {"text_input": prompt, "max_tokens": n})
        assert r.status_code == 200, r.text
        return r.json()

    return {"completion": gen(PROMPT, 12), "chat": gen(CHAT_PROMPT, 24)}


# ---- the vLLM contract -------------------------------------------------------------------------


def test_vllm_contract_completion_returns_text_usage_and_logprobs(contracts_server, reference):
    want = reference["completion"]
    resp = one_answer(*infer(contracts_server, "vllm", vllm_request(PROMPT, chat=False, stream=False, max_tokens=12, logprobs=2)))
    text = text_of(resp)
    assert text == want["text_output"] and not text.startswith(PROMPT)
    assert usage_of(resp) == (want["num_input_tokens"], 12)
    assert resp["outputs"]["finish_reason"].reshape(-1)[0] == b"length"
    tokens = selected_logprobs(resp)
    assert len(tokens) == 12
    for entries in tokens:
        # Greedy: the sampled token is the most likely one; logprobs=2 → at most 2 alternatives
        # (the sampled token among them).
        assert entries[0][1]["rank"] == 1 and len(entries) <= 3
        assert [e["rank"] for _, e in entries] == sorted(e["rank"] for _, e in entries)
    # The selected tokens spell the text (ASCII answer, one token at a time).
    assert "".join(entries[0][1]["decoded_token"] for entries in tokens) == text
    # echo=True: exclude_input_in_output=False, the prompt comes first.
    resp = one_answer(*infer(contracts_server, "vllm", vllm_request(PROMPT, chat=False, stream=False, max_tokens=12, echo=True)))
    assert text_of(resp) == PROMPT + want["text_output"]
    assert "logprobs" not in resp["outputs"]


def test_vllm_contract_streaming_deltas_usage_and_logprobs_add_up(contracts_server, reference):
    want = reference["completion"]
    responses, error = infer(contracts_server, "vllm", vllm_request(PROMPT, chat=False, stream=True, max_tokens=12, logprobs=1))
    assert stream_answer(responses, error) == want["text_output"]
    assert len(responses) >= 2
    assert streamed_usage(responses) == (want["num_input_tokens"], 12)
    per_response = [selected_logprobs(r) for r in responses]
    assert sum(len(t) for t in per_response) == 12
    # Each response's logprobs are those of its own tokens.
    for r, toks in zip(responses, per_response):
        assert len(toks) == usage_of(r)[1]


def test_vllm_contract_chat_with_a_stop_list(contracts_server, reference):
    want = reference["chat"]["text_output"]
    assert "Paris" in want, want
    # Stop at the answer's second word: the text ends before it.
    stop_word = want.split()[1]
    cut = want.index(stop_word)
    for stream in (False, True):
        responses, error = infer(contracts_server, "vllm", vllm_request(
            CHAT_PROMPT, chat=True, stream=stream, max_tokens=24, stop=[stop_word, "NEVER"], logprobs=True))
        text = stream_answer(responses, error)
        assert text == want[:cut], (text, want)
        assert responses[-1]["outputs"]["finish_reason"].reshape(-1)[0] == b"stop"
        prompt_tokens, completion_tokens = streamed_usage(responses)
        assert prompt_tokens == reference["chat"]["num_input_tokens"] and 0 < completion_tokens < 24
        assert sum(len(selected_logprobs(r)) for r in responses) == completion_tokens


def test_vllm_contract_refuses_structured_outputs_and_lora_clearly(contracts_server):
    # A named tool choice adds `structured_outputs` (a JSON string); a LoRA model `lora_name`.
    for key, value in [("structured_outputs", json.dumps({"json": {"type": "object"}})), ("lora_name", "adapter")]:
        responses, error = infer(contracts_server, "vllm", vllm_request(
            QUESTION, chat=True, stream=False, max_tokens=4, extra={key: value}))
        assert error is not None and not responses
        assert f"'{key}'" in error and "not supported by ferrum" in error, error


# ---- the TensorRT-LLM contract -----------------------------------------------------------------


def test_trtllm_contract_chat_comes_back_without_the_prompt(contracts_server, reference):
    echo = echo_tensor_name(contracts_server, "trtllm")
    assert echo == "exclude_input_in_output"
    want = reference["chat"]
    resp = one_answer(*infer(contracts_server, "trtllm", trtllm_request(
        CHAT_PROMPT, chat=True, stream=False, max_tokens=24, echo_tensor=echo)))
    text = text_of(resp)
    assert text == want["text_output"] and "<|im_start|>" not in text and "Paris" in text
    assert usage_of(resp) == (want["num_input_tokens"], want["num_output_tokens"])
    # The same answer streamed, and through the vLLM contract.
    responses, error = infer(contracts_server, "trtllm", trtllm_request(
        CHAT_PROMPT, chat=True, stream=True, max_tokens=24, echo_tensor=echo))
    assert stream_answer(responses, error) == text
    assert streamed_usage(responses) == (want["num_input_tokens"], want["num_output_tokens"])
    resp = one_answer(*infer(contracts_server, "vllm", vllm_request(CHAT_PROMPT, chat=True, stream=False, max_tokens=24)))
    assert text_of(resp) == text


def test_trtllm_contract_completions_echo_stop_words_and_streamed_usage(contracts_server, reference):
    echo = echo_tensor_name(contracts_server, "trtllm")
    want = reference["completion"]
    # echo=False (the default) sends exclude_input_in_output=True; a seed with greedy changes
    # nothing.
    resp = one_answer(*infer(contracts_server, "trtllm", trtllm_request(
        PROMPT, chat=False, stream=False, max_tokens=12, echo_tensor=echo, seed=123)))
    assert text_of(resp) == want["text_output"]
    resp = one_answer(*infer(contracts_server, "trtllm", trtllm_request(
        PROMPT, chat=False, stream=False, max_tokens=12, echo_tensor=echo, echo=True)))
    assert text_of(resp) == PROMPT + want["text_output"]
    stop_word = want["text_output"].split()[1]
    cut = want["text_output"].index(stop_word)
    responses, error = infer(contracts_server, "trtllm", trtllm_request(
        PROMPT, chat=False, stream=True, max_tokens=12, echo_tensor=echo, stop=stop_word))
    assert stream_answer(responses, error) == want["text_output"][:cut]
    prompt_tokens, completion_tokens = streamed_usage(responses)
    assert prompt_tokens == want["num_input_tokens"] and 0 < completion_tokens < 12
    assert all(usage_of(r) is not None for r in responses)


def test_trtllm_contract_refuses_guided_decoding_clearly(contracts_server):
    echo = echo_tensor_name(contracts_server, "trtllm")
    responses, error = infer(contracts_server, "trtllm", trtllm_request(
        QUESTION, chat=True, stream=False, max_tokens=4, echo_tensor=echo, tool_schema='{"type": "object"}'))
    assert error is not None and not responses
    assert "'guided_decoding_guide_type'" in error and "not supported by ferrum" in error, error


# ---- UTF-8 -------------------------------------------------------------------------------------


def test_streamed_deltas_are_utf8_safe(contracts_server):
    # An answer of CJK characters, each split over 2-3 of SmolLM2's byte-level tokens: every
    # delta must decode on its own (the frontend decodes each strictly), a token that completes
    # no character goes with the next response, and the counts still add up.
    prompt = CHAT_PROMPT.replace(QUESTION, "Repeat: 你好世界")
    full = one_answer(*infer(contracts_server, "vllm", vllm_request(prompt, chat=True, stream=False, max_tokens=8)))
    whole = text_of(full)
    assert "你好" in whole, whole
    responses, error = infer(contracts_server, "vllm", vllm_request(prompt, chat=True, stream=True, max_tokens=8))
    assert stream_answer(responses, error) == whole
    assert streamed_usage(responses)[1] == usage_of(full)[1] == 8
    assert max(usage_of(r)[1] for r in responses) >= 2, "no token was held back"
    # The TensorRT-LLM contract streams the same deltas.
    responses, error = infer(contracts_server, "trtllm", trtllm_request(
        prompt, chat=True, stream=True, max_tokens=8, echo_tensor="exclude_input_in_output"))
    assert stream_answer(responses, error) == whole


# ---- TensorRT-LLM's llmapi model ---------------------------------------------------------------


def llmapi_request(prompt, *, streaming, max_tokens, exclude_input=None, **flags):
    """llmapi's inputs (config.pbtxt): max_batch_size 0, dims [1] (text_input [-1])."""
    inputs = [
        _tensor("text_input", [prompt], "BYTES"),
        _tensor("streaming", [streaming], np.bool_),
        _tensor("sampling_param_max_tokens", [max_tokens], np.int32),
        _tensor("sampling_param_temperature", [0.0], np.float32),
        _tensor("sampling_param_top_k", [1], np.int32),
        _tensor("sampling_param_top_p", [1.0], np.float32),
        _tensor("sampling_param_frequency_penalty", [0.0], np.float32),
        _tensor("sampling_param_presence_penalty", [0.0], np.float32),
        _tensor("sampling_param_seed", [5], np.uint64),
        _tensor("sampling_param_best_of", [1], np.int32),
    ]
    if exclude_input is not None:
        inputs.append(_tensor("sampling_param_exclude_input_from_output", [exclude_input], np.bool_))
    for name, value in flags.items():
        inputs.append(_tensor(name, value if isinstance(value, list) else [value], "BYTES" if name == "sampling_param_stop" else np.bool_))
    return inputs


def test_llmapi_model_inputs_and_outputs(contracts_server, reference):
    want = reference["completion"]
    resp = one_answer(*infer(contracts_server, "llmapi", llmapi_request(
        PROMPT, streaming=False, max_tokens=12, return_finish_reason=True, return_cumulative_logprob=True)))
    out = resp["outputs"]
    # Only the outputs the config declares (no counts, no tensorrtllm logprobs).
    assert set(out) == {"text_output", "finish_reason", "cumulative_logprob"}, set(out)
    assert text_of(resp) == want["text_output"]
    assert out["finish_reason"].reshape(-1)[0] == b"length"
    cum = float(out["cumulative_logprob"].reshape(-1)[0])
    assert out["cumulative_logprob"].dtype == np.float32 and -1000 < cum < 0
    # Streaming: the deltas add up, each response carries the cumulative logprob so far (the
    # last one the whole answer's), the finish reason comes last.
    responses, error = infer(contracts_server, "llmapi", llmapi_request(
        PROMPT, streaming=True, max_tokens=12, return_finish_reason=True, return_cumulative_logprob=True))
    assert stream_answer(responses, error) == want["text_output"]
    cums = [float(r["outputs"]["cumulative_logprob"].reshape(-1)[0]) for r in responses]
    assert cums == sorted(cums, reverse=True) and abs(cums[-1] - cum) < 1e-3, (cums, cum)
    assert [("finish_reason" in r["outputs"]) for r in responses] == [False] * (len(responses) - 1) + [True]
    # Flags off: no finish reason, no logprob; the prompt back with exclude_input_from_output=false.
    resp = one_answer(*infer(contracts_server, "llmapi", llmapi_request(
        PROMPT, streaming=False, max_tokens=12, exclude_input=False, return_finish_reason=False)))
    assert set(resp["outputs"]) == {"text_output"}
    assert text_of(resp) == PROMPT + want["text_output"]
    # A stop list (sampling_param_stop, [-1] strings).
    stop_word = want["text_output"].split()[1]
    resp = one_answer(*infer(contracts_server, "llmapi", llmapi_request(
        PROMPT, streaming=False, max_tokens=12, sampling_param_stop=[stop_word, "NEVER"], return_finish_reason=True)))
    assert text_of(resp) == want["text_output"][: want["text_output"].index(stop_word)]
    assert resp["outputs"]["finish_reason"].reshape(-1)[0] == b"stop"


def test_llmapi_model_over_the_generate_endpoint(contracts_server, reference):
    # The llmapi docs' curl form: every key an input.
    r = contracts_server.generate("llmapi", {
        "text_input": PROMPT, "sampling_param_max_tokens": 12, "sampling_param_temperature": 0.0,
        "return_finish_reason": True, "return_cumulative_logprob": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text_output"] == reference["completion"]["text_output"]
    assert body["finish_reason"] == "length" and body["cumulative_logprob"] < 0
    # A misspelt key is no input, so Triton passes it as a request parameter: an error naming it.
    r = contracts_server.generate("llmapi", {"text_input": PROMPT, "sampling_param_max_token": 3})
    assert r.status_code == 400 and "'sampling_param_max_token'" in r.text, r.text
