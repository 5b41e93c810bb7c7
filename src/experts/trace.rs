//! Routing traces: JSON lines, a header then one record per (token, layer). The only file I/O
//! of the `experts` room, and only for traces.
//!
//! ```text
//! {"model":"olmoe","n_layers":16,"n_experts":64,"top_k":8,"expert_bytes_high":3145728,"expert_bytes_low":0}
//! {"token":0,"layer":0,"experts":[12,3,40,7,9,1,60,22],"weights":[0.31,0.2,...]}
//! ```
//! Weights are normalized gate weights in router rank order (rank 0 = highest).

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

/// The first line of a trace.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TraceHeader {
    pub model: String,
    pub n_layers: usize,
    pub n_experts: usize,
    pub top_k: usize,
    pub expert_bytes_high: u64,
    pub expert_bytes_low: u64,
}

/// The routing of one token in one layer.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TraceRecord {
    pub token: u64,
    pub layer: u16,
    pub experts: Vec<u16>,
    pub weights: Vec<f32>,
}

impl TraceRecord {
    /// (expert, weight) pairs, as `ExpertCache::plan` takes them.
    pub fn needed(&self) -> Vec<(u16, f32)> {
        self.experts.iter().copied().zip(self.weights.iter().copied()).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: the file is empty (no header line)", .path.display())]
    NoHeader { path: PathBuf },
    #[error("{}:{line}: {source}", .path.display())]
    Json { path: PathBuf, line: usize, source: serde_json::Error },
    #[error("{}:{line}: {what}", .path.display())]
    Invalid { path: PathBuf, line: usize, what: String },
}

/// Writes a trace line by line (buffered; call `finish` to flush and see the last error).
pub struct TraceWriter<W: Write = BufWriter<crate::atomic::Staged>> {
    out: W,
    path: PathBuf,
    header: TraceHeader,
    line: usize,
}

impl TraceWriter<BufWriter<crate::atomic::Staged>> {
    /// Start the trace that replaces `path` (a temporary file beside it until `commit`) and
    /// write the header line.
    pub fn create(path: impl AsRef<Path>, header: &TraceHeader) -> Result<Self, TraceError> {
        let path = path.as_ref().to_path_buf();
        let file = crate::atomic::Staged::new(&path).map_err(|source| TraceError::Io { path: path.clone(), source })?;
        TraceWriter::new(BufWriter::new(file), path, header)
    }

    /// Flush, sync and rename the trace into place.
    pub fn commit(self) -> Result<(), TraceError> {
        let path = self.path.clone();
        let io = |source| TraceError::Io { path: path.clone(), source };
        let staged = self.finish()?.into_inner().map_err(|e| io(e.into_error()))?;
        staged.commit(&path).map_err(io)
    }
}

impl<W: Write> TraceWriter<W> {
    /// Write to any sink; `name` is used in errors.
    pub fn new(out: W, name: impl Into<PathBuf>, header: &TraceHeader) -> Result<Self, TraceError> {
        let mut w = TraceWriter { out, path: name.into(), header: header.clone(), line: 0 };
        w.line(header)?;
        Ok(w)
    }

    /// Append the routing of `token` in `layer`. Checks what `read_trace` will check, so a
    /// trace written here always reads back.
    pub fn record(&mut self, token: u64, layer: u16, experts: &[u16], weights: &[f32]) -> Result<(), TraceError> {
        let rec = TraceRecord { token, layer, experts: experts.to_vec(), weights: weights.to_vec() };
        if let Err(what) = check_record(&self.header, &rec) {
            return Err(TraceError::Invalid { path: self.path.clone(), line: self.line + 1, what });
        }
        self.line(&rec)
    }

    /// Flush and hand back the sink.
    pub fn finish(mut self) -> Result<W, TraceError> {
        self.out.flush().map_err(|source| TraceError::Io { path: self.path.clone(), source })?;
        Ok(self.out)
    }

    fn line<T: serde::Serialize>(&mut self, v: &T) -> Result<(), TraceError> {
        self.line += 1;
        let io = |source| TraceError::Io { path: self.path.clone(), source };
        serde_json::to_writer(&mut self.out, v).map_err(|e| io(e.into()))?;
        self.out.write_all(b"\n").map_err(io)
    }
}

/// Read a whole trace, checking every record against the header.
pub fn read_trace(path: impl AsRef<Path>) -> Result<(TraceHeader, Vec<TraceRecord>), TraceError> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|source| TraceError::Io { path: path.to_path_buf(), source })?;
    read_trace_from(BufReader::new(file), path)
}

/// Read a trace from any reader; `name` is used in errors.
pub fn read_trace_from(
    reader: impl BufRead,
    name: impl AsRef<Path>,
) -> Result<(TraceHeader, Vec<TraceRecord>), TraceError> {
    let path = name.as_ref().to_path_buf();
    let mut header: Option<TraceHeader> = None;
    let mut records = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|source| TraceError::Io { path: path.clone(), source })?;
        if line.trim().is_empty() {
            continue;
        }
        let json = |source| TraceError::Json { path: path.clone(), line: line_no, source };
        match &header {
            None => {
                let h: TraceHeader = serde_json::from_str(&line).map_err(json)?;
                if let Err(what) = check_header(&h) {
                    return Err(TraceError::Invalid { path, line: line_no, what });
                }
                header = Some(h);
            }
            Some(h) => {
                let rec: TraceRecord = serde_json::from_str(&line).map_err(json)?;
                if let Err(what) = check_record(h, &rec) {
                    return Err(TraceError::Invalid { path, line: line_no, what });
                }
                records.push(rec);
            }
        }
    }
    match header {
        Some(h) => Ok((h, records)),
        None => Err(TraceError::NoHeader { path }),
    }
}

