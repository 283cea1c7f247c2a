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
        for x in &mut c[..m * n] {
            *x *= beta;
        }
        return;
    }
    let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the asserts above bound every index the strides reach: a is m x k (or its
    // transpose) with at least m*k elements, b likewise k x n, and c is m x n row-major.
    unsafe {
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
