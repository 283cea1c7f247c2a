//! The coarse-space correction: its vectors, its small matrix, and how it joins the
//! one-level directions, as a [`Correction`] of the staged driver.

use kron_autodiff::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::captured::{Rows, tselepidis_means};
use super::config::{CoarseConfig, CoarseSpace};
use crate::backend::Backend;
use crate::comm::Shard;
use crate::curvature::{Correction, CorrectionInput, Note};
use crate::error::OptimError;
use crate::kfac::{KfacBlock, KfacRefreshed};
use crate::optimizer::{OptimState, Tensor64};

/// Elements per task of the element-wise passes over parameter-sized matrices.
const CHUNK: usize = 1 << 14;

/// One coarse vector `R` of a layer, in the `W_aug` layout, normalized by its largest entry.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum CoarseVector {
    /// `R = u v^T` (`u` over outputs, `v` over `a_aug`): Nicolaides' all-ones and the spectral
    /// `q_G q_A^T`, whose products with the captures cost a matrix-vector product.
    Rank1 { u: Vec<f32>, v: Vec<f32> },
    /// A full matrix (the residual space and Krylov vectors).
    Dense(Tensor),
}

impl CoarseVector {
    fn ones(o: usize, a: usize) -> Self {
        CoarseVector::Rank1 {
            u: vec![1.0; o],
            v: vec![1.0; a],
        }
    }

    /// Normalized by the largest entry (a zero vector stays zero).
    fn normalized(self) -> Self {
        let inf = |x: &[f32]| x.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
        let scale = |x: &mut [f32], m: f32| {
            if m > 0.0 {
                x.iter_mut().for_each(|v| *v /= m);
            }
        };
        match self {
            CoarseVector::Rank1 { mut u, mut v } => {
                let (mu, mv) = (inf(&u), inf(&v));
                scale(&mut u, mu);
                scale(&mut v, mv);
                CoarseVector::Rank1 { u, v }
            }
            CoarseVector::Dense(mut t) => {
                // A parameter-sized matrix: the largest entry and the division run on every
                // thread (the maximum does not depend on the order).
                let m = t.data().par_chunks(CHUNK).map(inf).reduce(|| 0.0, f32::max);
                if m > 0.0 {
                    t.data_mut()
                        .par_iter_mut()
                        .with_min_len(CHUNK)
                        .for_each(|v| *v /= m);
                }
                CoarseVector::Dense(t)
            }
        }
    }

    /// The vector as a dense matrix of `shape`.
    pub fn dense(&self, shape: [usize; 2]) -> Tensor {
        match self {
            CoarseVector::Rank1 { u, v } => {
                let mut out = Vec::with_capacity(shape[0] * shape[1]);
                for &x in u {
                    out.extend(v.iter().map(|&y| x * y));
                }
                Tensor::from_vec(out, &shape)
            }
            CoarseVector::Dense(t) => t.clone(),
        }
    }

    /// `<R, x>` in `f64`.
    fn dot(&self, x: &Tensor) -> f64 {
        match self {
            // The rows' terms side by side, summed in row order as one thread would.
            CoarseVector::Rank1 { u, v } => x
                .data()
                .par_chunks(v.len())
                .zip(u.par_iter())
                .map(|(row, &a)| {
                    a as f64
                        * row
                            .iter()
                            .zip(v)
                            .map(|(&p, &q)| p as f64 * q as f64)
                            .sum::<f64>()
                })
                .collect::<Vec<f64>>()
                .into_iter()
                .sum(),
            CoarseVector::Dense(t) => crate::curvature::driver::dot(t, x),
        }
    }

