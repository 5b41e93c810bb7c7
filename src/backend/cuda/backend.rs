//! `CudaBackend`: the layers' operations on a CUDA device, on the kernels of `kernels/*.cu`.
//!
//! - **Memory.** Dense weights, norm vectors and each session's KV cache live in device memory.
//!   Routed experts live there too when they fit (or when `--gpu-budget` covers them); otherwise
//!   they are held by the host (the file mapping, or the expert cache's RAM slots) and copied on
//!   use into one **slot arena** in device memory of the GPU budget, an LRU keyed by the expert's
//!   identity (file offset, type, size): a slot keeps its expert until it is evicted, so a hit is
//!   never copied again. A miss goes host bytes → a pinned staging ring → an async host-to-device
//!   copy on the copy stream; the compute stream waits on an event for it, and a slot is refilled
//!   only after an event says the kernels that read its last occupant ran.
//! - **Unified memory** (an integrated GPU such as a Jetson, or `--unified`): host memory the
//!   backend was handed (`use_host_memory`: the expert cache's slots) is registered once and read
//!   by the kernels in place, no copy.
//! - **Experts on the CPU** (`--cpu-moe`, llama.cpp's flag): experts the device does not hold are
//!   computed by the CPU backend from the host's bytes, their inputs read back and their outputs
//!   uploaded.
//! - **Errors.** The trait's operations cannot fail; a driver error is kept (the first one), every
//!   later operation is skipped, and `take_error` hands it to the engine, which fails the
//!   generation with it.
//!
//! Invariant: every kernel reads and writes device memory this backend owns or registered, in
//! stream order; nothing a queued kernel may still read is freed or overwritten before the device
//! is past it (buffers are freed after a context sync, slots refilled after their read event).

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaFunction, DriverError};

use super::kernels::{self, FILES};
use super::{probe, CudaError, DeviceInfo};
use crate::arch::{Glu, RopeStyle};
use crate::backend::cpu::{CpuBackend, MatRef};
use crate::backend::{
    AttnShape, Backend, BackendError, DeviceStats, ExpertJob, Heads, HostAct, KvConfig, KvType, Op, Rope, Values,
};
use crate::engine::offload::Budget;
use crate::experts::costmodel::{split_misses, Miss, MissRates};
use crate::gguf::GgmlType;
use crate::model::{resident_set, Model, Residency, Resident, VecRef, WeightDesc};

#[cfg(target_endian = "big")]
compile_error!("kernel arguments are passed as little-endian 8-byte slots");

type DevPtr = sys::CUdeviceptr;

/// Bytes of one pinned staging buffer (a miss larger than this is copied in pieces).
const STAGE_BYTES: usize = 8 << 20;
/// Pinned staging buffers the copies rotate through.
const STAGES: usize = 4;
/// Bytes of the pinned ring small uploads (token ids, routing lists) go through between syncs.
const UPLOAD_BYTES: usize = 1 << 20;
/// Device memory left free when the backend sizes things itself (KV, activations, the driver).
const HEADROOM: u64 = 2 << 30;
/// Token rows from which a mat-mul takes the tiled kernel instead of the mat-vec.
const TILED_FROM: usize = 17;
/// Weight rows one mat-vec block takes (a warp each): a grouped job has at least as many.
const MV_ROWS: usize = 8;

/// How the CUDA backend is set up (`--device cuda[:N]`, `--gpu-budget`, `--unified`,
/// `--cpu-moe`).
#[derive(Debug, Clone, Default)]
pub struct CudaOptions {
    pub ordinal: usize,
    /// Device memory for routed experts that are not all resident (a share of the model's
    /// expert bytes, or bytes); `None`: every expert if they fit, else what is free.
    pub gpu_budget: Option<Budget>,
    /// Read host-held experts in place through mapped memory (forced on for integrated GPUs).
    pub unified: bool,
    /// Compute experts the device does not hold on the CPU instead of copying them.
    pub cpu_moe: bool,
    /// Keep the routed experts of the first N layers on the CPU and compute them there; the
    /// device holds (or caches) the rest (llama.cpp's `--n-cpu-moe N`). 0: none.
    pub n_cpu_moe: usize,
    /// Compute some misses of the expert arena on the CPU, from the host's copy, instead of
    /// copying them (`--cpu-misses`).
    pub cpu_misses: CpuMisses,
    /// CPU threads for `cpu_moe`, `n_cpu_moe` and `cpu_misses`.
    pub threads: usize,
    /// Where compiled kernels are cached (`None`: compile every start).
    pub kernel_cache: Option<PathBuf>,
}

/// Which misses of the expert arena the CPU computes from the host's copy instead of the device
/// copying them. Off by default: a miss computed on the CPU sums in another order than on the
/// device, so tokens can differ from an all-resident run at near-ties, as llama.cpp's `--cpu-moe`
/// does from its full offload; with it off, every budget gives the same tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CpuMisses {
    #[default]
    Off,
    /// Per layer, the split of its misses between the link and the CPU that ends soonest
    /// (`experts::costmodel::split_misses`), from the copy stream's measured rate and the CPU's.
    Auto,
    /// Every miss the host holds (Fiddler's choice: the arena keeps what prefetches and earlier
    /// loads put there).
    Always,
}

/// Whether the CUDA backend runs `op` on `ty`: every type `dequant.cuh` knows.
pub fn supports(op: Op, ty: GgmlType) -> bool {
    let _ = op;
    kernels::kernel_type(ty).is_some()
}

/// Device memory, freed (after the device is idle) when dropped.
#[derive(Default)]
pub struct DeviceBuf {
    ptr: DevPtr,
    bytes: usize,
    ctx: Option<Arc<CudaContext>>,
}

impl DeviceBuf {
    fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<DeviceBuf, DriverError> {
        ctx.bind_to_thread()?;
        // SAFETY: a plain device allocation in the bound context; freed once, in Drop.
        let ptr = if bytes == 0 { 0 } else { unsafe { result::malloc_sync(bytes) }? };
        Ok(DeviceBuf { ptr, bytes, ctx: Some(Arc::clone(ctx)) })
    }
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        if let (Some(ctx), true) = (&self.ctx, self.ptr != 0) {
            let _ = ctx.bind_to_thread();
            // No queued kernel may still touch it.
            let _ = ctx.synchronize();
            // SAFETY: `ptr` came from malloc_sync in this context and is freed once.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// Page-locked host memory (the staging ring, small uploads).
struct PinnedBuf {
    ptr: *mut u8,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: the buffer is owned memory, used only through &mut of its owner.
unsafe impl Send for PinnedBuf {}

impl PinnedBuf {
    fn new(ctx: &Arc<CudaContext>, bytes: usize, flags: u32) -> Result<PinnedBuf, DriverError> {
        ctx.bind_to_thread()?;
        // SAFETY: a host allocation of `bytes`; freed once, in Drop.
        let ptr = unsafe { result::malloc_host(bytes, flags) }? as *mut u8;
        Ok(PinnedBuf { ptr, bytes, ctx: Arc::clone(ctx) })
    }

    /// Bytes `at..at + src.len()` of the buffer become `src`.
    fn write(&mut self, at: usize, src: &[u8]) {
        assert!(at + src.len() <= self.bytes, "a pinned write past the buffer");
        // SAFETY: in bounds (checked above); the buffer does not overlap `src` (it is our own).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(at), src.len()) };
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        let _ = self.ctx.synchronize();
        // SAFETY: `ptr` came from malloc_host and is freed once, after the device is idle.
        let _ = unsafe { result::free_host(self.ptr as *mut c_void) };
    }
}

/// A CUDA event.
struct Event(sys::CUevent);

// SAFETY: an event handle is usable from any thread with the context bound.
unsafe impl Send for Event {}

impl Event {
    fn new(timing: bool) -> Result<Event, DriverError> {
        let flags =
            if timing { sys::CUevent_flags::CU_EVENT_DEFAULT } else { sys::CUevent_flags::CU_EVENT_DISABLE_TIMING };
        result::event::create(flags).map(Event)
    }

    fn record(&self, stream: sys::CUstream) -> Result<(), DriverError> {
        // SAFETY: a live event and stream of the bound context.
        unsafe { result::event::record(self.0, stream) }
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: destroyed once; the driver defers it past pending work.
        let _ = unsafe { result::event::destroy(self.0) };
    }
}

/// f32 activations in device memory, `rows × cols`.
#[derive(Default)]
pub struct CudaAct {
    buf: DeviceBuf,
    rows: usize,
    cols: usize,
}

impl CudaAct {
    fn ptr(&self) -> DevPtr {
        self.buf.ptr
    }

    fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// Address of column `col` of row 0.
    fn at(&self, col: usize) -> DevPtr {
        self.buf.ptr + 4 * col as u64
    }
}

/// One session's keys and values in device memory, per layer `[len][kv_dim]`, position p in row
/// p % len: `len` is `n_ctx`, or a sliding-window layer's ring (`KvConfig::layer_len`).
pub struct CudaKv {
    k: Vec<DeviceBuf>,
    v: Vec<DeviceBuf>,
    ty: KvType,
    kv_dim: usize,
    n_ctx: usize,
    len: Vec<usize>,
}

/// Who holds an expert's bytes: where a cached copy is looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    offset: u64,
    ty: GgmlType,
    bytes: usize,
}

#[derive(Clone, Copy)]
enum At<'a> {
    Device(DevPtr),
    /// Plain ggml bytes in host memory: the mapping, or an expert cache slot.
    Host(&'a [u8], Key),
}

/// A weight view: in device memory, or in host memory (copied into the slot arena on use).
#[derive(Clone, Copy)]
pub struct CudaMat<'a> {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    at: At<'a>,
}

impl<'a> CudaMat<'a> {
    fn host_desc(&self) -> Option<(WeightDesc, &'a [u8])> {
        match self.at {
            At::Host(bytes, k) => Some((
                WeightDesc {
                    ty: self.ty,
                    rows: self.rows,
                    cols: self.cols,
                    offset: k.offset,
                    bytes: bytes.len() as u64,
                },
                bytes,
            )),
            At::Device(_) => None,
        }
    }
}

/// A norm weight or bias: on the device, and the model's host copy (for experts on the CPU).
#[derive(Clone, Copy)]
pub struct CudaVector<'a> {
    ptr: DevPtr,
    host: &'a [f32],
}

/// The weights the CUDA backend took: copies in device memory, views of the rest.
pub struct CudaWeights {
    model: Arc<Model>,
    _mem: DeviceBuf,
    _vec_mem: DeviceBuf,
    /// File offset → device address.
    index: HashMap<u64, DevPtr>,
    /// Per `VecRef`: its device address.
    vectors: Vec<DevPtr>,
    resident: Resident,
    bytes: u64,
}

/// The device slots host-held experts are copied into.
struct Arena {
    _mem: DeviceBuf,
    slot_bytes: usize,
    owner: Vec<Option<Key>>,
    map: HashMap<Key, usize>,
    stamp: Vec<u64>,
    /// Recorded on the compute stream after the last kernel that read the slot.
    read_done: Vec<Event>,
    /// Recorded on the prefetch stream after a prefetch filled the slot; `fill_pending` while
    /// neither the compute nor the copy stream has waited on it yet.
    filled: Vec<Event>,
    fill_pending: Vec<bool>,
    /// Filled by a prefetch and not looked up since.
    prefetched: Vec<bool>,
    clock: u64,
}

