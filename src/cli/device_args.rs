//! Where a front door computes: `--device cpu|cuda[:N]` and the GPU's flags, and
//! `with_backend!`, which runs a generic body on the backend they name.

/// Device flags, shared by `generate`, `chat`, `serve` and `bench`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DeviceArgs {
    /// Where to compute: `cpu`, or `cuda[:N]` (the N-th GPU). Default: the first CUDA GPU when
    /// this build has CUDA and the machine has one, else the CPU.
    #[arg(long, value_name = "cpu|cuda[:N]")]
    pub device: Option<String>,
    /// GPU memory for routed experts when they do not all stay on the GPU: a size (6GiB) or a
    /// share of the model's expert bytes (25%). The rest are held by the host (RAM, or the file
    /// through `--memory-budget`'s cache) and copied in on use. Default: every expert if they
    /// fit, else the GPU's free memory less 2 GiB.
    #[arg(long, value_name = "SIZE|PCT")]
    pub gpu_budget: Option<String>,
    /// Let the GPU read host-held experts in place through mapped memory instead of copying them
    /// (what an integrated GPU, such as a Jetson's, does by itself).
    #[arg(long)]
    pub unified: bool,
    /// Keep routed experts on the CPU and compute them there; the GPU runs the rest (llama.cpp's
    /// `--cpu-moe`).
    #[arg(long)]
    pub cpu_moe: bool,
    /// Keep the routed experts of the first N layers on the CPU and compute them there; the GPU
    /// holds (or caches, under `--gpu-budget`) the rest (llama.cpp's `--n-cpu-moe`).
    #[arg(long, value_name = "N", default_value_t = 0, conflicts_with = "cpu_moe")]
    pub n_cpu_moe: usize,
    /// Compute misses of the GPU's expert cache on the CPU, from the host's copy, instead of
    /// copying them: `auto` splits each layer's misses between the link and the CPU by their
    /// measured speeds (what ends the layer soonest), `always` sends every miss to the CPU. Off
    /// by default: tokens can then differ at near-ties from an all-resident run (the CPU sums in
    /// another order), as llama.cpp's `--cpu-moe` does from its full offload.
    #[arg(long, value_name = "auto|always", conflicts_with = "cpu_moe")]
    pub cpu_misses: Option<CpuMissesArg>,
}

/// `--cpu-misses`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMissesArg {
    Auto,
    Always,
}

/// A resolved device.
pub enum Device {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(moerun::backend::cuda::CudaOptions),
}

impl Device {
    pub fn name(&self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            #[cfg(feature = "cuda")]
            Device::Cuda(o) => format!("cuda:{}", o.ordinal),
        }
    }
}

impl DeviceArgs {
    /// The device the flags name; with none named, CUDA when it is there, else the CPU with one
    /// line saying why.
    pub fn resolve(&self, threads: usize) -> anyhow::Result<Device> {
        let gpu_flags = self.gpu_budget.is_some()
            || self.unified
            || self.cpu_moe
            || self.n_cpu_moe > 0
            || self.cpu_misses.is_some();
        let asked = self.device.as_deref().map(str::trim);
        let ordinal = match asked {
            Some("cpu") => {
                anyhow::ensure!(
                    !gpu_flags,
                    "--gpu-budget, --unified, --cpu-moe, --n-cpu-moe and --cpu-misses need --device cuda"
                );
                return Ok(Device::Cpu);
            }
            Some(d) if d == "cuda" || d.starts_with("cuda:") => match d.strip_prefix("cuda:") {
                Some(n) => Some(n.parse::<usize>().map_err(|_| anyhow::anyhow!("--device {d}: not cuda:N"))?),
                None => Some(0),
            },
            Some(d) => anyhow::bail!("--device {d}: give cpu, cuda or cuda:N"),
            None => None,
        };
        self.cuda(ordinal, threads, gpu_flags)
    }

    #[cfg(not(feature = "cuda"))]
    fn cuda(&self, ordinal: Option<usize>, threads: usize, gpu_flags: bool) -> anyhow::Result<Device> {
        let _ = threads;
        anyhow::ensure!(
            ordinal.is_none() && !gpu_flags,
            "this moerun was built without CUDA: build it with `cargo build --release --features cuda`"
        );
        Ok(Device::Cpu)
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, ordinal: Option<usize>, threads: usize, gpu_flags: bool) -> anyhow::Result<Device> {
        use moerun::backend::cuda::{probe, CudaOptions};
        let n = ordinal.unwrap_or(0);
        if let Err(e) = probe(n) {
            anyhow::ensure!(ordinal.is_none() && !gpu_flags, "--device cuda:{n}: {e}");
            eprintln!("moerun: no CUDA device ({e}); running on the CPU");
            return Ok(Device::Cpu);
        }
        let gpu_budget = match &self.gpu_budget {
            Some(s) => Some(
                moerun::engine::offload::parse_budget(s)
                    .map_err(anyhow::Error::msg)
                    .map_err(|e| e.context("--gpu-budget"))?,
            ),
            None => None,
        };
        Ok(Device::Cuda(CudaOptions {
            ordinal: n,
            gpu_budget,
            unified: self.unified,
            cpu_moe: self.cpu_moe,
            n_cpu_moe: self.n_cpu_moe,
            cpu_misses: match self.cpu_misses {
                None => moerun::backend::cuda::CpuMisses::Off,
                Some(CpuMissesArg::Auto) => moerun::backend::cuda::CpuMisses::Auto,
                Some(CpuMissesArg::Always) => moerun::backend::cuda::CpuMisses::Always,
            },
            threads,
            kernel_cache: moerun::backend::cuda::kernels::default_cache(),
        }))
    }
}

/// A GPU's counters over `steps` tokens: hit rate of host-held experts, bytes copied, copy
/// busy time and launches per token, memory in use.
pub fn device_line(d: &moerun::backend::DeviceStats, steps: f64) -> String {
    let hit = if d.expert_lookups > 0 { 100.0 * d.expert_hits as f64 / d.expert_lookups as f64 } else { 100.0 };
    format!(
        "{}: expert hit rate {hit:.1}% ({} lookups), {:.2} MiB copied per token ({} copies ahead of need, {} of them used; {} straight from page-locked memory), copy stream busy {:.2} ms per token, {:.0} kernel launches per token, {} experts on the CPU ({} of them misses), {:.0} MiB of GPU memory in use (weights {:.0}, expert arena {:.0})",
        d.device,
        d.expert_lookups,
        d.bytes_copied as f64 / steps / 1048576.0,
        d.prefetch_copies,
        d.prefetch_used,
        d.direct_copies,
        1000.0 * d.copy_busy_s / steps,
        d.launches as f64 / steps,
        d.host_computed,
        d.cpu_misses,
        d.memory_in_use_bytes as f64 / 1048576.0,
        d.weight_bytes as f64 / 1048576.0,
        d.arena_bytes as f64 / 1048576.0
    )
}

/// `with_backend!(device, threads, b => body)`: `body` with `b` the backend `device` names (a
/// generic function call, monomorphized per backend).
macro_rules! with_backend {
    ($dev:expr, $threads:expr, $b:ident => $body:expr) => {
        match $dev {
            $crate::cli::device_args::Device::Cpu => {
                let $b = moerun::backend::cpu::CpuBackend::new($threads);
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::cli::device_args::Device::Cuda(o) => {
                let $b = moerun::backend::cuda::CudaBackend::new(o)?;
                $body
            }
        }
    };
}
pub(crate) use with_backend;
