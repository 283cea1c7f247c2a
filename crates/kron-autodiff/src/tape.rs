//! The tape: an append-only arena of recorded operations and the reverse sweep over it.

use std::cell::{Ref, RefCell};
use std::collections::{BTreeMap, HashSet};

use crate::capture::LayerCapture;
use crate::gradients::Gradients;
use crate::ops::{self, Op};
use crate::param::{LayerId, ParamId, ParamStore};
use crate::rng::Rng;
use crate::tensor::{Tensor, numel};

/// One recorded operation: what it was and the value it produced.
pub(crate) struct Node {
    pub(crate) op: Op,
    pub(crate) value: Tensor,
    pub(crate) requires_grad: bool,
}

/// A record of one forward pass, for reverse-mode differentiation.
///
/// Nodes are appended in execution order, so the reverse of that order is a valid topological
/// order for the backward sweep: no sorting, no hidden graph. A tape is cheap to create; make a
/// fresh one for each training step.
///
/// The tape is created over the [`ParamStore`] whose parameters the model reads
/// ([`Tape::param`]), carries the train/eval flag that dropout reads, the generator dropout
/// masks draw from, and the set of layers whose curvature statistics to capture.
///
/// ```
/// use kron_autodiff::{ParamStore, Tape, Tensor};
/// let mut store = ParamStore::new();
/// let w = store.add("w", Tensor::from_vec(vec![2.0], &[1, 1]));
/// let tape = Tape::new(&store);
/// let x = tape.input(Tensor::from_vec(vec![3.0], &[1, 1]));
/// let y = x.matmul(tape.param(w)).square().sum();
/// let grads = tape.backward(y);
/// // d/dw (3w)^2 = 18w = 36
/// assert_eq!(grads.get(w).unwrap().data(), &[36.0]);
/// ```
pub struct Tape<'s> {
    store: Option<&'s ParamStore>,
    nodes: RefCell<Vec<Node>>,
    param_nodes: RefCell<Vec<Option<usize>>>,
    training: bool,
    capture: HashSet<LayerId>,
    rng: RefCell<Rng>,
    /// `(first, global)`: this tape's batch is the examples from `first` of a global batch
    /// of `global` (data-parallel training).
    shard: Option<(usize, usize)>,
}

/// A handle to a value recorded on a [`Tape`]; cheap to copy.
///
/// The lifetime ties it to its tape, so handles cannot outlive the tape or mix tapes.
#[derive(Clone, Copy)]
pub struct Var<'t> {
    pub(crate) tape: &'t Tape<'t>,
    pub(crate) id: usize,
}

impl<'s> Tape<'s> {
    /// A tape over the parameters of `store`, in training mode, capturing nothing.
    pub fn new(store: &'s ParamStore) -> Self {
        Tape {
            store: Some(store),
            nodes: RefCell::new(Vec::new()),
            param_nodes: RefCell::new(vec![None; store.len()]),
            training: true,
            capture: HashSet::new(),
            rng: RefCell::new(Rng::new(0)),
            shard: None,
        }
    }

