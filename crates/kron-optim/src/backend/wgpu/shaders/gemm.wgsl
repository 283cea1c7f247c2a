// Tiled GEMM: out = alpha * op(A) op(B) + beta * C + diag * I.
//
// op(A) is m x k, op(B) is k x n, out is m x n, all row-major. `ta`/`tb` say whether the stored
// matrix is transposed. A stored matrix may carry a virtual column of ones after its last stored
// column (`aug` bit 0 for A, bit 1 for B): the homogeneous coordinate of a Kronecker factor,
// never materialized. Each workgroup computes a 64 x 64 tile of `out` with 16 x 16 threads (4 x 4
// outputs each), staging 16-deep slices of op(A) and op(B) in workgroup memory. Every output sums
// its k products in ascending order, so results do not depend on the tiling or the hardware's
// scheduling.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    ta: u32,
    tb: u32,
    a_cols: u32,
    b_cols: u32,
    aug: u32,
    alpha: f32,
    beta: f32,
    diag: f32,
    use_c: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> c: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;

// as_t[kk * TM + i] = op(A)[row0 + i, k0 + kk]; bs[kk * TN + j] = op(B)[k0 + kk, col0 + j].
var<workgroup> as_t: array<f32, 1024>;
var<workgroup> bs: array<f32, 1024>;

// Element (r, col) of stored A, with the virtual ones column.
fn load_a(r: u32, col: u32) -> f32 {
    if ((p.aug & 1u) != 0u && col == p.a_cols) {
        return 1.0;
    }
    return a[r * p.a_cols + col];
}

fn load_b(r: u32, col: u32) -> f32 {
    if ((p.aug & 2u) != 0u && col == p.b_cols) {
        return 1.0;
    }
    return b[r * p.b_cols + col];
}

// op(A)[i, kk], zero outside.
fn op_a(i: u32, kk: u32) -> f32 {
    if (i >= p.m || kk >= p.k) {
        return 0.0;
    }
    if (p.ta == 0u) {
        return load_a(i, kk);
    }
    return load_a(kk, i);
}

// op(B)[kk, j], zero outside.
fn op_b(kk: u32, j: u32) -> f32 {
    if (kk >= p.k || j >= p.n) {
        return 0.0;
    }
    if (p.tb == 0u) {
        return load_b(kk, j);
    }
    return load_b(j, kk);
}

@compute @workgroup_size(16, 16, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let tx = lid.x;
    let ty = lid.y;
    let t = ty * 16u + tx;
    let row0 = wg.y * TM;
    let col0 = wg.x * TN;

    var acc: array<f32, 16>;
    for (var e = 0u; e < 16u; e++) {
        acc[e] = 0.0;
    }

    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        // Each thread stages 4 elements of each tile; consecutive threads read consecutive
        // addresses of the stored matrix.
        for (var e = 0u; e < 4u; e++) {
            let idx = t + e * 256u;
            var i: u32;
            var kk: u32;
            if (p.ta == 0u) {
                kk = idx % TK;
                i = idx / TK;
            } else {
                i = idx % TM;
                kk = idx / TM;
            }
            as_t[kk * TM + i] = op_a(row0 + i, k0 + kk);
            var j: u32;
            var kb: u32;
            if (p.tb == 0u) {
                j = idx % TN;
                kb = idx / TN;
            } else {
                kb = idx % TK;
                j = idx / TK;
            }
            bs[kb * TN + j] = op_b(k0 + kb, col0 + j);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let a0 = as_t[kk * TM + ty];
            let a1 = as_t[kk * TM + ty + 16u];
            let a2 = as_t[kk * TM + ty + 32u];
            let a3 = as_t[kk * TM + ty + 48u];
            let b0 = bs[kk * TN + tx];
            let b1 = bs[kk * TN + tx + 16u];
            let b2 = bs[kk * TN + tx + 32u];
            let b3 = bs[kk * TN + tx + 48u];
            acc[0] = fma(a0, b0, acc[0]);
            acc[1] = fma(a0, b1, acc[1]);
            acc[2] = fma(a0, b2, acc[2]);
            acc[3] = fma(a0, b3, acc[3]);
            acc[4] = fma(a1, b0, acc[4]);
            acc[5] = fma(a1, b1, acc[5]);
            acc[6] = fma(a1, b2, acc[6]);
            acc[7] = fma(a1, b3, acc[7]);
            acc[8] = fma(a2, b0, acc[8]);
            acc[9] = fma(a2, b1, acc[9]);
            acc[10] = fma(a2, b2, acc[10]);
            acc[11] = fma(a2, b3, acc[11]);
            acc[12] = fma(a3, b0, acc[12]);
            acc[13] = fma(a3, b1, acc[13]);
            acc[14] = fma(a3, b2, acc[14]);
            acc[15] = fma(a3, b3, acc[15]);
        }
        workgroupBarrier();
    }

    for (var r = 0u; r < 4u; r++) {
        let i = row0 + ty + 16u * r;
        if (i >= p.m) {
            continue;
        }
        for (var s = 0u; s < 4u; s++) {
            let j = col0 + tx + 16u * s;
            if (j >= p.n) {
                continue;
            }
            let o = i * p.n + j;
            var v = p.alpha * acc[r * 4u + s];
            if (p.use_c != 0u) {
                v = v + p.beta * c[o];
            }
            if (i == j) {
                v = v + p.diag;
            }
            out[o] = v;
        }
    }
}
