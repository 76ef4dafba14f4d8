//! Snapshots of a [`Machine`]: capture to a file, restore into a new machine with
//! copy-on-write RAM, and reset in place.
//!
//! Capture pauses every vCPU (force-exit + join) and every virtio device (each
//! hands back its queues), writes machine config, vCPU, VM-device and virtio
//! transport state, each virtio device's own state where it keeps one (a
//! virtio-fs session), COM1 state plus sparse RAM, then resumes or leaves the machine paused.
//! Restore maps the RAM file privately (no copy), recreates vCPUs and devices and
//! loads their state; the guest continues with monotonic time exactly where it was
//! (TSC and kvmclock as saved). Host-side vsock connections from before the
//! snapshot do not survive: the guest gets a vsock transport reset.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sm_hypervisor::{Hypervisor, VcpuState, VmState};
use sm_snapshot::{DiffBase, SectionKind, SnapshotChain, SnapshotContents, WriteStats};
use sm_virtio::mmio::TransportState;
use sm_virtio::VirtioDevice;

use crate::console::ConsoleOutput;
use crate::machine::{Machine, MachineConfig, MachineState};
use crate::{Error, Result};

const MACHINE_MAGIC: &[u8; 4] = b"SMMC";
const MACHINE_VERSION: u16 = 1;
/// Index of COM1's section among the platform sections.
const PLATFORM_COM1: u32 = 0;

/// Each virtio device's own state, where it keeps one (device slot order).
type DeviceStates = Vec<Option<Vec<u8>>>;

/// The snapshot a machine was restored from, kept for reset in place.
pub(crate) struct Origin {
    chain: Arc<SnapshotChain>,
    state: MachineState,
    transports: Vec<TransportState>,
    /// Each device's own state, where it keeps one (same order as `transports`).
    device_states: DeviceStates,
}

/// What a capture cost.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotReport {
    /// vCPUs and devices paused.
    pub pause: Duration,
    /// State captured.
    pub capture: Duration,
    /// File written (see `write.duration`).
    pub write: WriteStats,
    /// Total, including resume.
    pub total: Duration,
}

/// How to bring a snapshot back.
pub struct RestoreOptions {
    /// Console sink of the restored machine.
    pub console: ConsoleOutput,
    /// Fresh devices matching the snapshot's device list (same types, same order),
    /// e.g. a `Vsock` on a new socket path.
    pub devices: Vec<Box<dyn VirtioDevice>>,
}

/// Host-side timings of a restore.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreTimings {
    /// Snapshot metadata read and checked.
    pub mapped: Duration,
    /// RAM mapped; VM, vCPUs and devices created (a shell has the VM, vCPUs and
    /// RAM slots already).
    pub created: Duration,
    /// State loaded; the machine can start.
    pub restored: Duration,
}

fn encode_machine(config: &MachineConfig, device_types: &[u32]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(MACHINE_MAGIC);
    b.extend_from_slice(&MACHINE_VERSION.to_le_bytes());
    b.extend_from_slice(&config.vcpus.to_le_bytes());
    b.extend_from_slice(&config.memory_mib.to_le_bytes());
    b.extend_from_slice(&(device_types.len() as u32).to_le_bytes());
    for t in device_types {
        b.extend_from_slice(&t.to_le_bytes());
    }
    b
}

