//! # kron-benches
//!
//! The shared pieces of kron's benchmarks: the two benchmark models with seeded data, the
//! GEMMs one forward+backward step of each performs (read off the model's own captures, so
//! they are exact), FLOP counts for SGD and KFAC steps, and small timing helpers.
//!
//! * **(a) the deep autoencoder** 784-1000-500-250-30-250-500-1000-784: sigmoid hidden units,
//!   a linear 30-unit code layer, output logits trained with sigmoid binary cross-entropy.
//! * **(b) the CIFAR-style conv net** on 3x32x32 inputs: three times [conv 5x5 padding 2,
//!   ReLU, max-pool 3x3 stride 2 padding 1] with 32, 32 and 64 channels (32 -> 16 -> 8 -> 4),
//!   then dense 1024 -> 10 with softmax cross-entropy.
//!
//! The criterion benches (`cargo bench -p kron-benches`) and the table example
//! (`cargo run --release -p kron-benches --example step_table`) both build on this crate.

pub mod pinned;

use std::time::{Duration, Instant};

use kron::autodiff::{Gradients, LossKind, ParamStore, Rng, Tape, Targets, Tensor, gemm, in_pool};
use kron::layers::{
    Activation, Conv2dConfig, Dense, FisherBlock, Flatten, MaxPool2d, Module, Sequential,
};

/// A model, its parameters, its loss and one seeded mini-batch.
pub struct Workload {
    /// A short name for tables.
    pub name: &'static str,
    /// The model.
    pub model: Sequential,
    /// Its parameters.
    pub params: ParamStore,
    /// The loss it trains with.
    pub loss: LossKind,
    /// One mini-batch of inputs.
    pub inputs: Tensor,
    /// The batch's targets.
    pub targets: Targets,
}

/// The autoencoder's layer widths, input to output.
pub const AUTOENCODER_WIDTHS: [usize; 9] = [784, 1000, 500, 250, 30, 250, 500, 1000, 784];

impl Workload {
    /// The deep autoencoder at `batch`, with weights and a batch of uniform `[0, 1)` inputs
    /// (reconstructed as their own targets) drawn from `seed`.
    pub fn autoencoder(batch: usize, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut params = ParamStore::new();
        let mut model = Sequential::new();
        let w = AUTOENCODER_WIDTHS;
        let code = w.len() / 2; // the layer whose output is the 30-unit code
        for i in 0..w.len() - 1 {
            model = model.push(Dense::new(
                &mut params,
                &format!("fc{}", i + 1),
                w[i],
                w[i + 1],
                &mut rng,
            ));
            // Sigmoid hidden units; the code layer is linear and the output layer gives logits.
            if i + 1 != code && i + 1 != w.len() - 1 {
                model = model.push(Activation::Sigmoid);
            }
        }
        let inputs = Tensor::rand_uniform(&[batch, w[0]], 0.0, 1.0, &mut rng);
        let targets = Targets::Values(inputs.clone());
        Workload {
            name: "autoencoder",
            model,
            params,
            loss: LossKind::SigmoidBce,
            inputs,
            targets,
        }
    }

    /// The CIFAR-style conv net at `batch`, with weights, standard-normal 3x32x32 inputs and
    /// uniform labels drawn from `seed`.
    pub fn convnet(batch: usize, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut params = ParamStore::new();
        let mut model = Sequential::new();
        let mut in_ch = 3;
        for (i, out_ch) in [32, 32, 64].into_iter().enumerate() {
            let conv = Conv2dConfig::new(in_ch, out_ch, 5).with_padding(2).build(
                &mut params,
                &format!("conv{}", i + 1),
                &mut rng,
            );
            model = model
                .push(conv)
                .push(Activation::Relu)
                .push(MaxPool2d::new(3, 2, 1));
            in_ch = out_ch;
        }
        model = model
            .push(Flatten)
            .push(Dense::new(&mut params, "fc", 64 * 4 * 4, 10, &mut rng));
        let inputs = Tensor::randn(&[batch, 3, 32, 32], 0.0, 1.0, &mut rng);
        let labels = (0..batch).map(|_| rng.below(10) as usize).collect();
        Workload {
            name: "convnet",
            model,
            params,
            loss: LossKind::CrossEntropy,
            inputs,
            targets: Targets::Classes(labels),
        }
    }

