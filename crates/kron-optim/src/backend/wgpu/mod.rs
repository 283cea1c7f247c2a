//! The wgpu backend: matrices resident in `f32` storage buffers, every primitive a WGSL compute
//! shader, and matrix-product iterations (Newton-Schulz, coupled Newton) where the CPU backend
//! factorizes. The eigendecomposition is the exception: it is delegated to the host (download,
//! faer in `f64`, upload), and [`Backend::delegates_eigh`] says so.
//!
//! Work is recorded into one pending command encoder and submitted when something is read back
//! (or every 64 dispatches), so a step's uploads (`queue.write_buffer`, staged by
//! wgpu until the next submission) and kernels travel in few submissions. Buffers are never
//! written after the kernel that creates them: every operation writes a fresh buffer, so a
//! [`Mat`]'s clone may share its buffer and "in-place" primitives keep value semantics.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::task::{Context, Poll, Waker};
use std::{fmt, mem};

use kron_autodiff::Tensor;
use wgpu::util::DeviceExt;

use super::iterate::{self, IterationConfig, IterationReport};
use super::{
    Backend, DeviceError, Eigh, Inverse, LinalgError, Mat, Precision, Reduction, Store, linalg,
};

/// Dispatches recorded before the pending encoder is submitted even without a read-back.
const FLUSH_EVERY: usize = 64;

/// Workgroup size of the 1-D kernels (elementwise and reductions).
const WG: u32 = 256;
/// The GEMM kernel's output tile (rows and columns).
const TILE: u32 = 64;
/// Most workgroups along one dispatch dimension (WebGPU's default limit).
const MAX_GROUPS: u32 = 65_535;
/// Pass 1 of a reduction uses at most this many workgroups.
const MAX_REDUCE_GROUPS: u32 = 256;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A matrix's storage buffer, tagged with the backend that made it.
#[derive(Clone, Debug)]
pub(crate) struct GpuBuf {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) owner: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Gemm,
    Affine,
    DivOuter,
    Reduce,
    Elementwise,
}

impl Kernel {
    const ALL: [Kernel; 5] = [
        Kernel::Gemm,
        Kernel::Affine,
        Kernel::DivOuter,
        Kernel::Reduce,
        Kernel::Elementwise,
    ];

    fn source(self) -> &'static str {
        match self {
            Kernel::Gemm => include_str!("shaders/gemm.wgsl"),
            Kernel::Affine => include_str!("shaders/affine.wgsl"),
            Kernel::DivOuter => include_str!("shaders/div_outer.wgsl"),
            Kernel::Reduce => include_str!("shaders/reduce.wgsl"),
            Kernel::Elementwise => include_str!("shaders/elementwise.wgsl"),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kernel::Gemm => "kron gemm",
            Kernel::Affine => "kron affine",
            Kernel::DivOuter => "kron div_outer",
            Kernel::Reduce => "kron reduce",
            Kernel::Elementwise => "kron elementwise",
        }
    }
}

struct Pipeline {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

#[derive(Default)]
struct Pending {
    encoder: Option<wgpu::CommandEncoder>,
    dispatches: usize,
}

/// Matrix primitives on a GPU (or any adapter wgpu finds) through WGSL compute shaders.
///
/// Matrices stay resident on the device in `f32` storage buffers; [`Backend::upload`] and
/// [`Backend::download`] are the only copies. The damped inverse runs Newton-Schulz and the
/// inverse `p`-th root coupled Newton iterations, matrix products only (see
/// [`IterationConfig`]); the eigendecomposition is delegated to the host. Shader pipelines are
/// compiled on first use and cached. Every kernel sums in a fixed order, so a run repeats to the
/// bit on the same adapter and driver; against the CPU backend results agree to `f32` rounding.
///
/// ```no_run
/// use kron_optim::backend::{Backend, WgpuBackend};
/// let be = WgpuBackend::new().expect("a wgpu adapter");
/// println!("{}", be.name());
/// ```
pub struct WgpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    id: u64,
    pipelines: [OnceLock<Pipeline>; 5],
    pending: Mutex<Pending>,
    iteration: IterationConfig,
    read_backs: AtomicU64,
}

