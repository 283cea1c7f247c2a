//! GEMM through matrixmultiply's single-threaded kernels, with the output split among rayon's
//! threads and transposes expressed as strides.
//!
//! matrixmultiply can thread a product itself, but it packs each panel of the right operand on
//! one thread while the others wait, and joins its threads after every panel. Splitting the
//! output into one contiguous slab per rayon thread and running one whole product per slab
//! costs a second packing of the shared operand instead, which is cheaper on every shape we
//! measured (the autoencoder's 23 products: 218-227 against 225-238 ms on 2 cores; the conv
//! net's 11: 153-162 against 174-184 ms). It also leaves one pool of threads, rayon's, for
//! the whole library.
//!
//! # Why a split product has the bits of one whole call
//!
//! matrixmultiply cuts `c` into register tiles of `MR x NR` elements, counted from the first
//! row and column of the `c` it is given, and computes each element as one chain of fused
//! multiply-adds over `k` in the same order (in blocks of `KC`, the same for every element):
//! no dot product is split. The only thing that depends on *where* an element lies is how its
//! tile is finished. A full tile ends with `fma(alpha, ab, beta * c)` in registers; a partial
//! tile at the bottom or right edge is computed into a buffer and added as
//! `beta * c + alpha * ab`, two roundings. (With `beta = 0` and `k <= KC` the two agree; with
//! `beta != 0`, or past the first `KC` block where matrixmultiply accumulates with `beta = 1`,
//! they differ in the last bit.) So a slab boundary that cuts through a tile of the whole call
//! changes the bits of the elements around it.
//!
//! Every slab therefore starts at a multiple of [`SLAB_ALIGN`] = 16 along the side it is cut
//! on, and every slab but the last is a multiple of 16 long. Each kernel matrixmultiply 0.3
//! can select has `MR` and `NR` dividing 16 (`f32`: AVX-512 16x16, FMA+AVX2 8x8, AVX 8x8, NEON
//! 8x8, the portable fallback 8x4; `f64`: AVX-512 8x8, FMA+AVX2 and AVX 8x4, NEON 8x4, the
//! fallback 4x4), and its cache blocks (`MC` = 64 rows, `NC` = 1024 columns) are multiples of
//! 16 too. Then every element of a slab lies at the same place in a tile of the same shape as
//! in the whole call, is finished the same way, and has the same bits, whatever the number of
//! threads and whichever kernel the CPU selects. The 8-row alignment used before matched the
//! 8x8 kernels only, and split products differed from one whole call on AVX-512 CPUs.
//!
//! The tests prove this on the CPU at hand for the kernel it selects (printed by
//! [`kernel_name`]); `.ci/gemm-kernels` runs them again with each other kernel the CPU can
//! run, through matrixmultiply's build-time `MMTEST_FEATURE` switch.

use rayon::prelude::*;

/// An element type the GEMMs multiply: `f32` or `f64`.
pub trait GemmScalar: raw::Kernel + Copy + Send + Sync + 'static {}

impl GemmScalar for f32 {}
impl GemmScalar for f64 {}

mod raw {
    /// matrixmultiply's routine for one element type (sealed: only `f32` and `f64`).
    pub trait Kernel: Sized {
        /// `c = alpha a b + beta c` over raw strided pointers.
        ///
        /// # Safety
        /// The strides must keep every index within the buffers behind the pointers, and no
        /// other thread may touch the elements of `c` it writes.
        #[allow(clippy::too_many_arguments)]
        unsafe fn gemm(
            m: usize,
            k: usize,
            n: usize,
            alpha: Self,
            a: *const Self,
            rsa: isize,
            csa: isize,
            b: *const Self,
            rsb: isize,
            csb: isize,
            beta: Self,
            c: *mut Self,
            rsc: isize,
            csc: isize,
        );
    }

    impl Kernel for f32 {
        unsafe fn gemm(
            m: usize,
            k: usize,
            n: usize,
            alpha: f32,
            a: *const f32,
            rsa: isize,
            csa: isize,
            b: *const f32,
            rsb: isize,
            csb: isize,
            beta: f32,
            c: *mut f32,
            rsc: isize,
            csc: isize,
        ) {
            // SAFETY: the caller's contract.
            unsafe {
                matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
            }
        }
    }

