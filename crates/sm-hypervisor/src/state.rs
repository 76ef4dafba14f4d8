/// Opaque, versioned, backend-specific saved state of one vCPU.
///
/// The bytes start with the backend's own header (magic, version, length); only the
/// backend that produced them can interpret them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuState(pub Vec<u8>);

/// Opaque, versioned, backend-specific saved state of VM-wide devices
/// (interrupt controllers, timers, clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmState(pub Vec<u8>);
