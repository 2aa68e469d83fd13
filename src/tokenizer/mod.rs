//! Tokenizers (HF tokenizer.json or GGUF vocabularies), chat templates, incremental UTF-8 safe
//! detokenization and stop strings. Pure host code: never imports device or backend code.

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer: {0}")]
    Other(String),
}