    /// `x += beta R`.
    fn add_to(&self, x: &mut Tensor, beta: f64) {
        match self {
            CoarseVector::Rank1 { u, v } => {
                x.data_mut()
                    .par_chunks_mut(v.len())
                    .zip(u.par_iter())
                    .for_each(|(row, &a)| {
                        let s = beta * a as f64;
                        for (p, &q) in row.iter_mut().zip(v) {
                            *p += (s * q as f64) as f32;
                        }
                    });
            }
            CoarseVector::Dense(t) => {
                x.data_mut()
                    .par_iter_mut()
                    .zip(t.data().par_iter())
                    .with_min_len(CHUNK)
                    .for_each(|(p, &q)| *p += (beta * q as f64) as f32);
            }
        }
    }

    /// `s(n) = <grad_n, R>` for every example of the captured rows.
    fn inner(&self, rows: &Rows<'_>) -> Vec<f64> {
        match self {
            CoarseVector::Rank1 { u, v } => rows.inner_rank1(u, v),
            CoarseVector::Dense(t) => rows.inner(t),
        }
    }
}

/// The coarse correction's state.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Coarse {
    pub config: CoarseConfig,
    /// The coarse vectors with the block each belongs to (one or two per block).
    vectors: Option<Vec<(usize, CoarseVector)>>,
    /// The undamped coarse matrix `R0 F R0^T`, row-major (`n_c x n_c`): a running average for
    /// the fixed spaces, rebuilt for the others whenever their vectors change.
    matrix: Option<Vec<f64>>,
    /// Updates of the running average.
    updates: u64,
    /// The Cholesky factor of the last damped coarse matrix that factorized.
    factor: Option<Vec<f64>>,
}

impl Coarse {
    pub fn new(config: CoarseConfig) -> Self {
        Coarse {
            config,
            vectors: None,
            matrix: None,
            updates: 0,
            factor: None,
        }
    }

    /// Whether the coarse matrix is a running average while the vectors stay as they are
    /// (every space but the residual, whose vectors change every step).
    fn averaged(&self) -> bool {
        self.config.space != Some(CoarseSpace::Residual)
    }

    /// Whether this step needs every layer's capture even where the blocks' statistics are
    /// not due: every step for the residual space, and at refreshes for the spaces whose
    /// vectors come from the refreshed factors (their matrix restarts from that batch).
    pub fn wants_captures(&self, refresh_due: bool) -> bool {
        match self.config.space {
            None | Some(CoarseSpace::Tselepidis) => false,
            Some(CoarseSpace::Residual) => true,
            Some(CoarseSpace::Spectral) => refresh_due || self.vectors.is_none(),
            Some(CoarseSpace::Nicolaides) => {
                self.config.krylov && (refresh_due || self.vectors.is_none())
            }
        }
    }

    /// The coarse vectors of the last step, as dense matrices by block (for tests and
    /// analysis).
    pub fn vectors(&self, blocks: &[KfacBlock]) -> Vec<(usize, Tensor)> {
        self.vectors
            .iter()
            .flatten()
            .map(|(i, v)| {
                let info = crate::curvature::CurvatureBlock::layout(&blocks[*i]);
                (*i, v.dense([info.g_dim(), info.a_dim()]))
            })
            .collect()
    }

    /// The undamped coarse matrix, row-major.
    pub fn matrix(&self) -> Option<&[f64]> {
        self.matrix.as_deref()
    }