fn check_header(h: &TraceHeader) -> Result<(), String> {
    if h.n_layers == 0 || h.n_experts == 0 || h.top_k == 0 || h.top_k > h.n_experts {
        return Err(format!(
            "header: n_layers = {}, n_experts = {}, top_k = {}: each must be at least 1 and top_k at most n_experts",
            h.n_layers, h.n_experts, h.top_k
        ));
    }
    if h.n_layers > u16::MAX as usize + 1 || h.n_experts > u16::MAX as usize + 1 {
        return Err(format!("header: n_layers = {}, n_experts = {}: at most 65536 each", h.n_layers, h.n_experts));
    }
    Ok(())
}

fn check_record(h: &TraceHeader, r: &TraceRecord) -> Result<(), String> {
    if r.layer as usize >= h.n_layers {
        return Err(format!("layer {} is not below n_layers = {}", r.layer, h.n_layers));
    }
    if r.experts.len() != r.weights.len() {
        return Err(format!("{} experts but {} weights", r.experts.len(), r.weights.len()));
    }
    if r.experts.len() > h.top_k {
        return Err(format!("{} experts, more than top_k = {}", r.experts.len(), h.top_k));
    }
    if let Some(e) = r.experts.iter().find(|&&e| e as usize >= h.n_experts) {
        return Err(format!("expert {e} is not below n_experts = {}", h.n_experts));
    }
    if let Some((i, _)) = r.experts.iter().enumerate().find(|&(i, e)| r.experts[..i].contains(e)) {
        return Err(format!("expert {} appears twice", r.experts[i]));
    }
    if let Some(w) = r.weights.iter().find(|w| !w.is_finite() || **w < 0.0) {
        return Err(format!("weight {w} is not a finite non-negative number"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> TraceHeader {
        TraceHeader {
            model: "tiny".into(),
            n_layers: 2,
            n_experts: 4,
            top_k: 2,
            expert_bytes_high: 100,
            expert_bytes_low: 30,
        }
    }

    #[test]
    fn trace_round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let mut w = TraceWriter::create(&path, &header()).unwrap();
        w.record(0, 0, &[3, 1], &[0.75, 0.25]).unwrap();
        w.record(0, 1, &[0, 2], &[0.5, 0.5]).unwrap();
        w.commit().unwrap();
        let (h, recs) = read_trace(&path).unwrap();
        assert_eq!(h, header());
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0], TraceRecord { token: 0, layer: 0, experts: vec![3, 1], weights: vec![0.75, 0.25] });
        assert_eq!(recs[1].needed(), vec![(0, 0.5), (2, 0.5)]);
    }

    #[test]
    fn trace_writer_refuses_what_the_reader_would() {
        let mut w = TraceWriter::new(Vec::new(), "mem", &header()).unwrap();
        let err = w.record(0, 2, &[0], &[1.0]).unwrap_err().to_string();
        assert_eq!(err, "mem:2: layer 2 is not below n_layers = 2");
        let err = w.record(0, 0, &[0, 1], &[1.0]).unwrap_err().to_string();
        assert_eq!(err, "mem:2: 2 experts but 1 weights");
    }

    fn read_err(text: &str) -> String {
        read_trace_from(text.as_bytes(), "t.jsonl").unwrap_err().to_string()
    }

    #[test]
    fn trace_errors_name_file_and_line() {
        let h = serde_json::to_string(&header()).unwrap();
        assert_eq!(read_err(""), "t.jsonl: the file is empty (no header line)");
        assert!(read_err("{\"model\":1}").starts_with("t.jsonl:1: "));
        let bad_json = format!("{h}\n{{\"token\":0,\"layer\":0,\"experts\":[1],\"weights\":[1.0]}}\n{{\"token\":");
        assert!(read_err(&bad_json).starts_with("t.jsonl:3: "), "{}", read_err(&bad_json));
        let cases = [
            (
                "{\"token\":0,\"layer\":0,\"experts\":[4],\"weights\":[1.0]}",
                "t.jsonl:2: expert 4 is not below n_experts = 4",
            ),
            ("{\"token\":0,\"layer\":0,\"experts\":[1,1],\"weights\":[0.5,0.5]}", "t.jsonl:2: expert 1 appears twice"),
            (
                "{\"token\":0,\"layer\":0,\"experts\":[1,2,3],\"weights\":[0.5,0.3,0.2]}",
                "t.jsonl:2: 3 experts, more than top_k = 2",
            ),
            (
                "{\"token\":0,\"layer\":0,\"experts\":[1],\"weights\":[-1.0]}",
                "t.jsonl:2: weight -1 is not a finite non-negative number",
            ),
        ];
        for (rec, want) in cases {
            assert_eq!(read_err(&format!("{h}\n{rec}\n")), want);
        }
        let bad_header = "{\"model\":\"m\",\"n_layers\":0,\"n_experts\":4,\"top_k\":2,\"expert_bytes_high\":1,\"expert_bytes_low\":0}";
        assert!(read_err(bad_header).starts_with("t.jsonl:1: header: n_layers = 0"));
        let missing = std::env::temp_dir().join("moerun-no-such-trace.jsonl");
        let err = read_trace(&missing).unwrap_err().to_string();
        assert!(err.starts_with(&missing.display().to_string()), "{err}");
    }
}
