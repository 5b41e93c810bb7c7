//! GGUF metadata values and their wire type tags. Pure data: no I/O.

/// Arrays nested deeper than this are rejected: the reader recurses once per level, and no
/// real file nests at all (llama.cpp itself refuses nested arrays).
pub(crate) const MAX_ARRAY_DEPTH: usize = 8;

/// One metadata value. Arrays hold values of a single kind; nested arrays are allowed by the
/// format (each inner array may have its own element kind).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// The value type tags of the GGUF format (`enum gguf_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    pub(crate) fn from_u32(v: u32) -> Option<ValueType> {
        use ValueType::*;
        [U8, I8, U16, I16, U32, I32, F32, Bool, String, Array, U64, I64, F64].get(v as usize).copied()
    }

    /// Fewest bytes one value of this type takes on disk: used to bound counts before
    /// allocating (a string is at least its u64 length, an array its u32 type and u64 count).
    pub(crate) fn min_encoded_len(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

impl Value {
    pub(crate) fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// Any integer that is non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer that fits an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => i64::try_from(v).ok(),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => None,
        }
    }

    /// F32, F64 (rounded) and any integer (rounded to the nearest f32).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            Value::U64(v) => Some(v as f32),
            _ => self.as_i64().map(|v| v as f32),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// "u8", "i32", "f32", "bool", "string", "array", ...
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }

    /// Why this value cannot be written to GGUF (mixed element kinds, or nesting too deep).
    pub(crate) fn check_encodable(&self) -> Result<(), String> {
        self.check_depth(0)
    }

    fn check_depth(&self, depth: usize) -> Result<(), String> {
        let Value::Array(items) = self else {
            return Ok(());
        };
        if depth >= MAX_ARRAY_DEPTH {
            return Err(format!("arrays nested more than {MAX_ARRAY_DEPTH} deep"));
        }
        if let Some(first) = items.first() {
            if let Some(odd) = items.iter().find(|v| v.value_type() != first.value_type()) {
                return Err(format!("array mixes {} and {} elements", first.type_name(), odd.type_name()));
            }
        }
        items.iter().try_for_each(|v| v.check_depth(depth + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accessors_convert_only_what_fits() {
        assert_eq!(Value::I32(-1).as_u64(), None);
        assert_eq!(Value::I32(7).as_u64(), Some(7));
        assert_eq!(Value::U64(u64::MAX).as_i64(), None);
        assert_eq!(Value::U64(5).as_i64(), Some(5));
        assert_eq!(Value::I8(-3).as_i64(), Some(-3));
        assert_eq!(Value::F64(0.5).as_f32(), Some(0.5));
        assert_eq!(Value::U32(3).as_f32(), Some(3.0));
        assert_eq!(Value::Bool(true).as_u64(), None);
        assert_eq!(Value::String("x".into()).as_f32(), None);
        assert_eq!(Value::Bool(false).as_bool(), Some(false));
        assert_eq!(Value::U8(1).as_bool(), None);
        assert_eq!(Value::String("hi".into()).as_str(), Some("hi"));
        assert_eq!(Value::Array(vec![Value::U8(1)]).as_array(), Some(&[Value::U8(1)][..]));
        assert_eq!(Value::F64(1.0).type_name(), "f64");
    }

    #[test]
    fn encodable_rejects_mixed_and_deep_arrays() {
        let mixed = Value::Array(vec![Value::U32(1), Value::I32(2)]);
        assert!(mixed.check_encodable().unwrap_err().contains("mixes u32 and i32"));
        let nested =
            Value::Array(vec![Value::Array(vec![Value::U8(1)]), Value::Array(vec![Value::String("a".into())])]);
        assert_eq!(nested.check_encodable(), Ok(()));
        let mut deep = Value::U8(0);
        for _ in 0..=MAX_ARRAY_DEPTH {
            deep = Value::Array(vec![deep]);
        }
        assert!(deep.check_encodable().unwrap_err().contains("nested"));
    }
}
