// Deterministic reductions in two passes of this one kernel. Pass 1 runs `groups` workgroups;
// thread t of workgroup g folds elements g * 256 + t, then every (groups * 256)-th one after it,
// in ascending order (sums compensated, Kahan), and the workgroup combines its 256 values in a
// fixed tree into partial[g]. Pass 2 runs one workgroup over the partials the same way. The
// order depends only on the element count, never on scheduling, so results repeat to the bit.
//
// Element e of the reduction reads x[e * stride] (and y[e * stride]), mapped by `mode`:
//   0: x * y                  (sums: Frobenius inner product)
//   1: |x - I| (diagonal of a `cols`-wide matrix when cols > 0), non-finite -> 3e38 (max)
//   2: 1 when x is NaN or infinite, else 0 (sums: a count)
//   3: x                      (sums: trace with stride cols + 1, or the partials of pass 1)
// `op` is 0 for a sum, 1 for a maximum. Workgroup g writes out[offset + g], so the second passes
// of many reductions can fill one buffer that is read back at once.

struct Params {
    len: u32,
    stride: u32,
    mode: u32,
    op: u32,
    cols: u32,
    offset: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

var<workgroup> scratch: array<f32, 256>;

fn non_finite(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7f800000u) == 0x7f800000u;
}

fn value(e: u32) -> f32 {
    let at = e * p.stride;
    switch p.mode {
        case 0u: {
            return x[at] * y[at];
        }
        case 1u: {
            var v = x[at];
            if (non_finite(v)) {
                return 3.0e38;
            }
            if (p.cols > 0u && at / p.cols == at % p.cols) {
                v = v - 1.0;
            }
            return abs(v);
        }
        case 2u: {
            return select(0.0, 1.0, non_finite(x[at]));
        }
        default: {
            return x[at];
        }
    }
}

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let step = nwg.x * 256u;
    var acc = 0.0;
    var comp = 0.0;
    for (var e = wg.x * 256u + li; e < p.len; e += step) {
        let v = value(e);
        if (p.op == 1u) {
            acc = max(acc, v);
        } else {
            let yk = v - comp;
            let t = acc + yk;
            comp = (t - acc) - yk;
            acc = t;
        }
    }
    scratch[li] = acc;
    workgroupBarrier();
    for (var half = 128u; half > 0u; half = half / 2u) {
        if (li < half) {
            if (p.op == 1u) {
                scratch[li] = max(scratch[li], scratch[li + half]);
            } else {
                scratch[li] = scratch[li] + scratch[li + half];
            }
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        out[p.offset + wg.x] = scratch[0];
    }
}
