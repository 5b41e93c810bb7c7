//! The tokenizer against llama.cpp's reference tokenizations of the shared fixtures, plus
//! streaming decode and the bundled model's chat template.

mod common;

use std::path::{Path, PathBuf};

use moerun::tokenizer::{ChatMessage, EncodeOptions, StreamDecoder, Tokenizer};
use serde::Deserialize;

const RUSTDOC: &str = "rustdoc-moe/rustdoc-moe-Q8_0.gguf";

/// As the fixtures were made: no BOS, special-token text parsed.
const AS_REFERENCE: EncodeOptions = EncodeOptions { add_bos: false, parse_special: true };

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt_text: String,
    prompt_ids: Vec<u32>,
}

fn load(dir: &Path, rel: &str) -> Tokenizer {
    let path = dir.join(rel);
    Tokenizer::from_gguf(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `*.ref.json` one or two folders below `dir`.
fn reference_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), 0)];
    while let Some((folder, depth)) = stack.pop() {
        let entries = std::fs::read_dir(&folder).unwrap_or_else(|e| panic!("{}: {e}", folder.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() && depth < 2 {
                stack.push((path, depth + 1));
            } else if path.to_string_lossy().ends_with(".ref.json") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// `encode(prompt_text)` must equal llama.cpp's `prompt_ids`, and `decode(prompt_ids)` must give
/// `prompt_text` back.
fn check(tokenizer: &Tokenizer, label: &str, case: &Case) {
    let ids = tokenizer.encode(&case.prompt_text, AS_REFERENCE).unwrap_or_else(|e| panic!("{label}: {e}"));
    assert_eq!(ids, case.prompt_ids, "{label}: ids of {:?}", case.prompt_text);
    assert_eq!(tokenizer.decode(&case.prompt_ids), case.prompt_text, "{label}: round trip");
}

#[test]
fn every_fixture_prompt_tokenizes_like_llama_cpp() {
    let Some(dir) = common::fixtures() else { return };
    let refs = reference_files(&dir);
    assert!(!refs.is_empty(), "no *.ref.json under {}", dir.display());
    let mut n_cases = 0;
    for ref_path in &refs {
        let text = std::fs::read_to_string(ref_path).unwrap_or_else(|e| panic!("{}: {e}", ref_path.display()));
        let reference: Reference =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", ref_path.display()));
        // `x.ref.json` describes `x.gguf` beside it.
        let name = ref_path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let gguf = ref_path.with_file_name(name.replace(".ref.json", ".gguf"));
        let tokenizer = Tokenizer::from_gguf(&gguf).unwrap_or_else(|e| panic!("{}: {e}", gguf.display()));
        for (i, case) in reference.cases.iter().enumerate() {
            check(&tokenizer, &format!("{name} case {i}"), case);
            n_cases += 1;
        }
    }
    println!("{} reference files, {n_cases} prompts", refs.len());
    assert!(n_cases >= refs.len());
}

/// What a vocabulary says about its special tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Specials {
    n_vocab: usize,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    add_bos_default: bool,
}

#[test]
fn special_tokens_of_each_fixture() {
    let Some(dir) = common::fixtures() else { return };
    // The tiny random models' GGUFs have no add_bos_token key and no EOT: libllama's defaults
    // for a gpt2/"gpt-2" vocabulary are no BOS and no EOT.
    let tiny = Specials { n_vocab: 3072, bos: Some(0), eos: Some(1), eot: None, add_bos_default: false };
    let expect = [
        (RUSTDOC, Specials { n_vocab: 4096, bos: Some(0), eos: Some(1), eot: Some(5), add_bos_default: true }),
        ("mixtral-tiny/mixtral-tiny-Q8_0.gguf", tiny),
        ("qwen3moe-tiny/qwen3moe-tiny-Q8_0.gguf", tiny),
    ];
    for (rel, want) in expect {
        let tok = load(&dir, rel);
        let got = Specials {
            n_vocab: tok.n_vocab(),
            bos: tok.bos(),
            eos: tok.eos(),
            eot: tok.eot(),
            add_bos_default: tok.add_bos_default(),
        };
        assert_eq!(got, want, "{rel}");
        for id in [got.eos, got.eot].into_iter().flatten() {
            assert!(tok.is_eog(id), "{rel}: {id} ends generation");
        }
        assert!(got.bos.is_some_and(|id| !tok.is_eog(id)), "{rel}: BOS does not end generation");
        assert!(!tok.is_eog(10), "{rel}: an ordinary token");
        // Out-of-range ids are inert, never a crash inside libllama.
        let past_end = got.n_vocab as u32;
        assert!(!tok.is_eog(past_end) && !tok.is_eog(u32::MAX));
        assert!(tok.piece_bytes(past_end, true).is_empty());
        assert_eq!(tok.decode(&[u32::MAX, 10, past_end]), tok.token_str(10));
    }
}

#[test]
fn bos_and_special_parsing_options() {
    let Some(dir) = common::fixtures() else { return };
    let tok = load(&dir, RUSTDOC);
    let text = "<|user|>\nhi";
    let plain = tok.encode(text, AS_REFERENCE).expect("encode");
    assert_eq!(plain[0], 3, "<|user|> is one special token");
    let with_bos = tok.encode(text, EncodeOptions { add_bos: true, parse_special: true }).expect("encode");
    assert_eq!(with_bos[0], 0);
    assert_eq!(&with_bos[1..], &plain[..]);
    let literal = tok.encode(text, EncodeOptions { add_bos: false, parse_special: false }).expect("encode");
    assert!(!literal.contains(&3) && literal.len() > plain.len(), "{literal:?}");
    assert_eq!(tok.decode(&literal), text);
    // Control tokens render in token_str/decode, and vanish from piece_bytes when not rendered.
    assert_eq!(tok.token_str(3), "<|user|>");
    assert_eq!(tok.piece_bytes(3, true), b"<|user|>");
    assert!(tok.piece_bytes(3, false).is_empty());
    assert_eq!(tok.encode("", AS_REFERENCE).expect("empty"), Vec::<u32>::new());
}

#[test]
fn stream_decoder_never_splits_a_character() {
    let Some(dir) = common::fixtures() else { return };
    let tok = load(&dir, RUSTDOC);
    let text = "héllo → 世界 🦀 done";
    let ids = tok.encode(text, AS_REFERENCE).expect("encode");
    // The test only means something if some token carries part of a character.
    assert!(
        ids.iter().any(|&id| std::str::from_utf8(&tok.piece_bytes(id, true)).is_err()),
        "no token of {text:?} splits a character: {ids:?}"
    );
    let mut stream = StreamDecoder::new(&tok);
    let mut chunks: Vec<String> = ids.iter().map(|&id| stream.push(id)).collect();
    chunks.push(stream.finish());
    // Every chunk is a String, hence valid UTF-8; none carries a replacement character.
    assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')), "{chunks:?}");
    assert!(chunks.iter().any(String::is_empty), "some pushes were held back: {chunks:?}");
    assert_eq!(chunks.concat(), text);
}

#[test]
fn stream_decoder_matches_decode_over_the_whole_vocabulary() {
    let Some(dir) = common::fixtures() else { return };
    let tok = load(&dir, RUSTDOC);
    // Every token once, in id order and reversed: byte tokens in odd orders exercise invalid
    // sequences as well as split characters.
    let forward: Vec<u32> = (0..tok.n_vocab() as u32).collect();
    let backward: Vec<u32> = forward.iter().rev().copied().collect();
    for ids in [forward, backward] {
        let mut stream = StreamDecoder::new(&tok);
        let mut streamed: String = ids.iter().map(|&id| stream.push(id)).collect();
        streamed.push_str(&stream.finish());
        assert_eq!(streamed, tok.decode(&ids));
    }
}

#[test]
fn rustdoc_chat_template_renders_a_conversation() {
    let Some(dir) = common::fixtures() else { return };
    let tok = load(&dir, RUSTDOC);
    assert!(tok.chat_template_error().is_none());
    let template = tok.chat_template().expect("rustdoc-moe carries tokenizer.chat_template");
    let messages = [ChatMessage::new("system", "You are a Rust expert."), ChatMessage::new("user", "What is a trait?")];
    let prompt = template.render(&messages, true).expect("render");
    assert_eq!(prompt, "<|system|>\nYou are a Rust expert.<|end|>\n<|user|>\nWhat is a trait?<|end|>\n<|assistant|>\n");
    let ids = tok.encode(&prompt, AS_REFERENCE).expect("encode");
    // <|system|>=2, <|user|>=3, <|assistant|>=4, <|end|>=5 each come out as one token.
    for (special, count) in [(2, 1), (3, 1), (4, 1), (5, 2)] {
        assert_eq!(ids.iter().filter(|&&id| id == special).count(), count, "token {special} in {ids:?}");
    }
    assert_eq!(ids.last(), Some(&204), "the prompt ends with a newline after <|assistant|>");
    let without = template.render(&messages, false).expect("render");
    assert_eq!(prompt.strip_suffix("<|assistant|>\n"), Some(without.as_str()));
}

#[test]
fn rustdoc_chat_template_reproduces_the_fixture_chat_prompt() {
    let Some(dir) = common::fixtures() else { return };
    let tok = load(&dir, RUSTDOC);
    let template = tok.chat_template().expect("chat template");
    let prompt =
        template.render(&[ChatMessage::new("user", "Tell me about references and borrowing.")], true).expect("render");
    let path = dir.join("rustdoc-moe/rustdoc-moe-Q8_0.ref.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let reference: Reference = serde_json::from_str(&text).expect("reference JSON");
    let case = reference
        .cases
        .iter()
        .find(|c| c.prompt_text == prompt)
        .unwrap_or_else(|| panic!("no fixture case is the rendered prompt {prompt:?}"));
    check(&tok, "rendered chat prompt", case);
}

#[test]
fn fixtures_without_a_template_have_none() {
    let Some(dir) = common::fixtures() else { return };
    let tok = load(&dir, "mixtral-tiny/mixtral-tiny-Q8_0.gguf");
    assert!(tok.chat_template().is_none() && tok.chat_template_error().is_none());
}

#[test]
fn one_tokenizer_serves_many_threads() {
    let Some(dir) = common::fixtures() else { return };
    let tok = load(&dir, RUSTDOC);
    let texts = ["The borrow checker", "fn main() {}", "<|user|>\nhi<|end|>\n", "héllo 世界 🦀"];
    let expect: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t, AS_REFERENCE).expect("encode")).collect();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..200 {
                    for (text, ids) in texts.iter().zip(&expect) {
                        assert_eq!(&tok.encode(text, AS_REFERENCE).expect("encode"), ids);
                        assert_eq!(tok.decode(ids), *text);
                    }
                }
            });
        }
    });
}
