//! Fashion-MNIST: IDX files (gzip or plain), the embedded subset, and client partitions.
//!
//! The full set comes from Debian's `dataset-fashion-mnist` package
//! (`/usr/share/datasets/fashion-mnist`) or any directory holding the four IDX files. When
//! none is found, the subset embedded in this crate (4000 training and 1000 test images,
//! `data/fashion-mnist-subset/`, MIT license) is used, and the log says so.

use std::io::Read;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, Gamma};

/// Where Debian's package puts the full set.
pub const DEBIAN_DIR: &str = "/usr/share/datasets/fashion-mnist";

const TRAIN_IMAGES: &str = "train-images-idx3-ubyte.gz";
const TRAIN_LABELS: &str = "train-labels-idx1-ubyte.gz";
const TEST_IMAGES: &str = "t10k-images-idx3-ubyte.gz";
const TEST_LABELS: &str = "t10k-labels-idx1-ubyte.gz";

macro_rules! embedded {
    ($f:literal) => {
        include_bytes!(concat!("../data/fashion-mnist-subset/", $f))
    };
}
static EMBEDDED: [&[u8]; 4] = [
    embedded!("train-images-idx3-ubyte.gz"),
    embedded!("train-labels-idx1-ubyte.gz"),
    embedded!("t10k-images-idx3-ubyte.gz"),
    embedded!("t10k-labels-idx1-ubyte.gz"),
];

/// Errors reading IDX data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{file}: {source}")]
    Io { file: String, source: std::io::Error },
    #[error("{file}: not valid gzip: {source}")]
    Gzip { file: String, source: std::io::Error },
    #[error("{file}: bad IDX magic {got:#010x}, expected {expected:#010x}")]
    Magic { file: String, got: u32, expected: u32 },
    #[error("{file}: truncated: the header announces {need} bytes, the file has {got}")]
    Truncated { file: String, need: usize, got: usize },
    #[error("{file}: {what}")]
    Shape { file: String, what: String },
    #[error("images and labels disagree: {images} images, {labels} labels")]
    Count { images: usize, labels: usize },
    #[error("bad partition {0:?}: use iid or dirichlet:ALPHA (ALPHA > 0)")]
    Partition(String),
}

/// IDX magic for unsigned-byte data of `dims` dimensions.
const fn magic(dims: u8) -> u32 {
    0x0000_0800 | dims as u32
}

/// Parses an IDX file (gzip-compressed or not) of unsigned bytes with `dims` dimensions;
/// returns the dimensions and the data. `file` names it in errors.
pub fn read_idx(bytes: &[u8], dims: u8, file: &str) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let raw = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|source| DataError::Gzip { file: file.into(), source })?;
        out
    } else {
        bytes.to_vec()
    };
    let header = 4 + 4 * dims as usize;
    if raw.len() < header {
        return Err(DataError::Truncated { file: file.into(), need: header, got: raw.len() });
    }
    let word = |i: usize| u32::from_be_bytes([raw[4 * i], raw[4 * i + 1], raw[4 * i + 2], raw[4 * i + 3]]);
    if word(0) != magic(dims) {
        return Err(DataError::Magic { file: file.into(), got: word(0), expected: magic(dims) });
    }
    let shape: Vec<usize> = (1..=dims as usize).map(|i| word(i) as usize).collect();
    let need = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|body| body.checked_add(header))
        .ok_or_else(|| DataError::Shape {
            file: file.into(),
            what: format!("dimensions {shape:?} overflow"),
        })?;
    if raw.len() < need {
        return Err(DataError::Truncated { file: file.into(), need, got: raw.len() });
    }
    Ok((shape, raw[header..need].to_vec()))
}

/// Images (28×28 bytes each) and their labels.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub rows: usize,
    pub cols: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn pixels(&self) -> usize {
        self.rows * self.cols
    }
    pub fn image(&self, i: usize) -> &[u8] {
        let p = self.pixels();
        &self.images[i * p..(i + 1) * p]
    }
    /// The samples at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut images = Vec::with_capacity(indices.len() * self.pixels());
        for &i in indices {
            images.extend_from_slice(self.image(i));
        }
        Dataset {
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            rows: self.rows,
            cols: self.cols,
        }
    }

    fn from_idx(images: &[u8], labels: &[u8], names: (&str, &str)) -> Result<Self, DataError> {
        let (ishape, ibytes) = read_idx(images, 3, names.0)?;
        let (lshape, lbytes) = read_idx(labels, 1, names.1)?;
        if ishape[0] != lshape[0] {
            return Err(DataError::Count { images: ishape[0], labels: lshape[0] });
        }
        if let Some(&bad) = lbytes.iter().find(|&&l| l > 9) {
            return Err(DataError::Shape {
                file: names.1.into(),
                what: format!("label {bad} is not a class 0-9"),
            });
        }
        Ok(Dataset { images: ibytes, labels: lbytes, rows: ishape[1], cols: ishape[2] })
    }
}

