//! Binary frames: Push (client → server), Delta and Snapshot (server → client).
//!
//! Every binary frame starts with the same 8 bytes, little-endian:
//!
//! | offset | size | field                              |
//! |--------|------|------------------------------------|
//! | 0      | 4    | magic `SPSY` (0x53 0x50 0x53 0x59) |
//! | 4      | 2    | protocol version (u16)             |
//! | 6      | 1    | kind: 1 Push, 2 Delta, 3 Snapshot  |
//! | 7      | 1    | flags, must be 0                   |
//!
//! followed by a kind-specific header and the arrays. `docs/protocol.md` is the full
//! specification. Decoding never copies the arrays: a view borrows the frame's bytes, and the
//! GPU engine uploads the payload bytes exactly as they arrived.

use half::f16;

use super::PROTOCOL_VERSION;

/// The four magic bytes that open every binary frame.
pub const MAGIC: [u8; 4] = *b"SPSY";
/// Push header length in bytes; the indices start here.
pub const PUSH_HEADER_LEN: usize = 40;
/// Delta header length in bytes; the indices start here.
pub const DELTA_HEADER_LEN: usize = 32;
/// Snapshot header length in bytes; the values start here.
pub const SNAPSHOT_HEADER_LEN: usize = 24;

/// Binary frame kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Push = 1,
    Delta = 2,
    Snapshot = 3,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Push),
            2 => Some(Self::Delta),
            3 => Some(Self::Snapshot),
            _ => None,
        }
    }
}

/// Snapshot value encodings.
pub const SNAPSHOT_DTYPE_F32: u8 = 0;

/// Why a binary frame was refused. Each variant names the field at fault (see [`field`]).
///
/// [`field`]: FrameError::field
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is shorter than the {need}-byte header")]
    Truncated { len: usize, need: usize },
    #[error("bad magic {got:02x?}, expected \"SPSY\"")]
    BadMagic { got: [u8; 4] },
    #[error("protocol version mismatch: frame says {got}, this side speaks {PROTOCOL_VERSION}")]
    ProtocolVersion { got: u16 },
    #[error("unknown frame kind {got}")]
    UnknownKind { got: u8 },
    #[error("expected a {expected:?} frame, got {got:?}")]
    UnexpectedKind { expected: FrameKind, got: FrameKind },
    #[error("flags must be 0, got {got:#04x}")]
    BadFlags { got: u8 },
    #[error("nnz {nnz} exceeds the limit of {max}")]
    NnzTooLarge { nnz: u64, max: u64 },
    #[error("nnz {nnz} needs a frame of {expected} bytes, got {got}")]
    LengthMismatch { nnz: u64, expected: u64, got: usize },
    #[error("indices[{pos}] = {index} is out of range: the model has {n} parameters")]
    IndexOutOfRange { pos: usize, index: u32, n: u64 },
    #[error("indices[{pos}] = {index} is a duplicate index")]
    DuplicateIndex { pos: usize, index: u32 },
    #[error("indices must be strictly ascending: indices[{pos}] = {index} follows {prev}")]
    NotAscending { pos: usize, index: u32, prev: u32 },
    #[error("values[{pos}] (index {index}) is not finite (f16 bits {bits:#06x})")]
    NonFinite { pos: usize, index: u32, bits: u16 },
    #[error("samples must be at least 1")]
    ZeroSamples,
    #[error("loss must be finite and non-negative, got {loss}")]
    BadLoss { loss: f32 },
    #[error("padding bytes must be zero")]
    BadPadding,
    #[error("snapshot has {got} values, expected {expected}")]
    SnapshotSize { got: u64, expected: u64 },
    #[error("unknown snapshot dtype {got}")]
    SnapshotDtype { got: u8 },
}

