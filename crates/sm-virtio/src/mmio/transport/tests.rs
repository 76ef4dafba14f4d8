use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::GuestAddress;

use super::*;
use crate::{ActivateError, ShmRegion};

/// (size, descriptor table, avail ring, used ring) of one activated queue.
type QueueSetup = (u16, u64, u64, u64);

#[derive(Default)]
struct Record {
    restored: Vec<bool>,
    activated: Vec<(u64, Vec<QueueSetup>)>,
    resets: u32,
    config_writes: Vec<(u64, Vec<u8>)>,
}

struct MockDevice {
    record: Arc<Mutex<Record>>,
    shm: Vec<ShmRegion>,
}

const FEATURE_A: u64 = 1 << 3;

impl VirtioDevice for MockDevice {
    fn device_type(&self) -> u32 {
        crate::device_type::RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | FEATURE_A
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (offset as u8).wrapping_add(i as u8);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.record.lock().unwrap().config_writes.push((offset, data.to_vec()));
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let qs = a.queues.iter().map(|q| (q.size(), q.desc_table(), q.avail_ring(), q.used_ring())).collect();
        let mut rec = self.record.lock().unwrap();
        rec.activated.push((a.acked_features, qs));
        rec.restored.push(a.restored);
        Ok(())
    }
    fn reset(&mut self) {
        self.record.lock().unwrap().resets += 1;
    }
    fn shm_regions(&self) -> Vec<ShmRegion> {
        self.shm.clone()
    }
}

#[derive(Default)]
struct CountingLine(AtomicU32);
impl InterruptLine for CountingLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct Rig {
    t: MmioTransport,
    record: Arc<Mutex<Record>>,
    line: Arc<CountingLine>,
    mem: GuestMemory,
}

fn rig_with_shm(shm: Vec<ShmRegion>) -> Rig {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let record = Arc::new(Mutex::new(Record::default()));
    let line = Arc::new(CountingLine::default());
    let t =
        MmioTransport::new(Box::new(MockDevice { record: record.clone(), shm }), mem.clone(), line.clone()).unwrap();
    Rig { t, record, line, mem }
}

fn rig() -> Rig {
    rig_with_shm(Vec::new())
}