    /// The batch size.
    pub fn batch(&self) -> usize {
        self.inputs.dim(0)
    }

    /// One forward and backward pass on a fresh tape: the loss and the gradients.
    pub fn forward_backward(&self) -> (f32, Gradients) {
        // On a rayon worker, as `train_step` runs its passes.
        in_pool(|| {
            let tape = Tape::new(&self.params);
            let out = self.model.forward(tape.input(self.inputs.clone()));
            let loss = self.loss.apply(out, &self.targets);
            let grads = tape.backward(loss);
            (loss.value().item(), grads)
        })
    }

    /// A fingerprint of the bits of one [`Workload::forward_backward`]: the loss and every
    /// parameter gradient, in parameter order (FNV-1a over the `f32` bit patterns). Equal
    /// fingerprints mean bit-identical results, across thread counts or code changes.
    pub fn fingerprint(&self) -> u64 {
        let (loss, grads) = self.forward_backward();
        let mut h = Fnv::default();
        h.word(loss.to_bits());
        for id in self.params.ids() {
            for v in grads.get(id).map_or(&[][..], |g| g.data()) {
                h.word(v.to_bits());
            }
        }
        h.0
    }

    /// The GEMMs one [`Workload::forward_backward`] performs, in the order it performs them
    /// (forward first, then backward from the last layer).
    ///
    /// Read off a capturing pass, whose `a` (`rows x in`) and `g` (`rows x out`) of each dense
    /// or conv layer give the shapes: forward `a W^T`, backward `g W` (the input gradient,
    /// skipped for the first layer, which reads the tape's input and needs none) and `g^T a`
    /// (the weight gradient). For a conv layer `a` is the im2col patch matrix, so these are
    /// exactly its im2col GEMMs.
    pub fn gemms(&self) -> Vec<GemmShape> {
        let blocks = self.model.fisher_blocks();
        let tape = Tape::new(&self.params).capturing(blocks.iter().map(|b| b.layer));
        let out = self.model.forward(tape.input(self.inputs.clone()));
        let loss = self.loss.apply(out, &self.targets);
        let grads = tape.backward(loss);
        let dims: Vec<(String, usize, usize, usize)> = blocks
            .iter()
            .map(|b| {
                let cap = grads
                    .capture(b.layer)
                    .expect("every block was asked to capture");
                (b.path.clone(), cap.a.dim(0), cap.a.dim(1), cap.g.dim(1))
            })
            .collect();
        let mut shapes = Vec::new();
        for (path, rows, inp, out) in &dims {
            shapes.push(GemmShape::new(
                format!("{path} fwd a.W^T"),
                *rows,
                *inp,
                *out,
                false,
                true,
            ));
        }
        for (i, (path, rows, inp, out)) in dims.iter().enumerate().rev() {
            if i > 0 {
                shapes.push(GemmShape::new(
                    format!("{path} bwd g.W"),
                    *rows,
                    *out,
                    *inp,
                    false,
                    false,
                ));
            }
            shapes.push(GemmShape::new(
                format!("{path} bwd g^T.a"),
                *out,
                *rows,
                *inp,
                true,
                false,
            ));
        }
        shapes
    }

