//! The built-in model families in burn, and their parameters as the server's flat vector.
//!
//! Layouts (names, shapes, order) are the server's (`sparsync::protocol::model`); a model
//! exports its tensors under the same names, and the client refuses to start when the first
//! tensor that differs is found.

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, Relu};
use burn::prelude::*;
use sparsync::protocol::model::{CLASSES, INPUT_FEATURES, MLP_HIDDEN, ModelLayout, TensorSpec};

/// Logistic regression: one linear layer.
#[derive(Module, Debug)]
pub struct LogReg {
    pub fc: Linear,
}

/// 784 → 128 → 10 with a relu.
#[derive(Module, Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub act: Relu,
}

/// conv 5×5 (1→8) → relu → pool → conv 5×5 (8→16) → relu → pool → linear (256→10).
#[derive(Module, Debug)]
pub struct Cnn {
    pub conv1: Conv2d,
    pub conv2: Conv2d,
    pub pool: MaxPool2d,
    pub fc: Linear,
    pub act: Relu,
}

/// A built-in model. A client holds exactly one, so the size gap between variants costs
/// nothing worth an indirection through every forward pass.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Net {
    LogReg(LogReg),
    Mlp(Mlp),
    Cnn(Cnn),
}

/// Errors building or loading a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unknown model {0:?}; this client builds logreg, mlp and cnn")]
    Unknown(String),
    #[error("the server's model does not match this client's: {0}")]
    Layout(#[from] sparsync::protocol::model::LayoutError),
    #[error("parameter vector has {got} values, the model has {expected}")]
    Size { expected: usize, got: usize },
}

impl Net {
    /// A freshly initialised model of family `name` (the values are replaced by the server's).
    pub fn new(name: &str, device: &Device) -> Result<Self, ModelError> {
        let linear = |i, o| LinearConfig::new(i, o).init(device);
        Ok(match name {
            "logreg" => Net::LogReg(LogReg { fc: linear(INPUT_FEATURES, CLASSES) }),
            "mlp" => Net::Mlp(Mlp {
                fc1: linear(INPUT_FEATURES, MLP_HIDDEN),
                fc2: linear(MLP_HIDDEN, CLASSES),
                act: Relu,
            }),
            "cnn" => Net::Cnn(Cnn {
                conv1: Conv2dConfig::new([1, 8], [5, 5]).init(device),
                conv2: Conv2dConfig::new([8, 16], [5, 5]).init(device),
                pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
                fc: linear(16 * 4 * 4, CLASSES),
                act: Relu,
            }),
            other => return Err(ModelError::Unknown(other.into())),
        })
    }

    /// Logits [batch, 10] for images [batch, 784] scaled to [0, 1].
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        match self {
            Net::LogReg(m) => m.fc.forward(x),
            Net::Mlp(m) => m.fc2.forward(m.act.forward(m.fc1.forward(x))),
            Net::Cnn(m) => {
                let [b, _] = x.dims();
                let x = x.reshape([b, 1, 28, 28]);
                let x = m.pool.forward(m.act.forward(m.conv1.forward(x)));
                let x = m.pool.forward(m.act.forward(m.conv2.forward(x)));
                m.fc.forward(x.reshape([b, 16 * 4 * 4]))
            }
        }
    }

    /// The tensors this model has, in the server's layout order.
    pub fn layout(&self) -> Vec<TensorSpec> {
        self.tensors().into_iter().map(|(name, shape, _)| TensorSpec { name, shape }).collect()
    }

    /// Every parameter as (name, shape, values), in layout order.
    fn tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut out = Vec::new();
        let mut lin = |name: &str, l: &Linear| {
            out.push(read(&format!("{name}.weight"), &l.weight));
            if let Some(b) = &l.bias {
                out.push(read(&format!("{name}.bias"), b));
            }
        };
        match self {
            Net::LogReg(m) => lin("fc", &m.fc),
            Net::Mlp(m) => {
                lin("fc1", &m.fc1);
                lin("fc2", &m.fc2);
            }
            Net::Cnn(m) => {
                for (name, c) in [("conv1", &m.conv1), ("conv2", &m.conv2)] {
                    out.push(read(&format!("{name}.weight"), &c.weight));
                    if let Some(b) = &c.bias {
                        out.push(read(&format!("{name}.bias"), b));
                    }
                }
                out.push(read("fc.weight", &m.fc.weight));
                if let Some(b) = &m.fc.bias {
                    out.push(read("fc.bias", b));
                }
            }
        }
        out
    }

    /// Checks this model against the server's layout; the error names the first difference.
    pub fn check_layout(&self, server: &[TensorSpec]) -> Result<(), ModelError> {
        let mine = ModelLayout { name: String::new(), tensors: self.layout() };
        mine.check_matches(server)?;
        Ok(())
    }

    /// The flat parameter vector (layout order, row-major).
    pub fn flatten(&self) -> Vec<f32> {
        self.tensors().into_iter().flat_map(|(_, _, v)| v).collect()
    }

    /// Replaces every parameter with the values of a flat vector.
    pub fn unflatten(self, values: &[f32]) -> Result<Self, ModelError> {
        let expected: usize = self.layout().iter().map(TensorSpec::numel).sum();
        if values.len() != expected {
            return Err(ModelError::Size { expected, got: values.len() });
        }
        let mut at = 0;
        let mut take = |n: usize| {
            let s = &values[at..at + n];
            at += n;
            s
        };
        Ok(match self {
            Net::LogReg(m) => Net::LogReg(LogReg { fc: set_linear(m.fc, &mut take) }),
            Net::Mlp(m) => {
                let fc1 = set_linear(m.fc1, &mut take);
                let fc2 = set_linear(m.fc2, &mut take);
                Net::Mlp(Mlp { fc1, fc2, act: m.act })
            }
            Net::Cnn(m) => {
                let conv1 = set_conv(m.conv1, &mut take);
                let conv2 = set_conv(m.conv2, &mut take);
                let fc = set_linear(m.fc, &mut take);
                Net::Cnn(Cnn { conv1, conv2, pool: m.pool, fc, act: m.act })
            }
        })
    }
}