impl FrameError {
    /// The name of the frame field that is wrong, as used in Error and Reject messages.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Truncated { .. } => "length",
            Self::BadMagic { .. } => "magic",
            Self::ProtocolVersion { .. } => "protocol_version",
            Self::UnknownKind { .. } | Self::UnexpectedKind { .. } => "kind",
            Self::BadFlags { .. } => "flags",
            Self::NnzTooLarge { .. } | Self::LengthMismatch { .. } => "nnz",
            Self::IndexOutOfRange { .. } | Self::DuplicateIndex { .. } | Self::NotAscending { .. } => {
                "indices"
            }
            Self::NonFinite { .. } => "values",
            Self::ZeroSamples => "samples",
            Self::BadLoss { .. } => "loss",
            Self::BadPadding => "padding",
            Self::SnapshotSize { .. } => "n",
            Self::SnapshotDtype { .. } => "dtype",
        }
    }

    /// True when the frame's header could be read, so the answer can name the Push (a Reject)
    /// rather than the frame (an Error).
    pub fn header_was_readable(&self) -> bool {
        !matches!(
            self,
            Self::Truncated { .. }
                | Self::BadMagic { .. }
                | Self::ProtocolVersion { .. }
                | Self::UnknownKind { .. }
                | Self::UnexpectedKind { .. }
                | Self::BadFlags { .. }
        )
    }
}

#[inline(always)]
fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
#[inline(always)]
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
#[inline(always)]
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Reads and checks the 8-byte common prefix; returns the kind.
pub fn check_prefix(frame: &[u8]) -> Result<FrameKind, FrameError> {
    if frame.len() < 8 {
        return Err(FrameError::Truncated { len: frame.len(), need: 8 });
    }
    let magic = [frame[0], frame[1], frame[2], frame[3]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic { got: magic });
    }
    let version = u16_at(frame, 4);
    if version != PROTOCOL_VERSION {
        return Err(FrameError::ProtocolVersion { got: version });
    }
    let kind = FrameKind::from_u8(frame[6]).ok_or(FrameError::UnknownKind { got: frame[6] })?;
    if frame[7] != 0 {
        return Err(FrameError::BadFlags { got: frame[7] });
    }
    Ok(kind)
}

fn expect_kind(frame: &[u8], expected: FrameKind, header_len: usize) -> Result<(), FrameError> {
    let kind = check_prefix(frame)?;
    if kind != expected {
        return Err(FrameError::UnexpectedKind { expected, got: kind });
    }
    if frame.len() < header_len {
        return Err(FrameError::Truncated { len: frame.len(), need: header_len });
    }
    Ok(())
}

/// Bytes taken by `nnz` indices and `nnz` f16 values, padded to a multiple of 4.
#[inline]
pub fn sparse_payload_len(nnz: usize) -> usize {
    4 * nnz + 2 * nnz + if nnz % 2 == 1 { 2 } else { 0 }
}

/// The fixed fields of a Push.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PushHeader {
    /// τ: the replica version the update was computed from.
    pub base_version: u64,
    /// The client's sequence number for this Push; answers name it.
    pub seq: u64,
    /// Training samples behind the update (≥ 1).
    pub samples: u32,
    /// Local optimisation steps behind the update.
    pub local_steps: u32,
    /// The client's training loss (finite, ≥ 0).
    pub loss: f32,
    /// Number of (index, value) pairs.
    pub nnz: u32,
}

/// What a decoder checks a Push against.
#[derive(Clone, Copy, Debug)]
pub struct PushLimits {
    /// Parameters in the model: every index must be below it.
    pub num_params: u64,
    /// Largest nnz accepted.
    pub max_nnz: u64,
}

/// A Push that passed [`PushView::decode`], owning its (reference-counted) frame.
///
/// The only way to make one is [`ValidatedPush::decode`], so holding one is the proof that the
/// frame is well formed: code after the session's checks never re-validates or `expect`s.
#[derive(Clone, Debug)]
pub struct ValidatedPush {
    header: PushHeader,
    frame: bytes::Bytes,
}

