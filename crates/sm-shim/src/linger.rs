//! The end of a shim with a warm pool. It serves every container of its
//! namespace, so containerd's Shutdown after one container's Delete does not
//! end it; it ends by itself once it has no container and no warm VM (idle
//! VMs leave the pool after `SM_SHIM_WARM_SECONDS`).
//!
//! A `start` of this binary for a new container hands out the running
//! shim's address; it first calls Connect, which puts the end off by
//! [`HOLD_AFTER_ACTIVITY`] (containerd's Create follows within it). The end
//! itself is atomic with Connect and Create: under the containers' lock the
//! shim marks itself closing and removes its socket, so a `start` either got
//! its Connect in before (and the shim stays) or finds no socket and starts
//! a new shim.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::task::{lock, Containers};
use crate::warm::WarmPools;

/// How often the shim looks whether it can end.
const POLL: Duration = Duration::from_millis(500);
/// How long after a Create or Connect the shim stays, whatever else.
pub const HOLD_AFTER_ACTIVITY: Duration = Duration::from_secs(20);

/// Starts the thread that ends the shim (removes `socket`, exits the
/// process) once it has no containers, no warm VMs, and no Create or
/// Connect came for [`HOLD_AFTER_ACTIVITY`]. It exits the process itself
/// rather than through the shim's exit signal: containerd-shim's own end
/// removes the socket named in the first bundle's `address` file, which by
/// then may be a new shim's.
pub fn spawn(containers: Arc<Mutex<Containers>>, warm: Arc<WarmPools>, socket: PathBuf) {
    let watcher = move || loop {
        std::thread::sleep(POLL);
        let mut containers = lock(&containers);
        if !containers.is_empty() || containers.last_activity().elapsed() < HOLD_AFTER_ACTIVITY || warm.alive() > 0 {
            continue;
        }
        containers.close();
        if let Err(e) = std::fs::remove_file(&socket) {
            tracing::warn!("ending: could not remove the shim's socket {}: {e}", socket.display());
        }
        tracing::info!("no containers and no warm VMs left: the shim ends");
        // Under the lock still: no Create or Connect is served from here on.
        std::process::exit(0);
    };
    if let Err(e) = std::thread::Builder::new().name("linger".into()).spawn(watcher) {
        // Other containers may still run here: the shim stays.
        tracing::warn!("the shim's end watcher did not start ({e}); the shim stays until it is killed");
    }
}