impl fmt::Debug for WgpuBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WgpuBackend")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .field("device_type", &self.info.device_type)
            .field("iteration", &self.iteration)
            .finish()
    }
}

/// Drives a future to completion on this thread without an async runtime (wgpu's native
/// futures resolve without a waker: they are ready when polled, or after `Device::poll`).
fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

fn f32_bytes(x: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and no invalid bit patterns; u8 has alignment 1, and the
    // length covers exactly the same memory.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), mem::size_of_val(x)) }
}

/// Uniform parameters: 4-byte words, padded to 16 bytes.
fn words(w: &[u32]) -> Vec<u8> {
    let mut out: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
    out.resize(out.len().div_ceil(16).max(1) * 16, 0);
    out
}

/// A 2-D grid of at least `groups` workgroups (x first), within the per-dimension limit.
fn grid(groups: u32) -> (u32, u32) {
    if groups <= MAX_GROUPS {
        (groups, 1)
    } else {
        (MAX_GROUPS, groups.div_ceil(MAX_GROUPS))
    }
}

fn u32_of(n: usize, what: &str) -> u32 {
    u32::try_from(n).unwrap_or_else(|_| panic!("WgpuBackend: {what} {n} exceeds u32"))
}

impl WgpuBackend {
    /// Finds an adapter (a high-performance GPU if there is one; a software Vulkan driver such
    /// as Mesa's lavapipe also counts) among the backends this build enables (respecting
    /// `WGPU_BACKEND` when set) and opens a device on it.
    ///
    /// # Errors
    /// [`DeviceError::NoAdapter`], naming the backends tried, when none is found;
    /// [`DeviceError::Device`] when the adapter refuses a device.
    pub fn new() -> Result<Self, DeviceError> {
        Self::with_backends(wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all()))
    }

    /// Like [`WgpuBackend::new`], among the given wgpu backends only (those this build does not
    /// enable are ignored).
    ///
    /// # Errors
    /// As [`WgpuBackend::new`].
    pub fn with_backends(backends: wgpu::Backends) -> Result<Self, DeviceError> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        desc.backends = backends;
        let tried = backends & wgpu::Instance::enabled_backend_features();
        let instance = wgpu::Instance::new(desc);
        let options = wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        };
        let adapter =
            block_on(instance.request_adapter(&options)).map_err(|e| DeviceError::NoAdapter {
                tried: backend_names(tried),
                reason: e.to_string(),
            })?;
        Self::from_adapter(adapter)
    }

    /// Opens a device on an adapter the caller chose (with the adapter's own limits, so large
    /// matrices fit).
    ///
    /// # Errors
    /// [`DeviceError::Device`] when the adapter refuses a device.
    pub fn from_adapter(adapter: wgpu::Adapter) -> Result<Self, DeviceError> {
        let info = adapter.get_info();
        let desc = wgpu::DeviceDescriptor {
            label: Some("kron"),
            required_limits: adapter.limits(),
            ..Default::default()
        };
        let (device, queue) =
            block_on(adapter.request_device(&desc)).map_err(|e| DeviceError::Device {
                adapter: info.name.clone(),
                reason: e.to_string(),
            })?;
        Ok(WgpuBackend {
            device,
            queue,
            info,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            pipelines: Default::default(),
            pending: Mutex::new(Pending::default()),
            iteration: IterationConfig::default(),
            read_backs: AtomicU64::new(0),
        })
    }

    /// The same backend with other stopping rules for its iterations.
    pub fn with_iteration(mut self, iteration: IterationConfig) -> Self {
        self.iteration = iteration;
        self
    }

    /// The stopping rules of its iterations.
    pub fn iteration(&self) -> IterationConfig {
        self.iteration
    }

    /// The adapter's description (name, backend, device type, driver).
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The device, for callers who want to share it.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// How many times this backend has waited on the device to read results back (a
    /// [`Backend::download`], a scalar such as [`Backend::dot`], or one batched
    /// [`Backend::read_back`] of many matrices and scalars: one each), since it was opened.
    /// Uploads are not read-backs. For tests and profiling of how often a step stalls on the
    /// device.
    pub fn read_backs(&self) -> u64 {
        self.read_backs.load(Ordering::Relaxed)
    }

    /// Submits recorded work and waits until the device is idle (for timing).
    pub fn synchronize(&self) {
        self.flush();
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .expect("WgpuBackend: device poll failed");
    }

    fn pipeline(&self, k: Kernel) -> &Pipeline {
        let i = Kernel::ALL
            .iter()
            .position(|&x| x == k)
            .expect("kernel listed");
        self.pipelines[i].get_or_init(|| {
            let module = self
                .device
                .create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(k.label()),
                    source: wgpu::ShaderSource::Wgsl(k.source().into()),
                });
            let pipeline = self
                .device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(k.label()),
                    layout: None,
                    module: &module,
                    entry_point: Some("main"),
                    compilation_options: Default::default(),
                    cache: None,
                });
            let layout = pipeline.get_bind_group_layout(0);
            Pipeline { pipeline, layout }
        })
    }

    fn buffer(&self, elements: usize) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: (elements.max(1) * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    }

    fn wrap(&self, rows: usize, cols: usize, buffer: wgpu::Buffer) -> Mat {
        Mat {
            rows,
            cols,
            store: Store::Gpu(GpuBuf {
                buffer,
                owner: self.id,
            }),
        }
    }

    /// The buffer of a matrix this backend made; panics on any other.
    fn buf<'a>(&self, m: &'a Mat) -> &'a wgpu::Buffer {
        match &m.store {
            Store::Gpu(g) if g.owner == self.id => &g.buffer,
            Store::Gpu(_) => panic!("WgpuBackend: {m:?} belongs to another wgpu device"),
            _ => panic!(
                "WgpuBackend: {m:?} lives in host memory; upload it through this backend first"
            ),
        }
    }

    fn upload_f32(&self, rows: usize, cols: usize, data: &[f32]) -> Mat {
        assert_eq!(data.len(), rows * cols);
        let buffer = self.buffer(data.len());
        if !data.is_empty() {
            self.queue.write_buffer(&buffer, 0, f32_bytes(data));
        }
        self.wrap(rows, cols, buffer)
    }

    /// Records one dispatch of kernel `k` with uniform `params` and storage `bufs` (bindings
    /// 1, 2, ...).
    fn dispatch(&self, k: Kernel, params: &[u32], bufs: &[&wgpu::Buffer], groups: (u32, u32)) {
        if groups.0 == 0 || groups.1 == 0 {
            return;
        }
        let pl = self.pipeline(k);
        let uniform = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: &words(params),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform.as_entire_binding(),
        }];
        entries.extend(bufs.iter().enumerate().map(|(i, b)| wgpu::BindGroupEntry {
            binding: i as u32 + 1,
            resource: b.as_entire_binding(),
        }));
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pl.layout,
            entries: &entries,
        });
        let mut pending = self
            .pending
            .lock()
            .expect("WgpuBackend: pending encoder poisoned");
        let encoder = pending
            .encoder
            .get_or_insert_with(|| self.device.create_command_encoder(&Default::default()));
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pl.pipeline);
            pass.set_bind_group(0, &group, &[]);
            pass.dispatch_workgroups(groups.0, groups.1, 1);
        }
        pending.dispatches += 1;
        if pending.dispatches >= FLUSH_EVERY {
            let enc = pending.encoder.take().expect("encoder present");
            pending.dispatches = 0;
            drop(pending);
            self.queue.submit([enc.finish()]);
        }
    }

    fn flush(&self) {
        let mut pending = self
            .pending
            .lock()
            .expect("WgpuBackend: pending encoder poisoned");
        pending.dispatches = 0;
        if let Some(enc) = pending.encoder.take() {
            drop(pending);
            self.queue.submit([enc.finish()]);
        }
    }

    /// Reads the first `len` floats of a buffer back to the host (submitting pending work).
    fn read(&self, buf: &wgpu::Buffer, len: usize) -> Vec<f32> {
        self.read_many(&[(buf, len)])
            .pop()
            .expect("one segment read")
    }

    /// Reads the first `len` floats of each buffer back to the host through one staging buffer:
    /// one submission, one wait on the device (counted in [`WgpuBackend::read_backs`]; nothing
    /// is read, or counted, when every length is 0).
    fn read_many(&self, segments: &[(&wgpu::Buffer, usize)]) -> Vec<Vec<f32>> {
        let total: usize = segments.iter().map(|&(_, n)| n).sum();
        if total == 0 {
            return vec![Vec::new(); segments.len()];
        }
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kron readback"),
            size: (total * 4) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        {
            let mut pending = self
                .pending
                .lock()
                .expect("WgpuBackend: pending encoder poisoned");
            let mut enc = pending
                .encoder
                .take()
                .unwrap_or_else(|| self.device.create_command_encoder(&Default::default()));
            pending.dispatches = 0;
            let mut at = 0u64;
            for &(buf, n) in segments {
                let bytes = (n * 4) as u64;
                if bytes > 0 {
                    enc.copy_buffer_to_buffer(buf, 0, &staging, at, bytes);
                }
                at += bytes;
            }
            self.queue.submit([enc.finish()]);
        }
        self.read_backs.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let slice = staging.slice(..);
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .expect("WgpuBackend: device poll failed");
        rx.recv()
            .expect("WgpuBackend: map callback dropped")
            .expect("WgpuBackend: mapping a read-back buffer failed");
        let out = {
            let view = slice.get_mapped_range().expect("WgpuBackend: mapped range");
            let all: Vec<f32> = view
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let mut at = 0;
            segments
                .iter()
                .map(|&(_, n)| {
                    at += n;
                    all[at - n..at].to_vec()
                })
                .collect()
        };
        staging.unmap();
        out
    }

    /// `alpha op(a) op(b) + beta c + diag I`, with optional virtual ones columns (`aug` bit 0
    /// for `a`, bit 1 for `b`).
    #[allow(clippy::too_many_arguments)]
    fn gemm_full(
        &self,
        alpha: f32,
        a: &Mat,
        ta: bool,
        b: &Mat,
        tb: bool,
        aug: u32,
        c: Option<(f32, &Mat)>,
        diag: f32,
    ) -> Mat {
        let (ar, ac) = (a.rows, a.cols + (aug & 1) as usize);
        let (br, bc) = (b.rows, b.cols + ((aug >> 1) & 1) as usize);
        let (m, k) = if ta { (ac, ar) } else { (ar, ac) };
        let (k2, n) = if tb { (bc, br) } else { (br, bc) };
        assert_eq!(
            k, k2,
            "Backend::gemm: inner dimensions differ: {a:?} x {b:?} (ta {ta}, tb {tb})"
        );
        if let Some((_, cm)) = c {
            assert_eq!(
                cm.dims(),
                (m, n),
                "Backend::gemm: accumulator {cm:?} does not fit {m}x{n}"
            );
        }
        let out = self.buffer(m * n);
        let (beta, cbuf) = match c {
            Some((beta, cm)) => (beta, self.buf(cm)),
            None => (0.0, self.buf(a)),
        };
        let params = [
            u32_of(m, "rows"),
            u32_of(n, "cols"),
            u32_of(k, "inner dimension"),
            ta as u32,
            tb as u32,
            a.cols as u32,
            b.cols as u32,
            aug,
            alpha.to_bits(),
            beta.to_bits(),
            diag.to_bits(),
            c.is_some() as u32,
        ];
        let gx = (n as u32).div_ceil(TILE);
        let gy = (m as u32).div_ceil(TILE);
        assert!(
            gx <= MAX_GROUPS && gy <= MAX_GROUPS,
            "Backend::gemm: {m}x{n} output too large"
        );
        self.dispatch(
            Kernel::Gemm,
            &params,
            &[self.buf(a), self.buf(b), cbuf, &out],
            (gx, gy),
        );
        self.wrap(m, n, out)
    }

    /// `alpha x + beta y + diag I` into a fresh matrix.
    fn affine(&self, alpha: f32, x: &Mat, y: Option<(f32, &Mat)>, diag: f32) -> Mat {
        let len = x.rows * x.cols;
        if let Some((_, ym)) = y {
            assert_eq!(x.dims(), ym.dims(), "Backend::axpby: {x:?} vs {ym:?}");
        }
        let out = self.buffer(len);
        let (beta, ybuf) = match y {
            Some((beta, ym)) => (beta, self.buf(ym)),
            None => (0.0, self.buf(x)),
        };
        let params = [
            u32_of(len, "length"),
            if diag != 0.0 { x.cols as u32 } else { 0 },
            y.is_some() as u32,
            0,
            alpha.to_bits(),
            beta.to_bits(),
            diag.to_bits(),
            0,
        ];
        self.dispatch(
            Kernel::Affine,
            &params,
            &[self.buf(x), ybuf, &out],
            grid((len as u32).div_ceil(WG)),
        );
        self.wrap(x.rows, x.cols, out)
    }

    /// Records a reduction over `len` elements read at `stride` (see `reduce.wgsl` for `mode`)
    /// whose result lands in element `at` of `out` (left as it is, zero in a fresh buffer, when
    /// `len` is 0).
    #[allow(clippy::too_many_arguments)]
    fn reduce_into(
        &self,
        x: &Mat,
        y: Option<&Mat>,
        len: usize,
        stride: usize,
        mode: u32,
        out: &wgpu::Buffer,
        at: usize,
    ) {
        if len == 0 {
            return;
        }
        let groups = (len as u32).div_ceil(WG).min(MAX_REDUCE_GROUPS);
        let partial = self.buffer(groups as usize);
        let cols = if mode == 1 { x.cols as u32 } else { 0 };
        let xb = self.buf(x);
        let yb = y.map_or(xb, |m| self.buf(m));
        let p1 = [u32_of(len, "length"), stride as u32, mode, 0, cols, 0, 0, 0];
        self.dispatch(Kernel::Reduce, &p1, &[xb, yb, &partial], (groups, 1));
        // Pass 2 over the partials: plain values (mode 3), the same combination.
        let p2 = [groups, 1, 3, 0, 0, u32_of(at, "reduction index"), 0, 0];
        self.dispatch(Kernel::Reduce, &p2, &[&partial, &partial, out], (1, 1));
    }

    /// Records the reduction a [`Reduction`] names into element `at` of `out`.
    fn record(&self, r: &Reduction<'_>, out: &wgpu::Buffer, at: usize) {
        match *r {
            Reduction::Trace(m) => {
                self.reduce_into(m, None, m.rows.min(m.cols), m.cols + 1, 3, out, at)
            }
            Reduction::Dot(a, b) => {
                assert_eq!(a.dims(), b.dims(), "Backend::dot: {a:?} vs {b:?}");
                self.reduce_into(a, Some(b), a.rows * a.cols, 1, 0, out, at)
            }
            Reduction::SquaredNorm(m) => {
                self.reduce_into(m, Some(m), m.rows * m.cols, 1, 0, out, at)
            }
            Reduction::NonFinite(m) => self.reduce_into(m, None, m.rows * m.cols, 1, 2, out, at),
        }
    }

    /// Elementwise `mode` of `elementwise.wgsl` on `x` (and `y`) into a fresh matrix.
    fn elementwise(&self, mode: u32, x: &Mat, y: Option<&Mat>, eps: f32) -> Mat {
        let len = x.rows * x.cols;
        let out = self.buffer(len);
        let xb = self.buf(x);
        let yb = y.map_or(xb, |m| self.buf(m));
        let params = [u32_of(len, "length"), mode, 0, 0, eps.to_bits(), 0, 0, 0];
        self.dispatch(
            Kernel::Elementwise,
            &params,
            &[xb, yb, &out],
            grid((len as u32).div_ceil(WG)),
        );
        self.wrap(x.rows, x.cols, out)
    }

    /// Newton-Schulz iteration for `(m + damping I)^-1` on this device, with its report
    /// ([`iterate::newton_schulz`] under this backend's [`IterationConfig`]).
    ///
    /// # Errors
    /// As [`iterate::newton_schulz`].
    pub fn newton_schulz(
        &self,
        m: &Mat,
        damping: f32,
    ) -> Result<(Mat, IterationReport), LinalgError> {
        iterate::newton_schulz(self, m, damping as f64, &self.iteration)
    }

    /// Coupled Newton iteration for `(m + damping I)^(-1/p)` on this device, with its report
    /// ([`iterate::coupled_newton`] under this backend's [`IterationConfig`]).
    ///
    /// # Errors
    /// As [`iterate::coupled_newton`].
    pub fn coupled_newton(
        &self,
        m: &Mat,
        p: u32,
        damping: f32,
    ) -> Result<(Mat, IterationReport), LinalgError> {
        iterate::coupled_newton(self, m, p, damping as f64, &self.iteration)
    }
}

