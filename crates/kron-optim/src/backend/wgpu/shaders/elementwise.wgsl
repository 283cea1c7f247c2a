// Elementwise maps of a matrix into a fresh buffer, each element rounded once in f32:
//   mode 0: sqrt(x)
//   mode 1: 1 / (x + eps)
//   mode 2: x * y
// (`y` read only in mode 2). The diagonal grafts' square roots, reciprocals and products.

struct Params {
    len: u32,
    mode: u32,
    _pad0: u32,
    _pad1: u32,
    eps: f32,
    _pad2: f32,
    _pad3: f32,
    _pad4: f32,
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
    let v = x[idx];
    switch p.mode {
        case 0u: {
            out[idx] = sqrt(v);
        }
        case 1u: {
            out[idx] = 1.0 / (v + p.eps);
        }
        default: {
            out[idx] = v * y[idx];
        }
    }
}
