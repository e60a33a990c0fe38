//! Checkpoints and the write-ahead log.
//!
//! A checkpoint is a safetensors file `checkpoint-<version>.safetensors` holding x, x̂ and the
//! momentum, plus metadata: versions, the model's layout, the client registry (each client
//! id's last accepted sequence number), the accepted pushes not yet aggregated, the policy's
//! state, and an FNV-1a checksum of everything else. It is written to a temporary file,
//! fsynced, renamed, and the directory fsynced; the newest three are kept. On resume the newest
//! file that parses and whose checksum matches wins; a torn or corrupt one is skipped with a
//! warning.
//!
//! The WAL (`--wal`) appends every accepted push before its Ack is sent, and starts a new file
//! at each checkpoint. A record is `SPW3`, payload length (u32), CRC-32 of the payload (8
//! bytes), then the payload: client id (u16 length + bytes), the Push header, its indices as
//! LEB128 gaps and its values (older logs' `SPW2` records, with the frame as it came, and
//! `SPWL` records, with FNV-1a 64, are still read). On resume the records
//! after the checkpoint are replayed in acceptance order; a torn last record (a crash in the
//! middle of a write, before its Ack) is ignored. Writes go to the operating system before the
//! Ack, so a crashed process (kill -9) loses no acknowledged push; surviving power loss would
//! need an fsync per push, which this does not do.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use safetensors::Dtype;
use safetensors::tensor::TensorView;

use crate::engine::ModelState;
use crate::protocol::model::TensorSpec;

/// Errors reading or writing durable state.
#[derive(Debug, thiserror::Error)]
pub enum DurabilityError {
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("checkpoint {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("no valid checkpoint in {0}")]
    NoCheckpoint(PathBuf),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DurabilityError + 'a {
    move |source| DurabilityError::Io { what, path: path.to_path_buf(), source }
}

/// FNV-1a 64.
pub fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

pub use crate::core::log::{LoggedStep, PendingPush, WalOp};

/// Everything a checkpoint holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub model: String,
    pub layout: Vec<TensorSpec>,
    pub state: ModelState,
    /// Client id → last accepted sequence number.
    pub registry: BTreeMap<String, u64>,
    pub pending: Vec<PendingPush>,
    pub policy: String,
    pub policy_state: serde_json::Value,
    /// The WAL file that holds what was accepted after this checkpoint.
    pub wal_seq: u64,
    /// What that WAL holds (read at resume; not stored in the checkpoint file).
    pub wal: Vec<WalOp>,
}

const PREFIX: &str = "checkpoint-";
const SUFFIX: &str = ".safetensors";

