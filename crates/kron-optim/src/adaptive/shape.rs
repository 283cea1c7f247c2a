//! How a parameter's shape becomes the blocks its Kronecker-factored preconditioner works on:
//! the order it is read as, small dimensions merged, large ones split into blocks (Google's
//! `_merge_small_dims` and `BlockPartitioner`, Meta's `max_preconditioner_dim`).

use serde::{Deserialize, Serialize};

/// How a parameter of order 3 or more (a conv weight `out x in x kh x kw`) is read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TensorLayout {
    /// As the matrix `shape[0] x (product of the rest)`: a conv weight is `out x (in kh kw)`,
    /// the layout KFC and kron's conv layers use (default).
    #[default]
    Matrix,
    /// As a tensor with one statistic per axis, consecutive axes merged while their product
    /// stays within the block size (never below two axes).
    Tensor,
}

/// Blocking and shape handling of a Kronecker-factored adaptive method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockingConfig {
    /// The largest preconditioner dimension: longer axes are split into blocks of this size
    /// (the last one smaller), each block with its own statistics (default 1024, Meta's
    /// `max_preconditioner_dim`).
    pub max_dim: usize,
    /// How parameters of order 3 or more are read (default [`TensorLayout::Matrix`]).
    pub layout: TensorLayout,
    /// Parameters with an axis longer than this (after the layout) take the grafted diagonal
    /// rule instead of being blocked (default none: every axis is blocked; optax's
    /// `skip_preconditioning_dim_size_gt`).
    pub skip_above: Option<usize>,
}

impl BlockingConfig {
    /// The defaults as a constant.
    pub const DEFAULT: BlockingConfig = BlockingConfig {
        max_dim: 1024,
        layout: TensorLayout::Matrix,
        skip_above: None,
    };

    /// With a block size.
    pub const fn with_max_dim(mut self, max_dim: usize) -> Self {
        self.max_dim = max_dim;
        self
    }

    /// With a tensor layout.
    pub const fn with_layout(mut self, layout: TensorLayout) -> Self {
        self.layout = layout;
        self
    }

    /// With a size past which parameters take the diagonal rule.
    pub const fn with_skip_above(mut self, skip_above: Option<usize>) -> Self {
        self.skip_above = skip_above;
        self
    }
}

impl Default for BlockingConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// One block of a parameter: for each axis of the interpreted shape, the start and length of
/// its range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BlockSpec {
    pub(crate) ranges: Vec<(usize, usize)>,
}

impl BlockSpec {
    /// The block's dimensions.
    pub(crate) fn dims(&self) -> Vec<usize> {
        self.ranges.iter().map(|r| r.1).collect()
    }

    /// Its element count.
    pub(crate) fn len(&self) -> usize {
        self.ranges.iter().map(|r| r.1).product()
    }
}

/// What a parameter's preconditioner works on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// The grafted diagonal rule alone (order 0 or 1, or an axis past the skip size).
    Diagonal,
    /// The interpreted shape and its blocks, in row-major block order.
    Factored {
        dims: Vec<usize>,
        blocks: Vec<BlockSpec>,
    },
}

/// Merges consecutive axes while their product stays within `max_dim`; a result of one axis
/// (everything fits) is split again into the two most balanced groups of the original axes.
pub(crate) fn merge_small_dims(shape: &[usize], max_dim: usize) -> Vec<usize> {
    let shape: Vec<usize> = shape.to_vec();
    let mut out: Vec<usize> = Vec::new();
    for &d in &shape {
        match out.last_mut() {
            Some(last) if last.saturating_mul(d) <= max_dim => *last *= d,
            _ => out.push(d),
        }
    }
    if out.len() < 2 && shape.len() >= 2 {
        let total: usize = shape.iter().product();
        let mut best = (usize::MAX, 1usize);
        let mut left = 1usize;
        for (k, &d) in shape.iter().enumerate().take(shape.len() - 1) {
            left *= d;
            let right = total / left.max(1);
            let worst = left.max(right);
            if worst < best.0 {
                best = (worst, k + 1);
            }
        }
        let left: usize = shape[..best.1].iter().product();
        out = vec![left, shape[best.1..].iter().product()];
    }
    out
}

/// The plan for a parameter of `shape`.
pub(crate) fn plan(shape: &[usize], cfg: &BlockingConfig) -> Plan {
    if shape.len() < 2 {
        return Plan::Diagonal;
    }
    let dims: Vec<usize> = match cfg.layout {
        TensorLayout::Matrix => vec![shape[0], shape[1..].iter().product()],
        TensorLayout::Tensor if shape.len() == 2 => shape.to_vec(),
        TensorLayout::Tensor => merge_small_dims(shape, cfg.max_dim),
    };
    if dims.contains(&0) || cfg.skip_above.is_some_and(|s| dims.iter().any(|&d| d > s)) {
        return Plan::Diagonal;
    }
    let max = cfg.max_dim.max(1);
    let per_axis: Vec<Vec<(usize, usize)>> = dims
        .iter()
        .map(|&d| (0..d).step_by(max).map(|s| (s, max.min(d - s))).collect())
        .collect();
    let mut blocks = vec![BlockSpec { ranges: vec![] }];
    for axis in &per_axis {
        blocks = blocks
            .into_iter()
            .flat_map(|b| {
                axis.iter().map(move |&r| {
                    let mut ranges = b.ranges.clone();
                    ranges.push(r);
                    BlockSpec { ranges }
                })
            })
            .collect();
    }
    Plan::Factored { dims, blocks }
}

