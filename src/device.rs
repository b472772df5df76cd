//! Choosing the device, and what the process uses of it.

use crate::config::DeviceChoice;
use anyhow::{bail, Result};
use tch::Device;

/// auto: the first GPU when CUDA works, else the CPU. cuda without CUDA is an error.
pub fn resolve(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => Ok(Device::cuda_if_available()),
        DeviceChoice::Cuda => {
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                bail!(
                    "device cuda requested, but CUDA is not available here (no GPU visible, or \
                     libtorch without CUDA); use --device cpu or --device auto"
                )
            }
        }
    }
}

pub fn name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Cpu => "cpu".to_string(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Peak resident set size of this process, in MiB (Linux; None elsewhere).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Peak CUDA memory held by libtorch's allocator, in MiB (None on CPU).
pub fn peak_gpu_mib(device: Device) -> Option<f64> {
    match device {
        Device::Cuda(i) => crate::cuda::peak_allocated_bytes(i).map(|b| b as f64 / (1 << 20) as f64),
        _ => None,
    }
}

/// Bytes a run can still get on `device`: the CPU's MemAvailable (Linux), the GPU's free
/// memory. None where it cannot be told.
pub fn memory_available(device: Device) -> Option<u64> {
    match device {
        Device::Cuda(_) => crate::cuda::memory_info().map(|(free, _)| free),
        Device::Cpu => {
            let info = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        }
        _ => None,
    }
}

/// The CUDA ordinal of `device` (0 for the CPU).
pub fn index(device: Device) -> usize {
    match device {
        Device::Cuda(i) => i,
        _ => 0,
    }
}

/// Starts a new peak for [`peak_gpu_mib`] (nothing on the CPU).
pub fn reset_peak(device: Device) {
    if let Device::Cuda(i) = device {
        crate::cuda::reset_peak(i);
    }
}