fn sync_dir(dir: &Path) {
    // Directory fsync makes the rename durable; not every platform supports it.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

impl Checkpoint {
    /// Writes the checkpoint atomically into `dir`; keeps the newest `keep` files.
    pub fn write(&self, dir: &Path, keep: usize) -> Result<PathBuf, DurabilityError> {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let bytes = self.to_bytes()?;
        let path = dir.join(format!("{PREFIX}{:012}{SUFFIX}", self.state.version));
        let tmp = dir.join(format!(".{PREFIX}{:012}{SUFFIX}.tmp", self.state.version));
        {
            let mut f = std::fs::File::create(&tmp).map_err(io("creating", &tmp))?;
            f.write_all(&bytes).map_err(io("writing", &tmp))?;
            f.sync_all().map_err(io("syncing", &tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io("renaming", &tmp))?;
        sync_dir(dir);
        let mut all = list(dir);
        while all.len() > keep.max(1) {
            let (_, old) = all.remove(0);
            let _ = std::fs::remove_file(old);
        }
        Ok(path)
    }

    /// The checkpoint as one safetensors file's bytes (what [`Checkpoint::write`] stores and
    /// the JetStream log puts in its object store).
    pub fn to_bytes(&self) -> Result<Vec<u8>, DurabilityError> {
        let f32s = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let x = f32s(&self.state.x);
        let r = f32s(&self.state.replica);
        let m = f32s(&self.state.momentum);
        let mut pending = Vec::new();
        let mut index = Vec::new();
        for p in &self.pending {
            index.push(serde_json::json!({ "client": p.client_id, "len": p.frame.len() }));
            pending.extend_from_slice(&p.frame);
        }
        let bad = |e: safetensors::SafeTensorError| DurabilityError::Invalid {
            path: PathBuf::new(),
            reason: e.to_string(),
        };
        let mut views: Vec<(String, TensorView<'_>)> = vec![
            ("x".into(), TensorView::new(Dtype::F32, vec![self.state.x.len()], &x).map_err(bad)?),
            ("replica".into(), TensorView::new(Dtype::F32, vec![self.state.replica.len()], &r).map_err(bad)?),
        ];
        if !m.is_empty() {
            views.push((
                "momentum".into(),
                TensorView::new(Dtype::F32, vec![self.state.momentum.len()], &m).map_err(bad)?,
            ));
        }
        if !pending.is_empty() {
            views.push((
                "pending_frames".into(),
                TensorView::new(Dtype::U8, vec![pending.len()], &pending).map_err(bad)?,
            ));
        }
        let mut meta: std::collections::HashMap<String, String> = [
            ("sparsync.model", self.model.clone()),
            ("sparsync.layout", serde_json::to_string(&self.layout).expect("layout serializes")),
            ("sparsync.version", self.state.version.to_string()),
            ("sparsync.replica_version", self.state.replica_version.to_string()),
            ("sparsync.registry", serde_json::to_string(&self.registry).expect("registry serializes")),
            ("sparsync.pending", serde_json::to_string(&index).expect("index serializes")),
            ("sparsync.policy", self.policy.clone()),
            ("sparsync.policy_state", self.policy_state.to_string()),
            ("sparsync.wal_seq", self.wal_seq.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let sum = checksum(&meta, &[&x, &r, &m, &pending]);
        meta.insert("sparsync.checksum".into(), format!("{sum:016x}"));
        safetensors::serialize(views, Some(meta)).map_err(bad)
    }

    /// Reads and verifies a checkpoint file.
    pub fn read(path: &Path) -> Result<Self, DurabilityError> {
        let bytes = std::fs::read(path).map_err(io("reading", path))?;
        Self::from_bytes(&bytes, path)
    }

    /// Parses and verifies a checkpoint's bytes; `path` names where they came from in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, DurabilityError> {
        let invalid = |reason: String| DurabilityError::Invalid { path: path.to_path_buf(), reason };
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| invalid(e.to_string()))?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| invalid(e.to_string()))?;
        let meta = header.metadata().clone().ok_or_else(|| invalid("no metadata".into()))?;
        let get = |k: &str| meta.get(k).cloned().ok_or_else(|| invalid(format!("metadata {k} missing")));
        let data = |name: &str| st.tensor(name).map(|t| t.data().to_vec()).unwrap_or_default();
        let (x, r, m, pending) = (data("x"), data("replica"), data("momentum"), data("pending_frames"));
        let mut rest = meta.clone();
        let want = rest.remove("sparsync.checksum").ok_or_else(|| invalid("checksum missing".into()))?;
        if format!("{:016x}", checksum(&rest, &[&x, &r, &m, &pending])) != want {
            return Err(invalid("checksum mismatch (torn or corrupt)".into()));
        }
        let floats = |b: &[u8]| {
            b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<_>>()
        };
        let parse = |k: &str| -> Result<u64, DurabilityError> {
            get(k)?.parse().map_err(|_| invalid(format!("{k} is not a number")))
        };
        let index: Vec<serde_json::Value> =
            serde_json::from_str(&get("sparsync.pending")?).map_err(|e| invalid(e.to_string()))?;
        let mut at = 0usize;
        let mut pend = Vec::new();
        for e in index {
            let len = e["len"].as_u64().unwrap_or(0) as usize;
            if at + len > pending.len() {
                return Err(invalid("pending frames truncated".into()));
            }
            pend.push(PendingPush {
                client_id: e["client"].as_str().unwrap_or("").to_string(),
                frame: Bytes::copy_from_slice(&pending[at..at + len]),
            });
            at += len;
        }
        Ok(Self {
            model: get("sparsync.model")?,
            layout: serde_json::from_str(&get("sparsync.layout")?).map_err(|e| invalid(e.to_string()))?,
            state: ModelState {
                x: floats(&x),
                momentum: floats(&m),
                replica: floats(&r),
                version: parse("sparsync.version")?,
                replica_version: parse("sparsync.replica_version")?,
            },
            registry: serde_json::from_str(&get("sparsync.registry")?).map_err(|e| invalid(e.to_string()))?,
            pending: pend,
            policy: get("sparsync.policy")?,
            policy_state: serde_json::from_str(&get("sparsync.policy_state")?)
                .unwrap_or(serde_json::Value::Null),
            wal_seq: parse("sparsync.wal_seq")?,
            wal: Vec::new(),
        })
    }

    /// The newest valid checkpoint in `dir` (torn or corrupt ones are skipped with a warning).
    pub fn newest(dir: &Path) -> Result<(PathBuf, Self), DurabilityError> {
        for (_, path) in list(dir).into_iter().rev() {
            match Self::read(&path) {
                Ok(c) => return Ok((path, c)),
                Err(e) => tracing::warn!(error = %e, "skipping an unusable checkpoint"),
            }
        }
        Err(DurabilityError::NoCheckpoint(dir.to_path_buf()))
    }
}

/// Checkpoint files in `dir`, oldest first, by version.
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    numbered_files(dir, PREFIX, SUFFIX)
}

/// Files in `dir` named `{prefix}{number}{suffix}`, by number; unreadable entries are skipped.
fn numbered_files(dir: &Path, prefix: &str, suffix: &str) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let v = name.strip_prefix(prefix)?.strip_suffix(suffix)?.parse().ok()?;
            Some((v, e.path()))
        })
        .collect();
    out.sort();
    out
}

