//! Stats: what a container costs the host, in the cgroup v1 metrics message
//! containerd's `ctr task metrics` and the CRI read.
//!
//! One shim process runs one VM, so the process's figures are the VM's: CPU
//! time of its vCPU and device threads, and the host memory resident for it
//! (guest RAM the guest touched, snapshot pages it read, the VMM itself).
//! The limit is the guest's RAM size. Nothing is asked of the guest: reading
//! them costs a `getrusage` and one small /proc file.

use containerd_shim::protos::cgroups::metrics::{CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageField;

use crate::error::{Result, ShimError};

/// The host memory of this process, from /proc/self/status (bytes).
#[derive(Debug, Default, PartialEq, Eq)]
struct Resident {
    /// VmRSS: all resident pages.
    total: u64,
    /// VmHWM: the most ever resident.
    peak: u64,
    /// RssAnon: anonymous (guest RAM written, VMM heap).
    anon: u64,
    /// RssFile: file pages (snapshot memory read, binaries).
    file: u64,
}

/// Reads the `kB` figures of a /proc/<pid>/status text.
fn parse_status(status: &str) -> Resident {
    let kib = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
            .map_or(0, |k| k.saturating_mul(1024))
    };
    Resident { total: kib("VmRSS"), peak: kib("VmHWM"), anon: kib("RssAnon"), file: kib("RssFile") }
}

/// CPU time this process used: (user, kernel) in nanoseconds.
fn cpu_time() -> Result<(u64, u64)> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a `rusage` into the valid, writable buffer.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return Err(ShimError::io("reading the VM's CPU time (getrusage)")(std::io::Error::last_os_error()));
    }
    // SAFETY: getrusage returned 0, so it filled the struct (and zeroed() made every byte valid before).
    let usage = unsafe { usage.assume_init() };
    let nanos = |t: libc::timeval| {
        u64::try_from(t.tv_sec).unwrap_or(0).saturating_mul(1_000_000_000)
            + u64::try_from(t.tv_usec).unwrap_or(0).saturating_mul(1_000)
    };
    Ok((nanos(usage.ru_utime), nanos(usage.ru_stime)))
}

/// The VM's metrics: `processes` running in it, a guest of
/// `guest_memory_bytes`.
pub fn vm_metrics(processes: u64, guest_memory_bytes: u64) -> Result<Metrics> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(ShimError::io("reading /proc/self/status"))?;
    let resident = parse_status(&status);
    let (user, kernel) = cpu_time()?;
    let usage =
        MemoryEntry { usage: resident.total, max: resident.peak, limit: guest_memory_bytes, ..Default::default() };
    let memory = MemoryStat {
        rss: resident.anon,
        total_rss: resident.anon,
        mapped_file: resident.file,
        total_mapped_file: resident.file,
        hierarchical_memory_limit: guest_memory_bytes,
        usage: MessageField::some(usage),
        ..Default::default()
    };
    let cpu = CPUStat {
        usage: MessageField::some(CPUUsage { total: user + kernel, user, kernel, ..Default::default() }),
        ..Default::default()
    };
    Ok(Metrics {
        pids: MessageField::some(PidsStat { current: processes, ..Default::default() }),
        cpu: MessageField::some(cpu),
        memory: MessageField::some(memory),
        ..Default::default()
    })
}

/// `metrics` packed as containerd reads it (type URL
/// `io.containerd.cgroups.v1.Metrics`).
pub fn pack(metrics: &Metrics) -> Result<Any> {
    containerd_shim::util::convert_to_any(Box::new(metrics.clone()))
        .map_err(|e| ShimError::InvalidArgument(format!("encoding the metrics: {e}")))
}

#[cfg(test)]
mod tests {
    use containerd_shim::protos::protobuf::Message;

    use super::*;

    #[test]
    fn status_figures_are_read_in_bytes_and_missing_ones_are_zero() {
        let status = "Name:\tshim\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nRssAnon:\t 1000 kB\nRssFile:\t24 kB\n";
        assert_eq!(
            parse_status(status),
            Resident { total: 1024 << 10, peak: 2048 << 10, anon: 1000 << 10, file: 24 << 10 }
        );
        assert_eq!(parse_status("VmRSS: lots\n"), Resident::default(), "garbage reads as nothing, not a panic");
    }

    #[test]
    fn metrics_of_this_process_are_real_and_pack_as_containerd_reads_them() {
        // Burn a little CPU so the figure cannot be zero.
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let m = vm_metrics(2, 256 << 20).unwrap();
        let memory = m.memory.as_ref().unwrap();
        let usage = memory.usage.as_ref().unwrap();
        assert!(usage.usage > 0 && usage.max >= usage.usage, "{usage:?}");
        assert_eq!(usage.limit, 256 << 20);
        let cpu = m.cpu.usage.as_ref().unwrap();
        assert!(cpu.total > 0 && cpu.total == cpu.user + cpu.kernel, "{cpu:?}");
        assert_eq!(m.pids.current, 2);
        let any = pack(&m).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v1.Metrics");
        assert_eq!(Metrics::parse_from_bytes(&any.value).unwrap(), m);
    }
}