impl ValidatedPush {
    /// Validates `frame` (see [`PushView::decode`]) and keeps it without copying.
    pub fn decode(frame: bytes::Bytes, limits: &PushLimits) -> Result<Self, FrameError> {
        let header = PushView::decode(&frame, limits)?.header;
        Ok(ValidatedPush { header, frame })
    }

    /// The header as the client sent it.
    pub fn header(&self) -> &PushHeader {
        &self.header
    }

    /// The whole frame, as received.
    pub fn frame(&self) -> &bytes::Bytes {
        &self.frame
    }

    /// A borrowed view for the engines.
    pub fn view(&self) -> PushView<'_> {
        PushView { header: self.header, frame: &self.frame }
    }
}

/// A validated Push borrowing its frame: indices and values are read in place.
#[derive(Clone, Copy, Debug)]
pub struct PushView<'a> {
    pub header: PushHeader,
    frame: &'a [u8],
}

impl<'a> PushView<'a> {
    /// Reads only the header fields (no validation of the arrays). Used to name a Push in a
    /// Reject when the arrays are bad.
    pub fn peek_header(frame: &[u8]) -> Result<PushHeader, FrameError> {
        expect_kind(frame, FrameKind::Push, PUSH_HEADER_LEN)?;
        Ok(PushHeader {
            base_version: u64_at(frame, 8),
            seq: u64_at(frame, 16),
            samples: u32_at(frame, 24),
            local_steps: u32_at(frame, 28),
            loss: f32::from_bits(u32_at(frame, 32)),
            nnz: u32_at(frame, 36),
        })
    }

    /// Decodes and fully validates a Push: lengths before anything else, then indices strictly
    /// ascending and below `num_params`, values finite. Allocates nothing.
    pub fn decode(frame: &'a [u8], limits: &PushLimits) -> Result<Self, FrameError> {
        let header = Self::peek_header(frame)?;
        let nnz = header.nnz as u64;
        if nnz > limits.max_nnz || nnz > limits.num_params {
            return Err(FrameError::NnzTooLarge { nnz, max: limits.max_nnz.min(limits.num_params) });
        }
        let expected = PUSH_HEADER_LEN as u64 + sparse_payload_len(nnz as usize) as u64;
        if frame.len() as u64 != expected {
            return Err(FrameError::LengthMismatch { nnz, expected, got: frame.len() });
        }
        if header.samples == 0 {
            return Err(FrameError::ZeroSamples);
        }
        if !header.loss.is_finite() || header.loss < 0.0 {
            return Err(FrameError::BadLoss { loss: header.loss });
        }
        let view = PushView { header, frame };
        validate_sparse(view.indices_bytes(), view.values_bytes(), limits.num_params)?;
        if nnz % 2 == 1 && frame[frame.len() - 2..] != [0, 0] {
            return Err(FrameError::BadPadding);
        }
        Ok(view)
    }

    /// The whole frame.
    pub fn frame(&self) -> &'a [u8] {
        self.frame
    }

    /// Indices then values then padding, exactly as received: what the GPU engine uploads.
    pub fn payload(&self) -> &'a [u8] {
        &self.frame[PUSH_HEADER_LEN..]
    }

    /// The indices as little-endian `u32` bytes.
    pub fn indices_bytes(&self) -> &'a [u8] {
        let n = self.header.nnz as usize;
        &self.frame[PUSH_HEADER_LEN..PUSH_HEADER_LEN + 4 * n]
    }

    /// The values as little-endian f16 bytes (no padding).
    pub fn values_bytes(&self) -> &'a [u8] {
        let n = self.header.nnz as usize;
        let start = PUSH_HEADER_LEN + 4 * n;
        &self.frame[start..start + 2 * n]
    }

    /// Iterates (index, value) pairs in index order.
    pub fn entries(&self) -> impl ExactSizeIterator<Item = (u32, f16)> + 'a {
        sparse_entries(self.indices_bytes(), self.values_bytes())
    }
}