    /// The FLOPs of one SGD step and of what KFAC adds, from the model's shapes.
    pub fn kfac_flops(&self) -> KfacFlops {
        let blocks = self.model.fisher_blocks();
        let gemms = self.gemms();
        let total = |pred: &dyn Fn(&GemmShape) -> bool| -> f64 {
            gemms.iter().filter(|g| pred(g)).map(GemmShape::flops).sum()
        };
        let forward = total(&|g| g.label.ends_with("fwd a.W^T"));
        let input_grads = total(&|g| g.label.ends_with("bwd g.W"));
        let weight_grads = total(&|g| g.label.ends_with("bwd g^T.a"));
        // Rows of `a` and `g` per block (batch times locations).
        let rows: Vec<f64> = gemms
            .iter()
            .filter(|g| g.label.ends_with("fwd a.W^T"))
            .map(|g| g.m as f64)
            .collect();
        let mut factors = 0.0;
        let mut full_factors = 0.0;
        let mut precondition = 0.0;
        let mut refresh = 0.0;
        for (b, r) in blocks.iter().zip(&rows) {
            let (a, g) = (b.a_dim() as f64, b.g_dim() as f64);
            factors += syrk_flops(b.a_dim(), *r) + syrk_flops(b.g_dim(), *r);
            full_factors += 2.0 * r * (a * a + g * g);
            precondition += 2.0 * g * a * (g + a);
            refresh += a * a * a + g * g * g;
        }
        KfacFlops {
            sgd_step: forward + input_grads + weight_grads,
            sampled_backward: input_grads,
            sampled_backward_full: input_grads + weight_grads,
            factors,
            full_factors,
            precondition,
            refresh,
        }
    }

    /// The Fisher blocks of the model.
    pub fn blocks(&self) -> Vec<FisherBlock> {
        self.model.fisher_blocks()
    }
}

/// FLOPs of kron's blocked symmetric update `X^T X` for a `d`-wide factor over `rows` rows:
/// the CPU backend's row blocks (of about `d/8` rows, a multiple of 16 from 64 to 256), each
/// from its diagonal entry to the last column (the blocking of `syrk_rows` in kron-optim's CPU
/// backend).
fn syrk_flops(d: usize, rows: f64) -> f64 {
    let h = (d.div_ceil(8).div_ceil(16) * 16).clamp(64, 256);
    (0..d)
        .step_by(h)
        .map(|i0| 2.0 * rows * (h.min(d - i0) * (d - i0)) as f64)
        .sum()
}

/// A fingerprint of every parameter's bits, in parameter order (FNV-1a over the `f32` bit
/// patterns, each tensor's name and shape first).
pub fn params_hash(params: &ParamStore) -> u64 {
    let mut h = Fnv::default();
    for id in params.ids() {
        for b in params.name(id).bytes() {
            h.word(u32::from(b));
        }
        let t = params.get(id);
        for &d in t.shape() {
            h.word(d as u32);
        }
        for v in t.data() {
            h.word(v.to_bits());
        }
    }
    h.0
}

/// FNV-1a, 64 bits.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn word(&mut self, w: u32) {
        for b in w.to_le_bytes() {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// FLOP counts of one step: SGD's forward and backward, and the work KFAC adds.
#[derive(Clone, Copy, Debug)]
pub struct KfacFlops {
    /// Forward and backward GEMMs, which is all an SGD step does at scale.
    pub sgd_step: f64,
    /// The sampled-label backward pass for the captures alone (`Tape::backward_captures`,
    /// what `kron::train_step` runs): the input-gradient products.
    pub sampled_backward: f64,
    /// The sampled-label backward pass with weight gradients too (`Tape::backward`).
    pub sampled_backward_full: f64,
    /// The factor products `a^T a` and `g^T g` as kron computes them: the 256-column block
    /// products on and above the diagonal (`kron-optim`'s blocked symmetric rank-k update).
    pub factors: f64,
    /// The same products as full GEMMs (a symmetric product needs exactly half of this).
    pub full_factors: f64,
    /// The two-sided preconditioning `G^-1 V A^-1` of every block.
    pub precondition: f64,
    /// One refresh of every damped inverse, counted as `d^3` per factor (Cholesky and inverse).
    pub refresh: f64,
}

impl KfacFlops {
    /// FLOPs of one KFAC step with statistics every `stats_period` steps and inverses every
    /// `inverse_period` steps, amortized.
    pub fn kfac_step(&self, stats_period: u64, inverse_period: u64) -> f64 {
        self.sgd_step
            + (self.sampled_backward + self.factors) / stats_period as f64
            + self.precondition
            + self.refresh / inverse_period as f64
    }

    /// [`KfacFlops::kfac_step`] with exactly half a GEMM per factor product, the least a
    /// symmetric product needs.
    pub fn lean_kfac_step(&self, stats_period: u64, inverse_period: u64) -> f64 {
        self.sgd_step
            + (self.sampled_backward + 0.5 * self.full_factors) / stats_period as f64
            + self.precondition
            + self.refresh / inverse_period as f64
    }
}

/// One GEMM `c = op(a) op(b)` of a step: `m x k` times `k x n`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GemmShape {
    /// Which layer and which product.
    pub label: String,
    /// Rows of the output.
    pub m: usize,
    /// The inner dimension.
    pub k: usize,
    /// Columns of the output.
    pub n: usize,
    /// Whether `a` is stored transposed (`k x m`).
    pub ta: bool,
    /// Whether `b` is stored transposed (`n x k`).
    pub tb: bool,
}