fn checksum(meta: &std::collections::HashMap<String, String>, data: &[&[u8]]) -> u64 {
    let mut keys: Vec<&String> = meta.keys().collect();
    keys.sort();
    let mut parts: Vec<&[u8]> = Vec::new();
    for k in keys {
        parts.push(k.as_bytes());
        parts.push(meta[k].as_bytes());
    }
    parts.extend_from_slice(data);
    fnv64(&parts)
}

/// The write-ahead log of accepted pushes.
pub struct Wal {
    dir: PathBuf,
    file: std::fs::File,
    path: PathBuf,
}

/// Record kinds: a push and a step, each with its checksum (the first two: FNV-1a 64, written
/// until 2026-12, still read; the last two: CRC-32, which hardware computes at memory speed).
const WAL_MAGIC_FNV: &[u8; 4] = b"SPWL";
const WAL_STEP_MAGIC_FNV: &[u8; 4] = b"SPWS";
const WAL_MAGIC: &[u8; 4] = b"SPW2";
const WAL_STEP_MAGIC: &[u8; 4] = b"SPS2";
/// A push with its indices as gaps: at 1% density about 3.5 bytes an entry instead of 6.
const WAL_COMPACT_MAGIC: &[u8; 4] = b"SPW3";

/// CRC-32 (IEEE) of the parts, as the record's 8-byte checksum field holds it.
fn crc(parts: &[&[u8]]) -> u64 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize() as u64
}

impl Wal {
    /// Starts log file number `seq` (empty) and removes older ones: call it once the checkpoint
    /// that names `seq` is durable.
    pub fn start(dir: &Path, seq: u64) -> Result<Self, DurabilityError> {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let path = dir.join(format!("wal-{seq:012}.log"));
        let file = std::fs::File::create(&path).map_err(io("creating", &path))?;
        sync_dir(dir);
        for (v, p) in wal_files(dir) {
            if v < seq {
                let _ = std::fs::remove_file(p);
            }
        }
        Ok(Self { dir: dir.to_path_buf(), file, path })
    }

