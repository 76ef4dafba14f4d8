//! `containerd-shim-supermachine-v2`: the containerd runtime shim (task API
//! v2, what containerd 1.6 and 1.7 speak) that runs each container in a
//! supermachine microVM.
//!
//! containerd starts this binary once per container (`start`: it spawns the
//! long-lived shim process, or with a warm pool ([`warm`]) hands out the
//! namespace's running one, and prints its ttrpc address), then drives the
//! container through the task service ([`task::TaskService`]): Create boots a
//! VM on a root disk built from the bundle's root file system, Start runs the
//! bundle's process through the guest agent, Exec adds processes, Kill
//! signals them, Wait/State report, Delete stops the VM and cleans up.

mod bundle;
mod container;
mod error;
mod events;
mod linger;
mod process;
mod service;
mod shim_log;
mod stats;
mod stdio;
mod task;
mod warm;

/// The runtime name containerd knows this shim by (`--runtime` of `ctr run`).
pub const RUNTIME_NAME: &str = "io.containerd.supermachine.v2";

fn main() {
    let config = containerd_shim::Config {
        // The shim's children (mkfs, passt) are waited for by whoever started
        // them; a reaper of every child would steal their exit statuses. The
        // guest's processes are not our children.
        no_reaper: true,
        no_sub_reaper: true,
        // Our own logger (shim_log): a shim with a warm pool outlives the
        // bundle whose log FIFO containerd's logger writes to.
        no_setup_logger: true,
        ..Default::default()
    };
    containerd_shim::run::<service::ShimService>(RUNTIME_NAME, Some(config));
}
