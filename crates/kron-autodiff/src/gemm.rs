//! Single-precision GEMM through matrixmultiply, with transposes expressed as strides.

/// `c = alpha * op(a) * op(b) + beta * c` for row-major `a` (`m x k`, or `k x m` stored when
/// `ta`), `b` (`k x n`, or `n x k` stored when `tb`) and `c` (`m x n`).
///
/// matrixmultiply splits the output among threads without splitting any dot product, so the
/// result has the same bits for any thread count.
#[allow(clippy::too_many_arguments)]
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
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty product: `c = beta c`, where `beta = 0` ignores what `c` held (as
        // matrixmultiply does), so an output taken from the buffer pool never shows through.
        if beta == 0.0 {
            c[..m * n].fill(0.0);
        } else {
            for x in &mut c[..m * n] {
                *x *= beta;
            }
        }
        return;
    }
    let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
    let swap = m < SPLIT_ROWS && n >= SPLIT_ROWS;
    // SAFETY: the asserts above bound every index the strides reach: a is m x k (or its
    // transpose) with at least m*k elements, b likewise k x n, and c is m x n row-major.
    unsafe { sgemm(swap, m, k, n, alpha, a, (rsa, csa), b, (rsb, csb), beta, c) }
}

/// Output rows from which matrixmultiply splits a product's rows among threads (1.5 times its
/// 64-row block); below, it splits only the columns.
const SPLIT_ROWS: usize = 96;

/// `c = alpha * A B + beta * c` with `A` (`m x k`) and `B` (`k x n`) given by strides and `c`
/// row-major. With `swap`, computes the transpose `c^T = B^T A^T` instead: a short, wide
/// product (a conv layer's weight gradient, `out_ch x patch_len`) then has rows enough for
/// matrixmultiply to split among threads (44 -> 35 ms for 32 x 32768 x 800 on 2 cores). Each
/// element is the same sequence of fused multiply-adds either way, so the bits do not change.
///
/// # Safety
/// The strides must keep every index within `a`, `b` and the first `m * n` elements of `c`.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm(
    swap: bool,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    (rsa, csa): (isize, isize),
    b: &[f32],
    (rsb, csb): (isize, isize),
    beta: f32,
    c: &mut [f32],
) {
    // SAFETY: the caller's contract; the swapped call reads the same elements through the
    // transposed strides and writes c's m x n elements as the n x m transpose.
    unsafe {
        if swap {
            matrixmultiply::sgemm(
                n,
                k,
                m,
                alpha,
                b.as_ptr(),
                csb,
                rsb,
                a.as_ptr(),
                csa,
                rsa,
                beta,
                c.as_mut_ptr(),
                1,
                n as isize,
            );
        } else {
            matrixmultiply::sgemm(
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
            );
        }
    }
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

    #[test]
    fn the_transposed_product_has_the_same_bits() {
        let mut rng = Rng::new(3);
        for &(m, k, n) in &[(32, 4096, 800), (7, 300, 130), (64, 257, 96), (100, 33, 5)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
                let c0: Vec<f32> = (0..m * n).map(|_| rng.normal()).collect();
                let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
                let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
                let run = |swap| {
                    let mut c = c0.clone();
                    // SAFETY: the strides describe a (m x k) and b (k x n) exactly.
                    unsafe {
                        sgemm(
                            swap,
                            m,
                            k,
                            n,
                            0.7,
                            &a,
                            (rsa, csa),
                            &b,
                            (rsb, csb),
                            0.5,
                            &mut c,
                        )
                    };
                    c
                };
                let (plain, swapped) = (run(false), run(true));
                assert!(
                    plain
                        .iter()
                        .zip(&swapped)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{m}x{k}x{n} ta {ta} tb {tb}"
                );
                // And both are the product.
                let at = |i: usize, p: usize| a[i * rsa as usize + p * csa as usize];
                let bt = |p: usize, j: usize| b[p * rsb as usize + j * csb as usize];
                let (i, j) = (m - 1, n / 2);
                let want: f64 = (0..k)
                    .map(|p| at(i, p) as f64 * bt(p, j) as f64)
                    .sum::<f64>()
                    * 0.7
                    + 0.5 * c0[i * n + j] as f64;
                assert!((plain[i * n + j] as f64 - want).abs() < 1e-3 * (1.0 + want.abs()));
            }
        }
    }
}
