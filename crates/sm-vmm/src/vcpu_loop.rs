//! The loop each vCPU thread runs: enter the guest, dispatch the exit, repeat until
//! asked to return.

use std::sync::Arc;

use sm_hypervisor::{SystemEvent, Vcpu, VcpuExit};

use crate::control::{ExitReason, RunControl};
use crate::devices::{MmioBus, PortBus};

/// The longest a halted vCPU waits before the loop looks at its run
/// control again (a kick ends the wait sooner).
const HALT_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// What a vCPU thread needs besides its vCPU.
pub struct VcpuContext {
    /// Port-I/O devices.
    pub ports: PortBus,
    /// virtio-mmio devices.
    pub mmio: MmioBus,
    /// Run control of the machine.
    pub control: Arc<RunControl>,
}

/// Ends the VM with a vCPU error when dropped during a panic.
struct PanicReport<'a> {
    vcpu: u32,
    ctx: &'a VcpuContext,
}

impl Drop for PanicReport<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let detail = "the vCPU thread panicked (in a device handler)".to_string();
            self.ctx.control.finish(ExitReason::VcpuError { vcpu: self.vcpu, detail });
        }
    }
}

thread_local! {
    /// This vCPU thread installed its seccomp filter (once: filters stack).
    static CONFINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `vcpu` until the machine asks its threads to return.
pub fn run_vcpu(vcpu: &mut dyn Vcpu, ctx: Arc<VcpuContext>) {
    let id = vcpu.id();
    // The thread emulates devices for the guest: confined before the first
    // guest instruction (see sm-seccomp), or the VM does not run at all.
    if !CONFINED.get() {
        // Device workers this thread starts (at the driver's DRIVER_OK)
        // inherit its confinement: it may open what the VM's devices serve.
        let host_paths = ctx.mmio.host_paths();
        if let Err(e) = sm_seccomp::confine_current_thread(sm_seccomp::ThreadKind::Vcpu, &host_paths) {
            tracing::error!(vcpu = id, "{e}");
            ctx.control.finish(ExitReason::VcpuError { vcpu: id, detail: e.to_string() });
            return;
        }
        CONFINED.set(true);
    }
    // A panic in a device handler on this thread ends the VM with an error
    // instead of leaving the other vCPUs running without it.
    let _panic_report = PanicReport { vcpu: id, ctx: &ctx };
    // The last exit was port or MMIO I/O: KVM completes such an instruction
    // (a read's data into its register, the rest of a string I/O) only on
    // the next KVM_RUN. Before leaving, enter once more — the kick that made
    // us leave set `immediate_exit`, so no further guest instruction runs —
    // or a snapshot taken now would make the guest repeat the access.
    let mut io_incomplete = false;
    loop {
        if ctx.control.should_return() {
            if io_incomplete {
                let _ = vcpu.run();
            }
            return;
        }
        let exit = vcpu.run();
        io_incomplete = matches!(
            exit,
            Ok(VcpuExit::IoIn { .. } | VcpuExit::IoOut { .. } | VcpuExit::MmioRead { .. } | VcpuExit::MmioWrite { .. })
        );
        let ended = match exit {
            Ok(VcpuExit::IoIn { port, data }) => {
                if !ctx.ports.read(port, data) {
                    tracing::trace!(port, "read from unhandled port");
                }
                None
            }
            Ok(VcpuExit::IoOut { port, data }) => {
                if !ctx.ports.write(port, data) {
                    tracing::trace!(port, "write to unhandled port");
                }
                None
            }
            Ok(VcpuExit::MmioRead { addr, data }) => {
                if !ctx.mmio.read(addr, data) {
                    tracing::trace!(addr, "read from unhandled MMIO");
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioWrite { addr, data }) => {
                if !ctx.mmio.write(addr, data) {
                    tracing::trace!(addr, "write to unhandled MMIO");
                }
                None
            }
            Ok(VcpuExit::Halt) => {
                if let Err(e) = vcpu.wait_for_interrupt(HALT_WAIT) {
                    tracing::warn!(vcpu = id, "waiting for an interrupt: {e}");
                }
                None
            }
            Ok(VcpuExit::ForcedExit) => None,
            Ok(VcpuExit::Shutdown) => Some(ExitReason::TripleFault),
            Ok(VcpuExit::SystemEvent(event)) => Some(match event {
                SystemEvent::Reset => ExitReason::Reboot,
                SystemEvent::Shutdown => ExitReason::PowerOff,
                SystemEvent::Crash => ExitReason::GuestPanic { line: "the guest reported a crash event".into() },
                SystemEvent::Unknown(code) => {
                    ExitReason::VcpuError { vcpu: id, detail: format!("unknown system event {code}") }
                }
            }),
            Ok(VcpuExit::InternalError { detail }) => Some(ExitReason::VcpuError { vcpu: id, detail }),
            Ok(VcpuExit::Other { detail }) => {
                Some(ExitReason::VcpuError { vcpu: id, detail: format!("unexpected exit: {detail}") })
            }
            Err(e) => Some(ExitReason::VcpuError { vcpu: id, detail: e.to_string() }),
        };
        if let Some(reason) = ended {
            let reason = match reason {
                ExitReason::VcpuError { vcpu: which, detail } => {
                    let detail = format!("{detail}; {}", vcpu.register_summary());
                    tracing::error!(vcpu = which, %detail, "vCPU stopped");
                    ExitReason::VcpuError { vcpu: which, detail }
                }
                r => r,
            };
            ctx.control.finish(reason);
        }
    }
}