    /// A tape with no parameter store (for computations on inputs alone, as in tests).
    pub fn without_params() -> Tape<'static> {
        Tape {
            store: None,
            nodes: RefCell::new(Vec::new()),
            param_nodes: RefCell::new(Vec::new()),
            training: true,
            capture: HashSet::new(),
            rng: RefCell::new(Rng::new(0)),
            shard: None,
        }
    }

    /// Sets the train/eval flag (dropout is the identity in eval mode).
    pub fn training(mut self, training: bool) -> Self {
        self.training = training;
        self
    }

    /// Sets the generator that dropout masks draw from.
    pub fn with_rng(self, rng: Rng) -> Self {
        *self.rng.borrow_mut() = rng;
        self
    }

    /// Says that this tape's batch is the examples from `first` of a global batch of
    /// `global` examples (one rank's shard in data-parallel training): dropout then draws for
    /// each example the mask it would draw on one process running the whole global batch,
    /// whatever the split.
    ///
    /// # Panics
    /// If `first` is beyond `global`.
    pub fn with_shard(mut self, first: usize, global: usize) -> Self {
        assert!(
            first <= global,
            "Tape::with_shard: first example {first} beyond a batch of {global}"
        );
        self.shard = Some((first, global));
        self
    }

    /// Asks the tape to capture the curvature statistics `(a, g)` of these layers.
    pub fn capturing(mut self, layers: impl IntoIterator<Item = LayerId>) -> Self {
        self.capture.extend(layers);
        self
    }

    /// Whether the tape is in training mode.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Whether `layer`'s statistics are captured.
    pub fn captures(&self, layer: LayerId) -> bool {
        self.capture.contains(&layer)
    }

    /// The parameter store the tape reads, if any.
    pub fn store(&self) -> Option<&'s ParamStore> {
        self.store
    }

    /// The number of recorded nodes.
    pub fn len(&self) -> usize {
        self.nodes.borrow().len()
    }

    /// Whether nothing has been recorded.
    pub fn is_empty(&self) -> bool {
        self.nodes.borrow().is_empty()
    }

    /// Brings a parameter onto the tape as a leaf (once; later calls return the same node).
    ///
    /// # Panics
    /// If the tape has no store or the id is not in it.
    #[track_caller]
    pub fn param(&self, id: ParamId) -> Var<'_> {
        let store = self
            .store
            .expect("Tape::param: this tape was created without a parameter store");
        if let Some(Some(node)) = self.param_nodes.borrow().get(id.index()) {
            return Var {
                tape: self,
                id: *node,
            };
        }
        let value = store.get(id).clone();
        let var = self.push(Op::Param(id), value, true);
        let mut pn = self.param_nodes.borrow_mut();
        if pn.len() <= id.index() {
            pn.resize(id.index() + 1, None);
        }
        pn[id.index()] = Some(var.id);
        var
    }

    /// A constant input (no gradient is computed for it).
    pub fn input(&self, value: Tensor) -> Var<'_> {
        self.push(Op::Input, value, false)
    }

    /// A differentiable leaf whose gradient [`Gradients::wrt`] returns after backward.
    pub fn var(&self, value: Tensor) -> Var<'_> {
        self.push(Op::Input, value, true)
    }

    pub(crate) fn push(&self, op: Op, value: Tensor, requires_grad: bool) -> Var<'_> {
        let mut nodes = self.nodes.borrow_mut();
        nodes.push(Node {
            op,
            value,
            requires_grad,
        });
        Var {
            tape: self,
            id: nodes.len() - 1,
        }
    }

    /// Records `op` with `value`; it requires a gradient if any of `parents` does.
    pub(crate) fn record(&self, op: Op, value: Tensor, parents: &[usize]) -> Var<'_> {
        let rg = {
            let nodes = self.nodes.borrow();
            parents.iter().any(|&p| nodes[p].requires_grad)
        };
        self.push(op, value, rg)
    }

    pub(crate) fn nodes_ref(&self) -> Ref<'_, Vec<Node>> {
        self.nodes.borrow()
    }

    pub(crate) fn value_of(&self, id: usize) -> Ref<'_, Tensor> {
        Ref::map(self.nodes.borrow(), |n| &n[id].value)
    }

    /// Draws the mask of a batch of `rows` examples of `per_row` values each, one `u64` per
    /// value: `f` gets the generator and the number of values. On a shard, the generator first
    /// skips the examples before it and afterwards those after it, so each example's values
    /// and the draws of the next mask are those of the whole global batch.
    pub(crate) fn draw_mask<T>(
        &self,
        rows: usize,
        per_row: usize,
        f: impl FnOnce(&mut Rng, usize) -> T,
    ) -> T {
        let mut rng = self.rng.borrow_mut();
        let Some((first, global)) = self.shard else {
            return f(&mut rng, rows * per_row);
        };
        assert!(
            first + rows <= global,
            "dropout: a batch of {rows} rows from example {first} overruns the global batch of \
             {global}"
        );
        rng.discard((first * per_row) as u64);
        let out = f(&mut rng, rows * per_row);
        rng.discard(((global - first - rows) * per_row) as u64);
        out
    }

    /// Reverse-mode sweep from a scalar `loss`: the gradient of every parameter (and of every
    /// [`Tape::var`] leaf) that `loss` depends on, and the captures of the requested layers.
    ///
    /// The tape is not consumed: a second backward from another scalar recorded on the same tape
    /// (a loss on labels sampled from the model, for the true Fisher) reuses the forward pass.
    ///
    /// # Panics
    /// If `loss` is not a single value or belongs to another tape.
    #[track_caller]
    pub fn backward(&self, loss: Var<'_>) -> Gradients {
        self.sweep(loss, true)
    }

    /// A reverse sweep from `loss` for the captures alone: like [`Tape::backward`], but no
    /// parameter takes a gradient, so the dense and conv layers skip their weight-gradient
    /// products (and bias sums), about a third of the work of a backward pass through them.
    /// This is the true-Fisher pass, whose parameter gradients are not needed. The captures
    /// (and the gradients of [`Tape::var`] leaves) have the same bits as [`Tape::backward`]'s.
    ///
    /// # Panics
    /// As [`Tape::backward`].
    #[track_caller]
    pub fn backward_captures(&self, loss: Var<'_>) -> Gradients {
        self.sweep(loss, false)
    }

    /// [`Tape::backward_captures`] from any node `output` whose gradient is given: the sweep
    /// a scalar loss of `output` would make below it, without recording the loss. The true-Fisher
    /// pass seeds it with [`LossKind::input_gradient`](crate::LossKind::input_gradient) on the
    /// sampled labels, which has the bits the loss node's own backward would pass down, and so
    /// skips computing a loss value nobody reads.
    ///
    /// # Panics
    /// If `seed`'s shape is not `output`'s, or `output` belongs to another tape.
    #[track_caller]
    pub fn backward_captures_from(&self, output: Var<'_>, seed: Tensor) -> Gradients {
        self.sweep_from(output, seed, false)
    }

    #[track_caller]
    fn sweep(&self, loss: Var<'_>, with_params: bool) -> Gradients {
        self.check_own(loss, "Tape::backward");
        let shape = self.nodes.borrow()[loss.id].value.shape().to_vec();
        assert_eq!(
            numel(&shape),
            1,
            "Tape::backward: the loss must be a single value, found shape {shape:?}"
        );
        self.sweep_from(loss, Tensor::ones(&shape), with_params)
    }

    #[track_caller]
    fn sweep_from(&self, root: Var<'_>, seed: Tensor, with_params: bool) -> Gradients {
        self.check_own(root, "Tape::backward");
        let nodes = self.nodes.borrow();
        assert_eq!(
            seed.shape(),
            nodes[root.id].value.shape(),
            "Tape::backward_captures_from: a seed of shape {:?} for an output of shape {:?}",
            seed.shape(),
            nodes[root.id].value.shape()
        );
        let mut grads: Vec<Option<Tensor>> = vec![None; root.id + 1];
        grads[root.id] = Some(seed);
        let mut params: Vec<Option<Tensor>> = vec![None; self.store.map_or(0, ParamStore::len)];
        let mut leaves = BTreeMap::new();
        let mut captures: BTreeMap<LayerId, LayerCapture> = BTreeMap::new();
        for i in (0..=root.id).rev() {
            let Some(g) = grads[i].take() else { continue };
            let node = &nodes[i];
            if !node.requires_grad {
                continue;
            }
            match &node.op {
                Op::Param(pid) => params[pid.index()] = Some(g),
                Op::Input => {
                    leaves.insert(i, g);
                }
                op => {
                    let mut sink = ops::GradSink {
                        nodes: &nodes,
                        grads: &mut grads,
                        params: with_params,
                    };
                    if let Some(cap) = ops::backward(op, &node.value, &g, &mut sink, &self.capture)
                    {
                        // The sweep meets a reused layer's later uses first.
                        let cap = match captures.remove(&cap.layer) {
                            Some(later) => cap.stacked_with(later),
                            None => cap,
                        };
                        captures.insert(cap.layer, cap);
                    }
                }
            }
        }
        Gradients::new(params, leaves, captures)
    }
}

