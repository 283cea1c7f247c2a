//! Helpers shared by the optimizer tests: tiny nets and dense linear algebra in `f64`.
#![allow(dead_code)]

use kron_autodiff::{ParamStore, Rng, Tensor};
use kron_layers::{Activation, Conv2dConfig, Dense, FisherBlock, Flatten, Sequential};

/// Solves `m x = b` (dense, f64) by Gaussian elimination with partial pivoting.
pub fn solve(mut m: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| m[i][c].abs().total_cmp(&m[j][c].abs()))
            .unwrap();
        m.swap(c, p);
        b.swap(c, p);
        for r in c + 1..n {
            let f = m[r][c] / m[c][c];
            for k in c..n {
                m[r][k] -= f * m[c][k];
            }
            b[r] -= f * b[c];
        }
    }
    let mut x = vec![0.0; n];
    for r in (0..n).rev() {
        let s: f64 = (r + 1..n).map(|k| m[r][k] * x[k]).sum();
        x[r] = (b[r] - s) / m[r][r];
    }
    x
}

pub fn mat64(t: &Tensor) -> Vec<Vec<f64>> {
    let (r, c) = t.dims2();
    (0..r)
        .map(|i| (0..c).map(|j| t.data()[i * c + j] as f64).collect())
        .collect()
}

/// `kron(x, y)` of square matrices.
pub fn kron(x: &[Vec<f64>], y: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let (n, m) = (x.len(), y.len());
    let mut out = vec![vec![0.0; n * m]; n * m];
    for i in 0..n {
        for j in 0..n {
            for k in 0..m {
                for l in 0..m {
                    out[i * m + k][j * m + l] = x[i][j] * y[k][l];
                }
            }
        }
    }
    out
}

pub fn add_diag(mut x: Vec<Vec<f64>>, v: f64) -> Vec<Vec<f64>> {
    for (i, row) in x.iter_mut().enumerate() {
        row[i] += v;
    }
    x
}

pub fn trace(x: &[Vec<f64>]) -> f64 {
    (0..x.len()).map(|i| x[i][i]).sum()
}

pub struct Net {
    pub store: ParamStore,
    pub model: Sequential,
}

pub fn mlp(seed: u64) -> Net {
    let mut store = ParamStore::new();
    let mut rng = Rng::new(seed);
    let model = Sequential::new()
        .push(Dense::new(&mut store, "0", 3, 4, &mut rng))
        .push(Activation::Tanh)
        .push(Dense::new(&mut store, "2", 4, 2, &mut rng));
    Net { store, model }
}

pub fn convnet(seed: u64) -> Net {
    let mut store = ParamStore::new();
    let mut rng = Rng::new(seed);
    let model = Sequential::new()
        .push(
            Conv2dConfig::new(2, 3, 3)
                .with_padding(1)
                .with_stride(2)
                .build(&mut store, "c", &mut rng),
        )
        .push(Activation::Relu)
        .push(Flatten)
        .push(Dense::new(&mut store, "fc", 3 * 3 * 3, 2, &mut rng));
    Net { store, model }
}

/// A gradient (or parameter change) in the blocks' `W_aug` layouts, concatenated, in `f64`.
pub fn joined(blocks: &[FisherBlock], get: impl Fn(kron_autodiff::ParamId) -> Tensor) -> Vec<f64> {
    let mut out = Vec::new();
    for b in blocks {
        let w = get(b.weight);
        let bias = b.bias.map(&get);
        out.extend(b.join(&w, bias.as_ref()).data().iter().map(|&v| v as f64));
    }
    out
}

/// A two-layer net whose `visit_blocks` leaves its second layer out (a slip a hand-written
/// `Module` can make): its parameters lie outside every Fisher block.
pub struct Forgetful {
    pub first: Dense,
    pub second: Dense,
}

impl kron_layers::Module for Forgetful {
    fn forward<'t>(&self, x: kron_autodiff::Var<'t>) -> kron_autodiff::Var<'t> {
        self.second.forward(self.first.forward(x).tanh())
    }
    fn visit_params(&self, f: &mut dyn FnMut(kron_autodiff::ParamId)) {
        self.first.visit_params(f);
        self.second.visit_params(f);
    }
    fn visit_blocks(&self, f: &mut dyn FnMut(&FisherBlock)) {
        self.first.visit_blocks(f);
    }
}

/// [`Forgetful`] 3 -> 4 -> 2, layers named `first` and `second`.
pub fn forgetful(seed: u64) -> (ParamStore, Forgetful) {
    let mut store = ParamStore::new();
    let mut rng = Rng::new(seed);
    let first = Dense::new(&mut store, "first", 3, 4, &mut rng);
    let second = Dense::new(&mut store, "second", 4, 2, &mut rng);
    (store, Forgetful { first, second })
}