    /// The number of the next log file after the ones in `dir`.
    pub fn next_seq(dir: &Path) -> u64 {
        wal_files(dir).last().map_or(1, |(v, _)| v + 1)
    }

    /// Appends one record the core asked the log to keep; returns (its length in bytes) once
    /// the operating system has it.
    pub fn append_op(&mut self, op: &WalOp) -> Result<usize, DurabilityError> {
        let mut rec = Vec::new();
        encode_record(op, &mut rec);
        self.file.write_all(&rec).map_err(io("appending to", &self.path))?;
        Ok(rec.len())
    }

    /// Switches to log file `seq` once the checkpoint naming it is durable.
    pub fn rotate(&mut self, seq: u64) -> Result<(), DurabilityError> {
        *self = Self::start(&self.dir.clone(), seq)?;
        Ok(())
    }
}

fn wal_files(dir: &Path) -> Vec<(u64, PathBuf)> {
    numbered_files(dir, "wal-", ".log")
}

/// Appends one log record to `out`: `SPW3` (an accepted push: client id, u16 length + bytes,
/// then the Push frame with its indices as gaps, see [`encode_compact_push`]), `SPW2` (a push
/// frame that is not a well-formed Push, kept as it is) or `SPS2` (an applied step: broadcast
/// flag, u32 count, then each push's client id, seq and weight bits), the payload's length
/// (u32) and its CRC-32 (in 8 bytes), then the payload. The file WAL and the JetStream log
/// hold the same records.
pub fn encode_record(op: &WalOp, out: &mut Vec<u8>) {
    let (magic, payload) = match op {
        WalOp::Push(p) if encode_compact_push(p, out) => return,
        WalOp::Push(p) => {
            // Written in place (a push's frame is most of the log's bytes: copied once).
            let name = p.client_id.as_bytes();
            let nlen = (name.len() as u16).to_le_bytes();
            let len = (2 + name.len() + p.frame.len()) as u32;
            out.reserve(16 + len as usize);
            out.extend_from_slice(WAL_MAGIC);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&crc(&[&nlen, name, &p.frame]).to_le_bytes());
            out.extend_from_slice(&nlen);
            out.extend_from_slice(name);
            out.extend_from_slice(&p.frame);
            return;
        }
        WalOp::Step(s) => {
            let mut payload = Vec::with_capacity(5 + s.items.len() * 24);
            payload.push(s.broadcast as u8);
            payload.extend_from_slice(&(s.items.len() as u32).to_le_bytes());
            for (name, seq, w) in &s.items {
                payload.extend_from_slice(&(name.len() as u16).to_le_bytes());
                payload.extend_from_slice(name.as_bytes());
                payload.extend_from_slice(&seq.to_le_bytes());
                payload.extend_from_slice(&w.to_bits().to_le_bytes());
            }
            (WAL_STEP_MAGIC, payload)
        }
    };
    out.reserve(16 + payload.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc(&[&payload]).to_le_bytes());
    out.extend_from_slice(&payload);
}

