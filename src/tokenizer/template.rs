//! Chat templates: HF-style Jinja rendered by minijinja, set up the way transformers sets up
//! jinja2 so that a GGUF's `tokenizer.chat_template` renders byte for byte as in Python.
//! Renders text only; never tokenizes.
//!
//! The environment mirrors `transformers`' `_compile_jinja_template`: `trim_blocks`,
//! `lstrip_blocks`, loop controls, `raise_exception(msg)`, `strftime_now(fmt)`, and a `tojson` that
//! is Python's `json.dumps(x, ensure_ascii=False, indent=…, separators=…, sort_keys=…)` (not
//! jinja2's HTML-safe builtin). Python string methods (`.strip()`, `.startswith()`, …) come from
//! `minijinja_contrib::pycompat`. Known differences from jinja2: booleans print as `true`/`false`
//! and dicts print as JSON when interpolated directly, and `strftime_now` uses UTC, not local time.

use std::fmt::{self, Write as _};

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use super::{TemplateStage, TokenizerError};

/// One message of a conversation, as HF templates see it (`message['role']`, `message.content`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template plus the `bos_token` / `eos_token` strings it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the source came from, for error messages ("chat template", "x.gguf: tokenizer.…").
    origin: String,
    bos_token: String,
    eos_token: String,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// The name the source is registered under; it appears in minijinja's error locations.
