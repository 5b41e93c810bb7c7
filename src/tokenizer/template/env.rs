//! The minijinja environment chat templates run in, set up the way transformers'
//! `_compile_jinja_template` sets up jinja2. Configuration only: compiles and renders nothing itself.
//!
//! `trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception(msg)`, `strftime_now(fmt)`, and a
//! `tojson` that is Python's `json.dumps(x, ensure_ascii=False, indent=…, separators=…, sort_keys=…)`
//! (not jinja2's HTML-safe builtin). Python string methods (`.strip()`, `.startswith()`, …) come from
//! `minijinja_contrib::pycompat`. Known differences from jinja2: booleans print as `true`/`false`
//! and dicts print as JSON when interpolated directly, and `strftime_now` uses UTC, not local time.

use minijinja::value::Value;
use minijinja::{Environment, Error, ErrorKind};

use super::pyjson::tojson;
use super::strftime::strftime_now;

/// A minijinja environment configured like transformers' jinja2 environment.
pub(super) fn hf_environment() -> Environment<'static> {
    // No loader: `include`, `import` and `extends` find only the template itself, never a file.
    let mut env = Environment::new();
    env.set_recursion_limit(super::limits::RECURSION);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // jinja2's default, which transformers keeps: one trailing newline of the source is dropped.
    env.set_keep_trailing_newline(false);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    // pycompat's methods, and the size-bounded builtins.
    super::bounded::install(&mut env);
    env
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{check, msgs, MISTRAL};
    use crate::tokenizer::{ChatTemplate, TemplateStage, TokenizerError};

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
    fn strftime_now_is_callable_from_templates() {
        let template = ChatTemplate::new("{{ strftime_now('%Y') | length }}", "", "").expect("compiles");
        assert_eq!(template.render(&[], false).expect("renders"), "4");
    }
}