impl Arena {
    fn new(ctx: &Arc<CudaContext>, slot_bytes: usize, n: usize) -> Result<Arena, DriverError> {
        let mem = DeviceBuf::new(ctx, slot_bytes * n)?;
        let events = || (0..n).map(|_| Event::new(false)).collect::<Result<Vec<_>, _>>();
        Ok(Arena {
            _mem: mem,
            slot_bytes,
            owner: vec![None; n],
            map: HashMap::new(),
            stamp: vec![0; n],
            read_done: events()?,
            filled: events()?,
            fill_pending: vec![false; n],
            prefetched: vec![false; n],
            clock: 0,
        })
    }

    fn addr(&self, slot: usize) -> DevPtr {
        self._mem.ptr + (slot * self.slot_bytes) as u64
    }

    fn hit(&mut self, k: &Key) -> Option<usize> {
        let s = *self.map.get(k)?;
        self.clock += 1;
        self.stamp[s] = self.clock;
        Some(s)
    }

    /// The slot to refill: an empty one, else the least recently used outside `keep`.
    fn victim(&self, keep: &[usize]) -> Option<usize> {
        (0..self.owner.len()).filter(|s| !keep.contains(s)).min_by_key(|&s| (self.owner[s].is_some(), self.stamp[s]))
    }

    fn fill(&mut self, slot: usize, k: Key) {
        if let Some(old) = self.owner[slot].take() {
            self.map.remove(&old);
        }
        self.owner[slot] = Some(k);
        self.map.insert(k, slot);
        self.clock += 1;
        self.stamp[slot] = self.clock;
        self.prefetched[slot] = false;
    }
}

/// Host memory registered with the driver: page-locked, so copies out of it go straight to the
/// device; with `dev`, also mapped for the kernels to read in place (unified memory).
struct Registered {
    host: usize,
    len: usize,
    dev: Option<DevPtr>,
}

/// The named kernels, and the per-type ones by type.
struct Kernels {
    named: HashMap<String, CudaFunction>,
    matvec: HashMap<GgmlType, CudaFunction>,
    matvec_grouped: HashMap<GgmlType, CudaFunction>,
    matmul: HashMap<GgmlType, CudaFunction>,
    matmul_grouped: HashMap<GgmlType, CudaFunction>,
    get_rows: HashMap<GgmlType, CudaFunction>,
}

/// One kernel argument, passed to the driver as an 8-byte slot (little-endian: a 4-byte
/// parameter reads the slot's first 4 bytes).
#[derive(Clone, Copy)]
enum Arg {
    P(DevPtr),
    I(i32),
    L(i64),
    F(f32),
}

impl Arg {
    fn slot(self) -> u64 {
        match self {
            Arg::P(p) => p,
            Arg::I(v) => v as u32 as u64,
            Arg::L(v) => v as u64,
            Arg::F(v) => v.to_bits() as u64,
        }
    }
}

fn int(v: usize) -> Arg {
    Arg::I(v as i32)
}

fn long(v: usize) -> Arg {
    Arg::L(v as i64)
}

/// See the module docs.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: sys::CUstream,
    /// Copies of the experts a job needs now (the highest priority the device offers).
    copy: sys::CUstream,
    /// Copies ahead of need, on a prediction (the lowest priority).
    prefetch: sys::CUstream,
    /// Whether work queued on the compute stream (or the copy stream it waits on), or on the
    /// prefetch stream, reads host bytes handed to an operation: mapped memory read in place,
    /// or a copy straight out of page-locked memory (`release_host_bytes` waits for them).
    host_reads: bool,
    prefetch_host_reads: bool,
    info: DeviceInfo,
    opts: CudaOptions,
    k: Kernels,
    arena: Option<Arena>,
    /// Bytes of an arena slot: the model's largest expert matrix (set when the weights are taken).
    expert_slot: usize,
    stages: Vec<(PinnedBuf, Event)>,
    next_stage: usize,
    /// Small uploads: pinned bytes and their device twin, bump-allocated between syncs.
    up_host: PinnedBuf,
    up_dev: DeviceBuf,
    up_at: usize,
    registered: Vec<Registered>,
    /// File offsets of the expert matrices `--n-cpu-moe` keeps on the CPU.
    cpu_experts: std::collections::HashSet<u64>,
    /// An input rounded to a weight's `vec_dot_type`, and which input and type it holds (reset
    /// by every operation: the input's bytes change between them).
    xr: CudaAct,
    rounded: Option<(DevPtr, i32)>,
    /// Expert-FFN scratch: gathered inputs, gate, up, down outputs.
    xg: CudaAct,
    g: CudaAct,
    u: CudaAct,
    o: CudaAct,
    cpu: Option<CpuBackend>,
    /// The CPU's measured expert time: seconds and weight bytes × tokens (`--cpu-misses auto`).
    host_timing: (f64, f64),
    /// Copy-stream timing: (start, end) event pairs since the last sync.
    copy_timing: Vec<(Event, Event)>,
    /// Whether the last pair of `copy_timing` waits for its end (copies of the current job).
    timing_open: bool,
    /// Recorded on the copy stream after a job's copies; the compute stream waits on it.
    copy_done: Event,
    stats: DeviceStats,
    error: RefCell<Option<CudaError>>,
}

// SAFETY: the raw stream handles belong to `ctx`, which is Send + Sync; the backend is used from
// one thread at a time (it is `&mut` for every operation) and binds the context before each.
unsafe impl Send for CudaBackend {}

