// out[i, j] = m[i, j] / (left[i] * right[j] + add): the eigenbasis preconditioner's division.

struct Params {
    rows: u32,
    cols: u32,
    add: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> m: array<f32>;
@group(0) @binding(2) var<storage, read> left: array<f32>;
@group(0) @binding(3) var<storage, read> right: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let idx = (wg.y * nwg.x + wg.x) * 256u + li;
    if (idx >= p.rows * p.cols) {
        return;
    }
    let i = idx / p.cols;
    let j = idx % p.cols;
    out[idx] = m[idx] / (left[i] * right[j] + p.add);
}