/// Where a dataset was read from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    Directory(PathBuf),
    Embedded,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Directory(d) => write!(f, "Fashion-MNIST from {}", d.display()),
            Source::Embedded => write!(f, "the embedded Fashion-MNIST subset (4000 train / 1000 test)"),
        }
    }
}

/// Training and test sets, shared: cloning a `FashionMnist` (or either set) copies a pointer,
/// so a client round or an evaluation costs the same whatever the dataset's size.
#[derive(Clone, Debug)]
pub struct FashionMnist {
    pub train: std::sync::Arc<Dataset>,
    pub test: std::sync::Arc<Dataset>,
    pub source: Source,
}

/// Loads from `dir`, or when `dir` is None from Debian's directory if it holds the files, else
/// the embedded subset.
pub fn load(dir: Option<&Path>) -> Result<FashionMnist, DataError> {
    let dir = match dir {
        Some(d) => Some(d.to_path_buf()),
        None => {
            let d = Path::new(DEBIAN_DIR);
            [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS]
                .iter()
                .all(|f| d.join(f).is_file())
                .then(|| d.into())
        }
    };
    match dir {
        Some(d) => {
            let read = |f: &str| {
                let p = d.join(f);
                std::fs::read(&p).map_err(|source| DataError::Io { file: p.display().to_string(), source })
            };
            let names = |a: &str, b: &str| (d.join(a).display().to_string(), d.join(b).display().to_string());
            let (tr, te) = (names(TRAIN_IMAGES, TRAIN_LABELS), names(TEST_IMAGES, TEST_LABELS));
            Ok(FashionMnist {
                train: Dataset::from_idx(&read(TRAIN_IMAGES)?, &read(TRAIN_LABELS)?, (&tr.0, &tr.1))?.into(),
                test: Dataset::from_idx(&read(TEST_IMAGES)?, &read(TEST_LABELS)?, (&te.0, &te.1))?.into(),
                source: Source::Directory(d),
            })
        }
        None => Ok(embedded()),
    }
}

/// The embedded subset.
pub fn embedded() -> FashionMnist {
    let train =
        Dataset::from_idx(EMBEDDED[0], EMBEDDED[1], ("embedded train images", "embedded train labels"))
            .expect("the embedded subset is valid (tested)");
    let test = Dataset::from_idx(EMBEDDED[2], EMBEDDED[3], ("embedded test images", "embedded test labels"))
        .expect("the embedded subset is valid (tested)");
    FashionMnist { train: train.into(), test: test.into(), source: Source::Embedded }
}

/// How training samples are split across clients.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Partition {
    /// Uniformly at random, equal shares.
    Iid,
    /// Each class split across clients by proportions drawn from Dirichlet(α): small α, very
    /// unequal label mixes.
    Dirichlet(f64),
}

impl std::str::FromStr for Partition {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self, DataError> {
        if s == "iid" {
            return Ok(Self::Iid);
        }
        match s.strip_prefix("dirichlet:").map(str::parse::<f64>) {
            Some(Ok(a)) if a > 0.0 && a.is_finite() => Ok(Self::Dirichlet(a)),
            _ => Err(DataError::Partition(s.into())),
        }
    }
}

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Iid => write!(f, "iid"),
            Self::Dirichlet(a) => write!(f, "dirichlet:{a}"),
        }
    }
}