impl<'t> Var<'t> {
    /// The tape this value lives on.
    pub fn tape(&self) -> &'t Tape<'t> {
        self.tape
    }

    /// The node index on the tape.
    pub fn id(&self) -> usize {
        self.id
    }

    /// The value (a cheap clone sharing storage with the tape's copy).
    pub fn value(&self) -> Tensor {
        self.tape.value_of(self.id).clone()
    }

    /// The shape of the value.
    pub fn shape(&self) -> Vec<usize> {
        self.tape.value_of(self.id).shape().to_vec()
    }
}

impl std::fmt::Debug for Var<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Var#{}{:?}", self.id, self.shape())
    }
}

#[cfg(test)]
mod tests {
    use crate::{ParamStore, Rng, Tape, Tensor};

    #[test]
    fn captures_alone_match_a_full_backward_bit_for_bit() {
        let mut rng = Rng::new(4);
        let mut store = ParamStore::new();
        let conv = store.add_layer("conv");
        let cw = store.add(
            "conv.weight",
            Tensor::randn(&[4, 2, 3, 3], 0.0, 0.3, &mut rng),
        );
        let cb = store.add("conv.bias", Tensor::randn(&[4], 0.0, 0.1, &mut rng));
        let fc = store.add_layer("fc");
        let w = store.add(
            "fc.weight",
            Tensor::randn(&[3, 4 * 5 * 5], 0.0, 0.1, &mut rng),
        );
        let b = store.add("fc.bias", Tensor::randn(&[3], 0.0, 0.1, &mut rng));
        let x = Tensor::randn(&[6, 2, 5, 5], 0.0, 1.0, &mut rng);
        let tape = Tape::new(&store).capturing([conv, fc]);
        let xv = tape.var(x);
        let h = xv
            .conv2d(tape.param(cw), Some(tape.param(cb)), 1, 1, Some(conv))
            .tanh()
            .flatten();
        let out = h.linear(tape.param(w), Some(tape.param(b)), Some(fc));
        let loss = out.cross_entropy(&[0, 1, 2, 0, 1, 2]);
        let full = tape.backward(loss);
        let alone = tape.backward_captures(loss);
        for id in [cw, cb, w, b] {
            assert!(full.get(id).is_some());
            assert!(alone.get(id).is_none());
        }
        for layer in [conv, fc] {
            let (f, a) = (full.capture(layer).unwrap(), alone.capture(layer).unwrap());
            assert_eq!(f.a, a.a);
            assert_eq!(f.g, a.g);
        }
        assert_eq!(full.wrt(xv), alone.wrt(xv));
    }