/// Appends `p` as an `SPW3` record: the payload is the client id (u16 length + bytes), the
/// Push's 40-byte header, its nnz indices as unsigned LEB128 (the first index, then each
/// index's distance from the one before) and its nnz f16 values; the frame's zero padding is
/// left out. Returns false (writing nothing) for a frame whose indices do not rise or whose
/// length or padding is not a Push's.
fn encode_compact_push(p: &PendingPush, out: &mut Vec<u8>) -> bool {
    use crate::protocol::frame::{PUSH_HEADER_LEN, sparse_payload_len};
    let f = &p.frame[..];
    let Some(nnz) = f.get(PUSH_HEADER_LEN - 4..PUSH_HEADER_LEN) else { return false };
    let nnz = u32::from_le_bytes(nnz.try_into().expect("4 bytes")) as usize;
    if f.len() != PUSH_HEADER_LEN + sparse_payload_len(nnz) {
        return false;
    }
    let (indices, rest) = f[PUSH_HEADER_LEN..].split_at(4 * nnz);
    let (values, padding) = rest.split_at(2 * nnz);
    let name = p.client_id.as_bytes();
    if padding.iter().any(|&b| b != 0) || name.len() > u16::MAX as usize {
        return false;
    }
    let start = out.len();
    out.reserve(16 + 2 + name.len() + PUSH_HEADER_LEN + 2 * nnz + 2 * nnz);
    out.extend_from_slice(WAL_COMPACT_MAGIC);
    out.extend_from_slice(&[0; 12]);
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(&f[..PUSH_HEADER_LEN]);
    let mut prev: Option<u32> = None;
    for c in indices.chunks_exact(4) {
        let i = u32::from_le_bytes(c.try_into().expect("4 bytes"));
        let mut gap = match prev {
            None => i,
            Some(p) if i > p => i - p,
            Some(_) => {
                out.truncate(start);
                return false;
            }
        };
        prev = Some(i);
        while gap >= 0x80 {
            out.push((gap as u8) | 0x80);
            gap >>= 7;
        }
        out.push(gap as u8);
    }
    out.extend_from_slice(values);
    let len = (out.len() - start - 16) as u32;
    let sum = crc(&[&out[start + 16..]]);
    out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    out[start + 8..start + 16].copy_from_slice(&sum.to_le_bytes());
    true
}

/// The Push frame an `SPW3` payload (after the client id) holds, as it was received.
fn decode_compact_push(b: &[u8]) -> Option<Bytes> {
    use crate::protocol::frame::{PUSH_HEADER_LEN, sparse_payload_len};
    let header = b.get(..PUSH_HEADER_LEN)?;
    let nnz = u32::from_le_bytes(header[PUSH_HEADER_LEN - 4..].try_into().ok()?) as usize;
    // Every index takes at least one byte and every value two.
    if nnz > (b.len() - PUSH_HEADER_LEN) / 3 {
        return None;
    }
    let mut frame = Vec::with_capacity(PUSH_HEADER_LEN + sparse_payload_len(nnz));
    frame.extend_from_slice(header);
    let mut at = PUSH_HEADER_LEN;
    let mut index: u32 = 0;
    for k in 0..nnz {
        let mut gap: u32 = 0;
        let mut shift = 0;
        loop {
            let byte = *b.get(at)?;
            at += 1;
            if shift == 28 && byte & 0x70 != 0 {
                return None;
            }
            gap |= ((byte & 0x7f) as u32) << shift;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 28 {
                return None;
            }
        }
        index = if k == 0 { gap } else { index.checked_add(gap).filter(|_| gap > 0)? };
        frame.extend_from_slice(&index.to_le_bytes());
    }
    let values = b.get(at..)?;
    if values.len() != 2 * nnz {
        return None;
    }
    frame.extend_from_slice(values);
    frame.resize(PUSH_HEADER_LEN + sparse_payload_len(nnz), 0);
    Some(Bytes::from(frame))
}

/// Why [`decode_records`] stopped before the end of its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Torn {
    /// A record is cut short or its header is not one (a write the process died in).
    Torn { offset: usize },
    /// A record's checksum does not match, or a step record does not parse.
    Corrupt { offset: usize },
}