    impl Kernel for f64 {
        unsafe fn gemm(
            m: usize,
            k: usize,
            n: usize,
            alpha: f64,
            a: *const f64,
            rsa: isize,
            csa: isize,
            b: *const f64,
            rsb: isize,
            csb: isize,
            beta: f64,
            c: *mut f64,
            rsc: isize,
            csc: isize,
        ) {
            // SAFETY: the caller's contract.
            unsafe {
                matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
            }
        }
    }
}

/// Panics, naming `what`, if a `rows x cols` matrix with these strides reaches past `len`
/// elements.
#[track_caller]
fn check_fits(what: &str, len: usize, rows: usize, cols: usize, rs: usize, cs: usize) {
    assert!(
        rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < len,
        "{what}: {rows}x{cols} with strides ({rs}, {cs}) reaches past a slice of {len}"
    );
}

/// A read-only matrix in a slice: element `(i, j)` at `data[i * row_stride + j * col_stride]`.
/// A transpose is the same slice with the strides swapped.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A `rows x cols` view of `data` with the given strides.
    ///
    /// # Panics
    /// If an element lies outside `data`.
    #[track_caller]
    pub fn new(
        data: &'a [T],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        check_fits("MatRef", data.len(), rows, cols, row_stride, col_stride);
        MatRef {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// The row-major `rows x cols` matrix in `data`.
    #[track_caller]
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The `rows x cols` matrix `op(M)` of a row-major `M` in `data`: `M` itself, or, when
    /// `transposed`, the transpose of the `cols x rows` matrix stored there.
    #[track_caller]
    pub fn row_major_op(data: &'a [T], rows: usize, cols: usize, transposed: bool) -> Self {
        if transposed {
            Self::row_major(data, cols, rows).t()
        } else {
            Self::row_major(data, rows, cols)
        }
    }

    /// The transpose: the same elements with rows and columns swapped.
    pub fn t(self) -> Self {
        MatRef {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// A writable matrix in a slice: element `(i, j)` at `data[i * row_stride + j * col_stride]`,
/// each element at its own place.
#[derive(Debug)]
pub struct MatMut<'a, T> {
    data: &'a mut [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> MatMut<'a, T> {
    /// A `rows x cols` view of `data` with the given strides.
    ///
    /// # Panics
    /// If an element lies outside `data`, or two elements share a place (the strides must lay
    /// the rows out one after another, or the columns).
    #[track_caller]
    pub fn new(
        data: &'a mut [T],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        let empty = rows == 0 || cols == 0;
        check_fits("MatMut", data.len(), rows, cols, row_stride, col_stride);
        let rows_apart = col_stride >= 1 && (rows <= 1 || row_stride >= cols * col_stride);
        let cols_apart = row_stride >= 1 && (cols <= 1 || col_stride >= rows * row_stride);
        assert!(
            empty || rows_apart || cols_apart,
            "MatMut: {rows}x{cols} with strides ({row_stride}, {col_stride}) puts two elements \
             in one place"
        );
        MatMut {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// The row-major `rows x cols` matrix in `data`.
    #[track_caller]
    pub fn row_major(data: &'a mut [T], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }
}

/// Products below this many floating-point operations run on the calling thread: splitting
/// them would cost more in hand-offs than it saves.
const SPLIT_FLOPS: usize = 1 << 21;

/// Slabs start at multiples of this many rows (or columns), and every slab but the last is a
/// multiple of it long: a multiple of every register tile's height and width among the
/// kernels matrixmultiply can select, so that no slab boundary cuts a tile of the whole call
/// (see the module docs for why that keeps the bits).
const SLAB_ALIGN: usize = 16;

/// The kernels matrixmultiply selects on this CPU, with their register tiles, for example
/// `"avx512f (f32 16x16, f64 8x8)"` or `"fma+avx2 (f32 8x8, f64 8x4)"`.
///
/// matrixmultiply does not report its choice; this follows its detection order (0.3.11:
/// AVX-512F, then FMA with AVX2, then AVX, then NEON on aarch64, else the portable fallback),
/// including its build-time `MMTEST_FEATURE` restriction, which the same build environment
/// passes to this crate. The AVX-512 kernel exists only on rustc 1.89 or newer, the
/// workspace's minimum.
pub fn kernel_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        let allowed = |f: &str| match option_env!("MMTEST_FEATURE") {
            None | Some("") => true,
            Some(list) => list.split(',').any(|x| x == f),
        };
        // Detected and allowed, as matrixmultiply's own detection asks.
        macro_rules! has {
            ($f:tt) => {
                allowed($f) && std::arch::is_x86_feature_detected!($f)
            };
        }
        if has!("avx512f") {
            "avx512f (f32 16x16, f64 8x8)"
        } else if has!("fma") && has!("avx2") {
            "fma+avx2 (f32 8x8, f64 8x4)"
        } else if has!("avx") {
            "avx (f32 8x8, f64 8x4)"
        } else {
            "fallback (f32 8x4, f64 4x4)"
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        "neon (f32 8x8, f64 8x4)"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "fallback (f32 8x4, f64 4x4)"
    }
}

/// `c = alpha a b + beta c` for any strided `a` (`m x k`), `b` (`k x n`) and `c` (`m x n`),
/// with `f32` or `f64` elements. Where `beta` is zero, what `c` held is ignored (NaN included).
/// Large products split `c` along its longer side among rayon's threads.
///
/// # Panics
/// If the shapes do not chain.
#[track_caller]
pub fn gemm_strided<T: GemmScalar>(
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    beta: T,
    c: MatMut<'_, T>,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k && c.rows == m && c.cols == n,
        "gemm: ({m}x{k}) * ({}x{n}) into {}x{}",
        b.rows,
        c.rows,
        c.cols
    );
    if m == 0 || n == 0 {
        return;
    }
    // Pointers cross to the worker threads as addresses; each slab writes its own elements.
    let (ap, bp, cp) = (
        a.data.as_ptr() as usize,
        b.data.as_ptr() as usize,
        c.data.as_mut_ptr() as usize,
    );
    let slab = move |i0: usize, rows: usize, j0: usize, cols: usize| {
        let (ap, bp, cp) = (ap as *const T, bp as *const T, cp as *mut T);
        // SAFETY: a, b and c were bounds-checked whole by their constructors and the slab
        // (i0..i0+rows, j0..j0+cols) lies within c, so every index lies within them; the slabs
        // are disjoint and c's elements have distinct places (MatMut::new), so no two threads
        // write one element, and nothing else holds c while this call borrows it mutably.
        unsafe {
            T::gemm(
                rows,
                k,
                cols,
                alpha,
                ap.add(i0 * a.row_stride),
                a.row_stride as isize,
                a.col_stride as isize,
                bp.add(j0 * b.col_stride),
                b.row_stride as isize,
                b.col_stride as isize,
                beta,
                cp.add(i0 * c.row_stride + j0 * c.col_stride),
                c.row_stride as isize,
                c.col_stride as isize,
            )
        }
    };
    let threads = rayon::current_num_threads();
    let long = m.max(n);
    if threads == 1 || 2 * m * n * k < SPLIT_FLOPS || long < 2 * SLAB_ALIGN {
        return slab(0, m, 0, n);
    }
    let step = long.div_ceil(threads).div_ceil(SLAB_ALIGN) * SLAB_ALIGN;
    (0..long.div_ceil(step)).into_par_iter().for_each(|s| {
        let (start, len) = (s * step, step.min(long - s * step));
        if m >= n {
            slab(start, len, 0, n)
        } else {
            slab(0, m, start, len)
        }
    });
}

/// `c = alpha * op(a) * op(b) + beta * c` for row-major `a` (`m x k`, or `k x m` stored when
/// `ta`), `b` (`k x n`, or `n x k` stored when `tb`) and `c` (`m x n`): [`gemm_strided`] on
/// row-major `f32` matrices.
#[allow(clippy::too_many_arguments)]
#[track_caller]
pub fn gemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    ta: bool,
    b: &[f32],
    tb: bool,
    beta: f32,
    c: &mut [f32],
) {
    assert!(a.len() >= m * k, "gemm: lhs holds {} < {m}x{k}", a.len());
    assert!(b.len() >= k * n, "gemm: rhs holds {} < {k}x{n}", b.len());
    assert!(c.len() >= m * n, "gemm: out holds {} < {m}x{n}", c.len());
    let a = MatRef::row_major_op(a, m, k, ta);
    let b = MatRef::row_major_op(b, k, n, tb);
    gemm_strided(alpha, a, b, beta, MatMut::row_major(c, m, n));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;

    #[test]
    fn an_empty_product_ignores_the_old_output_when_beta_is_zero() {
        let mut c = vec![f32::NAN; 6];
        gemm(2, 0, 3, 1.0, &[], false, &[], false, 0.0, &mut c);
        assert_eq!(c, vec![0.0; 6]);
        let mut c = vec![2.0; 6];
        gemm(2, 0, 3, 1.0, &[], false, &[], false, 0.5, &mut c);
        assert_eq!(c, vec![1.0; 6]);
    }

    /// One whole product on the calling thread, straight through matrixmultiply.
    fn whole<T: GemmScalar>(
        (m, k, n): (usize, usize, usize),
        alpha: T,
        (a, ta): (&[T], bool),
        (b, tb): (&[T], bool),
        beta: T,
        c: &mut [T],
    ) {
        let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
        let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
        // SAFETY: the strides describe a (m x k), b (k x n) and c (m x n) exactly.
        unsafe {
            T::gemm(
                m,
                k,
                n,
                alpha,
                a.as_ptr(),
                rsa,
                csa,
                b.as_ptr(),
                rsb,
                csb,
                beta,
                c.as_mut_ptr(),
                n as isize,
                1,
            )
        };
    }

    /// Shapes that split by rows or by columns, into slabs whose 8-aligned edges would cut the
    /// 16-wide tiles of the AVX-512 kernel (203 rows on 3 threads, 300 columns on 2), with `k`
    /// past matrixmultiply's 256-deep blocks (where it accumulates with `beta = 1`), with
    /// partial last slabs, or too small to split.
    const SHAPES: [(usize, usize, usize); 7] = [
        (32, 4096, 800),
        (7, 300, 130),
        (203, 257, 96),
        (100, 33, 5),
        (1000, 70, 999),
        (40, 520, 300),
        (333, 300, 47),
    ];

    /// The same bits as one whole call, on 2, 3 and 4 threads, through every transpose, for
    /// `T`, with `beta` zero and not.
    fn split_equals_whole<T: GemmScalar + PartialEq + std::fmt::Debug>(from: fn(f32) -> T) {
        let mut rng = Rng::new(3);
        let pools: Vec<_> = [2, 3, 4]
            .map(|t| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .unwrap()
            })
            .into();
        for &(m, k, n) in &SHAPES {
            let a: Vec<T> = (0..m * k).map(|_| from(rng.normal())).collect();
            let b: Vec<T> = (0..k * n).map(|_| from(rng.normal())).collect();
            let c0: Vec<T> = (0..m * n).map(|_| from(rng.normal())).collect();
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                for beta in [from(0.5), from(0.0)] {
                    let mut want = c0.clone();
                    whole((m, k, n), from(0.7), (&a, ta), (&b, tb), beta, &mut want);
                    for pool in &pools {
                        let mut split = c0.clone();
                        let (am, bm) = (
                            MatRef::row_major_op(&a, m, k, ta),
                            MatRef::row_major_op(&b, k, n, tb),
                        );
                        let cm = MatMut::row_major(&mut split, m, n);
                        pool.install(|| gemm_strided(from(0.7), am, bm, beta, cm));
                        let bad = split.iter().zip(&want).position(|(x, y)| x != y);
                        assert!(
                            bad.is_none(),
                            "{m}x{k}x{n} ta {ta} tb {tb} beta {beta:?} on {} threads with the \
                             {} kernel: element {:?} differs from one whole call",
                            pool.current_num_threads(),
                            kernel_name(),
                            bad.map(|e| (e / n, e % n)),
                        );
                    }
                }
            }
        }
    }

    /// Split `f32` products have the bits of one whole call on this CPU's kernel.
    #[test]
    fn split_products_have_the_bits_of_one_whole_call_f32() {
        println!("matrixmultiply kernel: {}", kernel_name());
        split_equals_whole::<f32>(|x| x);
    }

    /// Split `f64` products have the bits of one whole call on this CPU's kernel.
    #[test]
    fn split_products_have_the_bits_of_one_whole_call_f64() {
        println!("matrixmultiply kernel: {}", kernel_name());
        split_equals_whole::<f64>(f64::from);
    }

    /// Every element of `alpha op(a) op(b) + beta c` against an f64 sum, through every
    /// transpose, split on 3 threads.
    #[test]
    fn split_products_are_the_product() {
        let mut rng = Rng::new(4);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for &(m, k, n) in &SHAPES {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
                let c0: Vec<f32> = (0..m * n).map(|_| rng.normal()).collect();
                let mut split = c0.clone();
                pool.install(|| gemm(m, k, n, 0.7, &a, ta, &b, tb, 0.5, &mut split));
                let (rsa, csa) = if ta { (1, m) } else { (k, 1) };
                let (rsb, csb) = if tb { (1, k) } else { (n, 1) };
                let at = |i: usize, p: usize| a[i * rsa + p * csa];
                let bt = |p: usize, j: usize| b[p * rsb + j * csb];
                // Every element of the small products, every 7th of the large ones.
                let every = if m * k * n > 10_000_000 { 7 } else { 1 };
                for e in (0..m * n).step_by(every) {
                    let (i, j) = (e / n, e % n);
                    let want: f64 = (0..k)
                        .map(|p| at(i, p) as f64 * bt(p, j) as f64)
                        .sum::<f64>()
                        * 0.7
                        + 0.5 * c0[i * n + j] as f64;
                    let scale: f64 = (0..k)
                        .map(|p| (at(i, p) as f64 * bt(p, j) as f64).abs())
                        .sum();
                    let got = split[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + scale),
                        "{m}x{k}x{n} ta {ta} tb {tb} at ({i}, {j}): {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn strided_f64_products_write_only_their_block() {
        // A 3x4 product into the block at (1, 2) of a 6x8 matrix, read through transposes.
        let a: Vec<f64> = (0..15).map(|x| x as f64 * 0.5 - 2.0).collect(); // 5x3 stored, used as 3x5
        let b: Vec<f64> = (0..20).map(|x| 1.0 - x as f64 * 0.25).collect(); // 5x4
        let mut c = vec![9.0; 48];
        let block = &mut c[8 + 2..];
        gemm_strided(
            2.0,
            MatRef::row_major(&a, 5, 3).t(),
            MatRef::row_major(&b, 5, 4),
            0.0,
            MatMut::new(block, 3, 4, 8, 1),
        );
        for r in 0..6 {
            for col in 0..8 {
                let got = c[r * 8 + col];
                if (1..4).contains(&r) && (2..6).contains(&col) {
                    let (i, j) = (r - 1, col - 2);
                    let want: f64 = 2.0 * (0..5).map(|p| a[p * 3 + i] * b[p * 4 + j]).sum::<f64>();
                    assert_eq!(got, want, "({r}, {col})");
                } else {
                    assert_eq!(got, 9.0, "({r}, {col}) lies outside the block");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "gemm: (2x3) * (4x5) into 2x5")]
    fn shapes_that_do_not_chain_panic_naming_them() {
        let (a, b, mut c) = (vec![0.0f32; 6], vec![0.0f32; 20], vec![0.0f32; 10]);
        gemm_strided(
            1.0,
            MatRef::row_major(&a, 2, 3),
            MatRef::row_major(&b, 4, 5),
            0.0,
            MatMut::row_major(&mut c, 2, 5),
        );
    }

    #[test]
    #[should_panic(expected = "puts two elements in one place")]
    fn an_output_whose_elements_overlap_is_refused() {
        let mut c = vec![0.0f32; 10];
        let _ = MatMut::new(&mut c, 3, 3, 2, 1);
    }
}