impl CudaBackend {
    /// Device `opts.ordinal` with every kernel compiled (or taken from the kernel cache) and
    /// loaded. Fails, never panics, without a driver, NVRTC or device.
    pub fn new(opts: CudaOptions) -> Result<CudaBackend, CudaError> {
        let ordinal = opts.ordinal;
        let info = probe(ordinal)?;
        let err = |e: DriverError| CudaError::Driver { ordinal, message: e.to_string() };
        let ctx = CudaContext::new(ordinal).map_err(err)?;
        ctx.bind_to_thread().map_err(err)?;
        let mut named = HashMap::new();
        for f in FILES {
            let c = kernels::compile(f, &info.arch(), opts.kernel_cache.as_deref())?;
            let m = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(c.ptx))
                .map_err(|e| CudaError::Driver { ordinal, message: format!("loading kernels/{}: {e}", f.file) })?;
            for name in f.entry_names() {
                let func = m.load_function(&name).map_err(|e| CudaError::Driver {
                    ordinal,
                    message: format!("kernels/{}: no entry {name}: {e}", f.file),
                })?;
                named.insert(name, func);
            }
        }
        let per_type = |prefix: &str| {
            kernels::TYPES
                .iter()
                .filter_map(|t| Some((kernels::ggml_type(t)?, named.get(&format!("{prefix}_{t}"))?.clone())))
                .collect::<HashMap<_, _>>()
        };
        let k = Kernels {
            matvec: per_type("matvec"),
            matvec_grouped: per_type("matvec_grouped"),
            matmul: per_type("matmul"),
            matmul_grouped: per_type("matmul_grouped"),
            get_rows: per_type("get_rows"),
            named,
        };
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking).map_err(err)?;
        // Demand copies before prefetches where the device orders them (priorities are a hint).
        let (mut least, mut greatest) = (0i32, 0i32);
        // SAFETY: two out-parameters, the context bound above.
        let r = unsafe { sys::cuCtxGetStreamPriorityRange(&mut least, &mut greatest) }.result();
        if r.is_err() {
            (least, greatest) = (0, 0);
        }
        let copy = new_stream(greatest).map_err(err)?;
        let prefetch = new_stream(least).map_err(err)?;
        let stages = (0..STAGES)
            .map(|_| Ok((PinnedBuf::new(&ctx, STAGE_BYTES, sys::CU_MEMHOSTALLOC_WRITECOMBINED)?, Event::new(false)?)))
            .collect::<Result<Vec<_>, DriverError>>()
            .map_err(err)?;
        let up_host = PinnedBuf::new(&ctx, UPLOAD_BYTES, 0).map_err(err)?;
        let copy_done = Event::new(false).map_err(err)?;
        let up_dev = DeviceBuf::new(&ctx, UPLOAD_BYTES).map_err(err)?;
        let cpu = (opts.cpu_moe || opts.n_cpu_moe > 0 || opts.cpu_misses != CpuMisses::Off)
            .then(|| CpuBackend::new(opts.threads.max(1)));
        let mut opts = opts;
        opts.unified |= info.integrated;
        tracing::info!(
            "cuda:{ordinal} {} (compute {}.{}, {:.1} GiB{})",
            info.name,
            info.compute_capability.0,
            info.compute_capability.1,
            info.memory_bytes as f64 / (1u64 << 30) as f64,
            if opts.unified { ", unified memory" } else { "" }
        );
        Ok(CudaBackend {
            ctx,
            stream,
            copy,
            prefetch,
            host_reads: false,
            prefetch_host_reads: false,
            info,
            opts,
            k,
            arena: None,
            expert_slot: 0,
            stages,
            next_stage: 0,
            up_host,
            up_dev,
            up_at: 0,
            registered: Vec::new(),
            cpu_experts: Default::default(),
            xr: CudaAct::default(),
            rounded: None,
            xg: CudaAct::default(),
            g: CudaAct::default(),
            u: CudaAct::default(),
            o: CudaAct::default(),
            cpu,
            host_timing: (0.0, 0.0),
            copy_timing: Vec::new(),
            timing_open: false,
            copy_done,
            stats: DeviceStats::default(),
            error: RefCell::new(None),
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn driver_error(&self, what: &str, e: DriverError) -> CudaError {
        CudaError::Driver { ordinal: self.info.ordinal, message: format!("{what}: {e}") }
    }

    /// Keep the first error; later operations are skipped.
    fn fail(&self, e: CudaError) {
        let mut slot = self.error.borrow_mut();
        if slot.is_none() {
            tracing::error!("{e}");
            *slot = Some(e);
        }
    }

    fn check(&self, what: &str, r: Result<(), DriverError>) {
        if let Err(e) = r {
            self.fail(self.driver_error(what, e));
        }
    }

    /// Bind the context to this thread; false once an error was kept.
    fn enter(&self) -> bool {
        if self.error.borrow().is_some() {
            return false;
        }
        let r = self.ctx.bind_to_thread();
        self.check("binding the context", r);
        self.error.borrow().is_none()
    }

    fn kernel(&self, name: &str) -> Option<&CudaFunction> {
        let f = self.k.named.get(name);
        if f.is_none() {
            self.fail(CudaError::Driver { ordinal: self.info.ordinal, message: format!("no kernel {name}") });
        }
        f
    }

    fn launch(&mut self, f: &CudaFunction, grid: (usize, usize, usize), block: usize, args: &[Arg]) {
        if self.error.borrow().is_some() || grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return;
        }
        let mut slots = [0u64; 20];
        assert!(args.len() <= slots.len(), "a kernel with more than 20 arguments");
        for (s, a) in slots.iter_mut().zip(args) {
            *s = a.slot();
        }
        let mut ptrs = [std::ptr::null_mut::<c_void>(); 20];
        for (p, s) in ptrs.iter_mut().zip(slots.iter_mut()) {
            *p = s as *mut u64 as *mut c_void;
        }
        let g = (grid.0 as u32, grid.1 as u32, grid.2 as u32);
        // SAFETY: every caller passes the arguments of the kernel's signature in order (device
        // addresses of buffers this backend owns, sized for the launch); each slot outlives the
        // call, which copies the parameters before returning.
        let r = unsafe {
            result::launch_kernel(f.cu_function(), g, (block as u32, 1, 1), 0, self.stream, &mut ptrs[..args.len()])
        };
        self.stats.launches += 1;
        self.check("kernel launch", r);
    }

    fn launch_named(&mut self, name: &str, grid: (usize, usize, usize), block: usize, args: &[Arg]) {
        if let Some(f) = self.kernel(name).cloned() {
            self.launch(&f, grid, block, args);
        }
    }

    /// Reshape `a`, growing its buffer (to at least twice the old) when it is too small.
    fn ensure(&self, a: &mut CudaAct, rows: usize, cols: usize) {
        let need = rows * cols * 4;
        if need > a.buf.bytes && self.error.borrow().is_none() {
            match DeviceBuf::new(&self.ctx, need.max(2 * a.buf.bytes)) {
                Ok(b) => a.buf = b,
                Err(e) => {
                    self.fail(self.driver_error(&format!("allocating {need} bytes of activations"), e));
                    (a.rows, a.cols) = (0, 0);
                    return;
                }
            }
        }
        (a.rows, a.cols) = (rows, cols);
    }

    /// `data` on the device (through the pinned upload ring), valid for kernels queued before
    /// the next sync.
    fn upload<T: Copy>(&mut self, data: &[T]) -> DevPtr {
        // SAFETY: `T` is plain data (ids, floats); its bytes are read as they are.
        let bytes = unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data)) };
        if bytes.len() > UPLOAD_BYTES {
            self.fail(CudaError::Driver {
                ordinal: self.info.ordinal,
                message: format!("an upload of {} bytes is past the {UPLOAD_BYTES}-byte ring", bytes.len()),
            });
            return 0;
        }
        if self.up_at + bytes.len() > UPLOAD_BYTES {
            // Every queued upload must have been read before the ring starts over.
            self.sync();
        }
        let at = self.up_at;
        self.up_host.write(at, bytes);
        self.up_at = (at + bytes.len()).next_multiple_of(16);
        let dst = self.up_dev.ptr + at as u64;
        // SAFETY: pinned source bytes at..at+len stay untouched until the next sync (the ring is
        // reset only after one); the destination is inside the device twin.
        let r = unsafe {
            result::memcpy_htod_async(
                dst,
                std::slice::from_raw_parts(self.up_host.ptr.add(at), bytes.len()),
                self.stream,
            )
        };
        self.check("uploading", r);
        dst
    }

    /// Wait for the device; the upload ring starts over and the copy timings that completed
    /// are summed (a prefetch's may still be running: it is kept for a later sync).
    fn sync(&mut self) {
        // SAFETY: our own stream.
        let r = unsafe { result::stream::synchronize(self.stream) };
        self.check("synchronizing", r);
        self.up_at = 0;
        self.host_reads = false;
        let mut busy = 0.0;
        self.copy_timing.retain(|(a, b)| {
            // SAFETY: live events of this context; one not yet reached reports an error (not
            // ready) and is kept.
            match unsafe { result::event::elapsed(a.0, b.0) } {
                Ok(ms) => {
                    busy += ms as f64 / 1e3;
                    false
                }
                Err(_) => true,
            }
        });
        self.stats.copy_busy_s += busy;
        if self.copy_timing.len() > 256 {
            // Pairs that never complete (a failed recording) are dropped, not summed.
            let drop = self.copy_timing.len() - 256;
            self.copy_timing.drain(..drop);
        }
    }

    /// The registered range holding `bytes`, if any.
    fn registered(&self, bytes: &[u8]) -> Option<&Registered> {
        let h = bytes.as_ptr() as usize;
        self.registered.iter().find(|r| h >= r.host && h + bytes.len() <= r.host + r.len)
    }

    /// The device address of host bytes inside memory mapped for the device (unified).
    fn mapped(&self, bytes: &[u8]) -> Option<DevPtr> {
        let r = self.registered(bytes)?;
        Some(r.dev? + (bytes.as_ptr() as usize - r.host) as u64)
    }

    /// Queue a copy of `bytes` to `dst` on `stream`: straight out of page-locked memory (true:
    /// the device reads the host bytes later), else through the pinned staging ring (the bytes
    /// are taken now). None after an error (kept).
    fn copy_to_device(&mut self, dst: DevPtr, bytes: &[u8], stream: sys::CUstream) -> Option<bool> {
        if self.registered(bytes).is_some() {
            // SAFETY: page-locked host bytes that are not rewritten before `release_host_bytes`
            // (the trait's contract), which waits for this copy; the destination has room for
            // them (an arena slot at least as large, checked by the caller).
            let r = unsafe { result::memcpy_htod_async(dst, bytes, stream) };
            self.check("copying an expert", r);
            self.stats.direct_copies += 1;
            return self.error.borrow().is_none().then_some(true);
        }
        for (i, piece) in bytes.chunks(STAGE_BYTES).enumerate() {
            let (buf, done) = &mut self.stages[self.next_stage];
            self.next_stage = (self.next_stage + 1) % STAGES;
            // The previous copy out of this staging buffer must have finished.
            // SAFETY: a live event.
            let r = unsafe { result::event::synchronize(done.0) };
            if let Err(e) = r {
                self.fail(self.driver_error("waiting for a staging buffer", e));
                return None;
            }
            buf.write(0, piece);
            // SAFETY: the pinned bytes 0..len are not written again before `done` fires (checked
            // above on the next use); the destination has room for the whole weight.
            let r = unsafe {
                result::memcpy_htod_async(
                    dst + (i * STAGE_BYTES) as u64,
                    std::slice::from_raw_parts(buf.ptr, piece.len()),
                    stream,
                )
            };
            let r2 = done.record(stream);
            self.check("copying an expert", r.and(r2));
        }
        self.error.borrow().is_none().then_some(false)
    }

    /// The device address of `m`'s bytes: its own, a registered host range's, or an arena slot's
    /// (copied now on a miss; the slot joins `keep` so the same job does not evict it). `copied`
    /// is set when a copy was queued.
    fn device_addr(&mut self, m: &CudaMat<'_>, keep: &mut Vec<usize>, copied: &mut bool) -> Option<DevPtr> {
        let (bytes, key) = match m.at {
            At::Device(p) => return Some(p),
            At::Host(b, k) => (b, k),
        };
        if let Some(p) = self.mapped(bytes) {
            self.host_reads = true;
            return Some(p);
        }
        self.stats.expert_lookups += 1;
        if self.arena.is_none() {
            // Host-held experts with everything resident (an expert cache was put on top): a
            // small arena of slots for the model's largest expert matrix.
            let slot = self.expert_slot.max(bytes.len().next_multiple_of(256));
            if let Err(e) = Arena::new(&self.ctx, slot, 24).map(|a| self.arena = Some(a)) {
                self.fail(self.driver_error("allocating the expert arena", e));
                return None;
            }
        }
        let arena = self.arena.as_mut()?;
        if let Some(s) = arena.hit(&key) {
            self.stats.expert_hits += 1;
            self.stats.prefetch_used += u64::from(std::mem::take(&mut arena.prefetched[s]));
            keep.push(s);
            let addr = arena.addr(s);
            if std::mem::take(&mut arena.fill_pending[s]) {
                // A prefetch filled the slot and may still be copying.
                // SAFETY: live stream and event of this context.
                let r = unsafe {
                    result::stream::wait_event(
                        self.stream,
                        arena.filled[s].0,
                        sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    )
                };
                self.check("ordering compute after a prefetch", r);
            }
            return Some(addr);
        }
        if bytes.len() > arena.slot_bytes {
            let msg = format!("a weight of {} bytes is larger than an expert slot ({})", bytes.len(), arena.slot_bytes);
            self.fail(CudaError::Driver { ordinal: self.info.ordinal, message: msg });
            return None;
        }
        let Some(slot) = arena.victim(keep) else {
            self.fail(CudaError::Driver { ordinal: self.info.ordinal, message: "every expert slot is in use".into() });
            return None;
        };
        let dst = arena.addr(slot);
        // The copy may not overwrite the slot before the kernels reading its last occupant ran,
        // nor before a prefetch into it (never used) finished writing.
        let copy = self.copy;
        let wait = |ev: &Event| {
            // SAFETY: live stream and event of this context.
            unsafe { result::stream::wait_event(copy, ev.0, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
        };
        let mut r = wait(&arena.read_done[slot]);
        if std::mem::take(&mut arena.fill_pending[slot]) {
            r = r.and(wait(&arena.filled[slot]));
        }
        arena.fill(slot, key);
        keep.push(slot);
        self.check("ordering a copy", r);
        if !*copied {
            if let (Ok(a), Ok(b)) = (Event::new(true), Event::new(true)) {
                self.check("timing a copy", a.record(self.copy));
                self.copy_timing.push((a, b));
                self.timing_open = true;
            }
        }
        self.host_reads |= self.copy_to_device(dst, bytes, self.copy)?;
        self.stats.copies += 1;
        self.stats.bytes_copied += bytes.len() as u64;
        *copied = true;
        Some(dst)
    }

    /// After a job's copies were queued: the compute stream waits for them.
    fn join_copies(&mut self) {
        if std::mem::take(&mut self.timing_open) {
            if let Some((_, end)) = self.copy_timing.last() {
                let r = end.record(self.copy);
                self.check("timing a copy", r);
            }
        }
        let r = self.copy_done.record(self.copy);
        // SAFETY: live stream and event of this context.
        let r2 = unsafe {
            result::stream::wait_event(self.stream, self.copy_done.0, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
        };
        self.check("ordering compute after a copy", r.and(r2));
    }

    /// After the kernels reading `slots` were queued: mark when they ran.
    fn release(&mut self, slots: &[usize]) {
        if let Some(a) = &self.arena {
            for &s in slots {
                let r = a.read_done[s].record(self.stream);
                self.check("recording a slot's use", r);
            }
        }
    }

    /// Device addresses of `ms` (copying misses), the compute stream ordered after the copies.
    fn addrs(&mut self, ms: &[CudaMat<'_>], keep: &mut Vec<usize>) -> Option<Vec<DevPtr>> {
        let mut copied = false;
        let out = ms.iter().map(|m| self.device_addr(m, keep, &mut copied)).collect::<Option<Vec<_>>>();
        if copied {
            self.join_copies();
        }
        out
    }

    /// `x` (n rows of `cols`, `xs` apart) as ggml's CPU hands it to weights of type `ty`: rounded
    /// to their `vec_dot_type` (8-bit blocks for quantized weights, f16 or bf16) into `self.xr`,
    /// once per operation and type; f32 weights take it as it is.
    fn round_input(&mut self, x: DevPtr, xs: usize, n: usize, cols: usize, ty: GgmlType) -> (DevPtr, usize) {
        let kind = match crate::ggml::kernels(ty).map(|k| k.vec_dot_type) {
            Some(GgmlType::Q8_0) => 1,
            Some(GgmlType::Q8_1) => 2,
            Some(GgmlType::Q8_K) => 3,
            Some(GgmlType::F16) => 4,
            Some(GgmlType::BF16) => 5,
            _ => return (x, xs),
        };
        if self.rounded != Some((x, kind)) {
            let mut xr = std::mem::take(&mut self.xr);
            self.ensure(&mut xr, n, cols);
            let qk = if kind == 3 { 256 } else { 32 };
            self.launch_named(
                "round_act_f32",
                (cols.div_ceil(qk).div_ceil(128), n, 1),
                128,
                &[Arg::P(x), long(xs), Arg::P(xr.ptr()), long(cols), int(cols), Arg::I(kind)],
            );
            self.xr = xr;
            self.rounded = Some((x, kind));
        }
        (self.xr.ptr(), cols)
    }

    /// `y[t][r] = w[r] · x[t]` for `n` rows of x (`x_stride` apart) into y (`y_stride` apart), x
    /// first rounded as the CPU rounds it for `ty`.
    #[allow(clippy::too_many_arguments)]
    fn mat_mul(
        &mut self,
        w: DevPtr,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        x: DevPtr,
        xs: usize,
        n: usize,
        y: DevPtr,
        ys: usize,
    ) {
        let (x, xs) = self.round_input(x, xs, n, cols, ty);
        let tiled = n >= TILED_FROM;
        let f = match (tiled, if tiled { self.k.matmul.get(&ty) } else { self.k.matvec.get(&ty) }) {
            (_, Some(f)) => f.clone(),
            _ => {
                let msg = format!("no mat-mul kernel for {}", ty.name());
                self.fail(CudaError::Driver { ordinal: self.info.ordinal, message: msg });
                return;
            }
        };
        let args = [Arg::P(w), Arg::P(x), Arg::P(y), int(rows), int(cols), int(n), long(xs), long(ys)];
        match tiled {
            true => self.launch(&f, (rows.div_ceil(64), n.div_ceil(64), 1), 256, &args),
            false => self.launch(&f, (rows.div_ceil(MV_ROWS), n.div_ceil(8), 1), 256, &args),
        }
    }

    fn elementwise(&mut self, name: &str, n: usize, args: &[Arg]) {
        self.launch_named(name, (n.div_ceil(256), 1, 1), 256, args);
    }

    /// The expert-FFN scratch (gathered inputs, gate, up, down outputs) taken out of the backend
    /// and sized for `n` rows; the caller puts it back.
    fn take_scratch(&mut self, n: usize, d: usize, ff: usize, d_out: usize) -> [CudaAct; 4] {
        let mut s = [
            std::mem::take(&mut self.xg),
            std::mem::take(&mut self.g),
            std::mem::take(&mut self.u),
            std::mem::take(&mut self.o),
        ];
        for (a, cols) in s.iter_mut().zip([d, ff, ff, d_out]) {
            self.ensure(a, n, cols);
        }
        s
    }

    /// Rows `ids` of `x` (their first `out.cols` values) into `out`, side by side.
    fn gather_rows(&mut self, x: &CudaAct, ids: &[u32], out: &CudaAct) {
        let n = ids.len();
        let ids = self.upload(ids);
        self.launch_named(
            "gather_rows_f32",
            (out.cols.div_ceil(256), n, 1),
            256,
            &[Arg::P(x.ptr()), long(x.cols), Arg::P(ids), Arg::P(out.ptr()), int(out.cols)],
        );
    }

    /// Row i of `src` (its first `src.cols` values) into row `rows[i]` of `y`.
    fn scatter_rows(&mut self, src: &CudaAct, rows: &[u32], y: &CudaAct) {
        let n = rows.len();
        let ids = self.upload(rows);
        self.launch_named(
            "scatter_rows_f32",
            (src.cols.div_ceil(256), n, 1),
            256,
            &[Arg::P(src.ptr()), int(src.cols), Arg::P(ids), Arg::P(y.ptr()), long(y.cols)],
        );
    }

    /// One expert job on the device: gather, gate and up, GLU, down, scatter into `y`.
    fn expert_job(&mut self, x: &CudaAct, j: &ExpertJob<'_, '_, Self>, y: &mut CudaAct) {
        let n = j.tokens.len();
        if n == 0 {
            return;
        }
        self.rounded = None;
        let [gate, up, down] = j.mats;
        let mut keep = Vec::with_capacity(3);
        let Some(p) = self.addrs(&j.mats, &mut keep) else { return };
        let (d, ff, d_out) = (gate.cols, gate.rows, down.rows);
        let [xg, g, u, o] = self.take_scratch(n, d, ff, d_out);
        self.gather_rows(x, j.tokens, &xg);
        self.mat_mul(p[0], gate.ty, ff, d, xg.ptr(), d, n, g.ptr(), ff);
        self.mat_mul(p[1], up.ty, ff, d, xg.ptr(), d, n, u.ptr(), ff);
        if let Some([bg, bu, _]) = j.bias {
            self.bias(&g, 0, ff, bg.ptr);
            self.bias(&u, 0, ff, bu.ptr);
        }
        self.glu(g.ptr(), u.ptr(), n * ff, j.glu);
        self.mat_mul(p[2], down.ty, d_out, ff, g.ptr(), ff, n, o.ptr(), d_out);
        if let Some([_, _, bd]) = j.bias {
            self.bias(&o, 0, d_out, bd.ptr);
        }
        self.release(&keep);
        self.scatter_rows(&o, j.out_rows, y);
        (self.xg, self.g, self.u, self.o) = (xg, g, u, o);
    }

    /// Decode's routed experts in five launches instead of eight per expert: when every job is
    /// the same one token through experts of one type and shape, gate and up run as one grouped
    /// mat-vec (a weight address per expert and matrix; two where their types differ or biases
    /// follow), the GLU once over all of them, and down writes each expert's row of `y` directly.
    /// Returns false (nothing done) where that does not apply: the caller runs the jobs one by
    /// one.
    fn fused_decode(&mut self, x: &CudaAct, jobs: &[&ExpertJob<'_, '_, Self>], y: &mut CudaAct) -> bool {
        let Some(first) = jobs.first() else { return false };
        let [g0, u0, d0] = first.mats;
        let same = |j: &&ExpertJob<'_, '_, Self>| {
            let [g, u, d] = j.mats;
            j.tokens.len() == 1
                && j.tokens == first.tokens
                && j.glu == first.glu
                && j.bias.is_some() == first.bias.is_some()
                && (g.ty, g.rows, g.cols, u.ty, u.rows, u.cols, d.ty, d.rows, d.cols)
                    == (g0.ty, g0.rows, g0.cols, u0.ty, u0.rows, u0.cols, d0.ty, d0.rows, d0.cols)
        };
        let n = jobs.len();
        let fits = self.arena.as_ref().is_none_or(|a| 3 * n <= a.owner.len());
        let kernels = [g0.ty, u0.ty, d0.ty].iter().all(|t| self.k.matvec_grouped.contains_key(t));
        if n < 2 || !fits || !kernels || !jobs.iter().all(same) {
            return false;
        }
        let mats: Vec<CudaMat<'_>> = jobs.iter().flat_map(|j| j.mats).collect();
        let mut keep = Vec::with_capacity(mats.len());
        let Some(p) = self.addrs(&mats, &mut keep) else { return true };
        self.rounded = None;
        let (d, ff, d_out) = (g0.cols, g0.rows, d0.rows);
        let (mut g, mut u) = (std::mem::take(&mut self.g), std::mem::take(&mut self.u));
        let ptrs = |k: usize| p.iter().skip(k).step_by(3).copied().collect::<Vec<DevPtr>>();
        let xrow = x.at(first.tokens[0] as usize * x.cols);
        // Gate and up of one type without biases: one launch of 2n jobs, gates in rows 0..n of
        // `g` and ups in rows n..2n.
        let together = g0.ty == u0.ty && first.bias.is_none();
        let (gp, up) = if together {
            self.ensure(&mut g, 2 * n, ff);
            let wgu: Vec<DevPtr> = ptrs(0).into_iter().chain(ptrs(1)).collect();
            let wgu = self.upload(&wgu);
            let (xi, _) = self.round_input(xrow, x.cols, 1, d, g0.ty);
            self.grouped(g0.ty, wgu, xi, 0, g.ptr(), 0, ff, ff, d, 2 * n);
            (g.ptr(), g.at(n * ff))
        } else {
            self.ensure(&mut g, n, ff);
            self.ensure(&mut u, n, ff);
            let (wg, wu) = (self.upload(&ptrs(0)), self.upload(&ptrs(1)));
            let (xi, _) = self.round_input(xrow, x.cols, 1, d, g0.ty);
            self.grouped(g0.ty, wg, xi, 0, g.ptr(), 0, ff, ff, d, n);
            let (xi, _) = self.round_input(xrow, x.cols, 1, d, u0.ty);
            self.grouped(u0.ty, wu, xi, 0, u.ptr(), 0, ff, ff, d, n);
            (g.ptr(), u.ptr())
        };
        let wd = self.upload(&ptrs(2));
        let biases = first.bias.map(|_| {
            let per = |k: usize| jobs.iter().filter_map(|j| j.bias.map(|b| b[k].ptr)).collect::<Vec<DevPtr>>();
            [per(0), per(1), per(2)]
        });
        let rows: Vec<i32> = jobs.iter().map(|j| j.out_rows[0] as i32).collect();
        let rows = self.upload(&rows);
        if let Some([bg, bu, _]) = &biases {
            let (bg, bu) = (self.upload(bg), self.upload(bu));
            self.bias_grouped(&g, 0, bg, ff, n);
            self.bias_grouped(&u, 0, bu, ff, n);
        }
        self.glu(gp, up, n * ff, first.glu);
        let (ai, a_stride) = self.round_input(gp, ff, n, ff, d0.ty);
        self.grouped(d0.ty, wd, ai, a_stride, y.ptr(), rows, y.cols, d_out, ff, n);
        if let Some([_, _, bd]) = &biases {
            let bd = self.upload(bd);
            self.bias_grouped(y, rows, bd, d_out, n);
        }
        self.release(&keep);
        (self.g, self.u) = (g, u);
        true
    }

    /// One token through several weights of one type and width, outputs side by side (decode's
    /// q, k and v): one grouped mat-vec launch instead of one per weight, each weight cut into
    /// chunks of the rows they all divide into, each chunk a job writing its columns of `out`.
    /// Returns false (nothing done) where that does not apply.
    fn matvec_side_by_side(&mut self, x: &CudaAct, ws: &[CudaMat<'_>], p: &[DevPtr], out: &CudaAct) -> bool {
        let Some(w0) = ws.first() else { return false };
        if x.rows != 1 || ws.len() < 2 || ws.iter().any(|w| (w.ty, w.cols) != (w0.ty, w0.cols)) {
            return false;
        }
        let chunk = ws.iter().fold(0, |g, w| gcd(g, w.rows));
        let Some(row_bytes) = w0.ty.row_bytes(w0.cols as u64) else { return false };
        let jobs: usize = ws.iter().map(|w| w.rows / chunk.max(1)).sum();
        if chunk < MV_ROWS || jobs > 256 || !self.k.matvec_grouped.contains_key(&w0.ty) {
            return false;
        }
        let (mut ptrs, mut cols) = (Vec::with_capacity(jobs), Vec::with_capacity(jobs));
        let mut off = 0;
        for (w, &base) in ws.iter().zip(p) {
            for c in 0..w.rows / chunk {
                ptrs.push(base + (c * chunk) as u64 * row_bytes);
                cols.push((off + c * chunk) as i32);
            }
            off += w.rows;
        }
        let (ptrs, cols) = (self.upload(&ptrs), self.upload(&cols));
        let (xi, _) = self.round_input(x.ptr(), x.cols, 1, w0.cols, w0.ty);
        // Row `cols[j]` of a 1-wide y is column cols[j] of the one output row.
        self.grouped(w0.ty, ptrs, xi, 0, out.ptr(), cols, 1, chunk, w0.cols, jobs);
        true
    }

    /// A batch's experts (prefill) in eight launches for as many experts as the arena holds at
    /// once, instead of eight per expert: every job's tokens gathered side by side, rounded once,
    /// gate and up each one grouped tiled mat-mul (`matmul_grouped_*`, a weight and a row range
    /// per job), biases by row, the GLU once, down grouped, and one scatter into `y`. Applies
    /// when every job runs experts of one type and shape; returns false (nothing done) otherwise.
    fn grouped_batch(&mut self, x: &CudaAct, jobs: &[&ExpertJob<'_, '_, Self>], y: &mut CudaAct) -> bool {
        let Some(first) = jobs.first() else { return false };
        let [g0, u0, d0] = first.mats;
        let shape = |j: &&ExpertJob<'_, '_, Self>| {
            let [g, u, d] = j.mats;
            (g.ty, g.rows, g.cols, u.ty, u.rows, u.cols, d.ty, d.rows, d.cols, j.glu, j.bias.is_some())
        };
        let kernels = [g0.ty, u0.ty, d0.ty].iter().all(|t| self.k.matmul_grouped.contains_key(t));
        if jobs.len() < 2 || !kernels || !jobs.iter().all(|j| shape(j) == shape(first)) {
            return false;
        }
        // As many jobs at a time as the arena holds all three matrices of (every one when the
        // experts are resident).
        let per = self.arena.as_ref().map_or(jobs.len(), |a| a.owner.len() / 3).max(1);
        for group in jobs.chunks(per) {
            self.grouped_jobs(x, group, y);
        }
        true
    }

    /// [`Self::grouped_batch`] for jobs whose matrices the arena holds at once.
    fn grouped_jobs(&mut self, x: &CudaAct, jobs: &[&ExpertJob<'_, '_, Self>], y: &mut CudaAct) {
        let [g0, u0, d0] = jobs[0].mats;
        let (d, ff, d_out) = (g0.cols, g0.rows, d0.rows);
        let mats: Vec<CudaMat<'_>> = jobs.iter().flat_map(|j| j.mats).collect();
        let mut keep = Vec::with_capacity(mats.len());
        let Some(p) = self.addrs(&mats, &mut keep) else { return };
        self.rounded = None;
        let (mut row0, mut counts, mut tokens, mut out_rows) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for j in jobs {
            row0.push(tokens.len() as i32);
            counts.push(j.tokens.len() as i32);
            tokens.extend_from_slice(j.tokens);
            out_rows.extend_from_slice(j.out_rows);
        }
        let total = tokens.len();
        let widest = counts.iter().copied().max().unwrap_or(0) as usize;
        if total == 0 {
            self.release(&keep);
            return;
        }
        let [xg, g, u, o] = self.take_scratch(total, d, ff, d_out);
        self.gather_rows(x, &tokens, &xg);
        let (row0, counts) = (self.upload(&row0), self.upload(&counts));
        let ptrs = |k: usize| p.iter().skip(k).step_by(3).copied().collect::<Vec<DevPtr>>();
        let (wg, wu, wd) = (self.upload(&ptrs(0)), self.upload(&ptrs(1)), self.upload(&ptrs(2)));
        let grid = |rows: usize| (rows.div_ceil(64), widest.div_ceil(64), jobs.len());
        let (xi, xs) = self.round_input(xg.ptr(), d, total, d, g0.ty);
        self.matmul_grouped(g0.ty, grid(ff), &[Arg::P(wg), Arg::P(xi), Arg::P(g.ptr())], (row0, counts), ff, d, xs, ff);
        let (xi, xs) = self.round_input(xg.ptr(), d, total, d, u0.ty);
        self.matmul_grouped(u0.ty, grid(ff), &[Arg::P(wu), Arg::P(xi), Arg::P(u.ptr())], (row0, counts), ff, d, xs, ff);
        // Biases by row: row r gets its job's vector.
        let by_row = |k: usize| -> Option<Vec<DevPtr>> {
            let mut v = Vec::with_capacity(total);
            for j in jobs {
                let b = j.bias?[k].ptr;
                v.extend(std::iter::repeat_n(b, j.tokens.len()));
            }
            Some(v)
        };
        let biases = jobs[0].bias.and_then(|_| Some([by_row(0)?, by_row(1)?, by_row(2)?]));
        if let Some([bg, bu, _]) = &biases {
            let (bg, bu) = (self.upload(bg), self.upload(bu));
            self.bias_grouped(&g, 0, bg, ff, total);
            self.bias_grouped(&u, 0, bu, ff, total);
        }
        self.glu(g.ptr(), u.ptr(), total * ff, jobs[0].glu);
        let (ai, a_stride) = self.round_input(g.ptr(), ff, total, ff, d0.ty);
        self.matmul_grouped(
            d0.ty,
            grid(d_out),
            &[Arg::P(wd), Arg::P(ai), Arg::P(o.ptr())],
            (row0, counts),
            d_out,
            ff,
            a_stride,
            d_out,
        );
        if let Some([_, _, bd]) = &biases {
            let bd = self.upload(bd);
            self.bias_grouped(&o, 0, bd, d_out, total);
        }
        self.release(&keep);
        self.scatter_rows(&o, &out_rows, y);
        (self.xg, self.g, self.u, self.o) = (xg, g, u, o);
    }

    /// One `matmul_grouped_*` launch: `wxy` the weights' address array, the input and the
    /// output; `jobs` the row-start and row-count arrays.
    #[allow(clippy::too_many_arguments)]
    fn matmul_grouped(
        &mut self,
        ty: GgmlType,
        grid: (usize, usize, usize),
        wxy: &[Arg; 3],
        jobs: (DevPtr, DevPtr),
        rows: usize,
        cols: usize,
        x_stride: usize,
        y_stride: usize,
    ) {
        let Some(f) = self.k.matmul_grouped.get(&ty).cloned() else { return };
        let [w, x, y] = *wxy;
        let args = [w, x, y, Arg::P(jobs.0), Arg::P(jobs.1), int(rows), int(cols), long(x_stride), long(y_stride)];
        self.launch(&f, grid, 256, &args);
    }

    /// `out = rms_norm(x) · w` over whole rows; with `residual`, `x += residual` first (the
    /// kernel writes x back).
    fn norm_rows(&mut self, x: &CudaAct, residual: Option<&CudaAct>, w: CudaVector<'_>, eps: f32, out: &mut CudaAct) {
        self.ensure(out, x.rows, x.cols);
        if !self.enter() {
            return;
        }
        let (name, mut args) = match residual {
            Some(r) => ("add_rms_norm_f32", vec![Arg::P(x.ptr()), Arg::P(r.ptr())]),
            None => ("rms_norm_f32", vec![Arg::P(x.ptr())]),
        };
        args.extend([long(x.cols), Arg::P(w.ptr), Arg::P(out.ptr()), long(out.cols), int(x.cols), Arg::F(eps)]);
        self.launch_named(name, (1, x.rows, 1), 256, &args);
    }

    /// `y[rows_out[j] or j] = ws[j] · x[j]` for `n` jobs (`x` rows `x_job_stride` apart; 0: one
    /// row for all), one launch.
    #[allow(clippy::too_many_arguments)]
    fn grouped(
        &mut self,
        ty: GgmlType,
        ws: DevPtr,
        x: DevPtr,
        x_job_stride: usize,
        y: DevPtr,
        rows_out: DevPtr,
        y_stride: usize,
        rows: usize,
        cols: usize,
        n: usize,
    ) {
        let Some(f) = self.k.matvec_grouped.get(&ty).cloned() else { return };
        self.launch(
            &f,
            (rows.div_ceil(MV_ROWS), n, 1),
            256,
            &[
                Arg::P(ws),
                Arg::P(x),
                long(x_job_stride),
                Arg::P(y),
                Arg::P(rows_out),
                long(y_stride),
                int(rows),
                int(cols),
            ],
        );
    }

    /// Job j's bias (addresses `bs`) added to row `rows[j]` (or j, `rows` 0) of `x`.
    fn bias_grouped(&mut self, x: &CudaAct, rows: DevPtr, bs: DevPtr, n: usize, jobs: usize) {
        self.launch_named(
            "add_bias_grouped_f32",
            (n.div_ceil(256), jobs, 1),
            256,
            &[Arg::P(x.ptr()), long(x.cols), Arg::P(rows), Arg::P(bs), int(n)],
        );
    }

    /// `g = glu(g, u)` over the first `n` values.
    fn glu(&mut self, g: DevPtr, u: DevPtr, n: usize, glu: Glu) {
        let (kind, alpha, limit) = match glu {
            Glu::SwiGlu => (0, 0.0, 0.0),
            Glu::SwiGluOai { alpha, limit } => (1, alpha, limit),
        };
        self.elementwise(
            "glu_f32",
            n,
            &[Arg::P(g), Arg::P(u), Arg::P(g), long(n), Arg::I(kind), Arg::F(alpha), Arg::F(limit)],
        );
    }

    fn bias(&mut self, x: &CudaAct, col: usize, n: usize, b: DevPtr) {
        self.launch_named(
            "add_bias_f32",
            (n.div_ceil(256), x.rows, 1),
            256,
            &[Arg::P(x.ptr()), long(x.cols), int(col), Arg::P(b), int(n)],
        );
    }

    /// `--cpu-misses`: which of `jobs` (bound for the device) the CPU computes instead. A job is
    /// a miss when a matrix of it is neither on the device nor in the arena; `Auto` splits the
    /// misses by the measured rates (priors until there are some), `Always` takes every miss the
    /// host holds.
    fn plan_misses(&self, jobs: &[&ExpertJob<'_, '_, Self>]) -> Vec<bool> {
        if self.opts.cpu_misses == CpuMisses::Off || self.cpu.is_none() {
            return vec![false; jobs.len()];
        }
        let cached = |k: &Key| self.arena.as_ref().is_some_and(|a| a.map.contains_key(k));
        let misses: Vec<Miss> = jobs
            .iter()
            .map(|j| {
                let mut m = Miss { copy_bytes: 0, copies: 0, host_bytes: Some(0), tokens: j.tokens.len() as u32 };
                for w in j.mats {
                    match w.at {
                        At::Host(b, k) if self.mapped(b).is_none() => {
                            if !cached(&k) {
                                (m.copy_bytes, m.copies) = (m.copy_bytes + b.len() as u64, m.copies + 1);
                            }
                            m.host_bytes = m.host_bytes.map(|h| h + b.len() as u64);
                        }
                        _ => m.host_bytes = None,
                    }
                }
                m
            })
            .collect();
        let is_miss = |m: &Miss| m.copies > 0 && m.host_bytes.is_some();
        if self.opts.cpu_misses == CpuMisses::Always {
            return misses.iter().map(is_miss).collect();
        }
        let (idx, list): (Vec<usize>, Vec<Miss>) =
            misses.iter().enumerate().filter(|(_, m)| is_miss(m)).map(|(i, m)| (i, *m)).unzip();
        let mut out = vec![false; jobs.len()];
        for (i, h) in idx.into_iter().zip(split_misses(&list, &self.miss_rates())) {
            out[i] = h;
        }
        out
    }

    /// The planner's rates: the copy stream's measured seconds per demand-copied byte (fixed
    /// costs folded in) and the CPU's per weight byte and token, each a prior until 16 MiB
    /// were measured (PCIe 4 ×16 at 25 GB/s with 20 µs a copy; 3 GB/s a CPU thread).
    fn miss_rates(&self) -> MissRates {
        const MEASURED: f64 = (16 << 20) as f64;
        let demand = self.stats.bytes_copied.saturating_sub(self.stats.prefetch_bytes) as f64;
        let (copy_s_per_byte, copy_fixed_s) = match demand >= MEASURED && self.stats.copy_busy_s > 0.0 {
            true => (self.stats.copy_busy_s / demand, 0.0),
            false => (1.0 / 25e9, 20e-6),
        };
        let host_s_per_byte = match self.host_timing.1 >= MEASURED {
            true => self.host_timing.0 / self.host_timing.1,
            false => 1.0 / (3e9 * self.opts.threads.clamp(1, 8) as f64),
        };
        MissRates { copy_s_per_byte, copy_fixed_s, host_s_per_byte, host_fixed_s: 30e-6 }
    }

    /// `jobs` on the CPU from the host's copies of their weights, `xh` the input read back
    /// before the device's jobs were queued (the CPU computes while the device runs them); the
    /// outputs are uploaded into their rows of `y`.
    fn expert_jobs_on_cpu(&mut self, xh: HostAct, jobs: &[&ExpertJob<'_, '_, Self>], y: &mut CudaAct) {
        let Some(mut cpu) = self.cpu.take() else { return };
        let mut yh = HostAct::default();
        yh.resize(y.rows, y.cols);
        let descs: Vec<[(WeightDesc, &[u8]); 3]> = jobs
            .iter()
            .filter_map(|j| {
                let [a, b, c] = j.mats;
                Some([a.host_desc()?, b.host_desc()?, c.host_desc()?])
            })
            .collect();
        let cpu_jobs: Vec<ExpertJob<'_, '_, CpuBackend>> = jobs
            .iter()
            .zip(&descs)
            .map(|(j, d)| ExpertJob {
                mats: [0, 1, 2].map(|i| -> MatRef<'_> { CpuBackend::host_mat(&d[i].0, d[i].1) }),
                bias: j.bias.map(|b| b.map(|v| v.host)),
                glu: j.glu,
                dense: j.dense,
                tokens: j.tokens,
                out_rows: j.out_rows,
            })
            .collect();
        let started = std::time::Instant::now();
        cpu.expert_ffn(&xh, &cpu_jobs, &mut yh);
        let work: usize =
            descs.iter().zip(jobs).map(|(d, j)| d.iter().map(|m| m.1.len()).sum::<usize>() * j.tokens.len()).sum();
        self.host_timing.0 += started.elapsed().as_secs_f64();
        self.host_timing.1 += work as f64;
        self.cpu = Some(cpu);
        self.stats.host_computed += cpu_jobs.len() as u64;
        let rows: Vec<u32> = jobs.iter().flat_map(|j| j.out_rows.iter().copied()).collect();
        let packed: Vec<f32> = rows.iter().flat_map(|&r| yh.row(r as usize).iter().copied()).collect();
        let mut src = std::mem::take(&mut self.o);
        self.ensure(&mut src, rows.len(), y.cols);
        if !self.enter() {
            self.o = src;
            return;
        }
        // SAFETY: `src` holds rows.len() × cols f32; the host vector lives through the call
        // (a pageable copy is staged before the call returns).
        let r = unsafe { result::memcpy_htod_async(src.ptr(), &packed, self.stream) };
        self.check("uploading expert outputs", r);
        self.scatter_rows(&src, &rows, y);
        // Stream order: the next write into the scratch comes after this scatter.
        self.o = src;
    }

    /// Register host memory the backend was handed: page-locked, and with `map` also mapped
    /// for the device to read in place.
    fn register(&mut self, host: usize, len: usize, map: bool) -> Result<(), DriverError> {
        if len == 0 || self.registered.iter().any(|r| r.host == host) {
            return Ok(());
        }
        self.ctx.bind_to_thread()?;
        let flags = match map {
            true => sys::CU_MEMHOSTREGISTER_DEVICEMAP | sys::CU_MEMHOSTREGISTER_READ_ONLY,
            false => 0,
        };
        // SAFETY: `host..host + len` is live host memory that outlives the backend's use of it (the expert
        // cache's slots live as long as the engine); registration only pins (and maps) it.
        unsafe { sys::cuMemHostRegister_v2(host as *mut c_void, len, flags) }.result()?;
        let mut dev: DevPtr = 0;
        if map {
            // SAFETY: `host` was registered above with DEVICEMAP.
            let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, host as *mut c_void, 0) }.result();
            if let Err(e) = r {
                // SAFETY: registered just above, unregistered once.
                let _ = unsafe { sys::cuMemHostUnregister(host as *mut c_void) }.result();
                return Err(e);
            }
        }
        self.registered.push(Registered { host, len, dev: map.then_some(dev) });
        Ok(())
    }

    /// Wait for the prefetch stream (its copies read host bytes, or the slots are freed).
    fn sync_prefetch(&mut self) {
        // SAFETY: our own stream.
        let r = unsafe { result::stream::synchronize(self.prefetch) };
        self.check("synchronizing the prefetch stream", r);
        self.prefetch_host_reads = false;
    }

    fn budget_bytes(&self, model: &Model) -> Option<u64> {
        self.opts.gpu_budget.map(|b| match b {
            Budget::Bytes(n) => n,
            Budget::Share(s) => (model.expert_bytes() as f64 * s) as u64,
        })
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        let _ = self.ctx.synchronize();
        for r in self.registered.drain(..) {
            // SAFETY: registered by `register`, unregistered once, the device idle.
            let _ = unsafe { sys::cuMemHostUnregister(r.host as *mut c_void) }.result();
        }
        // SAFETY: our streams, idle, destroyed once.
        let _ = unsafe { result::stream::destroy(self.stream) };
        let _ = unsafe { result::stream::destroy(self.copy) };
        let _ = unsafe { result::stream::destroy(self.prefetch) };
    }
}

/// A non-blocking stream of the bound context with `priority` (lower numbers first).
fn new_stream(priority: i32) -> Result<sys::CUstream, DriverError> {
    let mut s: sys::CUstream = std::ptr::null_mut();
    let flags = sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
    // SAFETY: an out-parameter; the caller bound the context.
    unsafe { sys::cuStreamCreateWithPriority(&mut s, flags, priority) }.result()?;
    Ok(s)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The largest matrix of any routed expert (an arena slot's size).
fn largest_expert_matrix(model: &Model) -> u64 {
    (0..model.layers.len())
        .filter_map(|l| model.experts(l))
        .flat_map(|es| es.iter().flat_map(|e| [e.gate.bytes, e.up.bytes, e.down.bytes]))
        .max()
        .unwrap_or(0)
}

impl Backend for CudaBackend {
    type Mat<'a> = CudaMat<'a>;
    type Vector<'a> = CudaVector<'a>;
    type Weights = CudaWeights;
    type Act = CudaAct;
    type Kv = CudaKv;
    type Hot = ();

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn supports(&self, op: Op, ty: GgmlType) -> bool {
        supports(op, ty)
    }

    fn take_weights(&mut self, model: &Arc<Model>, residency: Residency) -> Result<CudaWeights, BackendError> {
        model.check_support(self.name(), supports)?;
        let alloc = |what: &'static str, bytes: u64| BackendError::Alloc { backend: "cuda", what, bytes };
        let ctx = Arc::clone(&self.ctx);
        ctx.bind_to_thread().map_err(|_| alloc("binding the device", 0))?;
        let dense = resident_set(model, Resident::Dense);
        let dense_bytes: u64 = dense.iter().map(|w| w.bytes).sum();
        // The experts of the first `n_cpu_moe` layers stay with the CPU; the device takes the rest.
        let on_cpu = |l: usize| self.opts.cpu_moe || l < self.opts.n_cpu_moe;
        let gpu_experts: Vec<WeightDesc> = (0..model.layers.len())
            .filter(|&l| !on_cpu(l))
            .filter_map(|l| model.experts(l))
            .flat_map(|es| es.iter().flat_map(|e| [e.gate, e.up, e.down]))
            .collect();
        self.cpu_experts = (0..model.layers.len())
            .filter(|&l| on_cpu(l))
            .filter_map(|l| model.experts(l))
            .flat_map(|es| es.iter().flat_map(|e| [e.gate.offset, e.up.offset, e.down.offset]))
            .collect();
        let experts: u64 = gpu_experts.iter().map(|w| w.bytes).sum();
        let free = ctx.mem_get_info().map(|(f, _)| f as u64).unwrap_or(self.info.memory_bytes);
        let wants_experts = !matches!(residency.which, Resident::Dense | Resident::None);
        let budget = self.budget_bytes(model);
        let all = experts > 0
            && wants_experts
            && match budget {
                Some(b) => b >= experts,
                None => dense_bytes + experts + HEADROOM <= free,
            };
        let ws = match all {
            true => dense.into_iter().chain(gpu_experts).collect(),
            false => dense,
        };
        // Each weight 256-byte aligned, as the kernels' block loads like.
        let total: u64 = ws.iter().map(|w| w.bytes.next_multiple_of(256)).sum();
        let t0 = std::time::Instant::now();
        let mem = DeviceBuf::new(&ctx, total as usize).map_err(|_| alloc("resident weights", total))?;
        let mut index = HashMap::with_capacity(ws.len());
        let mut at = 0u64;
        for w in &ws {
            let dst = mem.ptr + at;
            // SAFETY: the destination range lies inside `mem` (sized as the sum of the weights);
            // the source is the weight's bytes in the mapping.
            unsafe { result::memcpy_htod_sync(dst, model.bytes_of(w)) }
                .map_err(|_| alloc("resident weights", total))?;
            index.insert(w.offset, dst);
            at += w.bytes.next_multiple_of(256);
        }
        let host_vecs = model.vectors();
        let n_vec: usize = host_vecs.iter().map(Vec::len).sum();
        let vec_mem =
            DeviceBuf::new(&ctx, n_vec * 4).map_err(|_| alloc("norm weights and biases", n_vec as u64 * 4))?;
        let mut vectors = Vec::with_capacity(host_vecs.len());
        let mut at = 0u64;
        for v in host_vecs {
            // SAFETY: inside `vec_mem` (sized as the sum of the vectors).
            unsafe { result::memcpy_htod_sync(vec_mem.ptr + at, v) }
                .map_err(|_| alloc("norm weights", n_vec as u64 * 4))?;
            vectors.push(vec_mem.ptr + at);
            at += 4 * v.len() as u64;
        }
        tracing::info!(
            "cuda: {:.1} MiB of weights copied to the device in {:.2} s ({})",
            total as f64 / 1048576.0,
            t0.elapsed().as_secs_f64(),
            if all { "every expert resident" } else { "experts held by the host" }
        );
        self.stats.weight_bytes = total + n_vec as u64 * 4;
        self.expert_slot = largest_expert_matrix(model).next_multiple_of(256) as usize;
        if !all && experts > 0 {
            let slot = self.expert_slot;
            let budget = budget.unwrap_or_else(|| free.saturating_sub(total + HEADROOM));
            let n = (budget / slot.max(1) as u64) as usize;
            let need = 3 * model.hp.n_expert_used.max(1);
            if n < need {
                return Err(BackendError::GpuBudget { budget, slot: slot as u64, slots: n, need });
            }
            let arena = Arena::new(&ctx, slot, n).map_err(|_| alloc("the expert arena", budget))?;
            tracing::info!("cuda: expert arena of {n} slots of {:.2} MiB", slot as f64 / 1048576.0);
            self.stats.arena_bytes = (slot * n) as u64;
            self.arena = Some(arena);
        }
        let resident =
            if self.cpu_experts.is_empty() && (all || experts == 0) { Resident::All } else { Resident::Dense };
        Ok(CudaWeights {
            model: Arc::clone(model),
            _mem: mem,
            _vec_mem: vec_mem,
            index,
            vectors,
            resident,
            bytes: total,
        })
    }

    fn resident(weights: &CudaWeights) -> (Resident, u64) {
        (weights.resident, weights.bytes)
    }

    fn mat<'a>(weights: &'a CudaWeights, w: &WeightDesc) -> CudaMat<'a> {
        match weights.index.get(&w.offset) {
            Some(&p) => CudaMat { ty: w.ty, rows: w.rows, cols: w.cols, at: At::Device(p) },
            None => Self::host_mat(w, weights.model.bytes_of(w)),
        }
    }

    fn vector<'a>(weights: &'a CudaWeights, v: VecRef) -> CudaVector<'a> {
        CudaVector { ptr: weights.vectors[v.index()], host: weights.model.vector(v) }
    }

    fn host_mat<'a>(w: &WeightDesc, bytes: &'a [u8]) -> CudaMat<'a> {
        let key = Key { offset: w.offset, ty: w.ty, bytes: bytes.len() };
        CudaMat { ty: w.ty, rows: w.rows, cols: w.cols, at: At::Host(bytes, key) }
    }

    fn use_host_memory(&mut self, regions: &[(*const u8, usize)]) {
        let map = self.opts.unified;
        if !map && self.opts.cpu_moe {
            // The CPU computes what the device does not hold: nothing is copied out of them.
            return;
        }
        let t0 = std::time::Instant::now();
        let mut locked = 0;
        for &(p, len) in regions {
            match self.register(p as usize, len, map) {
                Ok(()) => locked += len,
                Err(e) if map => {
                    tracing::warn!("cuda: cannot map {len} bytes of host memory for the device ({e}); copying instead")
                }
                Err(e) => tracing::warn!(
                    "cuda: cannot page-lock {len} bytes of the expert cache ({e}); copies go through the staging ring"
                ),
            }
        }
        if locked > 0 {
            tracing::info!(
                "cuda: {:.1} MiB of the expert cache {} in {:.2} s",
                locked as f64 / 1048576.0,
                if map { "mapped for the device" } else { "page-locked for direct copies" },
                t0.elapsed().as_secs_f64()
            );
        }
    }

    fn release_host_bytes(&mut self) {
        if !self.host_reads && !self.prefetch_host_reads {
            return;
        }
        // Even after a kept error: copies queued before it may still be reading.
        let _ = self.ctx.bind_to_thread();
        if self.host_reads {
            self.sync();
        }
        if self.prefetch_host_reads {
            self.sync_prefetch();
        }
    }

    fn caches_experts(&self) -> bool {
        self.arena.is_some()
    }

    fn prefetch(&mut self, mats: &[CudaMat<'_>]) {
        if self.arena.is_none() || !self.enter() {
            return;
        }
        let mut keep: Vec<usize> = Vec::with_capacity(mats.len());
        let mut timing: Option<(Event, Event)> = None;
        for m in mats {
            let At::Host(bytes, key) = m.at else { continue };
            if self.mapped(bytes).is_some() {
                continue;
            }
            let pf = self.prefetch;
            let Some(arena) = self.arena.as_mut() else { return };
            if arena.map.contains_key(&key) || bytes.len() > arena.slot_bytes {
                continue;
            }
            // The least recently used slot, never one a prefetch filled and nothing used yet
            // (predictions do not evict each other): when none is left, the rest wait for need.
            let Some(slot) = (0..arena.owner.len())
                .filter(|&s| !arena.prefetched[s] && !keep.contains(&s))
                .min_by_key(|&s| (arena.owner[s].is_some(), arena.stamp[s]))
            else {
                break;
            };
            // SAFETY: live stream and event of this context.
            let r = unsafe {
                result::stream::wait_event(pf, arena.read_done[slot].0, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
            };
            // A slot left pending is never a prefetch's (those are skipped above) or was waited
            // on already; this stream's own earlier fills come first anyway.
            arena.fill_pending[slot] = false;
            arena.fill(slot, key);
            arena.prefetched[slot] = true;
            keep.push(slot);
            let dst = arena.addr(slot);
            self.check("ordering a prefetch", r);
            if timing.is_none() {
                if let (Ok(a), Ok(b)) = (Event::new(true), Event::new(true)) {
                    self.check("timing a copy", a.record(pf));
                    timing = Some((a, b));
                }
            }
            let Some(direct) = self.copy_to_device(dst, bytes, pf) else { return };
            self.prefetch_host_reads |= direct;
            let Some(arena) = self.arena.as_mut() else { return };
            let r = arena.filled[slot].record(pf);
            arena.fill_pending[slot] = true;
            self.check("recording a prefetch", r);
            self.stats.copies += 1;
            self.stats.bytes_copied += bytes.len() as u64;
            self.stats.prefetch_copies += 1;
            self.stats.prefetch_bytes += bytes.len() as u64;
        }
        if let Some((a, b)) = timing {
            self.check("timing a copy", b.record(self.prefetch));
            self.copy_timing.push((a, b));
        }
    }

    fn hot(&self) {}

    fn resize(&self, a: &mut CudaAct, rows: usize, cols: usize) {
        self.ensure(a, rows, cols);
    }

    fn read<'a>(&mut self, a: &'a CudaAct) -> Cow<'a, [f32]> {
        let mut out = vec![0f32; a.len()];
        if self.enter() && !out.is_empty() {
            // SAFETY: `a` holds a.len() f32; the stream is synchronized before `out` is used.
            let r = unsafe { result::memcpy_dtoh_async(&mut out, a.ptr(), self.stream) };
            self.check("reading back", r);
            self.sync();
        }
        Cow::Owned(out)
    }

    fn take_error(&mut self) -> Option<BackendError> {
        self.error.borrow_mut().take().map(|e| BackendError::Device(e.to_string()))
    }

    fn device_stats(&self) -> Option<DeviceStats> {
        let mut s = self.stats.clone();
        s.device = format!("cuda:{} {}", self.info.ordinal, self.info.name);
        s.memory_in_use_bytes = self.ctx.mem_get_info().map(|(f, t)| (t - f) as u64).unwrap_or(0);
        Some(s)
    }

    fn new_kv(&self, cfg: &KvConfig) -> Result<CudaKv, BackendError> {
        let kv_dim = cfg.n_head_kv * cfg.head_dim;
        let alloc = |_| BackendError::Alloc { backend: "cuda", what: "the KV cache", bytes: cfg.bytes() };
        let len: Vec<usize> = (0..cfg.n_layer).map(|l| cfg.layer_len(l).max(1)).collect();
        let mut k = Vec::with_capacity(cfg.n_layer);
        let mut v = Vec::new();
        for &n in &len {
            let per = n * kv_dim * cfg.ty.bytes();
            k.push(DeviceBuf::new(&self.ctx, per).map_err(alloc)?);
            if cfg.values == Values::Separate {
                v.push(DeviceBuf::new(&self.ctx, per).map_err(alloc)?);
            }
        }
        Ok(CudaKv { k, v, ty: cfg.ty, kv_dim, n_ctx: cfg.n_ctx, len })
    }

    fn copy_rows(&mut self, x: &CudaAct, rows: std::ops::Range<usize>, out: &mut CudaAct) {
        self.ensure(out, rows.len(), x.cols);
        if !self.enter() || rows.is_empty() {
            return;
        }
        let bytes = rows.len() * x.cols * 4;
        // SAFETY: both ranges lie inside their buffers (out was sized above).
        let r = unsafe { result::memcpy_dtod_async(out.ptr(), x.at(rows.start * x.cols), bytes, self.stream) };
        self.check("copying rows", r);
    }

    fn get_rows(&mut self, w: CudaMat<'_>, ids: &[u32], out: &mut CudaAct) {
        self.ensure(out, ids.len(), w.cols);
        if !self.enter() {
            return;
        }
        let table = match w.at {
            At::Device(p) => p,
            At::Host(bytes, _) => {
                // A table the device does not hold: the rows dequantized on the host.
                let Some(k) = crate::ggml::kernels(w.ty) else { return };
                let rb = bytes.len() / w.rows.max(1);
                let mut rows = vec![0f32; ids.len() * w.cols];
                for (i, &id) in ids.iter().enumerate() {
                    let r = (id as usize).min(w.rows.saturating_sub(1));
                    k.dequantize(&bytes[r * rb..(r + 1) * rb], &mut rows[i * w.cols..(i + 1) * w.cols]);
                }
                // SAFETY: `out` holds ids.len() × cols f32.
                let r = unsafe { result::memcpy_htod_async(out.ptr(), &rows, self.stream) };
                self.check("uploading rows", r);
                self.sync();
                return;
            }
        };
        let Some(f) = self.k.get_rows.get(&w.ty).cloned() else { return };
        let ids = self.upload(ids);
        self.launch(
            &f,
            (w.cols.div_ceil(256).min(64), out.rows, 1),
            256,
            &[Arg::P(table), Arg::P(ids), Arg::P(out.ptr()), int(w.cols)],
        );
    }

    fn rms_norm(&mut self, x: &CudaAct, w: CudaVector<'_>, eps: f32, out: &mut CudaAct) {
        self.norm_rows(x, None, w, eps, out);
    }

    fn rms_norm_heads(
        &mut self,
        x: &mut CudaAct,
        col: usize,
        n_heads: usize,
        head_dim: usize,
        w: CudaVector<'_>,
        eps: f32,
    ) {
        if !self.enter() {
            return;
        }
        let p = x.at(col);
        self.launch_named(
            "rms_norm_f32",
            (n_heads, x.rows, 1),
            256,
            &[Arg::P(p), long(x.cols), Arg::P(w.ptr), Arg::P(p), long(x.cols), int(head_dim), Arg::F(eps)],
        );
    }

    fn matmul(&mut self, x: &CudaAct, ws: &[CudaMat<'_>], out: &mut CudaAct) {
        let width: usize = ws.iter().map(|w| w.rows).sum();
        self.ensure(out, x.rows, width);
        if !self.enter() {
            return;
        }
        let mut keep = Vec::new();
        let Some(p) = self.addrs(ws, &mut keep) else { return };
        self.rounded = None;
        if !self.matvec_side_by_side(x, ws, &p, out) {
            let mut off = 0;
            for (w, &p) in ws.iter().zip(&p) {
                self.mat_mul(p, w.ty, w.rows, w.cols, x.ptr(), x.cols, x.rows, out.at(off), width);
                off += w.rows;
            }
        }
        self.release(&keep);
    }

    fn add_bias(&mut self, x: &mut CudaAct, col: usize, b: CudaVector<'_>) {
        if self.enter() {
            self.bias(x, col, b.host.len(), b.ptr);
        }
    }

    fn rope(&mut self, x: &mut CudaAct, col: usize, n_heads: usize, head_dim: usize, pos0: usize, rope: &Rope) {
        if !self.enter() {
            return;
        }
        let neox = matches!(rope.style, RopeStyle::Neox) as i32;
        self.launch_named(
            "rope_f32",
            ((rope.n_dims / 2).div_ceil(64), n_heads, x.rows),
            64,
            &[
                Arg::P(x.at(col)),
                long(x.cols),
                int(head_dim),
                int(rope.n_dims),
                int(pos0),
                Arg::F(rope.freq_base),
                Arg::F(rope.freq_scale),
                Arg::F(rope.ext_factor),
                Arg::F(rope.attn_factor),
                Arg::F(rope.corr_dims[0]),
                Arg::F(rope.corr_dims[1]),
                Arg::I(neox),
            ],
        );
    }

    fn attention(
        &mut self,
        kv: &mut CudaKv,
        layer: usize,
        qkv: &CudaAct,
        shape: &AttnShape,
        sinks: Option<CudaVector<'_>>,
        pos0: usize,
        out: &mut CudaAct,
    ) {
        let n = qkv.rows;
        self.ensure(out, n, shape.out_dim());
        if !self.enter() {
            return;
        }
        if pos0 + n > kv.n_ctx {
            let msg = format!("positions up to {} past the KV cache's {}", pos0 + n, kv.n_ctx);
            self.fail(CudaError::Driver { ordinal: self.info.ordinal, message: msg });
            return;
        }
        let ring = kv.len[layer];
        if ring < kv.n_ctx && (shape.window == 0 || n + shape.window > ring + 1) {
            // A row of this batch would overwrite a position an earlier row of it still needs.
            let msg = format!(
                "a batch of {n} rows does not fit layer {layer}'s sliding-window cache of {ring} positions (window {})",
                shape.window
            );
            self.fail(CudaError::Driver { ordinal: self.info.ordinal, message: msg });
            return;
        }
        let (ty, kc) = (kv.ty, kv.k[layer].ptr);
        let separate = shape.values == Values::Separate;
        let vc = if separate { kv.v[layer].ptr } else { kc };
        let (qd, kvd) = (shape.q_dim(), shape.kv_dim());
        let tn = match ty {
            KvType::F16 => "f16",
            KvType::F32 => "f32",
        };
        self.launch_named(
            &format!("kv_store_{tn}"),
            (kvd.div_ceil(256), n, 1),
            256,
            &[
                Arg::P(qkv.ptr()),
                long(qkv.cols),
                int(qd),
                Arg::I(if separate { (qd + kvd) as i32 } else { -1 }),
                Arg::P(kc),
                Arg::P(vc),
                int(kv.kv_dim),
                int(pos0),
                int(ring),
            ],
        );
        let widest = shape.head_dim.max(shape.v_dim());
        let Some(d) = [2usize, 4, 8, 20].into_iter().find(|d| 32 * d >= widest) else {
            let msg = format!("heads of {widest} values are past the attention kernel's 640");
            self.fail(CudaError::Driver { ordinal: self.info.ordinal, message: msg });
            return;
        };
        // llama.cpp rounds the query to the cache's type for batches under 64 rows.
        let round_q = (ty == KvType::F16 && n < crate::backend::cpu::kv::TILE) as i32;
        self.launch_named(
            &format!("attn_{tn}_{d}"),
            (shape.n_head, n, 1),
            128,
            &[
                Arg::P(qkv.ptr()),
                long(qkv.cols),
                Arg::P(kc),
                Arg::P(vc),
                int(kv.kv_dim),
                int(ring),
                Arg::P(out.ptr()),
                long(out.cols),
                int(shape.n_head),
                int(shape.n_head_kv),
                int(shape.head_dim),
                int(shape.v_dim()),
                Arg::F(shape.scale),
                int(pos0),
                int(shape.window),
                Arg::P(sinks.map_or(0, |s| s.ptr)),
                Arg::I(round_q),
            ],
        );
    }

    fn expert_ffn(&mut self, x: &CudaAct, jobs: &[ExpertJob<'_, '_, Self>], y: &mut CudaAct) {
        if !self.enter() {
            return;
        }
        // With --cpu-moe: an expert whose matrices the host holds (and the device cannot read);
        // with --n-cpu-moe, one of the layers kept on the CPU.
        let on_host = |j: &ExpertJob<'_, '_, Self>| {
            j.mats.iter().all(|m| match m.at {
                At::Host(b, k) => {
                    self.mapped(b).is_none() && (self.opts.cpu_moe || self.cpu_experts.contains(&k.offset))
                }
                At::Device(_) => false,
            })
        };
        let (mut host, dev): (Vec<_>, Vec<_>) = jobs.iter().partition(|j| self.cpu.is_some() && on_host(j));
        let split = self.plan_misses(&dev);
        let (planned, dev): (Vec<_>, Vec<_>) = dev.into_iter().zip(split).partition(|(_, h)| *h);
        let dev: Vec<_> = dev.into_iter().map(|(j, _)| j).collect();
        if !planned.is_empty() {
            self.stats.cpu_misses += planned.len() as u64;
            self.stats.expert_lookups += planned.iter().map(|(j, _)| j.mats.len() as u64).sum::<u64>();
            host.extend(planned.into_iter().map(|(j, _)| j));
        }
        // The input comes back before the device's jobs are queued, so that the CPU computes
        // its jobs while the device runs those.
        let xh = (!host.is_empty()).then(|| HostAct { data: self.read(x).into_owned(), rows: x.rows, cols: x.cols });
        if !self.fused_decode(x, &dev, y) && !self.grouped_batch(x, &dev, y) {
            for j in dev {
                self.expert_job(x, j, y);
            }
        }
        if let Some(xh) = xh {
            self.expert_jobs_on_cpu(xh, &host, y);
        }
    }

    fn combine(&mut self, y: &CudaAct, assign: &[(u32, f32)], done: &[bool], n_tok: usize, out: &mut CudaAct) {
        self.ensure(out, n_tok, y.cols);
        if !self.enter() {
            return;
        }
        // Each token's computed assignments, in assignment order (a counting sort by token).
        let mut starts = vec![0i32; n_tok + 1];
        for (&(t, _), _) in assign.iter().zip(done).filter(|(_, &d)| d) {
            starts[t as usize + 1] += 1;
        }
        for t in 0..n_tok {
            starts[t + 1] += starts[t];
        }
        let mut next = starts.clone();
        let total = starts[n_tok] as usize;
        let (mut rows, mut weights) = (vec![0i32; total], vec![0f32; total]);
        for (a, (&(t, w), _)) in assign.iter().zip(done).enumerate().filter(|(_, (_, &d))| d) {
            let i = next[t as usize] as usize;
            (rows[i], weights[i]) = (a as i32, w);
            next[t as usize] += 1;
        }
        let (s, r, w) = (self.upload(&starts), self.upload(&rows), self.upload(&weights));
        self.launch_named(
            "combine_f32",
            (y.cols.div_ceil(256), n_tok, 1),
            256,
            &[Arg::P(y.ptr()), int(y.cols), Arg::P(s), Arg::P(r), Arg::P(w), Arg::P(out.ptr())],
        );
    }

    fn copy_heads(&mut self, x: &CudaAct, from: Heads, out: &mut CudaAct, to: Heads) {
        if !self.enter() {
            return;
        }
        self.launch_named(
            "copy_cols_f32",
            (from.width.div_ceil(256), from.n, x.rows),
            256,
            &[
                Arg::P(x.ptr()),
                long(x.cols),
                int(from.col),
                int(from.stride),
                Arg::P(out.ptr()),
                long(out.cols),
                int(to.col),
                int(to.stride),
                int(from.width),
            ],
        );
    }

    fn matmul_heads(&mut self, x: &CudaAct, from: Heads, ws: &[CudaMat<'_>], out: &mut CudaAct, to: Heads) {
        if !self.enter() {
            return;
        }
        let mut keep = Vec::new();
        let Some(p) = self.addrs(&ws[..from.n.min(ws.len())], &mut keep) else { return };
        self.rounded = None;
        for (i, (w, &p)) in ws.iter().zip(&p).enumerate() {
            let xcol = from.cols(i).start;
            self.mat_mul(p, w.ty, w.rows, w.cols, x.at(xcol), x.cols, x.rows, out.at(to.col + i * to.stride), out.cols);
        }
        self.release(&keep);
    }

    fn add_rms_norm(&mut self, x: &mut CudaAct, y: &CudaAct, w: CudaVector<'_>, eps: f32, out: &mut CudaAct) {
        self.norm_rows(x, Some(y), w, eps, out);
    }

    fn add(&mut self, x: &mut CudaAct, y: &CudaAct) {
        if !self.enter() {
            return;
        }
        let n = x.len();
        self.elementwise("add_f32", n, &[Arg::P(x.ptr()), Arg::P(y.ptr()), Arg::P(x.ptr()), long(n)]);
    }
}
