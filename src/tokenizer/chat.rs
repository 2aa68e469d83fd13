//! Chat templates with Hugging Face semantics: Jinja rendered by minijinja with Python string /
//! dict / list methods (minijinja-contrib pycompat), `trim_blocks` and `lstrip_blocks` on, and
//! the variables and helpers transformers' `apply_chat_template` provides (`messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token`, `unk_token`, `pad_token`,
//! `raise_exception`, `strftime_now`, a Python-style `tojson`). Templates are compiled once at
//! load, so a syntax error fails loading, not a request. Never touches tokens or ids.

use std::fmt::Write as _;
use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectRepr, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

use super::{SpecialTokenStrings, TokenizerError};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// Who speaks: `system`, `user` or `assistant` (passed to the template as is).
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role` with `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A message as the template sees it: a dict with `role` and `content`, in that order.
#[derive(Debug)]
struct MessageObject(ChatMessage);

impl Object for MessageObject {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.0.role.clone())),
            "content" => Some(Value::from(self.0.content.clone())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template.
#[derive(Debug)]
pub(super) struct ChatTemplate {
    source: String,
    env: Environment<'static>,
}

fn template_error(e: &Error) -> TokenizerError {
    // minijinja's Display names the kind and detail; the debug info adds the line when known.
    let mut message = e.to_string();
    if let Some(line) = e.line() {
        let _ = write!(message, " (template line {line})");
    }
    TokenizerError::ChatTemplate { message }
}

impl ChatTemplate {
    pub fn new(source: String) -> Result<ChatTemplate, TokenizerError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| template_error(&e))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| template_error(&e))?;
        Ok(ChatTemplate { source, env })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        special: &SpecialTokenStrings,
    ) -> Result<String, TokenizerError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| template_error(&e))?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| Value::from_object(MessageObject(m.clone())))
            .collect();
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => special.bos.clone(),
            eos_token => special.eos.clone(),
            unk_token => special.unk.clone(),
            pad_token => special.pad.clone(),
        };
        template.render(ctx).map_err(|e| template_error(&e))
    }
}

/// `raise_exception(msg)`: templates call it to reject a conversation.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current time (UTC) formatted with Python's strftime codes
/// (%Y %y %m %d %e %j %H %I %M %S %p %a %A %b %B %%; others are kept as written).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_utc(secs, &format)
}

/// Formats `unix_secs` (UTC) with a subset of strftime.
pub(super) fn format_utc(unix_secs: u64, format: &str) -> String {
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let num_days = (unix_secs / 86_400) as i64;
    let secs_of_day = unix_secs % 86_400;
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = num_days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_from_march = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_from_march + 2) / 153;
    let day = doy_from_march - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let is_leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUMULATIVE: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let month_idx = (month - 1) as usize;
    let day_of_year = CUMULATIVE[month_idx] + day + i64::from(is_leap && month > 2);
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let weekday_idx = (num_days + 3).rem_euclid(7) as usize;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(code) = chars.next() else {
            out.push('%');
            break;
        };
        let _ = match code {
            'Y' => write!(out, "{year}"),
            'y' => write!(out, "{:02}", year.rem_euclid(100)),
            'm' => write!(out, "{month:02}"),
            'd' => write!(out, "{day:02}"),
            'e' => write!(out, "{day:>2}"),
            'j' => write!(out, "{day_of_year:03}"),
            'H' => write!(out, "{hour:02}"),
            'I' => write!(out, "{hour12:02}"),
            'M' => write!(out, "{minute:02}"),
            'S' => write!(out, "{second:02}"),
            'p' => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            'A' => write!(out, "{}", DAYS[weekday_idx]),
            'a' => write!(out, "{}", &DAYS[weekday_idx][..3]),
            'B' => write!(out, "{}", MONTHS[month_idx]),
            'b' => write!(out, "{}", &MONTHS[month_idx][..3]),
            '%' => write!(out, "%"),
            other => write!(out, "%{other}"),
        };
    }
    out
}