impl GemmShape {
    /// A shape.
    pub fn new(label: String, m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Self {
        GemmShape {
            label,
            m,
            k,
            n,
            ta,
            tb,
        }
    }

    /// `2 m k n`.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.k as f64 * self.n as f64
    }
}

/// A list of GEMMs with preallocated, seeded operands, to time them alone.
pub struct GemmSet {
    shapes: Vec<GemmShape>,
    buffers: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)>,
}

impl GemmSet {
    /// Operands for every shape, filled with seeded normal draws (the outputs start at zero).
    pub fn new(shapes: Vec<GemmShape>, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| 0.1 * rng.normal()).collect() };
        let buffers = shapes
            .iter()
            .map(|s| (draw(s.m * s.k), draw(s.k * s.n), vec![0.0; s.m * s.n]))
            .collect();
        GemmSet { shapes, buffers }
    }

    /// One square `n x n` product.
    pub fn square(n: usize, seed: u64) -> Self {
        Self::new(
            vec![GemmShape::new(format!("sgemm {n}"), n, n, n, false, false)],
            seed,
        )
    }

    /// Runs every GEMM once, through `kron_autodiff::gemm`, overwriting the outputs.
    pub fn run(&mut self) {
        for (s, (a, b, c)) in self.shapes.iter().zip(&mut self.buffers) {
            gemm(s.m, s.k, s.n, 1.0, a, s.ta, b, s.tb, 0.0, c);
        }
        std::hint::black_box(&self.buffers);
    }

    /// The shapes.
    pub fn shapes(&self) -> &[GemmShape] {
        &self.shapes
    }

    /// Total FLOPs of one [`GemmSet::run`].
    pub fn flops(&self) -> f64 {
        self.shapes.iter().map(GemmShape::flops).sum()
    }
}

/// The wall time of one call of `f`.
pub fn time<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let start = Instant::now();
    let out = f();
    (start.elapsed(), out)
}

/// Timing samples in seconds.
#[derive(Clone, Debug, Default)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    /// Adds one sample.
    pub fn push(&mut self, d: Duration) {
        self.0.push(d.as_secs_f64());
    }

    /// The median (the mean of the middle two for an even count); 0 when empty.
    pub fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
        }
    }

    /// The smallest sample; 0 when empty.
    pub fn best(&self) -> f64 {
        self.0.iter().copied().reduce(f64::min).unwrap_or(0.0)
    }
}

/// The parsed arguments of a bench tool, or its exit: `Ok(None)` (`--help` was asked for)
/// prints `usage` on standard output and exits 0; an error prints it with `usage` on standard
/// error, prefixed by the tool's `name`, and exits 2.
pub fn args_or_exit<T>(name: &str, usage: &str, parsed: Result<Option<T>, String>) -> T {
    match parsed {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{usage}");
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("{name}: {e}\n{usage}");
            std::process::exit(2);
        }
    }
}

/// The widest `f32` fused multiply-add this CPU has, and its lanes: AVX-512F (16 lanes) where
/// present, else FMA on AVX2 (8 lanes); `None` without FMA.
pub fn fma_width() -> Option<(&'static str, usize)> {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return Some(("AVX-512", 16));
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Some(("AVX2", 8));
        }
    }
    None
}