fn read<const D: usize>(name: &str, p: &Param<Tensor<D>>) -> (String, Vec<usize>, Vec<f32>) {
    let t = p.val();
    let shape = t.dims().to_vec();
    let values = t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 parameters");
    (name.to_string(), shape, values)
}

/// A parameter with the same shape and device holding `values` (trainable: a fresh `Param`
/// tracks gradients, which a mapped tensor would not).
fn write<const D: usize>(p: Param<Tensor<D>>, values: &[f32]) -> Param<Tensor<D>> {
    let t = p.val();
    Param::from_data(TensorData::new(values.to_vec(), t.dims()), &t.device())
}

fn set_linear<'a>(l: Linear, take: &mut impl FnMut(usize) -> &'a [f32]) -> Linear {
    let n = l.weight.val().shape().num_elements();
    let weight = write(l.weight, take(n));
    let bias = l.bias.map(|b| {
        let n = b.val().shape().num_elements();
        write(b, take(n))
    });
    Linear { weight, bias }
}

fn set_conv<'a>(c: Conv2d, take: &mut impl FnMut(usize) -> &'a [f32]) -> Conv2d {
    let n = c.weight.val().shape().num_elements();
    let weight = write(c.weight, take(n));
    let bias = c.bias.map(|b| {
        let n = b.val().shape().num_elements();
        write(b, take(n))
    });
    Conv2d { weight, bias, ..c }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_server_and_flatten_round_trips() {
        let device = Device::default();
        for name in sparsync::protocol::model::BUILTIN_FAMILIES {
            let net = Net::new(name, &device).unwrap();
            let server = ModelLayout::builtin(name).unwrap();
            net.check_layout(&server.tensors).unwrap();
            let values = server.init(3);
            let net = net.unflatten(&values).unwrap();
            assert_eq!(net.flatten(), values, "{name}: unflatten then flatten");
            let x = Tensor::<2>::zeros([2, 784], &device);
            assert_eq!(net.forward(x).dims(), [2, 10]);
        }
    }

    #[test]
    fn a_mismatch_names_the_first_differing_tensor() {
        let device = Device::default();
        let net = Net::new("mlp", &device).unwrap();
        let mut server = ModelLayout::builtin("mlp").unwrap().tensors;
        server[2].shape = vec![128, 11];
        let e = net.check_layout(&server).unwrap_err().to_string();
        assert!(
            e.contains("tensor 2 differs: expected fc2.weight [128, 10], got fc2.weight [128, 11]"),
            "{e}"
        );
        let e =
            Net::new("logreg", &device).unwrap().check_layout(&ModelLayout::builtin("mlp").unwrap().tensors);
        assert!(e.unwrap_err().to_string().contains("fc.weight"));
    }
}
