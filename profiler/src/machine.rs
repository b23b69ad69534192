//! Machine identity (CPU model, cores, threads, RAM from /proc; the GPU from the CUDA driver and
//! sysfs) and the RFC 3339 time stamp of a profile.

use std::time::{SystemTime, UNIX_EPOCH};

use pshard_kernels::cuda::{self, GpuDevice};
use pshard_planner::profile::{GpuIdentity, Machine};

/// CPU model name, physical cores and hardware threads, read from `/proc/cpuinfo` (falls back to
/// the thread count the OS reports when the file is missing or unusual).
pub fn cpu_identity() -> (String, u32, u32) {
    let threads_os = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    parse_cpuinfo(&text, threads_os)
}

/// Parses `/proc/cpuinfo` text: (model, physical cores, hardware threads).
pub fn parse_cpuinfo(text: &str, threads_fallback: u32) -> (String, u32, u32) {
    let mut model = None;
    let mut threads = 0u32;
    let mut cores = std::collections::BTreeSet::new();
    let (mut phys, mut core) = (None::<String>, None::<String>);
    for line in text.lines().chain(std::iter::once("")) {
        let Some((k, v)) = line.split_once(':') else {
            // Blank line ends one processor entry.
            if let (Some(p), Some(c)) = (phys.take(), core.take()) {
                cores.insert((p, c));
            }
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        match k {
            "processor" => threads += 1,
            "model name" if model.is_none() => model = Some(v.to_string()),
            "physical id" => phys = Some(v.to_string()),
            "core id" => core = Some(v.to_string()),
            _ => {}
        }
    }
    let threads = if threads == 0 {
        threads_fallback.max(1)
    } else {
        threads
    };
    let cores = if cores.is_empty() {
        threads
    } else {
        cores.len() as u32
    };
    (
        model.unwrap_or_else(|| "unknown CPU".to_string()),
        cores,
        threads,
    )
}

/// Installed RAM in bytes from `/proc/meminfo` (`MemTotal`), 0 when unknown.
pub fn ram_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// The CPU part of the identity with `threads_used` threads measured.
pub fn machine(threads_used: u32, gpu: Option<GpuIdentity>) -> Machine {
    let (cpu_model, cpu_cores, cpu_threads) = cpu_identity();
    Machine {
        cpu_model,
        cpu_cores,
        cpu_threads,
        threads_used: threads_used.max(1),
        ram_bytes: ram_bytes(),
        gpu,
    }
}

/// The identity of an open GPU: name, memory, driver, compute capability and the PCIe link (from
/// sysfs via the device's PCI address; 0 when it cannot be read).
pub fn gpu_identity(dev: &GpuDevice) -> GpuIdentity {
    let info = dev.info();
    let (pcie_gen, pcie_width) = pcie_link(dev).unwrap_or((0, 0));
    GpuIdentity {
        name: info.name.clone(),
        memory_bytes: info.total_mem,
        driver: format!(
            "{}.{}",
            info.driver_version / 1000,
            (info.driver_version % 1000) / 10
        ),
        compute_capability: format!("{}.{}", info.cc.0, info.cc.1),
        pcie_gen,
        pcie_width,
    }
}

fn pcie_link(dev: &GpuDevice) -> Option<(u32, u32)> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let ctx = dev.context();
    let domain = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID).ok()?;
    let bus = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID).ok()?;
    let device = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID).ok()?;
    let dir = format!("/sys/bus/pci/devices/{domain:04x}:{bus:02x}:{device:02x}.0");
    let speed = std::fs::read_to_string(format!("{dir}/current_link_speed")).ok()?;
    let width = std::fs::read_to_string(format!("{dir}/current_link_width")).ok()?;
    Some((pcie_gen_of(&speed)?, width.trim().parse().ok()?))
}

/// PCIe generation from a sysfs link speed such as `"32.0 GT/s PCIe"`.
pub fn pcie_gen_of(speed: &str) -> Option<u32> {
    let gts: f64 = speed.split_whitespace().next()?.parse().ok()?;
    Some(match gts {
        x if x < 4.0 => 1,
        x if x < 7.0 => 2,
        x if x < 12.0 => 3,
        x if x < 24.0 => 4,
        x if x < 48.0 => 5,
        x if x < 96.0 => 6,
        _ => 7,
    })
}

/// Opens GPU 0 when one is usable here (`None`, with the reason, otherwise).
pub fn try_open_gpu() -> Result<std::sync::Arc<GpuDevice>, String> {
    cuda::probe(0).map_err(|e| e.to_string())?;
    GpuDevice::open(0, None).map_err(|e| e.to_string())
}

/// The current time as RFC 3339 UTC (seconds precision).
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Formats seconds since the Unix epoch as RFC 3339 UTC.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian, 400-year eras).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn cpuinfo_counts_cores_and_threads() {
        let text = "processor\t: 0\nmodel name\t: Test CPU\nphysical id\t: 0\ncore id\t: 0\n\n\
                    processor\t: 1\nmodel name\t: Test CPU\nphysical id\t: 0\ncore id\t: 0\n\n\
                    processor\t: 2\nmodel name\t: Test CPU\nphysical id\t: 0\ncore id\t: 1\n\n";
        assert_eq!(parse_cpuinfo(text, 8), ("Test CPU".into(), 2, 3));
        assert_eq!(parse_cpuinfo("", 4), ("unknown CPU".into(), 4, 4));
    }

    #[test]
    fn pcie_generations() {
        assert_eq!(pcie_gen_of("32.0 GT/s PCIe"), Some(5));
        assert_eq!(pcie_gen_of("16.0 GT/s PCIe\n"), Some(4));
        assert_eq!(pcie_gen_of("8 GT/s"), Some(3));
        assert_eq!(pcie_gen_of("Unknown"), None);
    }
}
