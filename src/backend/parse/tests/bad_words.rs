//! `bad_words` (tensorrtllm's strings and `[2, N]` word list, vLLM's `sampling_parameters` key)
//! become token sequences in `SamplingParams::bad_words`.

use super::*;

fn bad_words_of(inputs: Vec<InputTensor>) -> Vec<Vec<u32>> {
    run(inputs).unwrap().generate.sampling().bad_words.clone()
}

#[test]
fn bad_words_as_text_ids_and_vllm_json_become_token_sequences() {
    let tok = tokenizer();
    let ids = |s: &str| tok.encode(s, false).unwrap();
    let multi = ids("hello world");
    assert!(multi.len() > 1, "a word of several ids: {multi:?}");
    // Tensor strings: as written (empty strings dropped, duplicates once).
    assert_eq!(
        bad_words_of(vec![
            text("x"),
            bytes_tensor("bad_words", vec![3], &[b"hello world", b"", b"hello world"]),
        ]),
        vec![multi.clone()]
    );
    // tensorrtllm's word list: ids as given.
    assert_eq!(
        bad_words_of(vec![
            text("x"),
            i32s("bad_words_list", vec![2, 3], &[7, 8, 9, 1, 3, -1]),
        ]),
        vec![vec![7], vec![8, 9]]
    );
    // vLLM's key: the word as written and after a space.
    assert_eq!(
        bad_words_of(vec![
            text("x"),
            bytes_tensor(
                "sampling_parameters",
                vec![1],
                &[br#"{"bad_words": ["hello world"]}"#]
            ),
        ]),
        vec![multi, ids(" hello world")]
    );
    assert!(bad_words_of(vec![text("x")]).is_empty());
}

#[test]
fn bad_words_as_text_need_a_tokenizer_and_ids_must_be_in_the_vocabulary() {
    let e = run_on(
        &model(None),
        vec![
            i32s("input_ids", vec![1], &[1]),
            bytes_tensor("bad_words", vec![1], &[b"no"]),
        ],
        vec![],
        0,
        true,
    )
    .unwrap_err();
    assert!(
        matches!(e, RequestError::NoTokenizer { field: "bad_words" }),
        "{e:?}"
    );
    let e = err_text(vec![
        text("x"),
        i32s("bad_words_list", vec![2, 1], &[100000, 1]),
    ]);
    assert!(e.contains("bad_words") && e.contains("100000"), "{e}");
}
