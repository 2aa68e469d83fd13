//! Response content: `ResponseData` (what one response says) → the output tensors Triton sends
//! (`build_outputs`, `OutputTensor`). Pure code, tested here; sending is `sender`'s job.

use triton_api::DataType;

use crate::request::FinishReason;

/// One output tensor of a response (shape includes the batch dimension when the model has one).
#[derive(Debug, Clone, PartialEq)]
pub struct OutputTensor {
    /// One of the names in `parse::OUTPUTS`.
    pub name: &'static str,
    /// Its Triton datatype, as `parse::OUTPUTS` declares it.
    pub dtype: DataType,
    /// Dims, with a leading 1 when the model is batched.
    pub shape: Vec<i64>,
    /// Little-endian elements; BYTES as Triton serializes them (a u32 length before each).
    pub data: Vec<u8>,
}

/// The content of one response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResponseData {
    /// For the text interface: the text of this response (a delta when streaming).
    pub text: Option<String>,
    /// For the token interface: the token ids of this response.
    pub token_ids: Option<Vec<u32>>,
    /// Log-probabilities of the generated tokens in this response (`cum_log_probs` is their
    /// sum, `output_log_probs` the list).
    pub logprobs: Option<Vec<f32>>,
    /// The vLLM backend's `logprobs` output: a JSON list with one object per generated token of
    /// this response (see `shape::logprobs_json`).
    pub logprobs_json: Option<String>,
    /// `cumulative_logprob`: the sum of the logprobs of every token generated so far.
    pub cumulative_logprob: Option<f32>,
    /// Set on the last response.
    pub finish: Option<FinishReason>,
    /// The prompt's length in tokens.
    pub num_input_tokens: Option<usize>,
    /// The tokens this response covers: all of them when not streaming, the new ones when
    /// streaming (so the values of a stream add up to the total).
    pub num_output_tokens: Option<usize>,
}

fn tensor(
    name: &'static str,
    dtype: DataType,
    batched: bool,
    dims: &[i64],
    data: Vec<u8>,
) -> OutputTensor {
    let mut shape = Vec::with_capacity(dims.len() + 1);
    if batched {
        shape.push(1);
    }
    shape.extend_from_slice(dims);
    OutputTensor {
        name,
        dtype,
        shape,
        data,
    }
}

/// Output tensors for one response, following tensorrtllm_backend's and the vLLM backend's
/// output names: `text_output` [1], `output_ids` [1, N] (one beam), `sequence_length` [1],
/// `cum_log_probs` [1], `output_log_probs` [1, N], `finish_reason` [1], `num_input_tokens` [1],
/// `num_output_tokens` [1], `logprobs` [1] (JSON), `cumulative_logprob` [1]; each with a
/// leading batch dimension of 1 when `batched`.
pub fn build_outputs(d: &ResponseData, batched: bool) -> Vec<OutputTensor> {
    let mut out = Vec::new();
    if let Some(text) = &d.text {
        out.push(tensor(
            "text_output",
            DataType::Bytes,
            batched,
            &[1],
            triton_api::serialize_bytes([text.as_bytes()]),
        ));
    }
    if let Some(ids) = &d.token_ids {
        let data = ids
            .iter()
            .flat_map(|&id| (id as i32).to_le_bytes())
            .collect();
        out.push(tensor(
            "output_ids",
            DataType::Int32,
            batched,
            &[1, ids.len() as i64],
            data,
        ));
        out.push(tensor(
            "sequence_length",
            DataType::Int32,
            batched,
            &[1],
            (ids.len() as i32).to_le_bytes().to_vec(),
        ));
    }
    if let Some(lps) = &d.logprobs {
        let cum: f32 = lps.iter().sum();
        out.push(tensor(
            "cum_log_probs",
            DataType::Fp32,
            batched,
            &[1],
            cum.to_le_bytes().to_vec(),
        ));
        let data = lps.iter().flat_map(|lp| lp.to_le_bytes()).collect();
        out.push(tensor(
            "output_log_probs",
            DataType::Fp32,
            batched,
            &[1, lps.len() as i64],
            data,
        ));
    }
    if let Some(reason) = d.finish {
        out.push(tensor(
            "finish_reason",
            DataType::Bytes,
            batched,
            &[1],
            triton_api::serialize_bytes([reason.as_str().as_bytes()]),
        ));
    }
    if let Some(n) = d.num_input_tokens {
        out.push(tensor(
            "num_input_tokens",
            DataType::Uint32,
            batched,
            &[1],
            (n as u32).to_le_bytes().to_vec(),
        ));
    }
    if let Some(n) = d.num_output_tokens {
        out.push(tensor(
            "num_output_tokens",
            DataType::Uint32,
            batched,
            &[1],
            (n as u32).to_le_bytes().to_vec(),
        ));
    }
    if let Some(json) = &d.logprobs_json {
        out.push(tensor(
            "logprobs",
            DataType::Bytes,
            batched,
            &[1],
            triton_api::serialize_bytes([json.as_bytes()]),
        ));
    }
    if let Some(cum) = d.cumulative_logprob {
        out.push(tensor(
            "cumulative_logprob",
            DataType::Fp32,
            batched,
            &[1],
            cum.to_le_bytes().to_vec(),
        ));
    }
    out
}