fn backend_names(b: wgpu::Backends) -> String {
    let names: Vec<&str> = [
        (wgpu::Backends::VULKAN, "Vulkan"),
        (wgpu::Backends::METAL, "Metal"),
        (wgpu::Backends::DX12, "DX12"),
        (wgpu::Backends::GL, "OpenGL"),
        (wgpu::Backends::BROWSER_WEBGPU, "WebGPU"),
    ]
    .into_iter()
    .filter(|(f, _)| b.contains(*f))
    .map(|(_, n)| n)
    .collect();
    if names.is_empty() {
        "none (this build enables no wgpu backend for this platform)".into()
    } else {
        names.join(", ")
    }
}

impl Backend for WgpuBackend {
    fn name(&self) -> String {
        format!(
            "wgpu: {} ({:?}, {:?})",
            self.info.name, self.info.backend, self.info.device_type
        )
    }

    fn precision(&self) -> Precision {
        Precision::F32
    }

    fn upload_rows(&self, t: &Tensor, rows: Option<usize>) -> Mat {
        let (r, c) = t.dims2();
        let rows = rows.map_or(r, |k| k.min(r));
        self.upload_f32(rows, c, &t.data()[..rows * c])
    }

    fn download(&self, m: &Mat) -> Tensor {
        let v = self.read(self.buf(m), m.rows * m.cols);
        Tensor::from_vec(v, &[m.rows, m.cols])
    }

