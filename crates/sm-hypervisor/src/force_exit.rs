use std::fmt;
use std::sync::Arc;

/// Backend side of a force-exit: makes one vCPU leave guest mode.
///
/// Implementations must not lose a kick: a kick delivered before the vCPU thread
/// enters the guest (or even before it exists) makes the next entry return at once
/// with [`crate::VcpuExit::ForcedExit`].
pub trait Kick: Send + Sync {
    /// Requests that the vCPU leave guest mode as soon as possible.
    fn kick(&self);
}

/// A cloneable handle that kicks one vCPU out of `run` from any thread.
#[derive(Clone)]
pub struct ForceExit(Arc<dyn Kick>);

impl ForceExit {
    /// Wraps a backend kick implementation.
    pub fn new(kick: Arc<dyn Kick>) -> Self {
        ForceExit(kick)
    }

    /// Kicks the vCPU. Never blocks for long; safe to call at any moment, repeatedly.
    pub fn kick(&self) {
        self.0.kick();
    }
}

impl fmt::Debug for ForceExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ForceExit")
    }
}