    /// Builds this step's vectors when they change; `Ok(None)` when they stay.
    fn new_vectors(
        &self,
        input: &CorrectionInput<'_, KfacBlock>,
        directions: &[Option<Tensor>],
        rows: Option<&[Rows<'_>]>,
        shard: Option<&Shard>,
    ) -> Result<Option<Vec<(usize, CoarseVector)>>, String> {
        let blocks = input.blocks;
        let dims = |i: usize| {
            let info = crate::curvature::CurvatureBlock::layout(&blocks[i]);
            (info.g_dim(), info.a_dim())
        };
        let precondition = |i: usize, x: &Tensor| {
            input
                .precondition(i, x)
                .ok_or_else(|| format!("block {i} has no preconditioner"))
        };
        // A first vector and its Krylov partner M_i^-1 r1 (preconditioned before either is
        // normalized).
        let krylov = |i: usize, r1: CoarseVector| -> Result<[(usize, CoarseVector); 2], String> {
            let r2 = match &r1 {
                CoarseVector::Dense(t) => precondition(i, t)?,
                rank1 => {
                    let (o, a) = dims(i);
                    precondition(i, &rank1.dense([o, a]))?
                }
            };
            Ok([
                (i, r1.normalized()),
                (i, CoarseVector::Dense(r2).normalized()),
            ])
        };
        let n = blocks.len();
        let space = self.config.space.expect("a coarse space");
        let fresh = self.vectors.is_none() || input.refreshed_now;
        let out = match space {
            CoarseSpace::Nicolaides | CoarseSpace::Tselepidis if !self.config.krylov => {
                if self.vectors.is_some() {
                    return Ok(None);
                }
                (0..n)
                    .map(|i| {
                        let (o, a) = dims(i);
                        (i, CoarseVector::ones(o, a).normalized())
                    })
                    .collect()
            }
            CoarseSpace::Nicolaides => {
                if !fresh {
                    return Ok(None);
                }
                let mut out = Vec::with_capacity(2 * n);
                for i in 0..n {
                    let (o, a) = dims(i);
                    out.extend(krylov(i, CoarseVector::ones(o, a))?);
                }
                out
            }
            CoarseSpace::Spectral => {
                if !fresh {
                    return Ok(None);
                }
                let refreshed = (0..n)
                    .map(|i| {
                        input.refreshed[i]
                            .map(|r| &r.value)
                            .ok_or_else(|| format!("block {i} has no refreshed factors"))
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                smallest_eigenvectors(input.backend, &refreshed, self.config.power_iterations)
                    .into_iter()
                    .enumerate()
                    .map(|(i, (u, v))| (i, CoarseVector::Rank1 { u, v }.normalized()))
                    .collect()
            }
            CoarseSpace::Tselepidis => unreachable!("validated: no Krylov with Tselepidis"),
            CoarseSpace::Residual => {
                let rows = rows.ok_or("the residual needs this step's captures")?;
                let u: Vec<&Tensor> = directions.iter().map(|d| d.as_ref().unwrap()).collect();
                let mut fu = fisher_product(rows, &u);
                if let Some(s) = shard {
                    // The shards' products, weighted into the global batch's.
                    let mut views: Vec<&mut [f32]> = fu.iter_mut().map(|t| t.data_mut()).collect();
                    s.mean_f32(&mut views);
                }
                let mut out = Vec::with_capacity(2 * n);
                for (i, mut rho) in fu.into_iter().enumerate() {
                    // rho = v - F u - lambda u, written over F u.
                    let (v, lambda) = (input.gradients[i].unwrap().data(), input.lambda);
                    rho.data_mut()
                        .par_iter_mut()
                        .zip(v.par_iter().zip(u[i].data().par_iter()))
                        .with_min_len(CHUNK)
                        .for_each(|(r, (&v, &x))| {
                            *r = (v as f64 - *r as f64 - lambda * x as f64) as f32;
                        });
                    let r1 = CoarseVector::Dense(precondition(i, &rho)?);
                    if self.config.krylov {
                        out.extend(krylov(i, r1)?);
                    } else {
                        out.push((i, r1.normalized()));
                    }
                }
                out
            }
        };
        Ok(Some(out))
    }

    /// The coarse matrix `R0 F R0^T` of `vectors` on the captured rows (in data-parallel
    /// training, `shard`'s rows: the means over examples are reduced over the ranks).
    fn batch_matrix(
        &self,
        vectors: &[(usize, CoarseVector)],
        rows: &[Rows<'_>],
        shard: Option<&Shard>,
    ) -> Vec<f64> {
        let nc = vectors.len();
        let examples = rows[0].examples;
        let mut m = vec![0.0f64; nc * nc];
        if self.config.space == Some(CoarseSpace::Tselepidis) {
            // Each entry is a product of two means over examples: the means are reduced
            // (both in one buffer), then multiplied.
            let sums: Vec<(Vec<f64>, Vec<f64>)> = rows.iter().map(|r| r.row_sums()).collect();
            let mut means = vec![0.0f64; 2 * nc * nc];
            for i in 0..nc {
                for j in 0..=i {
                    let (bi, bj) = (vectors[i].0, vectors[j].0);
                    let (g, a) = tselepidis_means(
                        (&sums[bi].0, &sums[bi].1, rows[bi].locations),
                        (&sums[bj].0, &sums[bj].1, rows[bj].locations),
                        examples,
                    );
                    means[2 * (i * nc + j)] = g;
                    means[2 * (i * nc + j) + 1] = a;
                }
            }
            if let Some(s) = shard {
                s.mean_f64(&mut means);
            }
            for i in 0..nc {
                for j in 0..=i {
                    let e = means[2 * (i * nc + j)] * means[2 * (i * nc + j) + 1];
                    m[i * nc + j] = e;
                    m[j * nc + i] = e;
                }
            }
            return m;
        }
        let s: Vec<Vec<f64>> = vectors.iter().map(|(b, v)| v.inner(&rows[*b])).collect();
        let inv_b = 1.0 / examples as f64;
        for i in 0..nc {
            for j in 0..=i {
                let e = s[i].iter().zip(&s[j]).map(|(x, y)| x * y).sum::<f64>() * inv_b;
                m[i * nc + j] = e;
                m[j * nc + i] = e;
            }
        }
        if let Some(sh) = shard {
            sh.mean_f64(&mut m);
        }
        m
    }

    /// Saves the state into `state` under `coarse.*`, returning its metadata.
    pub fn save(&self, state: &mut OptimState) -> serde_json::Value {
        let put64 = |state: &mut OptimState, name: &str, data: &[f64], n: usize| {
            state.tensors64.insert(
                format!("coarse.{name}"),
                Tensor64::new(data.to_vec(), &[n, n]).expect("a square coarse matrix"),
            );
        };
        let nc = self.vectors.as_ref().map_or(0, Vec::len);
        if let Some(m) = &self.matrix {
            put64(state, "matrix", m, nc);
        }
        if let Some(f) = &self.factor {
            put64(state, "factor", f, nc);
        }
        let mut kinds = Vec::new();
        for (k, (b, v)) in self.vectors.iter().flatten().enumerate() {
            match v {
                CoarseVector::Rank1 { u, v } => {
                    kinds.push((*b, VectorKind::Rank1));
                    let t = |x: &Vec<f32>| Tensor::from_vec(x.clone(), &[x.len()]);
                    state.tensors.insert(format!("coarse.{k}.u"), t(u));
                    state.tensors.insert(format!("coarse.{k}.v"), t(v));
                }
                CoarseVector::Dense(t) => {
                    kinds.push((*b, VectorKind::Dense));
                    state.tensors.insert(format!("coarse.{k}.r"), t.clone());
                }
            }
        }
        serde_json::to_value(CoarseMeta {
            space: self.config.name().into(),
            updates: self.updates,
            vectors: self.vectors.as_ref().map(|_| kinds),
            matrix: self.matrix.is_some(),
            factor: self.factor.is_some(),
        })
        .expect("the coarse metadata serializes")
    }

    /// The state saved by [`Coarse::save`], checked against the blocks' shapes.
    pub fn load(
        &self,
        meta: &serde_json::Value,
        state: &mut OptimState,
        blocks: &[KfacBlock],
    ) -> Result<Coarse, OptimError> {
        let bad = |detail: String| OptimError::BadState {
            detail: format!("coarse correction: {detail}"),
        };
        let meta: CoarseMeta =
            serde_json::from_value(meta.clone()).map_err(|e| bad(e.to_string()))?;
        if meta.space != self.config.name() {
            return Err(OptimError::Config {
                field: "coarse".into(),
                detail: format!(
                    "the state was saved with the coarse space {}, this optimizer uses {}",
                    meta.space,
                    self.config.name()
                ),
            });
        }
        let mut vectors = None;
        if let Some(kinds) = &meta.vectors {
            let mut out = Vec::with_capacity(kinds.len());
            for (k, (b, kind)) in kinds.iter().enumerate() {
                let info = blocks
                    .get(*b)
                    .map(crate::curvature::CurvatureBlock::layout)
                    .ok_or_else(|| bad(format!("vector {k} of block {b}, beyond the blocks")))?;
                let (o, a) = (info.g_dim(), info.a_dim());
                let v = match kind {
                    VectorKind::Rank1 => CoarseVector::Rank1 {
                        u: state.take(&format!("coarse.{k}.u"), &[o])?.into_vec(),
                        v: state.take(&format!("coarse.{k}.v"), &[a])?.into_vec(),
                    },
                    VectorKind::Dense => {
                        CoarseVector::Dense(state.take(&format!("coarse.{k}.r"), &[o, a])?)
                    }
                };
                out.push((*b, v));
            }
            vectors = Some(out);
        }
        let nc = vectors.as_ref().map_or(0, Vec::len);
        let mut take64 = |name: &str, present: bool| -> Result<Option<Vec<f64>>, OptimError> {
            if !present {
                return Ok(None);
            }
            let t = state
                .tensors64
                .remove(&format!("coarse.{name}"))
                .ok_or_else(|| bad(format!("{name} missing")))?;
            if t.shape() != [nc, nc] {
                return Err(bad(format!(
                    "{name} of shape {:?}, not {nc}x{nc}",
                    t.shape()
                )));
            }
            Ok(Some(t.into_data()))
        };
        Ok(Coarse {
            config: self.config,
            vectors,
            matrix: take64("matrix", meta.matrix)?,
            updates: meta.updates,
            factor: take64("factor", meta.factor)?,
        })
    }
}

#[derive(Serialize, Deserialize)]
enum VectorKind {
    Rank1,
    Dense,
}

#[derive(Serialize, Deserialize)]
struct CoarseMeta {
    space: String,
    updates: u64,
    vectors: Option<Vec<(usize, VectorKind)>>,
    matrix: bool,
    factor: bool,
}

/// The exact Fisher-vector product `F u` over all blocks from the captured rows: per example
/// `w(n) = sum_j <grad_n,j, u_j>`, then `(F u)_i = (1/B) sum_n w(n) grad_n,i`.
pub(crate) fn fisher_product(rows: &[Rows<'_>], u: &[&Tensor]) -> Vec<Tensor> {
    let mut w = vec![0.0f64; rows[0].examples];
    for (r, u) in rows.iter().zip(u) {
        for (acc, s) in w.iter_mut().zip(r.inner(u)) {
            *acc += s;
        }
    }
    rows.iter().map(|r| r.weighted_gradient(&w)).collect()
}

/// The eigenvectors `(q_G, q_A)` of the smallest eigenvalues of each block's factors: read off
/// the eigenbasis (ascending, so its first column), or, from the damped inverses, the largest
/// eigenvector of each by power iteration (every factor of every block in parallel).
fn smallest_eigenvectors(
    be: &dyn Backend,
    refreshed: &[&KfacRefreshed],
    iterations: usize,
) -> Vec<(Vec<f32>, Vec<f32>)> {
    let column0 = |q: &crate::backend::Mat| -> Vec<f32> {
        let t = be.download(q);
        let (rows, cols) = t.dims2();
        (0..rows).map(|i| t.data()[i * cols]).collect()
    };
    enum Source {
        Column(Vec<f32>),
        Power(Tensor),
    }
    let sources: Vec<[Source; 2]> = refreshed
        .iter()
        .map(|r| match r {
            KfacRefreshed::Eigen { qa, qg, .. } => {
                [Source::Column(column0(qg)), Source::Column(column0(qa))]
            }
            KfacRefreshed::Inverse { a_inv, g_inv } => [
                Source::Power(be.download(g_inv)),
                Source::Power(be.download(a_inv)),
            ],
        })
        .collect();
    let mut flat: Vec<Source> = sources.into_iter().flatten().collect();
    let vectors: Vec<Vec<f32>> = flat
        .par_iter_mut()
        .map(|s| match s {
            Source::Column(c) => std::mem::take(c),
            Source::Power(m) => top_eigenvector(m, iterations),
        })
        .collect();
    let mut it = vectors.into_iter();
    std::iter::from_fn(|| Some((it.next()?, it.next()?))).collect()
}

/// The eigenvector of the largest eigenvalue of a symmetric positive definite `m` by power
/// iteration (products in `f32`, norms and the Rayleigh quotient in `f64`) from a fixed start
/// (all ones plus a fixed pattern, so that it is not orthogonal to the answer by symmetry),
/// stopping when the Rayleigh quotient settles to 1e-9 relative or after `iterations`.
pub(crate) fn top_eigenvector(m: &Tensor, iterations: usize) -> Vec<f32> {
    let (n, _) = m.dims2();
    let norm = |x: &[f32]| x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
    let mut x: Vec<f32> = (0..n)
        .map(|i| 1.0 + ((i * 7919) % 13) as f32 / 13.0)
        .collect();
    let nx = norm(&x) as f32;
    x.iter_mut().for_each(|v| *v /= nx);
    let mut y = vec![0.0f32; n];
    let mut last = f64::NAN;
    for _ in 0..iterations {
        matvec(m.data(), &x, &mut y);
        let rq: f64 = y.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
        let ny = norm(&y);
        if !(ny > 0.0 && ny.is_finite()) {
            break;
        }
        for (xi, &yi) in x.iter_mut().zip(&y) {
            *xi = (yi as f64 / ny) as f32;
        }
        if (rq - last).abs() <= 1e-9 * rq.abs() {
            break;
        }
        last = rq;
    }
    x
}

/// `y = M x` for a square row-major `M`: each row's dot product in 16 lanes (which the compiler
/// vectorizes), summed in a fixed order. A matrix-vector product through the GEMM would pack
/// `M` on every call.
fn matvec(m: &[f32], x: &[f32], y: &mut [f32]) {
    let n = x.len();
    for (yi, row) in y.iter_mut().zip(m.chunks_exact(n)) {
        let mut acc = [0.0f32; 16];
        let (body, tail) = row.split_at(n - n % 16);
        let (xb, xt) = x.split_at(n - n % 16);
        for (r, v) in body.chunks_exact(16).zip(xb.chunks_exact(16)) {
            for k in 0..16 {
                acc[k] += r[k] * v[k];
            }
        }
        let mut s: f32 = acc.iter().sum();
        for (r, v) in tail.iter().zip(xt) {
            s += r * v;
        }
        *yi = s;
    }
}

/// The Cholesky factor `L` (row-major, lower) of a symmetric `m`, or `None` when a pivot is
/// not positive or not finite.
fn cholesky(m: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s = m[i * n + j] - (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum::<f64>();
            if i == j {
                if !(s > 0.0 && s.is_finite()) {
                    return None;
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    Some(l)
}

/// Solves `L L^T x = y`.
fn cholesky_solve(l: &[f64], y: &[f64]) -> Vec<f64> {
    let n = y.len();
    let mut z = y.to_vec();
    for i in 0..n {
        z[i] = (z[i] - (0..i).map(|k| l[i * n + k] * z[k]).sum::<f64>()) / l[i * n + i];
    }
    for i in (0..n).rev() {
        z[i] = (z[i] - (i + 1..n).map(|k| l[k * n + i] * z[k]).sum::<f64>()) / l[i * n + i];
    }
    z
}

impl Coarse {
    /// The damped coarse matrix: `lambda * N_i` on the diagonal entries of layer `i`'s
    /// vectors (`N_i` its parameter count, the squared norm of an all-ones vector).
    fn damped(
        &self,
        m: &[f64],
        vectors: &[(usize, CoarseVector)],
        blocks: &[KfacBlock],
        lambda: f64,
    ) -> Vec<f64> {
        let nc = vectors.len();
        let mut d = m.to_vec();
        for (k, (b, _)) in vectors.iter().enumerate() {
            let info = crate::curvature::CurvatureBlock::layout(&blocks[*b]);
            d[k * nc + k] += lambda * (info.g_dim() * info.a_dim()) as f64;
        }
        d
    }

    /// Factors the damped coarse matrix; one that is not positive definite keeps the last
    /// good factor (or none before the first), and the note says which.
    fn refactor(factor: &mut Option<Vec<f64>>, damped: &[f64], nc: usize) -> Option<Note> {
        if let Some(l) = cholesky(damped, nc) {
            *factor = Some(l);
            return None;
        }
        Some(Note::CoarseFailed {
            reason: format!(
                "the damped coarse matrix is not positive definite; {}",
                if factor.is_some() {
                    "kept the last good factor"
                } else {
                    "one-level directions alone"
                }
            ),
        })
    }
}

impl Correction<KfacBlock> for Coarse {
    fn correct(
        &mut self,
        input: &CorrectionInput<'_, KfacBlock>,
        directions: &mut [Option<Tensor>],
    ) -> Result<Vec<Note>, OptimError> {
        let mut notes = Vec::new();
        if self.config.space.is_none() {
            return Ok(notes);
        }
        let n = input.blocks.len();
        let missing = (0..n).find(|&i| directions[i].is_none() || input.gradients[i].is_none());
        if let Some(i) = missing {
            // Before the first refresh no block has a direction: nothing to say then.
            if directions.iter().any(Option::is_some) {
                notes.push(Note::CoarseSkipped {
                    reason: format!(
                        "block {} has no preconditioned gradient",
                        crate::curvature::CurvatureBlock::layout(&input.blocks[i]).path
                    ),
                });
            }
            return Ok(notes);
        }
        let rows: Option<Vec<Rows<'_>>> = input
            .blocks
            .iter()
            .map(|b| {
                let layer = crate::curvature::CurvatureBlock::layout(b).layer;
                let cap = input.captures.get(&layer)?;
                (cap.a.all_finite() && cap.g.all_finite())
                    .then(|| Rows::new(cap, input.statistics.examples))
            })
            .collect();
        let rows = rows.filter(|r| {
            r.iter().zip(input.blocks).all(|(r, b)| {
                let info = crate::curvature::CurvatureBlock::layout(b);
                r.a_dim() == info.a_dim() && r.g_dim() == info.g_dim()
            }) && r.iter().all(|x| x.examples == r[0].examples)
        });
        // In data-parallel training every rank takes the same path: without rows if any rank
        // has none.
        let shard = input.shard.filter(|s| s.is_distributed());
        let rows = match shard {
            Some(s) if s.any(rows.is_none()) => None,
            _ => rows,
        };

        // The vectors; when they change, the matrix and its factor start again.
        match self.new_vectors(input, directions, rows.as_deref(), shard) {
            Ok(Some(v)) => {
                self.vectors = Some(v);
                self.matrix = None;
                self.factor = None;
                self.updates = 0;
            }
            Ok(None) => {}
            Err(reason) => {
                notes.push(Note::CoarseSkipped { reason });
                return Ok(notes);
            }
        }
        let vectors = self.vectors.as_ref().expect("vectors built");

        // The matrix: a running average while the vectors stay, from this batch otherwise.
        if let Some(rows) = &rows
            && (self.averaged() || self.matrix.is_none())
        {
            let batch = self.batch_matrix(vectors, rows, shard);
            if batch.iter().all(|x| x.is_finite()) {
                self.matrix = Some(match &self.matrix {
                    Some(old) => {
                        let k = (self.updates + 1) as f64;
                        let decay = (1.0 - 1.0 / k).min(input.statistics.ema_decay as f64);
                        old.iter()
                            .zip(&batch)
                            .map(|(o, b)| decay * o + (1.0 - decay) * b)
                            .collect()
                    }
                    None => batch,
                });
                self.updates += 1;
            } else {
                notes.push(Note::CoarseFailed {
                    reason: "the coarse matrix of this batch is not finite; kept the last one"
                        .into(),
                });
            }
        }

        let Some(matrix) = &self.matrix else {
            notes.push(Note::CoarseSkipped {
                reason: "no captures to build the coarse matrix from yet".into(),
            });
            return Ok(notes);
        };

        // The factor, at the damping in force.
        let nc = vectors.len();
        let damped = self.damped(matrix, vectors, input.blocks, input.lambda);
        if let Some(note) = Self::refactor(&mut self.factor, &damped, nc) {
            notes.push(note);
            if self.factor.is_none() {
                return Ok(notes);
            }
        }
        let l = self.factor.as_ref().expect("a factor");

        // beta = (R0 F R0^T + lambda D)^-1 R0 v; u_i += sum_k beta_k R_k.
        let y: Vec<f64> = vectors
            .iter()
            .map(|(b, v)| v.dot(input.gradients[*b].unwrap()))
            .collect();
        let beta = cholesky_solve(l, &y);
        if !beta.iter().all(|x| x.is_finite()) {
            notes.push(Note::CoarseFailed {
                reason: "the coarse solution is not finite; one-level directions alone".into(),
            });
            return Ok(notes);
        }
        for ((b, v), &bk) in vectors.iter().zip(&beta) {
            v.add_to(directions[*b].as_mut().unwrap(), bk);
        }
        Ok(notes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_coarse_matrix_that_does_not_factor_keeps_the_last_good_factor() {
        let mut c = Coarse::new(CoarseConfig::DEFAULT);
        let good = [4.0, 2.0, 2.0, 3.0];
        assert_eq!(Coarse::refactor(&mut c.factor, &good, 2), None);
        let l = c.factor.clone().unwrap();
        // L L^T = good.
        assert!((l[0] * l[0] - 4.0).abs() < 1e-12 && (l[2] * l[0] - 2.0).abs() < 1e-12);
        let x = cholesky_solve(&l, &[1.0, 2.0]);
        assert!((4.0 * x[0] + 2.0 * x[1] - 1.0).abs() < 1e-12);
        assert!((2.0 * x[0] + 3.0 * x[1] - 2.0).abs() < 1e-12);
        for bad in [[1.0, 2.0, 2.0, 1.0], [f64::NAN, 0.0, 0.0, 1.0]] {
            let note = Coarse::refactor(&mut c.factor, &bad, 2).expect("a failure note");
            assert!(
                note.to_string().contains("kept the last good factor"),
                "{note}"
            );
            assert_eq!(c.factor.as_ref(), Some(&l));
        }
        let mut fresh = Coarse::new(CoarseConfig::DEFAULT);
        let note = Coarse::refactor(&mut fresh.factor, &[1.0, 2.0, 2.0, 1.0], 2).unwrap();
        assert!(
            note.to_string().contains("one-level directions alone"),
            "{note}"
        );
        assert!(fresh.factor.is_none());
    }

    #[test]
    fn power_iteration_finds_the_top_eigenvector() {
        // diag(1, 5, 2) rotated in its first two coordinates.
        let (c, s) = (0.6f32, 0.8f32);
        let m = Tensor::from_vec(
            vec![
                c * c + 5.0 * s * s,
                (1.0 - 5.0) * c * s,
                0.0,
                (1.0 - 5.0) * c * s,
                s * s + 5.0 * c * c,
                0.0,
                0.0,
                0.0,
                2.0,
            ],
            &[3, 3],
        );
        let v = top_eigenvector(&m, 200);
        let want = [-s, c, 0.0];
        let cos: f32 = v.iter().zip(&want).map(|(a, b)| a * b).sum();
        assert!(cos.abs() > 1.0 - 1e-6, "{v:?}");
    }
}
