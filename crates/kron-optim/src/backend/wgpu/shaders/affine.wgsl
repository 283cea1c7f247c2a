// Elementwise affine map: out = alpha * x + beta * y + diag * I, over a rows x cols matrix
// (`y` read only when `use_y` is set). Serves scale, add_diag, axpby and the iterations'
// `c1 M + c0 I` steps.

struct Params {
    len: u32,
    cols: u32,
    use_y: u32,
    _pad: u32,
    alpha: f32,
    beta: f32,
    diag: f32,
    _pad2: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let idx = (wg.y * nwg.x + wg.x) * 256u + li;
    if (idx >= p.len) {
        return;
    }
    var v = p.alpha * x[idx];
    if (p.use_y != 0u) {
        v = v + p.beta * y[idx];
    }
    if (p.cols > 0u && idx / p.cols == idx % p.cols) {
        v = v + p.diag;
    }
    out[idx] = v;
}