/// Splits sample indices among `clients` (each sample in exactly one shard), seeded.
pub fn partition(labels: &[u8], clients: usize, how: Partition, seed: u64) -> Vec<Vec<usize>> {
    let clients = clients.max(1);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut shards = vec![Vec::new(); clients];
    match how {
        Partition::Iid => {
            let mut idx: Vec<usize> = (0..labels.len()).collect();
            idx.shuffle(&mut rng);
            for (j, i) in idx.into_iter().enumerate() {
                shards[j % clients].push(i);
            }
        }
        Partition::Dirichlet(alpha) => {
            let gamma = Gamma::new(alpha, 1.0).expect("alpha > 0 was checked");
            for class in 0..=9u8 {
                let mut idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == class).collect();
                idx.shuffle(&mut rng);
                let mut p: Vec<f64> = (0..clients).map(|_| gamma.sample(&mut rng)).collect();
                let total: f64 = p.iter().sum();
                if total > 0.0 {
                    p.iter_mut().for_each(|v| *v /= total);
                } else {
                    p = vec![1.0 / clients as f64; clients];
                }
                // Cumulative proportions → cut points; every sample lands in one shard.
                let mut start = 0;
                let mut acc = 0.0;
                for (c, share) in p.iter().enumerate() {
                    acc += share;
                    let end = if c + 1 == clients {
                        idx.len()
                    } else {
                        ((acc * idx.len() as f64).round() as usize).min(idx.len())
                    };
                    shards[c].extend_from_slice(&idx[start..end.max(start)]);
                    start = end.max(start);
                }
            }
            for s in &mut shards {
                s.sort_unstable();
            }
        }
    }
    shards
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(magic: u32, dims: &[u32], body: &[u8]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn idx_reader_checks_magic_and_length() {
        let good = idx(0x803, &[2, 2, 2], &[1, 2, 3, 4, 5, 6, 7, 8]);
        let (shape, data) = read_idx(&good, 3, "x").unwrap();
        assert_eq!((shape, data.len()), (vec![2, 2, 2], 8));
        let e = read_idx(&good[..10], 3, "x").unwrap_err();
        assert!(matches!(e, DataError::Truncated { need: 16, got: 10, .. }), "{e}");
        let e = read_idx(&good[..15], 3, "x").unwrap_err().to_string();
        assert!(e.contains("truncated: the header announces 16 bytes, the file has 15"), "{e}");
        let e = read_idx(&good[..20], 3, "x").unwrap_err().to_string();
        assert!(e.contains("truncated: the header announces 24 bytes, the file has 20"), "{e}");
        let bad = idx(0x801, &[2, 2, 2], &[0; 8]);
        let e = read_idx(&bad, 3, "train.gz").unwrap_err().to_string();
        assert_eq!(e, "train.gz: bad IDX magic 0x00000801, expected 0x00000803");
        let e = read_idx(&[0x1f, 0x8b, 0, 1, 2], 1, "z").unwrap_err().to_string();
        assert!(e.starts_with("z: not valid gzip"), "{e}");
    }

    #[test]
    fn embedded_subset_loads() {
        let d = embedded();
        assert_eq!((d.train.len(), d.test.len(), d.train.rows, d.train.cols), (4000, 1000, 28, 28));
        assert_eq!(d.source, Source::Embedded);
    }

    #[test]
    fn partitions_cover_every_sample_exactly_once() {
        let labels: Vec<u8> = (0..5000).map(|i| ((i * 7) % 10) as u8).collect();
        for how in [
            Partition::Iid,
            Partition::Dirichlet(0.5),
            Partition::Dirichlet(0.05),
            Partition::Dirichlet(100.0),
        ] {
            for clients in [1, 3, 8] {
                let shards = partition(&labels, clients, how, 42);
                assert_eq!(shards.len(), clients);
                let mut all: Vec<usize> = shards.concat();
                all.sort_unstable();
                assert_eq!(all, (0..labels.len()).collect::<Vec<_>>(), "{how} with {clients} clients");
                assert_eq!(shards, partition(&labels, clients, how, 42), "seeded");
            }
        }
        // Small α gives skewed label mixes; IID gives balanced ones.
        // Mean over shards of the most common label's share: 0.1 is perfectly balanced.
        let skew = |shards: &Vec<Vec<usize>>| {
            let share = |s: &Vec<usize>| {
                let mut counts = [0usize; 10];
                s.iter().for_each(|&i| counts[labels[i] as usize] += 1);
                *counts.iter().max().unwrap() as f64 / s.len().max(1) as f64
            };
            shards.iter().map(share).sum::<f64>() / shards.len() as f64
        };
        assert!(skew(&partition(&labels, 4, Partition::Dirichlet(0.05), 1)) > 0.3);
        assert!(skew(&partition(&labels, 4, Partition::Iid, 1)) < 0.15);
        assert_eq!("dirichlet:0.5".parse::<Partition>().unwrap(), Partition::Dirichlet(0.5));
        assert!("dirichlet:-1".parse::<Partition>().is_err());
    }
}