/// Iterates little-endian (u32 index, f16 value) pairs from two byte arrays.
pub fn sparse_entries<'a>(
    indices: &'a [u8],
    values: &'a [u8],
) -> impl ExactSizeIterator<Item = (u32, f16)> + 'a {
    indices
        .chunks_exact(4)
        .zip(values.chunks_exact(2))
        .map(|(i, v)| (u32::from_le_bytes([i[0], i[1], i[2], i[3]]), f16::from_le_bytes([v[0], v[1]])))
}

/// Checks sparse arrays: indices strictly ascending and below `n`, values finite.
///
/// The common case runs as two branch-free, vectorisable folds; only when one of them finds a
/// problem does a second, scalar pass locate the first offending position for the message.
pub fn validate_sparse(indices: &[u8], values: &[u8], n: u64) -> Result<(), FrameError> {
    let nnz = indices.len() / 4;
    if nnz == 0 {
        return Ok(());
    }
    let bad_order = fold_order(indices);
    let bad_values = fold_nonfinite(values);
    let last = u32_at(indices, 4 * (nnz - 1)) as u64;
    if !bad_order && !bad_values && last < n {
        return Ok(());
    }
    // Slow path: find and report the first problem, in array order.
    let mut prev: Option<u32> = None;
    for (pos, (index, value)) in sparse_entries(indices, values).enumerate() {
        if let Some(p) = prev {
            if index == p {
                return Err(FrameError::DuplicateIndex { pos, index });
            }
            if index < p {
                return Err(FrameError::NotAscending { pos, index, prev: p });
            }
        }
        if index as u64 >= n {
            return Err(FrameError::IndexOutOfRange { pos, index, n });
        }
        if !value.is_finite() {
            return Err(FrameError::NonFinite { pos, index, bits: value.to_bits() });
        }
        prev = Some(index);
    }
    unreachable!("fast path reported a problem the slow path did not find")
}

/// True when some index is not strictly greater than its predecessor.
#[inline]
fn fold_order(indices: &[u8]) -> bool {
    #[cfg(target_endian = "little")]
    if let Ok(words) = bytemuck::try_cast_slice::<u8, u32>(indices) {
        return words.windows(2).fold(false, |bad, w| bad | (w[0] >= w[1]));
    }
    let mut bad = false;
    let mut prev = u32_at(indices, 0);
    for c in indices.chunks_exact(4).skip(1) {
        let i = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        bad |= prev >= i;
        prev = i;
    }
    bad
}

/// True when some f16 value is infinite or NaN (all exponent bits set).
#[inline]
fn fold_nonfinite(values: &[u8]) -> bool {
    #[cfg(target_endian = "little")]
    if let Ok(halves) = bytemuck::try_cast_slice::<u8, u16>(values) {
        return halves.iter().fold(false, |bad, &h| bad | (h & 0x7C00 == 0x7C00));
    }
    values.chunks_exact(2).fold(false, |bad, c| bad | (u16::from_le_bytes([c[0], c[1]]) & 0x7C00 == 0x7C00))
}

fn put_prefix(out: &mut Vec<u8>, kind: FrameKind) {
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.push(kind as u8);
    out.push(0);
}

fn put_sparse(out: &mut Vec<u8>, indices: &[u32], values: &[f16]) {
    debug_assert_eq!(indices.len(), values.len());
    for i in indices {
        out.extend_from_slice(&i.to_le_bytes());
    }
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    if indices.len() % 2 == 1 {
        out.extend_from_slice(&[0, 0]);
    }
}

/// Encodes a Push. `indices` must be strictly ascending (the server refuses anything else).
pub fn encode_push(header: &PushHeader, indices: &[u32], values: &[f16]) -> Vec<u8> {
    assert_eq!(indices.len(), values.len(), "one value per index");
    let mut out = Vec::with_capacity(PUSH_HEADER_LEN + sparse_payload_len(indices.len()));
    out.extend_from_slice(&push_header_bytes(&PushHeader { nnz: indices.len() as u32, ..*header }));
    put_sparse(&mut out, indices, values);
    out
}