    /// The true-Fisher pass seeded with a loss's input gradient sweeps with the bits of a
    /// backward from the recorded loss, for every loss kind.
    #[test]
    fn a_seeded_sweep_matches_the_recorded_loss_bit_for_bit() {
        use crate::{LossKind, Targets};
        let mut rng = Rng::new(5);
        let mut store = ParamStore::new();
        let fc = store.add_layer("fc");
        let w = store.add("fc.weight", Tensor::randn(&[3, 4], 0.0, 0.5, &mut rng));
        let b = store.add("fc.bias", Tensor::randn(&[3], 0.0, 0.1, &mut rng));
        let x = Tensor::randn(&[7, 4], 0.0, 1.0, &mut rng);
        let values = Tensor::randn(&[7, 3], 0.0, 1.0, &mut rng);
        let coins = Tensor::from_vec((0..21).map(|i| (i % 2) as f32).collect(), &[7, 3]);
        for (kind, targets) in [
            (
                LossKind::CrossEntropy,
                Targets::Classes(vec![0, 1, 2, 0, 1, 2, 0]),
            ),
            (LossKind::SquaredError, Targets::Values(values)),
            (LossKind::SigmoidBce, Targets::Values(coins)),
        ] {
            let tape = Tape::new(&store).capturing([fc]);
            let xv = tape.var(x.clone());
            let out = xv
                .tanh()
                .linear(tape.param(w), Some(tape.param(b)), Some(fc));
            let recorded = tape.backward_captures(kind.apply(out, &targets));
            let seed = kind.input_gradient(&out.value(), &targets);
            let seeded = tape.backward_captures_from(out, seed);
            let (r, s) = (recorded.capture(fc).unwrap(), seeded.capture(fc).unwrap());
            assert_eq!(r.g, s.g, "{kind:?}");
            assert_eq!(r.a, s.a, "{kind:?}");
            assert_eq!(recorded.wrt(xv), seeded.wrt(xv), "{kind:?}");
            assert!(seeded.get(w).is_none());
        }
    }

