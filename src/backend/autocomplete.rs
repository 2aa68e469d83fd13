//! Auto-completion of a model configuration (`TRITONBACKEND_ModelSetConfig`): a minimal
//! config.pbtxt with `backend: "ferrum"` and `parameters` gets every input and output ferrum
//! understands (see `parse::INPUTS`/`OUTPUTS`), all inputs optional. Only fills what is missing:
//! a config that declares inputs or outputs keeps its own. Pure JSON in, JSON out.

use serde_json::{Value, json};

use super::parse::{INPUTS, OUTPUTS, TensorSpec};

fn tensor_json(s: &TensorSpec, optional: bool) -> Value {
    let mut v = json!({ "name": s.name, "data_type": s.dtype.config_name(), "dims": s.dims });
    if optional {
        v["optional"] = Value::Bool(true);
    }
    v
}

fn is_empty_list(config: &Value, key: &str) -> bool {
    config
        .get(key)
        .and_then(|v| v.as_array())
        .is_none_or(|a| a.is_empty())
}

/// The completed configuration, or None when nothing needs to change.
pub fn complete(config: &Value) -> Option<Value> {
    let mut out = config.clone();
    let mut changed = false;
    if !out.is_object() {
        return None;
    }
    if is_empty_list(config, "input") {
        out["input"] = Value::Array(INPUTS.iter().map(|s| tensor_json(s, true)).collect());
        changed = true;
    }
    if is_empty_list(config, "output") {
        out["output"] = Value::Array(OUTPUTS.iter().map(|s| tensor_json(s, false)).collect());
        changed = true;
    }
    changed.then_some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn fills_inputs_and_outputs_of_a_minimal_config() {
        let c = json!({ "name": "m", "backend": "ferrum", "max_batch_size": 0, "input": [], "output": [] });
        let out = complete(&c).unwrap();
        let inputs = out["input"].as_array().unwrap();
        assert_eq!(inputs.len(), INPUTS.len());
        let text = inputs.iter().find(|i| i["name"] == "text_input").unwrap();
        assert_eq!(text["data_type"], "TYPE_STRING");
        assert_eq!(text["dims"], json!([1]));
        assert_eq!(text["optional"], true);
        let words = inputs
            .iter()
            .find(|i| i["name"] == "stop_words_list")
            .unwrap();
        assert_eq!(words["dims"], json!([2, -1]));
        let outputs = out["output"].as_array().unwrap();
        assert!(
            outputs
                .iter()
                .any(|o| o["name"] == "text_output" && o["dims"] == json!([-1]))
        );
        assert!(outputs.iter().any(|o| o["name"] == "finish_reason"));
        assert_eq!(out["backend"], "ferrum");
    }

    #[test]
    fn keeps_declared_tensors() {
        let c =
            json!({ "input": [{ "name": "text_input" }], "output": [{ "name": "text_output" }] });
        assert_eq!(complete(&c), None);
        let c = json!({ "input": [{ "name": "text_input" }] });
        let out = complete(&c).unwrap();
        assert_eq!(out["input"].as_array().unwrap().len(), 1);
        assert_eq!(out["output"].as_array().unwrap().len(), OUTPUTS.len());
    }
}