/// `outputs` without those the model's configuration does not declare (`declared`): Triton
/// refuses a response holding an undeclared output. A configuration that declares none (auto
/// completion disabled) filters nothing: the outputs go as before and Triton says which one it
/// does not know.
pub fn declared_only(mut outputs: Vec<OutputTensor>, declared: &[String]) -> Vec<OutputTensor> {
    if !declared.is_empty() {
        outputs.retain(|o| declared.iter().any(|d| d == o.name));
    }
    outputs
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn find<'a>(out: &'a [OutputTensor], name: &str) -> &'a OutputTensor {
        out.iter().find(|o| o.name == name).unwrap()
    }

    #[test]
    fn text_outputs_with_and_without_batch_dimension() {
        let d = ResponseData {
            text: Some("hé".into()),
            finish: Some(FinishReason::Length),
            num_input_tokens: Some(3),
            num_output_tokens: Some(2),
            ..Default::default()
        };
        let out = build_outputs(&d, false);
        let names: Vec<_> = out.iter().map(|o| o.name).collect();
        assert_eq!(
            names,
            [
                "text_output",
                "finish_reason",
                "num_input_tokens",
                "num_output_tokens"
            ]
        );
        let t = find(&out, "text_output");
        assert_eq!(t.shape, vec![1]);
        assert_eq!(t.data, triton_api::serialize_bytes(["hé".as_bytes()]));
        assert_eq!(
            find(&out, "finish_reason").data,
            triton_api::serialize_bytes([b"length".as_slice()])
        );
        assert_eq!(find(&out, "num_input_tokens").data, 3u32.to_le_bytes());
        let out = build_outputs(&d, true);
        assert!(
            out.iter().all(|o| o.shape[0] == 1 && o.shape.len() == 2),
            "{out:?}"
        );
    }

    #[test]
    fn vllm_outputs_and_the_declared_filter() {
        let d = ResponseData {
            text: Some("x".into()),
            logprobs_json: Some("[]".into()),
            cumulative_logprob: Some(-1.5),
            num_input_tokens: Some(2),
            ..Default::default()
        };
        let out = build_outputs(&d, false);
        assert_eq!(
            find(&out, "logprobs").data,
            triton_api::serialize_bytes([b"[]".as_slice()])
        );
        let cum = find(&out, "cumulative_logprob");
        assert_eq!(
            (cum.dtype, cum.data.clone()),
            (DataType::Fp32, (-1.5f32).to_le_bytes().to_vec())
        );
        let declared = ["text_output".to_string(), "cumulative_logprob".to_string()];
        let names: Vec<_> = declared_only(out.clone(), &declared)
            .iter()
            .map(|o| o.name)
            .collect();
        assert_eq!(names, ["text_output", "cumulative_logprob"]);
        assert_eq!(declared_only(out.clone(), &[]), out);
    }

    #[test]
    fn token_outputs_and_logprobs() {
        let d = ResponseData {
            token_ids: Some(vec![5, 6, 7]),
            logprobs: Some(vec![-0.5, -1.0, -0.25]),
            ..Default::default()
        };
        let out = build_outputs(&d, true);
        let ids = find(&out, "output_ids");
        assert_eq!(ids.shape, vec![1, 1, 3]);
        assert_eq!(
            ids.data,
            [5i32, 6, 7]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>()
        );
        assert_eq!(find(&out, "sequence_length").data, 3i32.to_le_bytes());
        assert_eq!(find(&out, "cum_log_probs").data, (-1.75f32).to_le_bytes());
        assert_eq!(find(&out, "output_log_probs").shape, vec![1, 1, 3]);
        // Every tensor's bytes match its shape.
        for o in &out {
            let n: i64 = o.shape.iter().product();
            assert_eq!(
                o.data.len() as i64,
                n * o.dtype.byte_size().unwrap() as i64,
                "{}",
                o.name
            );
        }
    }
}
