"""Checks of the smoke test's own comparison logic (runs anywhere: `pytest tests/e2e_gpu`), so a
bug there cannot make the GPU smoke test pass vacuously."""

from smoke_triton import compare, flat_ints, kv_gauges

CASE = {
    "prompt_ids": [5],
    "greedy_ids": [10, 11, 12],
    "top5": [[[10, -1.0], [20, -2.0]], [[11, -1.0], [21, -2.0]], [[12, -1.0], [22, -2.0]]],
}


def test_exact_comparison_flags_any_difference():
    assert compare([10, 11, 12], CASE, exact=True) is None
    assert "step 1" in compare([10, 21, 12], CASE, exact=True)
    assert "tokens" in compare([10, 11], CASE, exact=True)


def test_top5_rule_accepts_a_divergence_inside_the_reference_top5_only():
    # Diverging at step 1 to a token in transformers' top-5: accepted, later steps not compared.
    assert compare([10, 21, 99], CASE, exact=False) is None
    assert "not in" in compare([10, 99, 12], CASE, exact=False)
    assert "tokens" in compare([10, 11, 12, 13], CASE, exact=False)


def test_output_ids_are_flattened_in_order():
    assert flat_ints([[[1, 2, 3]]]) == [1, 2, 3]
    assert flat_ints([4, 5]) == [4, 5]
    assert flat_ints(6) == [6]


def test_kv_gauges_are_read_per_model():
    text = "\n".join([
        "# HELP nv_trt_llm_kv_cache_block_metrics KV blocks",
        'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="a",version="1"} 256',
        'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="a",version="1"} 3',
        'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="b",version="1"} 64',
        'nv_trt_llm_request_metrics{model="a",request_type="active",version="1"} 1',
    ])
    assert kv_gauges(text, "a") == {"max": 256.0, "used": 3.0}
    assert kv_gauges(text, "b") == {"max": 64.0}
    assert kv_gauges(text, "c") == {}