/// `tojson(indent=None, sort_keys=False)` as transformers defines it: Python's `json.dumps` with
/// `ensure_ascii=False` (", " and ": " separators without indent, no HTML escaping).
fn tojson(
    value: &Value,
    indent: Option<usize>,
    kwargs: minijinja::value::Kwargs,
) -> Result<Value, Error> {
    let indent = match indent {
        Some(n) => Some(n),
        None => kwargs.get::<Option<usize>>("indent")?,
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_py_json(&mut out, value, indent, sort_keys, 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_py_json(
    out: &mut String,
    value: &Value,
    indent: Option<usize>,
    sort_keys: bool,
    depth: usize,
) -> Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = value.as_i64().filter(|_| value.is_integer()) {
                let _ = write!(out, "{i}");
            } else {
                let f = f64::try_from(value.clone())?;
                if !f.is_finite() {
                    out.push_str(if f.is_nan() {
                        "NaN"
                    } else if f > 0.0 {
                        "Infinity"
                    } else {
                        "-Infinity"
                    });
                } else if f.fract() == 0.0 && f.abs() < 1e16 {
                    let _ = write!(out, "{f:.1}");
                } else {
                    let _ = write!(out, "{f}");
                }
            }
        }
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            out.push_str(
                &serde_json::to_string(s)
                    .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?,
            );
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (idx, item) in items.iter().enumerate() {
                if idx > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_py_json(out, item, indent, sort_keys, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if sort_keys {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (idx, key) in keys.iter().enumerate() {
                if idx > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                let key_text = match key.as_str() {
                    Some(s) => s.to_string(),
                    None => key.to_string(),
                };
                out.push_str(
                    &serde_json::to_string(&key_text)
                        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?,
                );
                out.push_str(": ");
                write_py_json(out, &value.get_item(key)?, indent, sort_keys, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize a {} value", value.kind()),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn render(source: &str, messages: &[ChatMessage]) -> Result<String, TokenizerError> {
        let special = SpecialTokenStrings {
            bos: Some("<s>".into()),
            eos: Some("</s>".into()),
            unk: None,
            pad: None,
        };
        ChatTemplate::new(source.to_string())?.render(messages, true, &special)
    }

    #[test]
    fn variables_and_python_methods() {
        let msgs = [ChatMessage::new("user", "  Hi there  ")];
        let out = render(
            "{{ bos_token }}{% for m in messages %}{{ m['role'].upper() }}:{{ m.content.strip() }}{% endfor %}\
             {% if add_generation_prompt %}|{{ eos_token }}{% endif %}{{ unk_token is none }}",
            &msgs,
        )
        .unwrap();
        // pycompat renders booleans the Python way, as HF's Jinja2 does.
        assert_eq!(out, "<s>USER:Hi there|</s>True");
    }

    #[test]
    fn trim_and_lstrip_blocks_like_hf() {
        let out = render("  {% if true %}\nA\n  {% endif %}\nB", &[]).unwrap();
        assert_eq!(out, "A\nB");
    }

    #[test]
    fn raise_exception_fails_with_message() {
        let err = render("{{ raise_exception('roles must alternate') }}", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("roles must alternate"), "{err}");
    }

    #[test]
    fn syntax_error_fails_at_load() {
        let err = ChatTemplate::new("{% for m in messages %}".into()).unwrap_err();
        assert!(matches!(err, TokenizerError::ChatTemplate { .. }), "{err}");
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let msgs = [ChatMessage::new("user", "é <b> \"q\"\n")];
        let out = render("{{ messages | tojson }}|{{ {'b': 1.0, 'a': [1, none, true]} | tojson(sort_keys=true) }}", &msgs)
            .unwrap();
        assert_eq!(
            out,
            r#"[{"role": "user", "content": "é <b> \"q\"\n"}]|{"a": [1, null, true], "b": 1.0}"#
        );
        let out = render("{{ {'a': [1]} | tojson(indent=2) }}", &[]).unwrap();
        assert_eq!(out, "{\n  \"a\": [\n    1\n  ]\n}");
    }

    #[test]
    fn strftime_formats_utc() {
        // 2024-02-29 13:05:09 UTC was a Thursday, day 60 of a leap year.
        let t = 1_709_211_909;
        assert_eq!(
            format_utc(t, "%Y-%m-%d %H:%M:%S %a %A %b %B %j %y %I%p %e %% %Q"),
            "2024-02-29 13:05:09 Thu Thursday Feb February 060 24 01PM 29 % %Q"
        );
        assert_eq!(format_utc(0, "%d %B %Y %A"), "01 January 1970 Thursday");
        let year = render("{{ strftime_now('%Y') }}", &[]).unwrap();
        assert!(year.len() == 4 && year.as_str() >= "2024", "{year}");
    }
}