fn decode_machine(b: &[u8]) -> std::result::Result<(u32, u64, Vec<u32>), String> {
    let fixed = 4 + 2 + 4 + 8 + 4;
    if b.len() < fixed || &b[..4] != MACHINE_MAGIC {
        return Err("machine section is malformed".into());
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != MACHINE_VERSION {
        return Err(format!("machine section version {version} is not supported"));
    }
    let vcpus = u32::from_le_bytes(b[6..10].try_into().map_err(|_| "short")?);
    let memory_mib = u64::from_le_bytes(b[10..18].try_into().map_err(|_| "short")?);
    let n = u32::from_le_bytes(b[18..22].try_into().map_err(|_| "short")?) as usize;
    if b.len() != fixed + 4 * n {
        return Err("machine section length does not match its device count".into());
    }
    let types =
        (0..n).map(|i| u32::from_le_bytes([b[22 + 4 * i], b[23 + 4 * i], b[24 + 4 * i], b[25 + 4 * i]])).collect();
    Ok((vcpus, memory_mib, types))
}

impl Machine {
    /// Pauses every device; their transport states and own states.
    fn pause_devices(&mut self) -> Result<(Vec<TransportState>, DeviceStates)> {
        let mut states = Vec::new();
        let mut device_states = Vec::new();
        for (i, (_, t)) in self.virtio_devices().iter().enumerate() {
            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
            let paused = t.pause().and_then(|()| {
                t.device_state().map_err(|e| format!("virtio device {i} (type {}): {e}", t.device().device_type()))
            });
            match paused {
                Ok(own) => device_states.push(own),
                Err(e) => {
                    t.resume();
                    drop(t);
                    self.resume_devices(i);
                    return Err(Error::State(format!("cannot snapshot: {e}")));
                }
            }
            states.push(t.state());
        }
        Ok((states, device_states))
    }

    fn resume_devices(&self, count: usize) {
        for (_, t) in self.virtio_devices().iter().take(count) {
            t.lock().unwrap_or_else(|e| e.into_inner()).resume();
        }
    }

    /// Writes a full snapshot to `path`. The vCPUs and devices pause for the
    /// capture; with `resume` the guest then continues (a live snapshot), else the
    /// machine stays paused.
    pub fn snapshot(&mut self, path: &Path, resume: bool) -> Result<SnapshotReport> {
        self.capture(path, resume, false)
    }

    /// Writes a diff snapshot to `path`: full vCPU and device state, but only the
    /// RAM pages written since this machine was restored (or reset), over the
    /// snapshot it was restored from, which must stay in place. Restore it like a
    /// full one; `sm_snapshot::merge_chain` turns it into a full one.
    pub fn snapshot_diff(&mut self, path: &Path, resume: bool) -> Result<SnapshotReport> {
        if self.origin.is_none() {
            return Err(Error::State(
                "a diff snapshot needs a machine restored from a snapshot (its parent); take a full snapshot".into(),
            ));
        }
        self.capture(path, resume, true)
    }

    fn capture(&mut self, path: &Path, resume: bool, diff: bool) -> Result<SnapshotReport> {
        let t0 = Instant::now();
        let was_running = self.is_running();
        self.pause()?;
        let (transports, device_states) = match self.pause_devices() {
            Ok(t) => t,
            Err(e) => {
                if was_running && resume {
                    self.start()?;
                }
                return Err(e);
            }
        };
        let pause = t0.elapsed();
        let captured = self.save_state();
        let capture = t0.elapsed();
        let written = captured.and_then(|state| {
            let device_types: Vec<u32> = self
                .virtio_devices()
                .iter()
                .map(|(_, t)| t.lock().unwrap_or_else(|e| e.into_inner()).device().device_type())
                .collect();
            let mut sections = vec![(SectionKind::Machine, 0, encode_machine(&self.config, &device_types))];
            sections.push((SectionKind::Vm, 0, state.vm.0));
            if let Some(com1) = state.com1 {
                sections.push((SectionKind::Platform, PLATFORM_COM1, com1));
            }
            for (i, v) in state.vcpus.into_iter().enumerate() {
                sections.push((SectionKind::Vcpu, i as u32, v.0));
            }
            for (i, t) in transports.iter().enumerate() {
                sections.push((SectionKind::VirtioTransport, i as u32, t.encode()));
            }
            for (i, own) in device_states.into_iter().enumerate() {
                if let Some(own) = own {
                    sections.push((SectionKind::VirtioDevice, i as u32, own));
                }
            }
            let diff = match (diff, &self.origin) {
                (true, Some(origin)) => Some(DiffBase::of(origin.chain.top(), &self.mem)?),
                _ => None,
            };
            // A machine that was not restored has anonymous RAM.
            let anonymous_memory = self.origin.is_none();
            let contents =
                SnapshotContents { vcpu_count: self.config.vcpus, sections, memory: &self.mem, diff, anonymous_memory };
            sm_snapshot::write_snapshot(path, &contents).map_err(Error::from)
        });
        self.resume_devices(transports.len());
        let resumed = if was_running && resume { self.start() } else { Ok(()) };
        // The capture's own error first: it says why there is no snapshot.
        let write = written?;
        resumed?;
        Ok(SnapshotReport { pause, capture: capture - pause, write, total: t0.elapsed() })
    }

    /// Restores the snapshot at `path` into a new machine (not started: call
    /// `start`). RAM is mapped copy-on-write from the file (for a diff snapshot:
    /// from the full snapshot at the root of its chain, with the diffs' pages
    /// copied over it).
    pub fn restore(
        hypervisor: &dyn Hypervisor,
        path: &Path,
        options: RestoreOptions,
    ) -> Result<(Machine, RestoreTimings)> {
        Self::restore_with(path, options, |config, chain, t0| {
            let mem = chain.map_ram()?;
            Machine::with_memory(hypervisor, config, mem, t0)
        })
    }

    /// Like [`Machine::restore`], into a shell from [`Machine::new_shell`] made
    /// for the snapshot's vCPU count and RAM size: the snapshot's RAM is mapped
    /// over the shell's registered ranges. The shell's console is kept
    /// (`options.console` is not used). On error the shell is gone.
    pub fn restore_into(shell: Machine, path: &Path, options: RestoreOptions) -> Result<(Machine, RestoreTimings)> {
        Self::restore_with(path, options, move |config, chain, _| {
            let mut m = shell;
            if m.config.vcpus != config.vcpus {
                return Err(Error::State(format!(
                    "the shell has {} vCPUs, the snapshot {}",
                    m.config.vcpus, config.vcpus
                )));
            }
            m.fill_shell(chain)?;
            Ok(m)
        })
    }

    fn restore_with(
        path: &Path,
        options: RestoreOptions,
        build: impl FnOnce(MachineConfig, &SnapshotChain, Instant) -> Result<Machine>,
    ) -> Result<(Machine, RestoreTimings)> {
        let t0 = Instant::now();
        let chain = Arc::new(SnapshotChain::open(path)?);
        let file = chain.top();
        let bad = |reason: String| Error::SnapshotContents { path: path.to_path_buf(), reason };
        let machine_section = file.section(SectionKind::Machine, 0).ok_or_else(|| bad("no machine section".into()))?;
        let (vcpus, memory_mib, device_types) = decode_machine(machine_section).map_err(bad)?;
        if vcpus != file.vcpu_count() || file.ram_size() != memory_mib << 20 {
            return Err(bad("machine section disagrees with the file header".into()));
        }
        let given: Vec<u32> = options.devices.iter().map(|d| d.device_type()).collect();
        if given != device_types {
            return Err(bad(format!(
                "it was taken with virtio devices of types {device_types:?}; restore was given {given:?}"
            )));
        }
        let vcpu_states = file.sections_of(SectionKind::Vcpu);
        if vcpu_states.len() != vcpus as usize {
            return Err(bad(format!("{} vCPU sections for {vcpus} vCPUs", vcpu_states.len())));
        }
        let state = MachineState {
            vcpus: vcpu_states.into_iter().map(|(_, b)| VcpuState(b.to_vec())).collect(),
            vm: VmState(file.section(SectionKind::Vm, 0).ok_or_else(|| bad("no VM section".into()))?.to_vec()),
            com1: file.section(SectionKind::Platform, PLATFORM_COM1).map(<[u8]>::to_vec),
        };
        let transports = (0..device_types.len() as u32)
            .map(|i| {
                let b = file
                    .section(SectionKind::VirtioTransport, i)
                    .ok_or_else(|| bad(format!("no state for device {i}")))?;
                TransportState::decode(b).map_err(|e| bad(e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let device_states: DeviceStates = (0..device_types.len() as u32)
            .map(|i| file.section(SectionKind::VirtioDevice, i).map(<[u8]>::to_vec))
            .collect();
        let mapped = t0.elapsed();

        let config = MachineConfig { vcpus, memory_mib, console: options.console };
        let mut machine = build(config, &chain, t0)?;
        for device in options.devices {
            machine.add_virtio_device(device)?;
        }
        let created = t0.elapsed();
        machine.load_state(&state, &transports, &device_states).map_err(|e| match e {
            // Nothing else runs here: a state the machine or a device cannot
            // take, or vCPU state the backend refuses as invalid, is the
            // snapshot's contents not fitting this build or host.
            Error::State(reason) => Error::SnapshotContents { path: path.to_path_buf(), reason },
            Error::Hypervisor(sm_hypervisor::Error::Backend { op, source })
                if source.kind() == std::io::ErrorKind::InvalidInput =>
            {
                Error::SnapshotContents {
                    path: path.to_path_buf(),
                    reason: format!("{op} refused the saved state: {source}"),
                }
            }
            other => other,
        })?;
        machine.origin = Some(Origin { chain, state, transports, device_states });
        let restored = t0.elapsed();
        Ok((machine, RestoreTimings { mapped, created, restored }))
    }

    fn load_state(
        &mut self,
        state: &MachineState,
        transports: &[TransportState],
        device_states: &[Option<Vec<u8>>],
    ) -> Result<()> {
        self.restore_state(state)?;
        for (i, ((_, t), s)) in self.virtio_devices().iter().zip(transports).enumerate() {
            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(Some(own)) = device_states.get(i) {
                t.restore_device_state(own)
                    .map_err(|e| Error::State(format!("virtio device {i} (type {}): {e}", t.device().device_type())))?;
            }
            t.restore(s).map_err(Error::State)?;
        }
        Ok(())
    }

    /// Returns a machine restored from a snapshot to that snapshot, in place: the
    /// vCPUs stop, private RAM pages are dropped (the file's pages show through
    /// again), vCPU, device and virtio state are reloaded. Call `start` to run.
    pub fn reset_to_snapshot(&mut self) -> Result<Duration> {
        let t0 = Instant::now();
        if self.origin.is_none() {
            return Err(Error::State("this machine was not restored from a snapshot".into()));
        }
        self.pause()?;
        let origin =
            self.origin.take().ok_or_else(|| Error::State("this machine was not restored from a snapshot".into()))?;
        for (_, t) in self.virtio_devices() {
            t.lock().unwrap_or_else(|e| e.into_inner()).reset();
        }
        self.console.mark_reset();
        let result = sm_snapshot::discard_private_pages(&self.mem)
            .and_then(|()| origin.chain.apply_diffs(&self.mem))
            .map_err(Error::from)
            .and_then(|()| crate::memory::reregister_guest_memory(&*self.vm, &self.mem))
            .and_then(|()| self.load_state(&origin.state, &origin.transports, &origin.device_states));
        self.origin = Some(origin);
        result.map(|()| t0.elapsed())
    }

    /// The snapshot file this machine was restored from.
    pub fn snapshot_origin(&self) -> Option<&Path> {
        self.origin.as_ref().map(|o| o.chain.top().path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_section_round_trip_and_rejections() {
        let config = MachineConfig { vcpus: 2, memory_mib: 256, console: ConsoleOutput::Null };
        let b = encode_machine(&config, &[19, 2]);
        assert_eq!(decode_machine(&b).unwrap(), (2, 256, vec![19, 2]));
        assert!(decode_machine(&b[..b.len() - 1]).is_err());
        let mut v = b.clone();
        v[4] = 9;
        assert!(decode_machine(&v).unwrap_err().contains("version 9"));
        assert!(decode_machine(b"nope").is_err());
    }
}