    fn zeros(&self, rows: usize, cols: usize) -> Mat {
        // WebGPU zero-initializes new buffers.
        self.wrap(rows, cols, self.buffer(rows * cols))
    }

    fn gemm(&self, alpha: f32, a: &Mat, ta: bool, b: &Mat, tb: bool) -> Mat {
        self.gemm_full(alpha, a, ta, b, tb, 0, None, 0.0)
    }

    fn factor_ema(&self, acc: &mut Mat, x: &Mat, homogeneous: bool, scale: f32, decay: f32) {
        let n = x.cols + usize::from(homogeneous);
        assert_eq!(
            acc.dims(),
            (n, n),
            "Backend::factor_ema: accumulator {acc:?} does not fit x {x:?} (homogeneous {homogeneous})"
        );
        let aug = if homogeneous { 3 } else { 0 };
        *acc = self.gemm_full(scale, x, true, x, false, aug, Some((decay, acc)), 0.0);
    }

    fn add_diag(&self, m: &mut Mat, v: f64) {
        *m = self.affine(1.0, m, None, v as f32);
    }

    fn scale(&self, m: &mut Mat, s: f64) {
        *m = self.affine(s as f32, m, None, 0.0);
    }

    fn axpby(&self, alpha: f64, x: &Mat, beta: f64, y: &mut Mat) {
        *y = self.affine(alpha as f32, x, Some((beta as f32, y)), 0.0);
    }

