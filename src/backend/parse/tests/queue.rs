//! Where a request waits: `priority` (tensor, request parameter, and vLLM's order inside
//! `sampling_parameters`) and `queue_timeout_microseconds`.

use super::*;

fn priority_of(p: &ParsedRequest) -> i64 {
    p.generate.queue().priority
}

fn sampling_json(json: &str) -> InputTensor {
    bytes_tensor("sampling_parameters", vec![1], &[json.as_bytes()])
}

#[test]
fn priority_is_higher_first_as_a_tensor_or_parameter_and_lower_first_in_sampling_parameters() {
    assert_eq!(priority_of(&run(vec![text("x")]).unwrap()), 0);
    let tensor = run(vec![text("x"), i32s("priority", vec![1], &[7])]).unwrap();
    assert_eq!(priority_of(&tensor), 7);
    let param = run_with(
        vec![text("x")],
        vec![("priority".into(), ParamValue::Int(-3))],
        0,
        false,
    )
    .unwrap();
    assert_eq!(priority_of(&param), -3);
    // vLLM's priority 2 is scheduled after its priority 1: the engine's levels -2 < -1.
    let vllm = run(vec![text("x"), sampling_json(r#"{"priority": 2}"#)]).unwrap();
    assert_eq!(priority_of(&vllm), -2);
    // Precedence as for every field: tensor > sampling_parameters > request parameter.
    let both = run_with(
        vec![
            text("x"),
            sampling_json(r#"{"priority": 4}"#),
            i32s("priority", vec![1], &[9]),
        ],
        vec![("priority".into(), ParamValue::Int(1))],
        0,
        false,
    )
    .unwrap();
    assert_eq!(priority_of(&both), 9);
    let json_over_param = run_with(
        vec![text("x"), sampling_json(r#"{"priority": 4}"#)],
        vec![("priority".into(), ParamValue::Int(1))],
        0,
        false,
    )
    .unwrap();
    assert_eq!(priority_of(&json_over_param), -4);
}

#[test]
fn a_priority_out_of_range_is_an_error_naming_the_order() {
    let e = run_with(
        vec![text("x")],
        vec![("priority".into(), ParamValue::Int(1 << 40))],
        0,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("'priority': 1099511627776")
            && e.contains("[-2147483648, 2147483647]")
            && e.contains("higher is scheduled first"),
        "{e}"
    );
    let e = err_text(vec![
        text("x"),
        sampling_json(r#"{"priority": -3000000000}"#),
    ]);
    assert!(
        e.contains("'priority': -3000000000") && e.contains("lower is scheduled first"),
        "{e}"
    );
    let e = err_text(vec![text("x"), sampling_json(r#"{"priority": "high"}"#)]);
    assert!(e.contains("priority"), "{e}");
}

#[test]
fn queue_timeout_microseconds_is_a_request_parameter_of_one_microsecond_to_an_hour() {
    let with = |v: ParamValue| {
        run_with(
            vec![text("x")],
            vec![("queue_timeout_microseconds".into(), v)],
            0,
            false,
        )
    };
    let p = with(ParamValue::Int(250_000)).unwrap();
    assert_eq!(
        p.generate.queue().queue_timeout,
        Some(std::time::Duration::from_millis(250))
    );
    assert_eq!(
        run(vec![text("x")]).unwrap().generate.queue().queue_timeout,
        None
    );
    for bad in [0, -5, 3_600_000_001] {
        let e = with(ParamValue::Int(bad)).unwrap_err().to_string();
        assert!(
            e.contains(&format!("'queue_timeout_microseconds': {bad}"))
                && e.contains("[1, 3600000000] microseconds"),
            "{e}"
        );
    }
    // Not a sampling_parameters key (vLLM has none).
    let e = err_text(vec![
        text("x"),
        sampling_json(r#"{"queue_timeout_microseconds": 5}"#),
    ]);
    assert!(
        e.contains("unknown key 'queue_timeout_microseconds'"),
        "{e}"
    );
}
