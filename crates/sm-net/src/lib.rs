//! Network back ends for supermachine's virtio-net device (`sm_virtio::net`).
//!
//! - [`Passt`]: one `passt` process per VM (Debian's `passt` package; rootless),
//!   started on one end of a socketpair (`--fd`), owned by the VMM: reaped and
//!   killed with the VM, and it exits by itself when our end closes (so a
//!   supervisor killed with -9 leaves no passt behind). Frames cross the socket
//!   as passt's stream protocol has them: a 4-byte big-endian length, then the
//!   Ethernet frame ([`StreamFramer`]).
//! - [`Tap`]: an existing TAP interface the host prepared (`--network tap:NAME`).
//! - [`EgressFilter`]: the egress policy ([`EgressPolicy`]), enforced on the
//!   frames the guest sends before they reach the back end.
//! - [`tls`]: TLS terminated on the host for `-p HOSTPORT:GUESTPORT/tls`.
//! - [`addressing`]: the guest addressing every VM gets, the same for all, so a
//!   restored VM's configuration stays valid with a fresh back end.

pub mod addressing;
pub mod dns_relay;
mod error;
pub mod filter;
mod passt;
pub mod policy;
mod stream;
mod tap;
pub mod tls;

pub use dns_relay::DnsRelay;
pub use error::NetError;
pub use filter::{EgressFilter, EgressStats};
pub use passt::{Passt, PasstOptions, PublishedPort, PASST_PACKAGE};
pub use policy::{EgressPolicy, PolicyError};
pub use stream::{StreamFramer, OUT_LIMIT};
pub use tap::Tap;
pub use tls::TlsIdentity;
