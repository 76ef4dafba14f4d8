/// Why `Vcpu::run` returned.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// The guest read `data.len()` bytes from an I/O port; fill `data` before the next run.
    IoIn {
        /// Port number.
        port: u16,
        /// Buffer to fill.
        data: &'a mut [u8],
    },
    /// The guest wrote `data` to an I/O port.
    IoOut {
        /// Port number.
        port: u16,
        /// Bytes written.
        data: &'a [u8],
    },
    /// The guest read from unbacked guest-physical memory; fill `data` before the next run.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// Buffer to fill.
        data: &'a mut [u8],
    },
    /// The guest wrote to unbacked guest-physical memory.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// Bytes written.
        data: &'a [u8],
    },
    /// The vCPU waits for an interrupt (x86 HLT, Arm WFI) and the backend
    /// does not wait itself: the run loop calls
    /// [`crate::Vcpu::wait_for_interrupt`] before running it again.
    Halt,
    /// The guest shut down (triple fault on x86).
    Shutdown,
    /// The guest asked for a platform event (reset, power-off, crash).
    SystemEvent(SystemEvent),
    /// A [`crate::ForceExit`] kick took the vCPU out of guest mode.
    ForcedExit,
    /// The backend could not run the guest (e.g. an instruction it cannot emulate).
    InternalError {
        /// What the backend knows: sub-error, instruction pointer, instruction bytes.
        detail: String,
    },
    /// An exit this seam has no variant for.
    Other {
        /// Description of the exit.
        detail: String,
    },
}

/// A platform event requested by the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemEvent {
    /// Power off.
    Shutdown,
    /// Reset / reboot.
    Reset,
    /// The guest reported a crash.
    Crash,
    /// An event code this seam does not know.
    Unknown(u32),
}