/// The records in `b`, in order, up to the first torn or corrupt one (reported).
pub fn decode_records(b: &[u8]) -> (Vec<WalOp>, Option<Torn>) {
    let mut out = Vec::new();
    let mut at = 0;
    while at < b.len() {
        let magic = b.get(at..at + 4).unwrap_or_default();
        let step = magic == WAL_STEP_MAGIC || magic == WAL_STEP_MAGIC_FNV;
        let fnv = magic == WAL_MAGIC_FNV || magic == WAL_STEP_MAGIC_FNV;
        let compact = magic == WAL_COMPACT_MAGIC;
        let ok = b.len() >= at + 16 && (step || compact || magic == WAL_MAGIC || magic == WAL_MAGIC_FNV);
        let len =
            if ok { u32::from_le_bytes([b[at + 4], b[at + 5], b[at + 6], b[at + 7]]) as usize } else { 0 };
        let end = at + 16 + len;
        if !ok || end > b.len() || len < 2 {
            return (out, Some(Torn::Torn { offset: at }));
        }
        let sum = u64::from_le_bytes([
            b[at + 8],
            b[at + 9],
            b[at + 10],
            b[at + 11],
            b[at + 12],
            b[at + 13],
            b[at + 14],
            b[at + 15],
        ]);
        let payload = &b[at + 16..end];
        if sum != if fnv { fnv64(&[payload]) } else { crc(&[payload]) } {
            return (out, Some(Torn::Corrupt { offset: at }));
        }
        if step {
            match parse_step(payload) {
                Some(s) => out.push(WalOp::Step(s)),
                None => return (out, Some(Torn::Corrupt { offset: at })),
            }
        } else {
            let nlen = u16::from_le_bytes([payload[0], payload[1]]) as usize;
            if 2 + nlen > payload.len() {
                return (out, Some(Torn::Corrupt { offset: at }));
            }
            let rest = &payload[2 + nlen..];
            let frame = if compact {
                match decode_compact_push(rest) {
                    Some(f) => f,
                    None => return (out, Some(Torn::Corrupt { offset: at })),
                }
            } else {
                Bytes::copy_from_slice(rest)
            };
            out.push(WalOp::Push(PendingPush {
                client_id: String::from_utf8_lossy(&payload[2..2 + nlen]).to_string(),
                frame,
            }));
        }
        at = end;
    }
    (out, None)
}

/// The records of WAL files numbered `seq` and later, in order. A torn tail is reported and
/// dropped.
pub fn replay(dir: &Path, seq: u64) -> Result<Vec<WalOp>, DurabilityError> {
    let mut out = Vec::new();
    for (v, path) in wal_files(dir) {
        if v < seq {
            continue;
        }
        let b = std::fs::read(&path).map_err(io("reading", &path))?;
        let (ops, torn) = decode_records(&b);
        out.extend(ops);
        match torn {
            Some(Torn::Torn { offset }) => {
                tracing::warn!(file = %path.display(), offset, "torn WAL record ignored (written when the process died, never acknowledged)")
            }
            Some(Torn::Corrupt { offset }) => {
                tracing::warn!(file = %path.display(), offset, "corrupt WAL record ignored")
            }
            None => {}
        }
    }
    Ok(out)
}