/// Row-major strides of `dims`.
fn strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// Calls `f(offset_in_full, offset_in_block, run)` for each contiguous run of the block (its
/// last axis), in row-major order.
fn for_runs(dims: &[usize], block: &BlockSpec, mut f: impl FnMut(usize, usize, usize)) {
    let k = dims.len();
    let st = strides(dims);
    let bd = block.dims();
    let run = bd[k - 1];
    let outer: usize = bd[..k - 1].iter().product();
    let mut idx = vec![0usize; k - 1];
    for o in 0..outer {
        let mut off = block.ranges[k - 1].0;
        for a in 0..k - 1 {
            off += (block.ranges[a].0 + idx[a]) * st[a];
        }
        f(off, o * run, run);
        for a in (0..k - 1).rev() {
            idx[a] += 1;
            if idx[a] < bd[a] {
                break;
            }
            idx[a] = 0;
        }
    }
}

/// The block's elements of a row-major tensor of `dims`, row-major.
pub(crate) fn gather(full: &[f32], dims: &[usize], block: &BlockSpec) -> Vec<f32> {
    let mut out = vec![0.0f32; block.len()];
    for_runs(dims, block, |src, dst, n| {
        out[dst..dst + n].copy_from_slice(&full[src..src + n])
    });
    out
}

/// Writes a block's elements back into a row-major tensor of `dims`.
pub(crate) fn scatter(full: &mut [f32], dims: &[usize], block: &BlockSpec, part: &[f32]) {
    for_runs(dims, block, |dst, src, n| {
        full[dst..dst + n].copy_from_slice(&part[src..src + n])
    });
}

/// The gather index of the mode-`axis` unfolding of a row-major tensor of `dims`: element `i`
/// of the `dims[axis] x rest` unfolding (columns over the other axes in row-major order) is
/// element `index[i]` of the tensor.
pub(crate) fn unfold_index(dims: &[usize], axis: usize) -> Vec<usize> {
    let pre: usize = dims[..axis].iter().product();
    let d = dims[axis];
    let post: usize = dims[axis + 1..].iter().product();
    let mut index = Vec::with_capacity(pre * d * post);
    for i in 0..d {
        for p in 0..pre {
            index.extend((0..post).map(|q| (p * d + i) * post + q));
        }
    }
    index
}

/// The gather index of the inverse of the unfolding: element `j` of the tensor is element
/// `index[j]` of its mode-`axis` unfolding.
pub(crate) fn fold_index(dims: &[usize], axis: usize) -> Vec<usize> {
    let u = unfold_index(dims, axis);
    let mut index = vec![0usize; u.len()];
    for (i, &j) in u.iter().enumerate() {
        index[j] = i;
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_dims_merge_as_the_reference_does() {
        assert_eq!(
            merge_small_dims(&[1, 2, 512, 1, 2048, 1, 3, 4], 1024),
            vec![1024, 2048, 12]
        );
        // Everything fits: never below two axes, split where most balanced.
        assert_eq!(merge_small_dims(&[4, 3, 3, 3], 1024), vec![12, 9]);
        assert_eq!(merge_small_dims(&[16, 3, 3, 3], 1024), vec![16, 27]);
    }

    #[test]
    fn plans_split_long_axes_and_send_vectors_to_the_diagonal_rule() {
        let cfg = BlockingConfig::DEFAULT.with_max_dim(4);
        assert_eq!(plan(&[7], &cfg), Plan::Diagonal);
        let Plan::Factored { dims, blocks } = plan(&[5, 6], &cfg) else {
            panic!("a matrix is factored")
        };
        assert_eq!(dims, vec![5, 6]);
        let got: Vec<Vec<(usize, usize)>> = blocks.iter().map(|b| b.ranges.clone()).collect();
        assert_eq!(
            got,
            vec![
                vec![(0, 4), (0, 4)],
                vec![(0, 4), (4, 2)],
                vec![(4, 1), (0, 4)],
                vec![(4, 1), (4, 2)]
            ]
        );
        // A conv weight as a matrix by default.
        let Plan::Factored { dims, .. } = plan(&[8, 3, 3, 3], &BlockingConfig::DEFAULT) else {
            panic!()
        };
        assert_eq!(dims, vec![8, 27]);
        let skip = BlockingConfig::DEFAULT.with_skip_above(Some(20));
        assert_eq!(plan(&[8, 3, 3, 3], &skip), Plan::Diagonal);
    }

    #[test]
    fn gather_scatter_and_unfoldings_round_trip() {
        let dims = [3, 4, 5];
        let t: Vec<f32> = (0..60).map(|x| x as f32).collect();
        let b = BlockSpec {
            ranges: vec![(1, 2), (2, 2), (0, 3)],
        };
        let g = gather(&t, &dims, &b);
        assert_eq!(
            g,
            vec![30., 31., 32., 35., 36., 37., 50., 51., 52., 55., 56., 57.]
        );
        let mut back = vec![0.0; 60];
        scatter(&mut back, &dims, &b, &g);
        assert_eq!(back[30], 30.0);
        assert_eq!(back[57], 57.0);
        assert_eq!(back[33], 0.0);
        let take = |x: &[f32], idx: &[usize]| -> Vec<f32> { idx.iter().map(|&i| x[i]).collect() };
        for axis in 0..3 {
            let u = take(&t, &unfold_index(&dims, axis));
            assert_eq!(take(&u, &fold_index(&dims, axis)), t);
        }
        // Axis 1's unfolding: row j holds the elements with index j on axis 1.
        let u = take(&t, &unfold_index(&dims, 1));
        assert_eq!(&u[0..10], &[0., 1., 2., 3., 4., 20., 21., 22., 23., 24.]);
    }
}
