//! The payload of `Mount`: a file system the agent mounts before commands
//! run (a volume's disk or a shared directory), so that later execs see it.

use super::codec::{DecodeError, Decoder, Encoder};

/// Mount `source` (a block device) of type `fstype` at `target`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MountRequest {
    /// The device, e.g. `/dev/vdb`.
    pub source: String,
    /// Absolute path in the guest's root; created (with parents) if missing.
    pub target: String,
    /// File system type, e.g. `ext4`.
    pub fstype: String,
    /// Mount read-only.
    pub read_only: bool,
    /// Wait (bounded) until the device has this many 512-byte sectors before
    /// mounting: after a restore the guest learns a new disk's size from a
    /// configuration-change interrupt, asynchronously. 0: do not wait.
    pub expect_sectors: u64,
    /// A shared directory whose device has a DAX window: mount with
    /// `dax=always` (file pages mapped from the host instead of copied).
    pub dax: bool,
}

impl MountRequest {
    pub(super) fn encode(&self, e: &mut Encoder) {
        e.str(&self.source);
        e.str(&self.target);
        e.str(&self.fstype);
        e.bool(self.read_only);
        e.u64(self.expect_sectors);
        e.bool(self.dax);
    }

    pub(super) fn decode(d: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        Ok(MountRequest {
            source: d.string("source")?,
            target: d.string("target")?,
            fstype: d.string("fstype")?,
            read_only: d.bool("read_only")?,
            expect_sectors: d.u64("expect_sectors")?,
            dax: d.bool("dax")?,
        })
    }
}
