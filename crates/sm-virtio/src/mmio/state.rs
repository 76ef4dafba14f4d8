//! Versioned binary encoding of the transport state, for snapshots.

/// Current encoding version of [`TransportState`].
pub const TRANSPORT_STATE_VERSION: u16 = 1;
const MAGIC: [u8; 4] = *b"SMVT";

/// One queue's driver-visible configuration and ring positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueSnapshot {
    /// Size chosen by the driver.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available index the device will read.
    pub next_avail: u16,
    /// Next used index the device will write.
    pub next_used: u16,
    /// VIRTIO_F_EVENT_IDX in use.
    pub event_idx: bool,
}

/// Everything the transport needs to resume where it was.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TransportState {
    /// Device status register.
    pub status: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// SHMSel.
    pub shm_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Per-queue state.
    pub queues: Vec<QueueSnapshot>,
}

/// Why a transport state blob was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// Not produced by this encoder.
    #[error("virtio transport state: bad magic")]
    BadMagic,
    /// From another encoding version.
    #[error("virtio transport state version {0} is not supported (this build reads {TRANSPORT_STATE_VERSION})")]
    Version(u16),
    /// Cut short or padded.
    #[error("virtio transport state: {0}")]
    Length(String),
}

const QUEUE_LEN: usize = 2 + 1 + 8 * 3 + 2 + 2 + 1;
const FIXED_LEN: usize = 4 + 2 + 4 + 8 + 4 * 6 + 2;

impl TransportState {
    /// Encodes the state.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(FIXED_LEN + QUEUE_LEN * self.queues.len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&TRANSPORT_STATE_VERSION.to_le_bytes());
        b.extend_from_slice(&self.status.to_le_bytes());
        b.extend_from_slice(&self.acked_features.to_le_bytes());
        for v in [
            self.device_features_sel,
            self.driver_features_sel,
            self.queue_sel,
            self.shm_sel,
            self.interrupt_status,
            self.config_generation,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&(self.queues.len() as u16).to_le_bytes());
        for q in &self.queues {
            b.extend_from_slice(&q.size.to_le_bytes());
            b.push(u8::from(q.ready));
            b.extend_from_slice(&q.desc_table.to_le_bytes());
            b.extend_from_slice(&q.avail_ring.to_le_bytes());
            b.extend_from_slice(&q.used_ring.to_le_bytes());
            b.extend_from_slice(&q.next_avail.to_le_bytes());
            b.extend_from_slice(&q.next_used.to_le_bytes());
            b.push(u8::from(q.event_idx));
        }
        b
    }

    /// Decodes a blob produced by [`TransportState::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        if bytes.len() < FIXED_LEN {
            return Err(StateError::Length(format!("{} bytes, need at least {FIXED_LEN}", bytes.len())));
        }
        let mut r = Reader { b: bytes, at: 0 };
        if r.take(4) != MAGIC {
            return Err(StateError::BadMagic);
        }
        let version = r.u16();
        if version != TRANSPORT_STATE_VERSION {
            return Err(StateError::Version(version));
        }
        let status = r.u32();
        let acked_features = r.u64();
        let (dfs, drs, qs, ss, is, cg) = (r.u32(), r.u32(), r.u32(), r.u32(), r.u32(), r.u32());
        let n = r.u16() as usize;
        let expect = FIXED_LEN + n * QUEUE_LEN;
        if bytes.len() != expect {
            return Err(StateError::Length(format!("{} bytes for {n} queues, expected {expect}", bytes.len())));
        }
        let queues = (0..n)
            .map(|_| QueueSnapshot {
                size: r.u16(),
                ready: r.u8() != 0,
                desc_table: r.u64(),
                avail_ring: r.u64(),
                used_ring: r.u64(),
                next_avail: r.u16(),
                next_used: r.u16(),
                event_idx: r.u8() != 0,
            })
            .collect();
        Ok(TransportState {
            status,
            acked_features,
            device_features_sel: dfs,
            driver_features_sel: drs,
            queue_sel: qs,
            shm_sel: ss,
            interrupt_status: is,
            config_generation: cg,
            queues,
        })
    }
}

/// Reads little-endian fields; callers check the total length first.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        s
    }
    fn u8(&mut self) -> u8 {
        self.take(1)[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take(2).try_into().unwrap_or_default())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap_or_default())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TransportState {
        TransportState {
            status: 0xf,
            acked_features: (1 << 32) | 3,
            queue_sel: 1,
            interrupt_status: 1,
            config_generation: 2,
            queues: vec![
                QueueSnapshot {
                    size: 256,
                    ready: true,
                    desc_table: 0x1000,
                    avail_ring: 0x2000,
                    used_ring: 0x3000,
                    next_avail: 7,
                    next_used: 6,
                    event_idx: true,
                },
                QueueSnapshot::default(),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(TransportState::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn every_truncation_and_extension_is_rejected() {
        let b = sample().encode();
        for len in 0..b.len() {
            assert!(TransportState::decode(&b[..len]).is_err(), "len {len}");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(matches!(TransportState::decode(&longer), Err(StateError::Length(_))));
    }

    #[test]
    fn wrong_version_and_magic_are_named() {
        let mut b = sample().encode();
        b[4] = 9;
        assert_eq!(TransportState::decode(&b), Err(StateError::Version(9)));
        b[0] = 0;
        assert_eq!(TransportState::decode(&b), Err(StateError::BadMagic));
    }
}