    fn div_outer(&self, m: &mut Mat, left: &[f64], right: &[f64], add: f64) {
        let (r, c) = m.dims();
        assert!(
            left.len() == r && right.len() == c,
            "Backend::div_outer: {m:?} vs {}x{}",
            left.len(),
            right.len()
        );
        let l: Vec<f32> = left.iter().map(|&v| v as f32).collect();
        let rt: Vec<f32> = right.iter().map(|&v| v as f32).collect();
        let lm = self.upload_f32(r, 1, &l);
        let rm = self.upload_f32(1, c, &rt);
        let out = self.buffer(r * c);
        let params = [
            u32_of(r, "rows"),
            u32_of(c, "cols"),
            (add as f32).to_bits(),
            0,
        ];
        self.dispatch(
            Kernel::DivOuter,
            &params,
            &[self.buf(m), self.buf(&lm), self.buf(&rm), &out],
            grid(((r * c) as u32).div_ceil(WG)),
        );
        *m = self.wrap(r, c, out);
    }

    fn trace(&self, m: &Mat) -> f64 {
        self.reductions(&[Reduction::Trace(m)])[0]
    }

    fn dot(&self, a: &Mat, b: &Mat) -> f64 {
        self.reductions(&[Reduction::Dot(a, b)])[0]
    }

