//! The shim process's lifecycle as containerd drives it: `start` spawns the
//! long-lived shim and prints its address, `delete` cleans up after a shim
//! that died, and the long-lived shim serves [`TaskService`] until Shutdown.

use std::sync::Arc;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, DeleteResponse, ExitSignal, Flags, StartOpts};

use crate::events::Events;
use crate::task::TaskService;

/// Exit status containerd records for a container whose shim was gone
/// (as runc's shim does: 128 + SIGKILL).
const LOST_EXIT_STATUS: u32 = 137;

/// The shim.
pub struct ShimService {
    exit: Arc<ExitSignal>,
    namespace: String,
}

impl containerd_shim::Shim for ShimService {
    type T = TaskService;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        ShimService { exit: Arc::new(ExitSignal::default()), namespace: args.namespace.clone() }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        // One shim per container: grouped by the container's id.
        let grouping = opts.id.clone();
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> Result<DeleteResponse, containerd_shim::Error> {
        // Run in the bundle directory, after the shim process is gone: its
        // VM went with it; what is left on the host is the bundle's mount
        // and root disk.
        let bundle = std::env::current_dir()
            .map_err(|e| containerd_shim::Error::IoError { context: "the bundle directory".into(), err: e })?;
        crate::bundle::clean_up(&bundle);
        Ok(DeleteResponse {
            exit_status: LOST_EXIT_STATUS,
            exited_at: Some(containerd_shim::util::timestamp()?).into(),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        TaskService::new(Events::new(publisher, self.namespace.clone()), Arc::clone(&self.exit))
    }
}