/// The machine's `f32` fused multiply-add throughput in GFLOP/s on `threads` threads at once,
/// with the widest FMA it has ([`fma_width`]): ten independent chains of FMAs per thread, the
/// most any GEMM kernel can reach. The ceiling for every GFLOP/s figure the benchmarks print.
/// `None` without FMA.
pub fn fma_peak(threads: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        let (_, lanes) = fma_width()?;
        const ITERS: u64 = 40_000_000;
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads.max(1) {
                s.spawn(move || {
                    // SAFETY: fma_width detected the instructions each function enables.
                    let v = unsafe {
                        if lanes == 16 {
                            fma_chains_avx512(ITERS)
                        } else {
                            fma_chains_avx2(ITERS)
                        }
                    };
                    std::hint::black_box(v)
                });
            }
        });
        let flops = threads.max(1) as f64 * ITERS as f64 * 10.0 * lanes as f64 * 2.0;
        Some(flops / start.elapsed().as_secs_f64() / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = threads;
        None
    }
}

/// `iters` rounds of ten independent 8-wide FMA chains.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains_avx2(iters: u64) -> f32 {
    use std::arch::x86_64::{_mm256_fmadd_ps, _mm256_set1_ps, _mm256_storeu_ps};
    let (b, c) = (_mm256_set1_ps(1.0 - 1e-7), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(0.5); 10];
    for _ in 0..iters {
        for a in &mut acc {
            *a = _mm256_fmadd_ps(*a, b, c);
        }
    }
    let mut lanes = [0.0f32; 8];
    let mut sum = 0.0;
    for a in acc {
        // SAFETY: `lanes` holds the 8 floats an unaligned 256-bit store writes.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), a) };
        sum += lanes.iter().sum::<f32>();
    }
    sum
}

/// `iters` rounds of ten independent 16-wide FMA chains.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_chains_avx512(iters: u64) -> f32 {
    use std::arch::x86_64::{_mm512_fmadd_ps, _mm512_set1_ps, _mm512_storeu_ps};
    let (b, c) = (_mm512_set1_ps(1.0 - 1e-7), _mm512_set1_ps(1e-7));
    let mut acc = [_mm512_set1_ps(0.5); 10];
    for _ in 0..iters {
        for a in &mut acc {
            *a = _mm512_fmadd_ps(*a, b, c);
        }
    }
    let mut lanes = [0.0f32; 16];
    let mut sum = 0.0;
    for a in acc {
        // SAFETY: `lanes` holds the 16 floats an unaligned 512-bit store writes.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), a) };
        sum += lanes.iter().sum::<f32>();
    }
    sum
}

/// The 1-minute load average from `/proc/loadavg`, if readable.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autoencoder_gemms_match_the_issue_count() {
        let w = Workload::autoencoder(10, 0);
        let g = w.gemms();
        // 8 forward, 8 weight-gradient and 7 input-gradient products.
        assert_eq!(g.len(), 23);
        let f = w.kfac_flops();
        let per_example: f64 = AUTOENCODER_WIDTHS
            .windows(2)
            .map(|p| (p[0] * p[1]) as f64)
            .sum();
        let expected = 2.0 * 10.0 * (3.0 * per_example - (784 * 1000) as f64);
        assert_eq!(f.sgd_step, expected);
    }

    #[test]
    fn convnet_gemms_have_im2col_shapes() {
        let w = Workload::convnet(2, 0);
        let g = w.gemms();
        assert_eq!(
            g[0],
            GemmShape::new("conv1 fwd a.W^T".into(), 2 * 1024, 75, 32, false, true)
        );
        assert_eq!(
            g[1],
            GemmShape::new("conv2 fwd a.W^T".into(), 2 * 256, 800, 32, false, true)
        );
        assert_eq!(
            g[2],
            GemmShape::new("conv3 fwd a.W^T".into(), 2 * 64, 800, 64, false, true)
        );
        assert_eq!(
            g[3],
            GemmShape::new("fc fwd a.W^T".into(), 2, 1024, 10, false, true)
        );
        assert_eq!(g.len(), 4 + 3 + 4);
    }

    #[test]
    fn median_and_best() {
        let s = Samples(vec![3.0, 1.0, 2.0, 10.0]);
        assert_eq!(s.median(), 2.5);
        assert_eq!(s.best(), 1.0);
    }
}
