//! Model layouts: the built-in families every client builds, their seeded initialisation, and
//! layouts read from safetensors files.
//!
//! A layout is an ordered list of named tensors; the flat parameter vector is each tensor's
//! values in row-major order, tensor after tensor. Shapes follow burn's conventions, which
//! TensorFlow.js shares for dense layers: a linear weight is `[inputs, outputs]`, a convolution
//! weight `[out_channels, in_channels, kernel_h, kernel_w]`.

use serde::{Deserialize, Serialize};

/// One named tensor of a layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn new(name: &str, shape: &[usize]) -> Self {
        Self { name: name.into(), shape: shape.to_vec() }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The built-in model families (all for 28×28×1 inputs and 10 classes).
pub const BUILTIN_FAMILIES: [&str; 3] = ["logreg", "mlp", "cnn"];
/// Largest `flat-N` model (2^30 parameters: 4 GiB of f32 per state vector).
pub const MAX_FLAT_PARAMS: usize = 1 << 30;

/// Input features of the built-in families (28×28 grey images).
pub const INPUT_FEATURES: usize = 28 * 28;
/// Output classes of the built-in families.
pub const CLASSES: usize = 10;
/// Hidden units of `mlp`.
pub const MLP_HIDDEN: usize = 128;

/// Safetensors metadata key holding the layout's tensor order as a JSON array of names.
pub const ORDER_KEY: &str = "sparsync.order";

/// An ordered list of tensors under a model name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelLayout {
    pub name: String,
    pub tensors: Vec<TensorSpec>,
}

/// Errors reading or checking a layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("unknown model {0:?}; built-in models are logreg, mlp, cnn and flat-N (1 ≤ N ≤ 2^30)")]
    Unknown(String),
    #[error("safetensors: {0}")]
    Safetensors(String),
    #[error("tensor {name:?} has dtype {dtype}; only F32 is supported")]
    Dtype { name: String, dtype: String },
    #[error("the model has no tensors")]
    Empty,
    #[error("the model has {0} parameters; at most 2^32 - 1 are supported")]
    TooLarge(u64),
    #[error("tensor {index} differs: expected {expected}, got {got}")]
    Mismatch { index: usize, expected: String, got: String },
    #[error("layout has {expected} tensors, got {got}")]
    Count { expected: usize, got: usize },
}

impl ModelLayout {
    /// The layout of a built-in family.
    pub fn builtin(name: &str) -> Result<Self, LayoutError> {
        let t = TensorSpec::new;
        let tensors = match name {
            "logreg" => vec![t("fc.weight", &[INPUT_FEATURES, CLASSES]), t("fc.bias", &[CLASSES])],
            "mlp" => vec![
                t("fc1.weight", &[INPUT_FEATURES, MLP_HIDDEN]),
                t("fc1.bias", &[MLP_HIDDEN]),
                t("fc2.weight", &[MLP_HIDDEN, CLASSES]),
                t("fc2.bias", &[CLASSES]),
            ],
            // conv 5×5 (1→8) → relu → maxpool 2 → conv 5×5 (8→16) → relu → maxpool 2 → fc (256→10)
            "cnn" => vec![
                t("conv1.weight", &[8, 1, 5, 5]),
                t("conv1.bias", &[8]),
                t("conv2.weight", &[16, 8, 5, 5]),
                t("conv2.bias", &[16]),
                t("fc.weight", &[16 * 4 * 4, CLASSES]),
                t("fc.bias", &[CLASSES]),
            ],
            // A bare vector of N parameters, for benchmarks and load tests: `flat-1048576`.
            other => match other.strip_prefix("flat-").and_then(|n| n.parse::<usize>().ok()) {
                Some(n) if (1..=MAX_FLAT_PARAMS).contains(&n) => vec![t("w", &[n])],
                _ => return Err(LayoutError::Unknown(other.into())),
            },
        };
        Ok(Self { name: name.into(), tensors })
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(TensorSpec::numel).sum()
    }

    /// Start offset of each tensor in the flat vector.
    pub fn offsets(&self) -> Vec<usize> {
        let mut off = 0;
        self.tensors
            .iter()
            .map(|t| {
                let o = off;
                off += t.numel();
                o
            })
            .collect()
    }

    /// Compares with another layout; the error names the first tensor that differs.
    pub fn check_matches(&self, other: &[TensorSpec]) -> Result<(), LayoutError> {
        for (i, (a, b)) in self.tensors.iter().zip(other).enumerate() {
            if a != b {
                return Err(LayoutError::Mismatch {
                    index: i,
                    expected: format!("{} {:?}", a.name, a.shape),
                    got: format!("{} {:?}", b.name, b.shape),
                });
            }
        }
        if self.tensors.len() != other.len() {
            return Err(LayoutError::Count { expected: self.tensors.len(), got: other.len() });
        }
        Ok(())
    }

