//! After a restore: the guest's clock and entropy refreshed in one round trip
//! on the VM's first agent connection, which is then kept for the first
//! request ([`Vm::agent`]), and the steps timed ([`StartTimings`]).

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use sm_agent::AgentClient;

use super::{tail, Vm, RESTORE_CONNECT_TIMEOUT};
use crate::{Error, Result};

/// How a restored VM came up, host side: each step's end, from the start of
/// the restore call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartTimings {
    /// Snapshot read and checked, VM, vCPUs and devices made, state loaded.
    pub restored: Duration,
    /// vCPUs running.
    pub resumed: Duration,
    /// The agent accepted a connection (the guest's vsock transport reset
    /// may drop the first tries: see `attempts`).
    pub agent_connected: Duration,
    /// `Hello`, clock and entropy answered (one round trip).
    pub refreshed: Duration,
    /// Volumes and shares mounted (same as `refreshed` without any).
    pub mounted: Duration,
    /// Connections it took to reach the agent.
    pub attempts: u32,
    /// Guest round trips on the way (a connection handshake counts as one).
    pub round_trips: u32,
}

impl Vm {
    /// Host time into the guest clock, fresh entropy, on a connection kept
    /// for the next [`Vm::agent`] call. The guest handles the vsock
    /// transport reset asynchronously, so a connection made right after the
    /// restore may still be reset by it: retry until the deadline (each try
    /// waits for an answer only as long as is left). An agent of another
    /// protocol version is not retried: the snapshot holds an older or
    /// newer guest than this build.
    pub(super) fn refresh_guest(&mut self, t0: Instant, timings: &mut StartTimings) -> Result<()> {
        let deadline = Instant::now() + RESTORE_CONNECT_TIMEOUT;
        let mut seed = [0u8; 64];
        // SAFETY: getrandom writes at most seed.len() bytes into our buffer.
        let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
        let entropy = (n == seed.len() as isize).then_some(&seed[..]);
        loop {
            timings.attempts += 1;
            let attempt = self.connect(self.agent_port).and_then(|stream| {
                timings.agent_connected = t0.elapsed();
                let left = deadline.saturating_duration_since(Instant::now());
                Ok(AgentClient::connect_refreshed_within(stream, entropy, left)?)
            });
            if let Some(reason) = self.machine.exit_reason() {
                return Err(Error::NotReady(format!(
                    "the restored guest ended ({reason:?}); console:\n{}",
                    tail(&self.machine)
                )));
            }
            match attempt {
                Ok(client) => {
                    timings.refreshed = t0.elapsed();
                    timings.round_trips += 2;
                    self.keep_ready(client);
                    return Ok(());
                }
                Err(Error::Agent(e)) if e.is_version_mismatch() => {
                    return Err(Error::NotReady(format!(
                        "the restored guest's agent is of another build ({e}); the snapshot must be made anew"
                    )));
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("agent not answering yet after restore: {e}");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(Error::NotReady(format!("agent unreachable after restore: {e}"))),
            }
        }
    }

    /// Keeps `client` for the next [`Vm::agent`] call.
    fn keep_ready(&self, client: AgentClient<UnixStream>) {
        *self.ready_agent.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(client);
    }

    /// Keeps `client`, idle between requests, for the next [`Vm::agent`]
    /// call unless one is kept already (concurrent callers each made their
    /// own; one is enough) or it is out of sync.
    pub(crate) fn keep_idle(&self, client: AgentClient<UnixStream>) {
        if !client.is_in_sync() {
            return;
        }
        let mut kept = self.ready_agent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if kept.is_none() {
            *kept = Some(client);
        }
    }

    /// The connection kept by the last refresh, if still usable.
    pub(super) fn take_ready(&self) -> Option<AgentClient<UnixStream>> {
        let client = self.ready_agent.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()?;
        client.is_in_sync().then_some(client)
    }

    /// How this VM came up, if it was restored (the last restore or reset).
    pub fn start_timings(&self) -> Option<StartTimings> {
        self.start_timings
    }
}