/// Encodes the 40-byte Push header (with `header.nnz`); the body (indices, values, padding)
/// follows it. A sender that pushes the same body again (a load generator) encodes the body
/// once and only the header per push.
pub fn push_header_bytes(header: &PushHeader) -> [u8; PUSH_HEADER_LEN] {
    let mut out = Vec::with_capacity(PUSH_HEADER_LEN);
    put_prefix(&mut out, FrameKind::Push);
    out.extend_from_slice(&header.base_version.to_le_bytes());
    out.extend_from_slice(&header.seq.to_le_bytes());
    out.extend_from_slice(&header.samples.to_le_bytes());
    out.extend_from_slice(&header.local_steps.to_le_bytes());
    out.extend_from_slice(&header.loss.to_bits().to_le_bytes());
    out.extend_from_slice(&header.nnz.to_le_bytes());
    out.try_into().expect("40 bytes")
}

/// The fixed fields of a Delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaHeader {
    /// The replica version after applying this Delta.
    pub version: u64,
    /// The replica version this Delta applies to.
    pub base_version: u64,
    pub nnz: u32,
}

/// Encodes the 32-byte Delta header; the body (indices, values, padding) follows it.
pub fn delta_header_bytes(h: &DeltaHeader) -> [u8; DELTA_HEADER_LEN] {
    let mut out = Vec::with_capacity(DELTA_HEADER_LEN);
    put_prefix(&mut out, FrameKind::Delta);
    out.extend_from_slice(&h.version.to_le_bytes());
    out.extend_from_slice(&h.base_version.to_le_bytes());
    out.extend_from_slice(&h.nnz.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.try_into().expect("32 bytes")
}

/// Encodes a Delta from index and value arrays.
pub fn encode_delta(h: &DeltaHeader, indices: &[u32], values: &[f16]) -> Vec<u8> {
    assert_eq!(indices.len(), h.nnz as usize);
    let mut out = Vec::with_capacity(DELTA_HEADER_LEN + sparse_payload_len(indices.len()));
    out.extend_from_slice(&delta_header_bytes(h));
    put_sparse(&mut out, indices, values);
    out
}

/// Encodes a Delta whose body (indices, values, padding) is already laid out, e.g. as read
/// back from the GPU.
pub fn encode_delta_with_body(h: &DeltaHeader, body: &[u8]) -> Vec<u8> {
    assert_eq!(body.len(), sparse_payload_len(h.nnz as usize));
    let mut out = Vec::with_capacity(DELTA_HEADER_LEN + body.len());
    out.extend_from_slice(&delta_header_bytes(h));
    out.extend_from_slice(body);
    out
}

/// A validated Delta borrowing its frame.
#[derive(Clone, Copy, Debug)]
pub struct DeltaView<'a> {
    pub header: DeltaHeader,
    frame: &'a [u8],
}

impl<'a> DeltaView<'a> {
    /// Decodes and validates a Delta against a model of `num_params` parameters.
    pub fn decode(frame: &'a [u8], num_params: u64) -> Result<Self, FrameError> {
        expect_kind(frame, FrameKind::Delta, DELTA_HEADER_LEN)?;
        let header = DeltaHeader {
            version: u64_at(frame, 8),
            base_version: u64_at(frame, 16),
            nnz: u32_at(frame, 24),
        };
        let nnz = header.nnz as u64;
        if nnz > num_params {
            return Err(FrameError::NnzTooLarge { nnz, max: num_params });
        }
        let expected = DELTA_HEADER_LEN as u64 + sparse_payload_len(nnz as usize) as u64;
        if frame.len() as u64 != expected {
            return Err(FrameError::LengthMismatch { nnz, expected, got: frame.len() });
        }
        let view = DeltaView { header, frame };
        validate_sparse(view.indices_bytes(), view.values_bytes(), num_params)?;
        Ok(view)
    }