impl Rig {
    fn r(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }
    fn negotiate(&mut self, features: u64) {
        self.w(REG_STATUS, STATUS_ACKNOWLEDGE);
        self.w(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.w(REG_DRIVER_FEATURES_SEL, 0);
        self.w(REG_DRIVER_FEATURES, features as u32);
        self.w(REG_DRIVER_FEATURES_SEL, 1);
        self.w(REG_DRIVER_FEATURES, (features >> 32) as u32);
        self.w(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    }
    fn setup_queue(&mut self, index: u32, q: &MockSplitQueue<GuestMemory>) {
        self.w(REG_QUEUE_SEL, index);
        self.w(REG_QUEUE_NUM, 8);
        let (d, a, u) = (q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0);
        self.w(REG_QUEUE_DESC_LOW, d as u32);
        self.w(REG_QUEUE_DESC_HIGH, (d >> 32) as u32);
        self.w(REG_QUEUE_DRIVER_LOW, a as u32);
        self.w(REG_QUEUE_DRIVER_HIGH, (a >> 32) as u32);
        self.w(REG_QUEUE_DEVICE_LOW, u as u32);
        self.w(REG_QUEUE_DEVICE_HIGH, (u >> 32) as u32);
        self.w(REG_QUEUE_READY, 1);
    }
}

#[test]
fn identity_registers() {
    let mut r = rig();
    assert_eq!(r.r(REG_MAGIC), MAGIC_VALUE);
    assert_eq!(r.r(REG_VERSION), 2);
    assert_eq!(r.r(REG_DEVICE_ID), crate::device_type::RNG);
    assert_eq!(r.r(REG_VENDOR_ID), VENDOR_ID);
    r.w(REG_DEVICE_FEATURES_SEL, 1);
    assert_eq!(r.r(REG_DEVICE_FEATURES), 1);
    r.w(REG_DEVICE_FEATURES_SEL, 0);
    assert_eq!(r.r(REG_DEVICE_FEATURES), FEATURE_A as u32);
    r.w(REG_DEVICE_FEATURES_SEL, 7);
    assert_eq!(r.r(REG_DEVICE_FEATURES), 0);
    r.w(REG_QUEUE_SEL, 1);
    assert_eq!(r.r(REG_QUEUE_NUM_MAX), 8);
    r.w(REG_QUEUE_SEL, 2);
    assert_eq!(r.r(REG_QUEUE_NUM_MAX), 0, "absent queue reads max 0");
}

#[test]
fn full_initialisation_activates_with_the_drivers_queues() {
    let mut r = rig();
    let mem = r.mem.clone();
    let q0 = MockSplitQueue::create(&mem, GuestAddress(0x1000), 8);
    let q1 = MockSplitQueue::create(&mem, GuestAddress(0x4000), 8);
    r.negotiate(VIRTIO_F_VERSION_1 | FEATURE_A);
    assert_ne!(r.r(REG_STATUS) & STATUS_FEATURES_OK, 0);
    r.setup_queue(0, &q0);
    r.setup_queue(1, &q1);
    r.w(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    assert!(r.t.is_activated());
    let rec = r.record.lock().unwrap();
    let (features, queues) = &rec.activated[0];
    assert_eq!(*features, VIRTIO_F_VERSION_1 | FEATURE_A);
    assert_eq!(queues[0], (8, q0.desc_table_addr().0, q0.avail_addr().0, q0.used_addr().0));
    assert_eq!(queues[1].1, q1.desc_table_addr().0);
}

#[test]
fn unoffered_feature_or_missing_version_1_refuses_features_ok() {
    let mut r = rig();
    r.negotiate(VIRTIO_F_VERSION_1 | (1 << 5));
    assert_eq!(r.r(REG_STATUS) & STATUS_FEATURES_OK, 0);
    r.w(REG_STATUS, 0);
    r.negotiate(FEATURE_A);
    assert_eq!(r.r(REG_STATUS) & STATUS_FEATURES_OK, 0);
    // DRIVER_OK without FEATURES_OK does nothing.
    r.w(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK);
    assert!(!r.t.is_activated());
    assert_eq!(r.r(REG_STATUS) & STATUS_DRIVER_OK, 0);
}

#[test]
fn invalid_queue_marks_device_needs_reset() {
    let mut r = rig();
    r.negotiate(VIRTIO_F_VERSION_1);
    r.w(REG_QUEUE_SEL, 0);
    r.w(REG_QUEUE_NUM, 8);
    r.w(REG_QUEUE_DESC_LOW, 0xffff_0000); // outside guest memory
    r.w(REG_QUEUE_DESC_HIGH, 0x10);
    r.w(REG_QUEUE_READY, 1);
    let before = r.line.0.load(Ordering::SeqCst);
    r.w(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    assert!(!r.t.is_activated());
    assert_ne!(r.r(REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_eq!(r.r(REG_INTERRUPT_STATUS) & crate::INT_CONFIG, crate::INT_CONFIG);
    assert!(r.line.0.load(Ordering::SeqCst) > before);
}

#[test]
fn queue_setup_out_of_order_and_odd_sizes_are_ignored() {
    let mut r = rig();
    // Before FEATURES_OK: ignored.
    r.w(REG_QUEUE_NUM, 4);
    r.w(REG_QUEUE_READY, 1);
    assert_eq!(r.r(REG_QUEUE_READY), 0);
    r.negotiate(VIRTIO_F_VERSION_1);
    // 2-byte and 8-byte register writes are ignored; reads of odd size give zeros.
    r.t.write(REG_QUEUE_NUM, &[4, 0]);
    r.t.write(REG_QUEUE_READY, &[1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(r.r(REG_QUEUE_READY), 0);
    let mut two = [0xaau8; 2];
    r.t.read(REG_MAGIC, &mut two);
    assert_eq!(two, [0, 0]);
    // Out-of-range selectors and notifies do nothing.
    r.w(REG_QUEUE_SEL, 99);
    r.w(REG_QUEUE_NUM, 8);
    r.w(REG_QUEUE_READY, 1);
    r.w(REG_QUEUE_NOTIFY, 99);
    assert_eq!(r.r(REG_QUEUE_READY), 0);
    // Writes to read-only registers are ignored.
    r.w(REG_MAGIC, 0);
    assert_eq!(r.r(REG_MAGIC), MAGIC_VALUE);
}

#[test]
fn notify_writes_the_queue_eventfd_and_ack_clears_status() {
    let mut r = rig();
    r.w(REG_QUEUE_NOTIFY, 1);
    assert_eq!(r.t.queue_events()[1].read().unwrap(), 1);
    assert!(r.t.queue_events()[0].read().is_err(), "queue 0 not notified");
    r.t.interrupt().signal_used_queue();
    assert_eq!(r.r(REG_INTERRUPT_STATUS), crate::INT_VRING);
    r.w(REG_INTERRUPT_ACK, crate::INT_VRING);
    assert_eq!(r.r(REG_INTERRUPT_STATUS), 0);
}

#[test]
fn reset_stops_the_device_and_clears_registers() {
    let mut r = rig();
    let mem = r.mem.clone();
    let q0 = MockSplitQueue::create(&mem, GuestAddress(0x1000), 8);
    r.negotiate(VIRTIO_F_VERSION_1);
    r.setup_queue(0, &q0);
    r.w(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    assert!(r.t.is_activated());
    r.w(REG_STATUS, 0);
    assert!(!r.t.is_activated());
    assert_eq!(r.record.lock().unwrap().resets, 1);
    assert_eq!(r.r(REG_STATUS), 0);
    r.w(REG_QUEUE_SEL, 0);
    assert_eq!(r.r(REG_QUEUE_READY), 0);
    // And it can be brought up again.
    r.negotiate(VIRTIO_F_VERSION_1);
    r.setup_queue(0, &q0);
    r.w(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    assert_eq!(r.record.lock().unwrap().activated.len(), 2);
}

#[test]
fn config_space_passes_through_at_any_size() {
    let mut r = rig();
    let mut b = [0u8; 3];
    r.t.read(REG_CONFIG + 5, &mut b);
    assert_eq!(b, [5, 6, 7]);
    r.t.write(REG_CONFIG + 2, &[9, 9]);
    assert_eq!(r.record.lock().unwrap().config_writes, vec![(2, vec![9, 9])]);
}

#[test]
fn shared_memory_regions_absent_read_minus_one() {
    let mut r = rig_with_shm(vec![ShmRegion { id: 1, base: 0x2_0000_0000, len: 0x4000_0000 }]);
    r.w(REG_SHM_SEL, 0);
    assert_eq!((r.r(REG_SHM_LEN_LOW), r.r(REG_SHM_LEN_HIGH)), (u32::MAX, u32::MAX));
    r.w(REG_SHM_SEL, 1);
    assert_eq!((r.r(REG_SHM_LEN_LOW), r.r(REG_SHM_LEN_HIGH)), (0x4000_0000, 0));
    assert_eq!((r.r(REG_SHM_BASE_LOW), r.r(REG_SHM_BASE_HIGH)), (0, 2));
}

#[test]
fn state_captures_registers_and_queue_setup() {
    let mut r = rig();
    let mem = r.mem.clone();
    let q0 = MockSplitQueue::create(&mem, GuestAddress(0x1000), 8);
    r.negotiate(VIRTIO_F_VERSION_1 | FEATURE_A);
    r.setup_queue(0, &q0);
    let s = r.t.state();
    assert_eq!(s.acked_features, VIRTIO_F_VERSION_1 | FEATURE_A);
    assert_eq!(s.queues[0].desc_table, q0.desc_table_addr().0);
    assert!(s.queues[0].ready);
    assert_eq!(TransportState::decode(&s.encode()).unwrap(), s);
}

#[test]
fn restore_into_a_fresh_transport_reactivates_with_saved_queues() {
    let mut r = rig();
    let mem = r.mem.clone();
    let q0 = MockSplitQueue::create(&mem, GuestAddress(0x1000), 8);
    let q1 = MockSplitQueue::create(&mem, GuestAddress(0x4000), 8);
    r.negotiate(VIRTIO_F_VERSION_1 | FEATURE_A);
    r.setup_queue(0, &q0);
    r.setup_queue(1, &q1);
    r.w(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    // The mock device cannot hand its queues back: pausing is refused, clearly.
    let err = r.t.pause().unwrap_err();
    assert!(err.contains("does not support snapshots"), "{err}");
    // Capture before activation semantics: the registers and queue set-up.
    let state = r.t.state();

    let mut fresh = rig();
    fresh.t.restore(&state).unwrap();
    assert!(fresh.t.is_activated());
    let rec = fresh.record.lock().unwrap();
    assert_eq!(rec.restored, vec![true]);
    assert_eq!(rec.activated[0].1[1], (8, q1.desc_table_addr().0, q1.avail_addr().0, q1.used_addr().0));
    drop(rec);
    assert_eq!(fresh.r(REG_STATUS), state.status);
    // A state with the wrong queue count is refused.
    let mut wrong = state.clone();
    wrong.queues.pop();
    assert!(rig().t.restore(&wrong).unwrap_err().contains("queues"));
}