    /// A dense layer applied twice (weight tying): one capture with both uses, whose weight
    /// gradient is the shared weight's and whose factors sum (A) and average (G) over the uses,
    /// against the uses' own captures taken apart.
    #[test]
    fn a_reused_layer_captures_every_use() {
        let mut rng = Rng::new(8);
        let mut store = ParamStore::new();
        let fc = store.add_layer("fc");
        let w = store.add("fc.weight", Tensor::randn(&[3, 3], 0.0, 0.5, &mut rng));
        let b = store.add("fc.bias", Tensor::randn(&[3], 0.0, 0.1, &mut rng));
        let x = Tensor::randn(&[5, 3], 0.0, 1.0, &mut rng);
        let y = [0, 1, 2, 0, 1];
        let tape = Tape::new(&store).capturing([fc]);
        let (wv, bv) = (tape.param(w), tape.param(b));
        let h = tape.var(x.clone()).linear(wv, Some(bv), Some(fc)).tanh();
        let out = h.linear(wv, Some(bv), Some(fc));
        let grads = tape.backward(out.cross_entropy(&y));
        let cap = grads.capture(fc).unwrap();
        assert_eq!((cap.batch, cap.locations), (5, 2));
        // The weight gradient of the capture is the parameters' gradient (both uses).
        let gw = cap.weight_grad();
        let (tw, tb) = (grads.get(w).unwrap(), grads.get(b).unwrap());
        for o in 0..3 {
            for i in 0..3 {
                let (got, want) = (gw.data()[o * 4 + i], tw.data()[o * 3 + i]);
                assert!((got - want).abs() < 1e-6, "W[{o},{i}] {got} vs {want}");
            }
            let (got, want) = (gw.data()[o * 4 + 3], tb.data()[o]);
            assert!((got - want).abs() < 1e-6, "b[{o}] {got} vs {want}");
        }
        // Example-major rows: example n's first use (its input x_n), then its second.
        let hv = h.value();
        for n in 0..5 {
            assert_eq!(
                &cap.a.data()[(2 * n) * 3..(2 * n + 1) * 3],
                &x.data()[n * 3..(n + 1) * 3]
            );
            assert_eq!(
                &cap.a.data()[(2 * n + 1) * 3..(2 * n + 2) * 3],
                &hv.data()[n * 3..(n + 1) * 3]
            );
        }
        // Factors: A sums the uses' outer products over B, G averages over B * 2.
        let (a, g) = (cap.a_factor(), cap.g_factor());
        let mut bf_a = [0.0f64; 16];
        let mut bf_g = [0.0f64; 9];
        for r in 0..10 {
            let mut v: Vec<f64> = cap.a.data()[r * 3..(r + 1) * 3]
                .iter()
                .map(|&t| t as f64)
                .collect();
            v.push(1.0);
            let gr: Vec<f64> = cap.g.data()[r * 3..(r + 1) * 3]
                .iter()
                .map(|&t| t as f64)
                .collect();
            for i in 0..4 {
                for j in 0..4 {
                    bf_a[i * 4 + j] += v[i] * v[j] / 5.0;
                }
            }
            for i in 0..3 {
                for j in 0..3 {
                    bf_g[i * 3 + j] += gr[i] * gr[j] / 10.0;
                }
            }
        }
        for (k, (&got, want)) in a.data().iter().zip(&bf_a).enumerate() {
            assert!((got as f64 - want).abs() < 1e-5, "A[{k}] {got} vs {want}");
        }
        for (k, (&got, want)) in g.data().iter().zip(&bf_g).enumerate() {
            assert!((got as f64 - want).abs() < 1e-5, "G[{k}] {got} vs {want}");
        }
    }
}