    /// Seeded Glorot-uniform initialisation (biases zero), as specified in `docs/protocol.md`:
    /// one SplitMix64 stream over the weight tensors in layout order.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        let mut out = Vec::with_capacity(self.num_params());
        for t in &self.tensors {
            if t.shape.len() < 2 {
                out.extend(std::iter::repeat_n(0.0f32, t.numel()));
                continue;
            }
            let (fan_in, fan_out) = fans(&t.shape);
            let limit = (6.0f32 / (fan_in + fan_out) as f32).sqrt();
            for _ in 0..t.numel() {
                let u = rng.next_unit_f32();
                out.push((2.0 * u - 1.0) * limit);
            }
        }
        out
    }

    /// Reads a layout and values from a safetensors file (F32 tensors). The tensor order is the
    /// one recorded under the metadata key [`ORDER_KEY`] when present (files this crate
    /// writes), else the order of the tensors' data in the file.
    pub fn from_safetensors(name: &str, bytes: &[u8]) -> Result<(Self, Vec<f32>), LayoutError> {
        let st_err = |e: safetensors::SafeTensorError| LayoutError::Safetensors(e.to_string());
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(st_err)?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(st_err)?;
        let order: Option<Vec<String>> = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(ORDER_KEY))
            .map(|s| serde_json::from_str(s))
            .transpose()
            .map_err(|e| LayoutError::Safetensors(format!("metadata {ORDER_KEY}: {e}")))?;
        let mut named: Vec<_> = st.tensors();
        match order {
            Some(order) => {
                if order.len() != named.len() {
                    return Err(LayoutError::Count { expected: order.len(), got: named.len() });
                }
                let mut sorted = Vec::with_capacity(named.len());
                for want in &order {
                    let pos = named.iter().position(|(n, _)| n == want).ok_or_else(|| {
                        LayoutError::Safetensors(format!(
                            "metadata names tensor {want:?}, which the file lacks"
                        ))
                    })?;
                    sorted.push(named.swap_remove(pos));
                }
                named = sorted;
            }
            None => named.sort_by_key(|(_, v)| v.data().as_ptr() as usize),
        }
        let mut tensors = Vec::with_capacity(named.len());
        let mut values = Vec::new();
        for (tname, view) in named {
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(LayoutError::Dtype { name: tname, dtype: format!("{:?}", view.dtype()) });
            }
            values.extend(view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
            tensors.push(TensorSpec { name: tname, shape: view.shape().to_vec() });
        }
        if tensors.is_empty() {
            return Err(LayoutError::Empty);
        }
        let layout = Self { name: name.into(), tensors };
        if layout.num_params() as u64 >= u32::MAX as u64 {
            return Err(LayoutError::TooLarge(layout.num_params() as u64));
        }
        Ok((layout, values))
    }

    /// Writes values with this layout as a safetensors file's bytes, recording the layout order
    /// under [`ORDER_KEY`].
    pub fn to_safetensors(&self, values: &[f32]) -> Result<Vec<u8>, LayoutError> {
        let views = self.tensor_views(values)?;
        let names: Vec<&str> = self.tensors.iter().map(|t| t.name.as_str()).collect();
        let meta = std::collections::HashMap::from([(
            ORDER_KEY.to_string(),
            serde_json::to_string(&names).expect("names serialize"),
        )]);
        safetensors::serialize(views, Some(meta)).map_err(|e| LayoutError::Safetensors(e.to_string()))
    }

    fn tensor_views<'a>(
        &self,
        values: &'a [f32],
    ) -> Result<Vec<(String, safetensors::tensor::TensorView<'a>)>, LayoutError> {
        let bytes: &[u8] = bytemuck::cast_slice(values);
        let mut out = Vec::new();
        for (t, off) in self.tensors.iter().zip(self.offsets()) {
            let data = &bytes[4 * off..4 * (off + t.numel())];
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), data)
                .map_err(|e| LayoutError::Safetensors(e.to_string()))?;
            out.push((t.name.clone(), view));
        }
        Ok(out)
    }
}

/// (fan_in, fan_out) of a weight: `[in, out]` for linear, `[out, in, kh, kw]` for convolution.
fn fans(shape: &[usize]) -> (usize, usize) {
    if shape.len() == 2 {
        (shape[0], shape[1])
    } else {
        let receptive: usize = shape[2..].iter().product();
        (shape[1] * receptive, shape[0] * receptive)
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and easy to reproduce in any language.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1) with 24 random bits: exact in f32.
    pub fn next_unit_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_sizes() {
        assert_eq!(ModelLayout::builtin("logreg").unwrap().num_params(), 7850);
        assert_eq!(ModelLayout::builtin("mlp").unwrap().num_params(), 101_770);
        assert_eq!(ModelLayout::builtin("cnn").unwrap().num_params(), 5994);
        assert!(ModelLayout::builtin("resnet").is_err());
        assert_eq!(ModelLayout::builtin("flat-1048576").unwrap().num_params(), 1 << 20);
        for bad in ["flat-0", "flat-", "flat-x", "flat-1073741825"] {
            assert!(ModelLayout::builtin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn init_is_seeded_and_bounded() {
        let l = ModelLayout::builtin("mlp").unwrap();
        let a = l.init(7);
        assert_eq!(a, l.init(7));
        assert_ne!(a, l.init(8));
        let limit = (6.0f32 / (784.0 + 128.0)).sqrt();
        assert!(a[..784 * 128].iter().all(|v| v.abs() <= limit));
        assert!(a[784 * 128..784 * 128 + 128].iter().all(|&v| v == 0.0));
        // First values pinned so that other implementations can check theirs (docs/protocol.md).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn safetensors_round_trip_and_mismatch() {
        let l = ModelLayout::builtin("logreg").unwrap();
        let v = l.init(1);
        let bytes = l.to_safetensors(&v).unwrap();
        let (l2, v2) = ModelLayout::from_safetensors("logreg", &bytes).unwrap();
        assert_eq!((l2.tensors.clone(), v2), (l.tensors.clone(), v));
        let mlp = ModelLayout::builtin("mlp").unwrap();
        let e = l.check_matches(&mlp.tensors).unwrap_err().to_string();
        assert!(e.contains("fc.weight") && e.contains("fc1.weight"), "{e}");
        assert!(ModelLayout::from_safetensors("x", b"garbage").is_err());
    }
}