    fn is_finite(&self, m: &Mat) -> bool {
        self.reductions(&[Reduction::NonFinite(m)])[0] == 0.0
    }

    fn sqrt(&self, m: &mut Mat) {
        *m = self.elementwise(0, m, None, 0.0);
    }

    fn recip(&self, m: &mut Mat, eps: f64) {
        *m = self.elementwise(1, m, None, eps as f32);
    }

    fn mul(&self, a: &Mat, m: &mut Mat) {
        assert_eq!(a.dims(), m.dims(), "Backend::mul: {a:?} vs {m:?}");
        *m = self.elementwise(2, m, Some(a), 0.0);
    }

    /// One wait on the device: every scalar is reduced into one buffer, and it and the matrices
    /// are copied into one staging buffer that is mapped once.
    fn read_back(&self, mats: &[&Mat], scalars: &[Reduction<'_>]) -> (Vec<Tensor>, Vec<f64>) {
        let results = self.buffer(scalars.len());
        for (i, r) in scalars.iter().enumerate() {
            self.record(r, &results, i);
        }
        let mut segments: Vec<(&wgpu::Buffer, usize)> = mats
            .iter()
            .map(|m| (self.buf(m), m.rows * m.cols))
            .collect();
        segments.push((&results, scalars.len()));
        let mut data = self.read_many(&segments);
        let values: Vec<f64> = data
            .pop()
            .expect("the scalars' segment")
            .into_iter()
            .zip(scalars)
            .map(|(v, r)| match r {
                // A count of non-finite elements, as the 0/1 the primitive promises.
                Reduction::NonFinite(_) => f64::from(u8::from(v != 0.0)),
                _ => v as f64,
            })
            .collect();
        let tensors = data
            .into_iter()
            .zip(mats)
            .map(|(v, m)| Tensor::from_vec(v, &[m.rows, m.cols]))
            .collect();
        (tensors, values)
    }

    fn spd_inverse(&self, m: &Mat, damping: f32) -> Result<Inverse, LinalgError> {
        let (mat, rep) = self.newton_schulz(m, damping)?;
        Ok(Inverse {
            mat,
            regularized_pivots: 0,
            iterations: Some(rep.iterations),
        })
    }

    fn eigh(&self, m: &Mat) -> Result<Eigh, LinalgError> {
        assert_eq!(m.rows, m.cols, "Backend::eigh: {m:?} is not square");
        let host: Vec<f64> = self.download(m).data().iter().map(|&x| x as f64).collect();
        let (q, values) = linalg::eigh(&host, m.rows)?;
        let q32: Vec<f32> = q.iter().map(|&x| x as f32).collect();
        Ok(Eigh {
            vectors: self.upload_f32(m.rows, m.cols, &q32),
            values,
        })
    }

    fn inv_root(&self, m: &Mat, p: u32, damping: f32) -> Result<Mat, LinalgError> {
        self.coupled_newton(m, p, damping).map(|(x, _)| x)
    }

    fn delegates_eigh(&self) -> bool {
        true
    }
}
