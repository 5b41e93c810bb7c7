//! Builtins whose size arguments could ask for more memory than exists, wrapped so a large one is
//! a render error. Without them `{{ 'x' | indent(10**13) }}` asks the allocator for 10 TB and the
//! process aborts — no `Result` and no `catch_unwind` can catch that. Checks only, then minijinja's
//! own filter.

use minijinja::value::{Kwargs, Rest, StringInput, Value};
use minijinja::{filters, Environment, Error, ErrorKind, State};

use super::limits::{MAX_COUNT, MAX_VALUE_BYTES, MAX_WIDTH};

/// Replaces `indent`, `batch`, `slice`, `join`, `replace` and `format` with bounded versions,
/// and guards pycompat's `str.format`, `str.join` and `str.replace` the same way.
pub(super) fn install(env: &mut Environment<'static>) {
    env.set_unknown_method_callback(python_method);
    env.add_filter("replace", replace);
    env.add_filter("indent", indent);
    env.add_filter("batch", batch);
    env.add_filter("slice", slice);
    env.add_filter("join", join);
    env.add_filter("format", format);
}

fn too_large(what: &str, n: impl std::fmt::Display, max: usize) -> Error {
    Error::new(ErrorKind::InvalidOperation, format!("{what} {n} is larger than a chat template may ask for ({max})"))
}

pub(super) fn check_width(what: &str, n: usize) -> Result<(), Error> {
    if n > MAX_WIDTH {
        return Err(too_large(what, n, MAX_WIDTH));
    }
    Ok(())
}

fn indent(
    value: StringInput<'_>,
    width: Option<usize>,
    first: Option<bool>,
    blank: Option<bool>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    let asked = match width {
        Some(w) => Some(w),
        None => kwargs.peek::<Option<usize>>("width")?,
    };
    check_width("indent width", asked.unwrap_or(0))?;
    filters::indent(value, width, first, blank, kwargs)
}

fn batch(state: &State, value: Value, count: usize, fill_with: Option<Value>) -> Result<Value, Error> {
    if count > MAX_COUNT {
        return Err(too_large("batch size", count, MAX_COUNT));
    }
    filters::batch(state, value, count, fill_with)
}

fn slice(state: &State, value: Value, count: usize, fill_with: Option<Value>) -> Result<Value, Error> {
    if count > MAX_COUNT {
        return Err(too_large("slice count", count, MAX_COUNT));
    }
    filters::slice(state, value, count, fill_with)
}

/// `join`: the separator is written between every two items, so a long one over many items is
/// the product of two sizes minijinja bounds only one at a time.
fn join(state: &State, value: &Value, joiner: Option<StringInput<'_>>) -> Result<Value, Error> {
    let sep = joiner.as_ref().map_or(0, |j| j.as_str().len());
    let items = value.len().unwrap_or(0);
    if sep.saturating_mul(items) > MAX_VALUE_BYTES {
        return Err(too_large("joined size", sep.saturating_mul(items), MAX_VALUE_BYTES));
    }
    filters::join(state, value, joiner)
}

fn replace(state: &State, value: StringInput<'_>, from: StringInput<'_>, to: StringInput<'_>) -> Result<Value, Error> {
    check_replace(value.as_str(), from.as_str(), to.as_str())?;
    filters::replace(state, value, from, to)
}

/// Every match of `from` (at every position, when it is empty) grows the string by the
/// difference: bounded as [`join`] is.
fn check_replace(s: &str, from: &str, to: &str) -> Result<(), Error> {
    if to.len() <= from.len() {
        return Ok(());
    }
    let matches = if from.is_empty() { s.len() + 1 } else { s.len() / from.len() };
    let grown = matches.saturating_mul(to.len() - from.len());
    if grown > MAX_VALUE_BYTES {
        return Err(too_large("replaced size", grown, MAX_VALUE_BYTES));
    }
    Ok(())
}

/// pycompat's Python methods (`.strip()`, `.format()`, …), with the amplifying ones checked first.
fn python_method(state: &State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    if let Some(s) = value.as_str() {
        match (method, args) {
            ("format", _) => check_format_spec(s, args)?,
            ("join", [items, ..]) => {
                let n = items.len().unwrap_or(0).saturating_mul(s.len());
                if n > MAX_VALUE_BYTES {
                    return Err(too_large("joined size", n, MAX_VALUE_BYTES));
                }
            }
            ("replace", [from, to, ..]) => check_replace(s, from.as_str().unwrap_or(""), to.as_str().unwrap_or(""))?,
            _ => {}
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

fn format(state: &State, format_str: &Value, args: Rest<Value>) -> Result<Value, Error> {
    check_format_spec(format_str.as_str().unwrap_or(""), &args)?;
    filters::format(state, format_str, args)
}

/// A printf (`%10s`, `%.3f`, `%*d`) or `str.format` (`{:>10}`) string whose widths and
/// precisions are all at most [`MAX_WIDTH`]. A width taken from the arguments (`*`) means no
/// integer argument may be larger either.
pub(super) fn check_format_spec(spec: &str, args: &[Value]) -> Result<(), Error> {
    let mut digits = 0usize;
    let mut run = 0usize;
    for b in spec.bytes().chain(std::iter::once(b' ')) {
        if b.is_ascii_digit() {
            run = run.saturating_mul(10).saturating_add(usize::from(b - b'0'));
            digits += 1;
        } else {
            if digits > 0 {
                check_width("format width or precision", run)?;
            }
            run = 0;
            digits = 0;
        }
    }
    if spec.contains('*') {
        for arg in args {
            if let Some(n) = arg.as_i64() {
                check_width("format width or precision", usize::try_from(n.unsigned_abs()).unwrap_or(usize::MAX))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_specs_with_large_widths_are_refused() {
        for ok in ["%s", "%10s|%-5d|%.3f", "{:>20}", "year 2024", "%*d"] {
            check_format_spec(ok, &[Value::from(7), Value::from("x")]).expect(ok);
        }
        for bad in ["%1000000000s", "%.99999999f", "{:>20000}", "{0:1000000}"] {
            assert!(check_format_spec(bad, &[]).is_err(), "{bad}");
        }
        assert!(check_format_spec("%*s", &[Value::from(1_000_000_000_000i64), Value::from("x")]).is_err());
    }
}