const TEMPLATE_NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source` once; a syntax error is `TokenizerError::Template { stage: Syntax, .. }`.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, TokenizerError> {
        ChatTemplate::with_origin(source, bos_token, eos_token, "chat template".to_owned())
    }

    /// As [`ChatTemplate::new`], naming the template's origin in errors.
    pub(crate) fn with_origin(
        source: &str,
        bos_token: &str,
        eos_token: &str,
        origin: String,
    ) -> Result<ChatTemplate, TokenizerError> {
        let mut env = hf_environment();
        if let Err(err) = env.add_template_owned(TEMPLATE_NAME, source.to_owned()) {
            return Err(template_error(&origin, TemplateStage::Syntax, &err));
        }
        Ok(ChatTemplate { env, origin, bos_token: bos_token.to_owned(), eos_token: eos_token.to_owned() })
    }

    /// Renders `messages`; `add_generation_prompt` asks the template to open the assistant's turn.
    /// A failure (including the template's own `raise_exception`) is
    /// `TokenizerError::Template { stage: Render, .. }` with the message in `detail`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TokenizerError> {
        let fail = |err: Error| template_error(&self.origin, TemplateStage::Render, &err);
        let template = self.env.get_template(TEMPLATE_NAME).map_err(fail)?;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        template.render(ctx).map_err(fail)
    }
}

fn template_error(origin: &str, stage: TemplateStage, err: &Error) -> TokenizerError {
    let mut detail = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let _ = write!(detail, ": {cause}");
        source = cause.source();
    }
    TokenizerError::Template { origin: origin.to_owned(), stage, detail }
}

/// A minijinja environment configured like transformers' jinja2 environment.
fn hf_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // jinja2's default, which transformers keeps: one trailing newline of the source is dropped.
    env.set_keep_trailing_newline(false);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: &str) -> String {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime_utc(format, now)
}

// ---------------------------------------------------------------------------------------------
// tojson: Python's json.dumps

/// Python `json.dumps` options, as transformers' `tojson` filter passes them.
struct JsonStyle {
    ensure_ascii: bool,
    /// `None`: one line. `Some(s)`: newline before each item, `s` repeated per depth.
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// `tojson(ensure_ascii=false, indent=none, separators=none, sort_keys=false)`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<String, Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
            (None, Some(s)) => Some(s.to_owned()),
            _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an integer or a string")),
        },
    };
    // Python's defaults: (', ', ': ') on one line, (',', ': ') when indenting.
    let (item_sep, key_sep) = match separators.as_deref() {
        None => (if indent.is_some() { "," } else { ", " }.to_owned(), ": ".to_owned()),
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair (item_separator, key_separator)",
            ))
        }
    };
    let style = JsonStyle {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(out)
}

fn write_json(out: &mut String, value: &Value, style: &JsonStyle, depth: usize) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number(out, value)?,
        ValueKind::String => write_json_str(out, value.as_str().unwrap_or_default(), style.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, ('[', ']'), &items, style, depth, |out, item, style| {
                write_json(out, item, style, depth + 1)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, ('{', '}'), &entries, style, depth, |out, (key, item), style| {
                write_json_str(out, key, style.ensure_ascii);
                out.push_str(&style.key_sep);
                write_json(out, item, style, depth + 1)
            })?;
        }
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a value of type {kind} is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

/// Writes `[a, b]` / `{..}` with Python's layout: empty containers stay `[]`, indented ones put
/// each item on its own line.
fn write_container<T>(
    out: &mut String,
    (open, close): (char, char),
    items: &[T],
    style: &JsonStyle,
    depth: usize,
    mut write_item: impl FnMut(&mut String, &T, &JsonStyle) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    let newline = |out: &mut String, depth: usize| {
        if let Some(indent) = &style.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    };
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&style.item_sep);
        }
        newline(out, depth + 1);
        write_item(out, item, style)?;
    }
    newline(out, depth);
    out.push(close);
    Ok(())
}

/// Python turns int, float, bool and None keys into strings; other keys are an error.
fn json_key(key: &Value) -> Result<String, Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_owned()),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.to_owned()),
        ValueKind::None => Ok("null".to_owned()),
        ValueKind::Number => {
            let mut s = String::new();
            write_number(&mut s, key)?;
            Ok(s)
        }
        kind => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: keys must be str, int, float, bool or None, not {kind}"),
        )),
    }
}

fn write_number(out: &mut String, value: &Value) -> Result<(), Error> {
    if value.is_integer() {
        // Integers of any width serialize as their decimal digits.
        let digits = serde_json::to_string(value)
            .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
        out.push_str(&digits);
    } else {
        let x = f64::try_from(value.clone())?;
        out.push_str(&python_float_repr(x));
    }
    Ok(())
}

/// Python's `repr(float)` as `json.dumps` writes it: shortest round-trip digits, exponent form
/// below 1e-4 and from 1e16 on (`1e-05`, `1e+16`), `.0` on integral values, `NaN`/`Infinity`.
fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_owned();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    // `{:e}` gives the shortest round-trip digits: "-1.2345e-7", "1e16", "0e0".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if x != 0.0 && !(-4..16).contains(&exp) {
        let (first, rest) = digits.split_at(1);
        let dot = if rest.is_empty() { "" } else { "." };
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{first}{dot}{rest}e{esign}{:02}", exp.unsigned_abs());
    }
    // Fixed notation: the decimal point sits after digit `exp + 1`.
    let point = exp + 1;
    let (int_part, frac_part) = if point <= 0 {
        ("0".to_owned(), "0".repeat(point.unsigned_abs() as usize) + &digits)
    } else {
        let point = point as usize;
        if digits.len() <= point {
            (digits.clone() + &"0".repeat(point - digits.len()), String::new())
        } else {
            (digits[..point].to_owned(), digits[point..].to_owned())
        }
    };
    let frac_part = if frac_part.is_empty() { "0".to_owned() } else { frac_part };
    format!("{sign}{int_part}.{frac_part}")
}

/// A JSON string literal the way Python's encoder writes it.
fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

// ---------------------------------------------------------------------------------------------
// strftime_now

const WEEKDAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
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

/// The calendar fields of a UTC instant.
struct Civil {
    year: i64,
    /// 1..=12
    month: usize,
    /// 1..=31
    day: i64,
    /// 0 = Sunday
    weekday: usize,
    /// 1..=366
    yday: i64,
    hour: i64,
    minute: i64,
    second: i64,
}

impl Civil {
    fn from_unix(secs: i64) -> Civil {
        let days = secs.div_euclid(86_400);
        let tod = secs.rem_euclid(86_400);
        // Days since 1970-01-01 to a proleptic Gregorian date (era-based, exact for all i64 days
        // that matter here).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        const CUMULATIVE: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let yday = CUMULATIVE[(month - 1) as usize] + day + i64::from(leap && month > 2);
        Civil {
            year,
            month: month as usize,
            day,
            weekday: (days + 4).rem_euclid(7) as usize, // 1970-01-01 was a Thursday
            yday,
            hour: tod / 3600,
            minute: tod / 60 % 60,
            second: tod % 60,
        }
    }
}

/// C/Python `strftime` for the common directives, in UTC. `%-d` (glibc's no-padding flag) is
/// honoured; an unknown directive is copied through, as glibc does.
fn strftime_utc(format: &str, unix_secs: i64) -> String {
    let t = Civil::from_unix(unix_secs);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        let pad = spec != Some('-');
        if !pad {
            spec = chars.next();
        }
        let num = |out: &mut String, v: i64, width: usize| {
            let _ = if pad { write!(out, "{v:0width$}") } else { write!(out, "{v}") };
        };
        let hour12 = if t.hour % 12 == 0 { 12 } else { t.hour % 12 };
        match spec {
            Some('Y') => {
                let _ = write!(out, "{}", t.year);
            }
            Some('y') => num(&mut out, t.year.rem_euclid(100), 2),
            Some('m') => num(&mut out, t.month as i64, 2),
            Some('d') => num(&mut out, t.day, 2),
            Some('e') => {
                let _ = if pad { write!(out, "{:2}", t.day) } else { write!(out, "{}", t.day) };
            }
            Some('j') => num(&mut out, t.yday, 3),
            Some('H') => num(&mut out, t.hour, 2),
            Some('I') => num(&mut out, hour12, 2),
            Some('M') => num(&mut out, t.minute, 2),
            Some('S') => num(&mut out, t.second, 2),
            Some('p') => out.push_str(if t.hour < 12 { "AM" } else { "PM" }),
            Some('A') => out.push_str(WEEKDAYS[t.weekday]),
            Some('a') => out.push_str(&WEEKDAYS[t.weekday][..3]),
            Some('B') => out.push_str(MONTHS[t.month - 1]),
            Some('b') | Some('h') => out.push_str(&MONTHS[t.month - 1][..3]),
            Some('F') => {
                let _ = write!(out, "{}-{:02}-{:02}", t.year, t.month, t.day);
            }
            Some('T') => {
                let _ = write!(out, "{:02}:{:02}:{:02}", t.hour, t.minute, t.second);
            }
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if !pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => {
                out.push('%');
                if !pad {
                    out.push('-');
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
        pairs.iter().map(|&(role, content)| ChatMessage::new(role, content)).collect()
    }

    /// Renders `source` with `<s>`/`</s>` as BOS/EOS and compares with `expect`, which was
    /// produced by Python jinja2 set up as transformers does.
    fn check(source: &str, messages: &[ChatMessage], add_generation_prompt: bool, expect: &str) {
        let template = ChatTemplate::new(source, "<s>", "</s>").expect("template compiles");
        let got = template.render(messages, add_generation_prompt).expect("template renders");
        assert_eq!(got, expect);
    }

    /// ChatML with a default system prompt; block tags are indented (lstrip_blocks) and followed
    /// by newlines (trim_blocks); `loop.first`, `loop.last`, `.strip()`.
    const CHATML: &str = "{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'].strip() }}<|im_end|>
    {% if not loop.last %}
{{ '' }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
";

    fn conversation() -> Vec<ChatMessage> {
        msgs(&[("user", "  Hi there!\n"), ("assistant", "Hello."), ("user", "What is 2+2?  ")])
    }

    #[test]
    fn chatml_with_generation_prompt() {
        check(
            CHATML,
            &conversation(),
            true,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nHi there!<|im_end|>\n\n\
             <|im_start|>assistant\nHello.<|im_end|>\n\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n\
             <|im_start|>assistant\n",
        );
    }

    #[test]
    fn chatml_without_generation_prompt() {
        check(
            CHATML,
            &conversation(),
            false,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nHi there!<|im_end|>\n\n\
             <|im_start|>assistant\nHello.<|im_end|>\n\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n",
        );
    }

    /// Mistral-Instruct's template: `bos_token`, `eos_token`, role alternation enforced with
    /// `raise_exception`.
    const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

    #[test]
    fn mistral_renders_bos_and_eos() {
        check(MISTRAL, &conversation(), true, "<s>[INST]   Hi there!\n [/INST]Hello.</s>[INST] What is 2+2?   [/INST]");
    }

    #[test]
    fn raise_exception_fails_with_its_message() {
        let template = ChatTemplate::new(MISTRAL, "<s>", "</s>").expect("compiles");
        let err = template.render(&msgs(&[("user", "a"), ("user", "b")]), true).expect_err("roles do not alternate");
        let TokenizerError::Template { stage, detail, .. } = &err else {
            panic!("expected a template error, got {err:?}");
        };
        assert_eq!(*stage, TemplateStage::Render);
        assert!(detail.contains("Conversation roles must alternate user/assistant/user/assistant/..."), "{detail}");
        assert!(err.to_string().contains("Conversation roles must alternate"), "{err}");
    }

    #[test]
    fn syntax_errors_are_reported_not_panicked() {
        for source in ["{% for m in messages %}{{ m.role }}", "{{ messages[0] ", "{% if %}x{% endif %}", "{% endfor %}"]
        {
            let err = ChatTemplate::new(source, "", "").expect_err(source);
            let TokenizerError::Template { stage, origin, .. } = &err else {
                panic!("expected a template error for {source:?}, got {err:?}");
            };
            assert_eq!(*stage, TemplateStage::Syntax, "{source:?}");
            assert_eq!(origin, "chat template");
            assert!(err.to_string().starts_with("chat template: syntax error: "), "{err}");
        }
    }

    #[test]
    fn render_errors_are_reported_not_panicked() {
        let template = ChatTemplate::new("{{ messages[0].content.nope() }}", "", "").expect("compiles");
        let err = template.render(&msgs(&[("user", "x")]), false).expect_err("unknown method");
        assert!(matches!(err, TokenizerError::Template { stage: TemplateStage::Render, .. }), "{err:?}");
        // An undefined name is empty, as in jinja2; attribute access on it is an error.
        let template = ChatTemplate::new("[{{ tools }}]{{ tools.x }}", "", "").expect("compiles");
        assert!(template.render(&[], false).is_err());
    }

    /// `namespace`, `continue`/`break`, pycompat `.upper()`/`.startswith()`/`.split()`/
    /// `.replace()`/`.lower()`, inline `if` without `else`, `trim`, and HF's `tojson` (Python
    /// separators, no HTML escaping, non-ASCII kept, `indent`, `sort_keys`).
    const FEATURES: &str = "{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}
    {%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for m in messages %}
    {%- if m.role == 'tool' %}{% continue %}{% endif %}
    {%- if m.content.startswith('#') %}{% break %}{% endif %}
<|{{ m.role.upper() }}|>{{ m.content | trim }}{{ ' (last user)' if loop.index0 == ns.last_user }}
{% endfor %}
{{ messages[:2] | tojson }}
{{ messages[0] | tojson(indent=2) }}
{{ {'b': [1, 2.5, none, true], 'a': '<\\'&\"\\n'} | tojson(sort_keys=true) }}
{{ 'a,b,c'.split(',') | join('|') }} {{ 'Hello World'.replace('World', 'Rust').lower() }}
";

    #[test]
    fn python_features_and_tojson() {
        let messages = msgs(&[
            ("system", "You are Ferris. Grüße → 🦀"),
            ("user", " hi "),
            ("tool", "42"),
            ("assistant", "ok"),
            ("assistant", "# stop here"),
        ]);
        check(
            FEATURES,
            &messages,
            false,
            "<|SYSTEM|>You are Ferris. Grüße → 🦀\n<|USER|>hi (last user)\n<|ASSISTANT|>ok\n\
             [{\"role\": \"system\", \"content\": \"You are Ferris. Grüße → 🦀\"}, {\"role\": \"user\", \"content\": \" hi \"}]\n\
             {\n  \"role\": \"system\",\n  \"content\": \"You are Ferris. Grüße → 🦀\"\n}\n\
             {\"a\": \"<'&\\\"\\n\", \"b\": [1, 2.5, null, true]}\n\
             a|b|c hello rust",
        );
    }

    #[test]
    fn tojson_options() {
        let t = |src: &str| ChatTemplate::new(src, "", "").and_then(|t| t.render(&[], false)).expect(src);
        assert_eq!(t("{{ [] | tojson(indent=2) }}{{ {} | tojson }}"), "[]{}");
        assert_eq!(
            t("{{ [1, [2, {'k': []}]] | tojson(indent=1) }}"),
            "[\n 1,\n [\n  2,\n  {\n   \"k\": []\n  }\n ]\n]"
        );
        assert_eq!(t("{{ {'a': 1, 'b': 2} | tojson(separators=(',', ':')) }}"), "{\"a\":1,\"b\":2}");
        assert_eq!(t("{{ 'é🦀\\t\\x01' | tojson(ensure_ascii=true) }}"), "\"\\u00e9\\ud83e\\udd80\\t\\u0001\"");
        assert_eq!(t("{{ {1: 'x'} | tojson }}"), "{\"1\": \"x\"}");
        assert!(ChatTemplate::new("{{ 1 | tojson(bogus=1) }}", "", "").and_then(|t| t.render(&[], false)).is_err());
    }

    #[test]
    fn python_float_repr_matches_python() {
        // Each right-hand side is Python 3's repr() of the left.
        let cases: [(f64, &str); 13] = [
            (2.5, "2.5"),
            (1.0, "1.0"),
            (-0.0, "-0.0"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1.5e16, "1.5e+16"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-1.25e-7, "-1.25e-07"),
            (123456789.125, "123456789.125"),
            (1e100, "1e+100"),
            (f64::NAN, "NaN"),
        ];
        for (x, want) in cases {
            assert_eq!(python_float_repr(x), want, "{x:e}");
        }
    }

    #[test]
    fn strftime_matches_python_gmtime() {
        // Python: time.strftime(fmt, time.gmtime(1721999096)) -> 2024-07-26 13:04:56 UTC, a Friday.
        let ts = 1_721_999_096;
        assert_eq!(strftime_utc("%d %b %Y", ts), "26 Jul 2024");
        assert_eq!(strftime_utc("%A, %B %-d, %Y %I:%M:%S %p", ts), "Friday, July 26, 2024 01:04:56 PM");
        assert_eq!(strftime_utc("%Y-%m-%d %H:%M %j %a %y %%", ts), "2024-07-26 13:04 208 Fri 24 %");
        // Leap day and the epoch.
        assert_eq!(strftime_utc("%F %T %j", 951_782_400), "2000-02-29 00:00:00 060");
        assert_eq!(strftime_utc("%F %A", 0), "1970-01-01 Thursday");
        assert_eq!(strftime_utc("%Q %", 0), "%Q %");
    }

    #[test]
    fn strftime_now_is_callable_from_templates() {
        let template = ChatTemplate::new("{{ strftime_now('%Y') | length }}", "", "").expect("compiles");
        assert_eq!(template.render(&[], false).expect("renders"), "4");
    }
}