    pub fn indices_bytes(&self) -> &'a [u8] {
        let n = self.header.nnz as usize;
        &self.frame[DELTA_HEADER_LEN..DELTA_HEADER_LEN + 4 * n]
    }

    pub fn values_bytes(&self) -> &'a [u8] {
        let n = self.header.nnz as usize;
        let s = DELTA_HEADER_LEN + 4 * n;
        &self.frame[s..s + 2 * n]
    }

    /// Indices, values and padding: the part the GPU produces.
    pub fn body(&self) -> &'a [u8] {
        &self.frame[DELTA_HEADER_LEN..]
    }

    pub fn entries(&self) -> impl ExactSizeIterator<Item = (u32, f16)> + 'a {
        sparse_entries(self.indices_bytes(), self.values_bytes())
    }
}

/// Encodes a dense Snapshot of the public replica (f32 values).
pub fn encode_snapshot(version: u64, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SNAPSHOT_HEADER_LEN + 4 * values.len());
    put_prefix(&mut out, FrameKind::Snapshot);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(values.len() as u32).to_le_bytes());
    out.extend_from_slice(&[SNAPSHOT_DTYPE_F32, 0, 0, 0]);
    #[cfg(target_endian = "little")]
    out.extend_from_slice(bytemuck::cast_slice(values));
    #[cfg(not(target_endian = "little"))]
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// A validated Snapshot borrowing its frame.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotView<'a> {
    pub version: u64,
    frame: &'a [u8],
}

impl<'a> SnapshotView<'a> {
    pub fn decode(frame: &'a [u8], num_params: u64) -> Result<Self, FrameError> {
        expect_kind(frame, FrameKind::Snapshot, SNAPSHOT_HEADER_LEN)?;
        let version = u64_at(frame, 8);
        let n = u32_at(frame, 16) as u64;
        if frame[20] != SNAPSHOT_DTYPE_F32 {
            return Err(FrameError::SnapshotDtype { got: frame[20] });
        }
        if n != num_params {
            return Err(FrameError::SnapshotSize { got: n, expected: num_params });
        }
        let expected = SNAPSHOT_HEADER_LEN as u64 + 4 * n;
        if frame.len() as u64 != expected {
            return Err(FrameError::LengthMismatch { nnz: n, expected, got: frame.len() });
        }
        Ok(SnapshotView { version, frame })
    }