fn parse_step(p: &[u8]) -> Option<LoggedStep> {
    let broadcast = *p.first()? != 0;
    let count = u32::from_le_bytes(p.get(1..5)?.try_into().ok()?) as usize;
    let mut at = 5;
    let mut items = Vec::with_capacity(count.min(p.len() / 14));
    for _ in 0..count {
        let nlen = u16::from_le_bytes(p.get(at..at + 2)?.try_into().ok()?) as usize;
        let name = String::from_utf8_lossy(p.get(at + 2..at + 2 + nlen)?).to_string();
        at += 2 + nlen;
        let seq = u64::from_le_bytes(p.get(at..at + 8)?.try_into().ok()?);
        let w = f32::from_bits(u32::from_le_bytes(p.get(at + 8..at + 12)?.try_into().ok()?));
        at += 12;
        items.push((name, seq, w));
    }
    (at == p.len()).then_some(LoggedStep { items, broadcast })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ckpt(version: u64) -> Checkpoint {
        Checkpoint {
            model: "test".into(),
            layout: vec![TensorSpec::new("w", &[3])],
            state: ModelState {
                x: vec![1.0, 2.0, 3.0],
                momentum: vec![],
                replica: vec![1.0, 2.0, 2.5],
                version,
                replica_version: version,
            },
            registry: BTreeMap::from([("a".to_string(), 7)]),
            pending: vec![PendingPush { client_id: "a".into(), frame: Bytes::from_static(b"frame-bytes") }],
            wal: Vec::new(),
            policy: "asp".into(),
            policy_state: serde_json::json!({ "pending": 1 }),
            wal_seq: version + 1,
        }
    }

    #[test]
    fn checkpoints_round_trip_and_torn_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let p5 = ckpt(5).write(dir.path(), 3).unwrap();
        let p9 = ckpt(9).write(dir.path(), 3).unwrap();
        assert_eq!(Checkpoint::read(&p5).unwrap(), ckpt(5));
        // Tear the newest: resume falls back to version 5.
        let bytes = std::fs::read(&p9).unwrap();
        std::fs::write(&p9, &bytes[..bytes.len() - 3]).unwrap();
        assert!(Checkpoint::read(&p9).is_err());
        let (path, c) = Checkpoint::newest(dir.path()).unwrap();
        assert_eq!((path, c.state.version), (p5.clone(), 5));
        // A flipped data byte is caught by the checksum.
        let mut bytes = std::fs::read(&p5).unwrap();
        let n = bytes.len();
        bytes[n - 20] ^= 1;
        std::fs::write(&p5, &bytes).unwrap();
        assert!(Checkpoint::read(&p5).unwrap_err().to_string().contains("checksum"));
        assert!(matches!(Checkpoint::newest(dir.path()), Err(DurabilityError::NoCheckpoint(_))));
        for v in 10..15 {
            ckpt(v).write(dir.path(), 3).unwrap();
        }
        assert_eq!(list(dir.path()).iter().map(|e| e.0).collect::<Vec<_>>(), vec![12, 13, 14]);
    }

    #[test]
    fn wal_replays_in_order_and_drops_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let push = |c: &str, f: &'static [u8]| {
            WalOp::Push(PendingPush { client_id: c.into(), frame: Bytes::from_static(f) })
        };
        let mut w = Wal::start(dir.path(), 3).unwrap();
        w.append_op(&push("a", b"one")).unwrap();
        w.append_op(&push("bb", b"two")).unwrap();
        let step = LoggedStep { items: vec![("a".into(), 7, 0.25), ("bb".into(), 1, -0.0)], broadcast: true };
        w.append_op(&WalOp::Step(step)).unwrap();
        let got = replay(dir.path(), 3).unwrap();
        let pushes: Vec<_> = got
            .iter()
            .filter_map(|op| match op {
                WalOp::Push(p) => Some((p.client_id.as_str(), &p.frame[..])),
                WalOp::Step(_) => None,
            })
            .collect();
        assert_eq!(pushes, vec![("a", &b"one"[..]), ("bb", &b"two"[..])]);
        assert_eq!(
            got[2],
            WalOp::Step(LoggedStep {
                items: vec![("a".into(), 7, 0.25), ("bb".into(), 1, -0.0)],
                broadcast: true
            })
        );
        // A half-written record at the end is ignored.
        let path = dir.path().join("wal-000000000003.log");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"SPWL\x10\x00");
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(replay(dir.path(), 3).unwrap().len(), 3);
        // Rotation at a checkpoint starts a fresh log and drops older ones.
        w.rotate(8).unwrap();
        w.append_op(&push("c", b"three")).unwrap();
        assert!(!path.exists());
        assert_eq!(replay(dir.path(), 8).unwrap().len(), 1);
    }

    /// A Push frame with these indices (values from the index).
    fn push_frame(seq: u64, indices: &[u32]) -> Bytes {
        use crate::protocol::frame::{PushHeader, encode_push};
        let values: Vec<half::f16> =
            indices.iter().map(|&i| half::f16::from_f32((i % 97) as f32 - 48.0)).collect();
        let h = PushHeader { base_version: 3, seq, samples: 32, local_steps: 2, loss: 0.5, nnz: 0 };
        Bytes::from(encode_push(&h, indices, &values))
    }

    #[test]
    fn push_records_keep_indices_as_gaps_and_give_back_the_frame_exactly() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        // 1% of 2^20 at random, the extremes, odd and even counts, none.
        let mut sets: Vec<Vec<u32>> = vec![
            vec![],
            vec![0],
            vec![u32::MAX],
            vec![0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, u32::MAX - 1, u32::MAX],
        ];
        for n in [1usize, 2, 10_485] {
            let mut idx: Vec<u32> = (0..n).map(|_| (next() % (1 << 20)) as u32).collect();
            idx.sort_unstable();
            idx.dedup();
            sets.push(idx);
        }
        let ops: Vec<WalOp> = sets
            .iter()
            .enumerate()
            .map(|(k, idx)| {
                WalOp::Push(PendingPush { client_id: format!("c{k}"), frame: push_frame(k as u64, idx) })
            })
            .collect();
        let mut log = Vec::new();
        for op in &ops {
            let at = log.len();
            encode_record(op, &mut log);
            assert_eq!(&log[at..at + 4], WAL_COMPACT_MAGIC);
        }
        assert_eq!(decode_records(&log), (ops.clone(), None));
        // At 1% density the record is well under the frame's size.
        let WalOp::Push(big) = &ops[6] else { unreachable!() };
        let mut one = Vec::new();
        encode_record(&ops[6], &mut one);
        assert!(
            one.len() * 10 < big.frame.len() * 6,
            "{} bytes for a frame of {}",
            one.len(),
            big.frame.len()
        );
        // A frame that is not a well-formed Push is kept as it came.
        let odd = [Bytes::from_static(b"not a push"), push_frame(1, &[5, 3]), {
            let mut f = push_frame(1, &[5]).to_vec();
            let n = f.len();
            f[n - 1] = 1; // nonzero padding
            Bytes::from(f)
        }];
        for frame in odd {
            let op = WalOp::Push(PendingPush { client_id: "x".into(), frame });
            let mut rec = Vec::new();
            encode_record(&op, &mut rec);
            assert_eq!(&rec[..4], WAL_MAGIC);
            assert_eq!(decode_records(&rec), (vec![op], None));
        }
        // A compact record whose checksum matches but whose indices do not rise (a gap of 0)
        // is refused, not turned into a frame.
        let mut payload = vec![1u8, 0, b'z'];
        payload.extend_from_slice(&push_frame(1, &[4, 6])[..40]);
        payload.extend_from_slice(&[4, 0, 1, 0, 2, 0]);
        let mut rec = Vec::new();
        rec.extend_from_slice(WAL_COMPACT_MAGIC);
        rec.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        rec.extend_from_slice(&crc(&[&payload]).to_le_bytes());
        rec.extend_from_slice(&payload);
        assert_eq!(decode_records(&rec), (vec![], Some(Torn::Corrupt { offset: 0 })));
    }

    #[test]
    fn records_of_the_older_fnv_format_are_still_read_and_checked() {
        let mut payload = vec![1u8, 0, b'a'];
        payload.extend_from_slice(b"frame");
        let mut old = Vec::new();
        old.extend_from_slice(b"SPWL");
        old.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        old.extend_from_slice(&fnv64(&[&payload]).to_le_bytes());
        old.extend_from_slice(&payload);
        let new = WalOp::Push(PendingPush { client_id: "b".into(), frame: Bytes::from_static(b"next") });
        encode_record(&new, &mut old);
        let (ops, torn) = decode_records(&old);
        assert_eq!(torn, None);
        assert_eq!(
            ops,
            vec![
                WalOp::Push(PendingPush { client_id: "a".into(), frame: Bytes::from_static(b"frame") }),
                new
            ]
        );
        // A flipped payload byte is caught in either format.
        let mut bad = old.clone();
        bad[18] ^= 1;
        assert_eq!(decode_records(&bad).1, Some(Torn::Corrupt { offset: 0 }));
        let mut bad = old.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert_eq!(decode_records(&bad), (ops[..1].to_vec(), Some(Torn::Corrupt { offset: 24 })));
    }
}
