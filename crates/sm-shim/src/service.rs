//! The shim process's lifecycle as containerd drives it: `start` spawns the
//! long-lived shim (or, with a warm pool, hands out the namespace's running
//! one) and prints its address, `delete` cleans up after a shim that died,
//! and the long-lived shim serves [`TaskService`] until it ends.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::protos::shim::shim::ConnectRequest;
use containerd_shim::protos::shim::shim_ttrpc::TaskClient;
use containerd_shim::protos::ttrpc;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, DeleteResponse, ExitSignal, Flags, StartOpts};

use crate::events::Events;
use crate::task::TaskService;
use crate::warm::{WarmPools, WarmSettings};

/// Exit status containerd records for a container whose shim was gone
/// (as runc's shim does: 128 + SIGKILL).
const LOST_EXIT_STATUS: u32 = 137;
/// The grouping of the shim with a warm pool: one per namespace (the
/// socket's address is made of containerd's address, the namespace and this).
const POOL_GROUPING: &str = "supermachine-warm-pool";
/// How long a `start` waits for the running shim's Connect answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The shim.
pub struct ShimService {
    exit: Arc<ExitSignal>,
    namespace: String,
    /// containerd's socket (the shim's own is derived from it).
    address: String,
    /// The shim's own socket, as ttrpc names it (`unix://...`).
    socket: String,
    debug: bool,
    /// The warm pool's settings, read once from the environment (a bad
    /// value: its message, which fails `start`).
    warm: Result<Option<WarmSettings>, String>,
}

impl containerd_shim::Shim for ShimService {
    type T = TaskService;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        let warm = WarmSettings::from_env().map_err(|e| e.to_string());
        // Without a pool: one shim per container, grouped by its id.
        let grouping = if matches!(warm, Ok(Some(_))) { POOL_GROUPING } else { &args.id };
        ShimService {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            address: args.address.clone(),
            socket: containerd_shim::socket_address(&args.address, &args.namespace, grouping),
            debug: args.debug,
            warm,
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        let warm = self.warm.clone().map_err(containerd_shim::Error::InvalidArgument)?;
        let grouping = if warm.is_some() { POOL_GROUPING.to_string() } else { opts.id.clone() };
        if warm.is_some() {
            hold_running_shim(&self.socket);
        }
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
        crate::shim_log::ShimLog::install(self.debug);
        // A bad setting failed `start` already, so none is seen here.
        let warm = self.warm.clone().ok().flatten().map(|settings| {
            tracing::info!(
                "warm pool: up to {} idle VMs per image, each kept {:?}; this shim serves namespace {} of {}",
                settings.vms,
                settings.idle,
                self.namespace,
                self.address
            );
            Arc::new(WarmPools::new(settings))
        });
        let socket = PathBuf::from(self.socket.strip_prefix("unix://").unwrap_or(&self.socket));
        TaskService::new(Events::new(publisher, self.namespace.clone()), Arc::clone(&self.exit), warm, socket)
    }
}

/// Puts off the end of the namespace's running shim (see
/// [`crate::linger`]) by calling its Connect. When that fails the shim is
/// ending (it removed its socket before refusing) or dead (a stale socket,
/// which `spawn` replaces); either way `spawn` then starts a new one. A
/// socket is never removed here: it may be a live shim's that was slow.
fn hold_running_shim(address: &str) {
    let Ok(client) = ttrpc::Client::connect(address) else { return };
    let request = ConnectRequest::default();
    let timeout = i64::try_from(CONNECT_TIMEOUT.as_nanos()).unwrap_or(i64::MAX);
    if let Err(e) = TaskClient::new(client).connect(ttrpc::context::with_timeout(timeout), &request) {
        tracing::debug!("the running shim at {address} refused Connect ({e})");
    }
}