    /// Copies the values into `out` (which must have `num_params` entries).
    pub fn read_into(&self, out: &mut [f32]) {
        for (o, c) in out.iter_mut().zip(self.frame[SNAPSHOT_HEADER_LEN..].chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(indices: &[u32], values: &[f32]) -> Vec<u8> {
        let values: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
        let h = PushHeader {
            base_version: 3,
            seq: 9,
            samples: 32,
            local_steps: 5,
            loss: 0.5,
            nnz: indices.len() as u32,
        };
        encode_push(&h, indices, &values)
    }

    const LIMITS: PushLimits = PushLimits { num_params: 100, max_nnz: 50 };

    #[test]
    fn push_round_trip() {
        for nnz in [0usize, 1, 2, 7, 50] {
            let idx: Vec<u32> = (0..nnz as u32).map(|i| i * 2).collect();
            let val: Vec<f32> = (0..nnz).map(|i| i as f32 * 0.25 - 1.0).collect();
            let frame = push(&idx, &val);
            let v = PushView::decode(&frame, &LIMITS).unwrap();
            assert_eq!(v.header.nnz as usize, nnz);
            assert_eq!(v.header.seq, 9);
            let got: Vec<(u32, f32)> = v.entries().map(|(i, h)| (i, h.to_f32())).collect();
            let want: Vec<(u32, f32)> = idx.iter().copied().zip(val.iter().copied()).collect();
            assert_eq!(got, want);
            assert_eq!(v.payload().len() % 4, 0);
        }
    }

    #[test]
    fn each_bad_push_names_its_field() {
        let good = push(&[1, 5, 9], &[1.0, 2.0, 3.0]);
        let field = |f: &[u8]| PushView::decode(f, &LIMITS).unwrap_err().field();

        assert_eq!(field(&good[..20]), "length");
        let mut f = good.clone();
        f[0] = b'X';
        assert_eq!(field(&f), "magic");
        let mut f = good.clone();
        f[4] = 2;
        assert_eq!(field(&f), "protocol_version");
        let mut f = good.clone();
        f[6] = 2;
        assert_eq!(field(&f), "kind");
        let mut f = good.clone();
        f[7] = 1;
        assert_eq!(field(&f), "flags");
        let mut f = good.clone();
        f[36] = 4; // nnz 4 but 3 entries
        assert_eq!(field(&f), "nnz");
        let mut f = good.clone();
        f[36] = 51;
        assert_eq!(field(&f), "nnz");
        assert_eq!(field(&push(&[1, 100], &[1.0, 1.0])), "indices");
        assert_eq!(field(&push(&[1, 1], &[1.0, 1.0])), "indices");
        assert_eq!(field(&push(&[5, 1], &[1.0, 1.0])), "indices");
        assert_eq!(field(&push(&[1, 2], &[1.0, f32::NAN])), "values");
        assert_eq!(field(&push(&[1, 2], &[f32::INFINITY, 1.0])), "values");
        let mut f = good.clone();
        f[24..28].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(field(&f), "samples");
        let mut f = good.clone();
        f[32..36].copy_from_slice(&f32::NAN.to_bits().to_le_bytes());
        assert_eq!(field(&f), "loss");
        let mut f = good.clone();
        let n = f.len();
        f[n - 1] = 7;
        assert_eq!(field(&f), "padding");
    }

    #[test]
    fn first_offending_position_is_reported() {
        let f = push(&[1, 2, 3, 3, 1], &[0.0; 5]);
        assert_eq!(
            PushView::decode(&f, &LIMITS).unwrap_err(),
            FrameError::DuplicateIndex { pos: 3, index: 3 }
        );
    }

    #[test]
    fn unaligned_frames_decode() {
        let frame = push(&[1, 5, 9, 10], &[1.0, 2.0, 3.0, 4.0]);
        let mut shifted = vec![0u8; frame.len() + 1];
        shifted[1..].copy_from_slice(&frame);
        let v = PushView::decode(&shifted[1..], &LIMITS).unwrap();
        assert_eq!(v.entries().map(|e| e.0).collect::<Vec<_>>(), vec![1, 5, 9, 10]);
        let bad = push(&[1, 5, 5, 10], &[1.0; 4]);
        shifted[1..].copy_from_slice(&bad);
        assert_eq!(PushView::decode(&shifted[1..], &LIMITS).unwrap_err().field(), "indices");
    }

    #[test]
    fn delta_and_snapshot_round_trip() {
        let h = DeltaHeader { version: 8, base_version: 7, nnz: 3 };
        let vals = [f16::from_f32(0.5), f16::from_f32(-0.25), f16::from_f32(2.0)];
        let frame = encode_delta(&h, &[0, 4, 99], &vals);
        let v = DeltaView::decode(&frame, 100).unwrap();
        assert_eq!(v.header, h);
        assert_eq!(v.entries().collect::<Vec<_>>(), vec![(0, vals[0]), (4, vals[1]), (99, vals[2])]);
        assert_eq!(encode_delta_with_body(&h, v.body()), frame);
        assert!(DeltaView::decode(&frame, 99).is_err());

        let snap = encode_snapshot(4, &[1.0, -2.0, 0.5]);
        let s = SnapshotView::decode(&snap, 3).unwrap();
        let mut out = [0.0; 3];
        s.read_into(&mut out);
        assert_eq!((s.version, out), (4, [1.0, -2.0, 0.5]));
        assert_eq!(SnapshotView::decode(&snap, 4).unwrap_err().field(), "n");
    }
}
