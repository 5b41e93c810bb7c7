//! The GGUF reader on arbitrary bytes: header, metadata, tensor table, every type's size rule,
//! then the model's own checks (architecture, hyper-parameters, tensor shapes) on what parsed.
//! A file either fails with an error or keeps every promise `GgufFile::open` makes.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use moerun::gguf::GgufFile;
use moerun::model::Model;

fuzz_target!(|data: &[u8]| {
    let file = match GgufFile::from_bytes("fuzz.gguf", data) {
        Ok(f) => f,
        Err(e) => {
            assert!(e.to_string().contains("fuzz.gguf"), "an error names the file: {e}");
            return;
        }
    };
    for (key, value) in file.metadata() {
        assert!(file.get(key).is_some());
        let _ = (file.get_u64(key), file.get_f32(key), file.get_bool(key), file.get_str(key));
        let _ = (value.as_u64(), value.as_i64(), value.as_f32(), value.as_array().map(<[_]>::len));
    }
    let align = file.alignment();
    assert!(align > 0);
    for t in file.tensors() {
        let bytes = file.tensor_data(t);
        assert_eq!(bytes.len() as u64, t.size, "{}", t.name);
        assert_eq!(t.offset % align, 0, "{}", t.name);
        assert!(t.offset >= file.data_offset(), "{}", t.name);
        assert_eq!(file.tensor(&t.name).map(|x| x.offset), Some(t.offset));
        if let Some(&ne0) = t.shape.first() {
            let rows: u64 = t.shape[1..].iter().product();
            assert_eq!(t.ggml_type.row_bytes(ne0).map(|r| r * rows), Some(t.size), "{}", t.name);
        }
    }
    if let Err(e) = Model::from_file(Arc::new(file)) {
        let _ = e.to_string();
    }
});
