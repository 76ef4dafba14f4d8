use std::sync::Mutex;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::queues::{process_deflate, process_inflate, process_stats, release_pages, return_stats_buffer};
use super::*;
use crate::worker::testing::{add_chains, device_queue, guest_memory, mock_queue, used_entries, wait_for, Rig, R};
use crate::{mmio, INT_CONFIG, INT_VRING};

const PFN_BUF: u64 = 0x1_0000;
/// Pages the tests fill and release (inside the 1 MiB of guest memory).
const PAGE_A: u32 = 0x40;
const PAGE_B: u32 = 0x41;
const PAGE_C: u32 = 0x42;

fn page_addr(pfn: u32) -> GuestAddress {
    GuestAddress(u64::from(pfn) * BALLOON_PAGE_SIZE)
}

fn fill_page(mem: &GuestMemory, pfn: u32, byte: u8) {
    mem.write_slice(&[byte; BALLOON_PAGE_SIZE as usize], page_addr(pfn)).unwrap();
}

fn page(mem: &GuestMemory, pfn: u32) -> Vec<u8> {
    let mut v = vec![0u8; BALLOON_PAGE_SIZE as usize];
    mem.read_slice(&mut v, page_addr(pfn)).unwrap();
    v
}

fn write_pfns(mem: &GuestMemory, addr: u64, pfns: &[u32]) -> u32 {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
    bytes.len() as u32
}

fn write_stats(mem: &GuestMemory, addr: u64, stats: &[(u16, u64)]) -> u32 {
    let mut bytes = Vec::new();
    for (tag, val) in stats {
        bytes.extend_from_slice(&tag.to_le_bytes());
        bytes.extend_from_slice(&val.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
    bytes.len() as u32
}

#[test]
fn inflate_releases_the_pages_and_skips_pfns_outside_memory() {
    let mem = guest_memory();
    for pfn in [PAGE_A, PAGE_B, PAGE_C] {
        fill_page(&mem, pfn, 0xa5);
    }
    // Out-of-order, duplicated, and out-of-memory PFNs (1 MiB = 0x100 pages).
    let len = write_pfns(&mem, PFN_BUF, &[PAGE_B, 0x5000, PAGE_A, PAGE_A, u32::MAX, 0x100]);
    let mq = mock_queue(&mem, 0);
    add_chains(&mq, &[&[(PFN_BUF, len, R)]]);
    let mut q = device_queue(&mq, 16);
    assert!(process_inflate(&mem, &mut q));
    assert_eq!(used_entries(&mq), vec![(0, 0)]);
    assert_eq!(page(&mem, PAGE_A), vec![0; 4096], "page A released");
    assert_eq!(page(&mem, PAGE_B), vec![0; 4096], "page B released");
    assert_eq!(page(&mem, PAGE_C), vec![0xa5; 4096], "neighbour kept");
    // Released pages are usable again.
    fill_page(&mem, PAGE_A, 0x3c);
    assert_eq!(page(&mem, PAGE_A), vec![0x3c; 4096]);
}

#[test]
fn release_pages_counts_only_pages_inside_memory() {
    // Two regions with a hole: PFNs in the hole or straddling nothing are skipped.
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000), (GuestAddress(0x20_0000), 0x10_0000)]).unwrap();
    fill_page(&mem, 0x200, 1);
    fill_page(&mem, 0x10, 1);
    assert_eq!(release_pages(&mem, &[0x10, 0x150, 0x200, 0x2ff, 0x300, 0x11]), 4);
    assert_eq!(page(&mem, 0x200), vec![0; 4096]);
    assert_eq!(page(&mem, 0x10), vec![0; 4096]);
    assert_eq!(release_pages(&mem, &[]), 0);
}

#[test]
fn deflate_is_acknowledged_without_touching_memory() {
    let mem = guest_memory();
    fill_page(&mem, PAGE_A, 0x77);
    let len = write_pfns(&mem, PFN_BUF, &[PAGE_A]);
    let mq = mock_queue(&mem, 0);
    add_chains(&mq, &[&[(PFN_BUF, len, R)], &[(0x7000_0000, 4, R)]]);
    let mut q = device_queue(&mq, 16);
    assert!(process_deflate(&mem, &mut q));
    assert_eq!(used_entries(&mq), vec![(0, 0), (1, 0)]);
    assert_eq!(page(&mem, PAGE_A), vec![0x77; 4096]);
}

#[test]
fn stats_are_parsed_held_and_returned_on_request() {
    let mem = guest_memory();
    let sink = Mutex::new(None);
    let mut held = None;
    let mq = mock_queue(&mem, 0);
    let first = [(stat_tag::FREE_MEMORY, 1 << 30), (stat_tag::TOTAL_MEMORY, 2 << 30), (stat_tag::MAJOR_FAULTS, 7)];
    let len = write_stats(&mem, 0x1_0000, &first);
    // Two descriptors: the report may be split anywhere, even inside an entry.
    add_chains(&mq, &[&[(0x1_0000, 15, R), (0x1_0000 + 15, len - 15, R)]]);
    let mut q = device_queue(&mq, 16);
    assert!(!process_stats(&mem, &mut q, &mut held, &sink), "buffer kept: nothing to signal");
    assert!(used_entries(&mq).is_empty());
    assert_eq!(held, Some(0));
    let stats = sink.lock().unwrap().clone().unwrap();
    assert_eq!(stats.entries, first.to_vec());
    assert_eq!(stats.get(stat_tag::TOTAL_MEMORY), Some(2 << 30));
    assert_eq!(stats.get(stat_tag::SWAP_IN), None);
    assert_eq!(stats.updates, 1);

    // Asking for fresh stats gives the buffer back.
    assert!(return_stats_buffer(&mem, &mut q, &mut held));
    assert_eq!(used_entries(&mq), vec![(0, 0)]);
    assert!(!return_stats_buffer(&mem, &mut q, &mut held), "nothing held any more");

    // The driver refills; a trailing partial entry is ignored.
    let len = write_stats(&mem, 0x2_0000, &[(stat_tag::AVAILABLE_MEMORY, 5)]);
    mq.add_desc_chains(&crate::worker::testing::chain(2, &[(0x2_0000, len + 3, R)]), 2).unwrap();
    process_stats(&mem, &mut q, &mut held, &sink);
    let stats = sink.lock().unwrap().clone().unwrap();
    assert_eq!(stats.entries, vec![(stat_tag::AVAILABLE_MEMORY, 5)]);
    assert_eq!(stats.updates, 2);
    assert_eq!(held, Some(2));

    // A driver that sends another buffer while one is held gets the old one back.
    mq.add_desc_chains(&crate::worker::testing::chain(3, &[(0x2_0000, len, R)]), 3).unwrap();
    assert!(process_stats(&mem, &mut q, &mut held, &sink));
    assert_eq!(used_entries(&mq), vec![(0, 0), (2, 0)]);
    assert_eq!(held, Some(3));
}

#[test]
fn config_space_target_and_actual() {
    let mut b = Balloon::new(true).unwrap();
    assert_eq!(b.device_type(), 5);
    assert_eq!(b.queue_max_sizes().len(), 3);
    let f = b.device_features();
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & VIRTIO_BALLOON_F_STATS_VQ, 0);
    assert_ne!(f & VIRTIO_BALLOON_F_DEFLATE_ON_OOM, 0);
    assert_eq!(Balloon::new(false).unwrap().device_features() & VIRTIO_BALLOON_F_DEFLATE_ON_OOM, 0);

    b.set_target_pages(1234);
    let mut c = [0u8; 8];
    b.read_config(0, &mut c);
    assert_eq!(c, [0xd2, 0x04, 0, 0, 0, 0, 0, 0]);
    // The driver writes actual; num_pages is read-only for it.
    b.write_config(4, &77u32.to_le_bytes());
    b.write_config(0, &[9, 9, 9, 9]);
    assert_eq!(b.actual_pages(), 77);
    assert_eq!(b.target_pages(), 1234);
    // Byte-wise write of the high byte of actual.
    b.write_config(7, &[1]);
    assert_eq!(b.actual_pages(), 77 + (1 << 24));
    let mut one = [0u8; 4];
    b.read_config(4, &mut one);
    assert_eq!(u32::from_le_bytes(one), 77 + (1 << 24));
    b.read_config(64, &mut one);
    assert_eq!(one, [0; 4]);
}

#[test]
fn threaded_through_the_mmio_transport() {
    let mem = guest_memory();
    let balloon = Balloon::new(false).unwrap();
    let handle = balloon.handle();
    let mut rig = Rig::new(Box::new(balloon), &mem);
    assert_eq!(rig.r(mmio::REG_DEVICE_ID), 5);
    let (inflate, deflate, stats) = (mock_queue(&mem, 0), mock_queue(&mem, 0x2000), mock_queue(&mem, 0x4000));
    rig.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_STATS_VQ);
    rig.setup_queue(0, 16, &inflate);
    rig.setup_queue(1, 16, &deflate);
    rig.setup_queue(2, 16, &stats);
    rig.driver_ok();

    // Target change: config interrupt, new value visible in config space.
    let before = rig.line.count();
    handle.set_target_pages(300);
    assert_eq!(rig.line.count(), before + 1);
    assert_ne!(rig.r(mmio::REG_INTERRUPT_STATUS) & INT_CONFIG, 0);
    assert_eq!(rig.r(mmio::REG_CONFIG), 300);
    rig.w(mmio::REG_INTERRUPT_ACK, INT_CONFIG);

    // The driver reports its balloon size.
    rig.w(mmio::REG_CONFIG + 4, 42);
    assert_eq!(handle.actual_pages(), 42);

    // Inflate a page.
    fill_page(&mem, PAGE_A, 0xcc);
    let len = write_pfns(&mem, PFN_BUF, &[PAGE_A]);
    add_chains(&inflate, &[&[(PFN_BUF, len, R)]]);
    rig.notify(0);
    wait_for("inflate used", || inflate.used().idx().load() == 1);
    wait_for("inflate interrupt", || rig.r(mmio::REG_INTERRUPT_STATUS) & INT_VRING != 0);
    assert_eq!(page(&mem, PAGE_A), vec![0; 4096]);

    // Deflate it.
    add_chains(&deflate, &[&[(PFN_BUF, len, R)]]);
    rig.notify(1);
    wait_for("deflate used", || deflate.used().idx().load() == 1);

    // Statistics: the report is kept, the buffer held until asked for.
    let slen = write_stats(&mem, 0x3_0000, &[(stat_tag::FREE_MEMORY, 12345)]);
    add_chains(&stats, &[&[(0x3_0000, slen, R)]]);
    rig.notify(2);
    wait_for("stats", || handle.stats().is_some());
    assert_eq!(handle.stats().unwrap().get(stat_tag::FREE_MEMORY), Some(12345));
    assert_eq!(stats.used().idx().load(), 0, "buffer held");
    rig.w(mmio::REG_INTERRUPT_ACK, INT_VRING);
    let before = rig.line.count();
    handle.request_stats();
    wait_for("stats buffer returned", || stats.used().idx().load() == 1);
    wait_for("stats interrupt", || rig.line.count() > before);

    rig.w(mmio::REG_STATUS, 0);
    assert!(!rig.t.is_activated());
    // After reset a target change raises no interrupt.
    let before = rig.line.count();
    handle.set_target_pages(1);
    assert_eq!(rig.line.count(), before);
}

#[test]
fn stats_are_polled_periodically() {
    let mem = guest_memory();
    let balloon = Balloon::new(false).unwrap().with_stats_interval(Duration::from_millis(10));
    let handle = balloon.handle();
    let mut rig = Rig::new(Box::new(balloon), &mem);
    let (inflate, deflate, stats) = (mock_queue(&mem, 0), mock_queue(&mem, 0x2000), mock_queue(&mem, 0x4000));
    rig.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_STATS_VQ);
    rig.setup_queue(0, 16, &inflate);
    rig.setup_queue(1, 16, &deflate);
    rig.setup_queue(2, 16, &stats);
    rig.driver_ok();
    let slen = write_stats(&mem, 0x3_0000, &[(stat_tag::MINOR_FAULTS, 3)]);
    add_chains(&stats, &[&[(0x3_0000, slen, R)]]);
    rig.notify(2);
    // Without any request the timer returns the buffer.
    wait_for("periodic stats request", || stats.used().idx().load() == 1);
    assert_eq!(handle.stats().unwrap().get(stat_tag::MINOR_FAULTS), Some(3));
}

#[test]
fn without_stats_feature_only_two_queues_are_needed() {
    let mem = guest_memory();
    let balloon = Balloon::new(false).unwrap();
    let handle = balloon.handle();
    let mut rig = Rig::new(Box::new(balloon), &mem);
    let (inflate, deflate) = (mock_queue(&mem, 0), mock_queue(&mem, 0x2000));
    rig.negotiate(VIRTIO_F_VERSION_1);
    rig.setup_queue(0, 16, &inflate);
    rig.setup_queue(1, 16, &deflate);
    rig.driver_ok();
    handle.request_stats(); // harmless without a stats queue
    fill_page(&mem, PAGE_B, 0xcc);
    let len = write_pfns(&mem, PFN_BUF, &[PAGE_B]);
    add_chains(&inflate, &[&[(PFN_BUF, len, R)]]);
    rig.notify(0);
    wait_for("inflate used", || inflate.used().idx().load() == 1);
    assert_eq!(page(&mem, PAGE_B), vec![0; 4096]);
    assert!(handle.stats().is_none());
}

#[test]
fn a_held_stats_buffer_survives_pause_and_restore() {
    let mem = guest_memory();
    let balloon = Balloon::new(false).unwrap();
    let handle = balloon.handle();
    let mut rig = Rig::new(Box::new(balloon), &mem);
    let (inflate, deflate, stats) = (mock_queue(&mem, 0), mock_queue(&mem, 0x2000), mock_queue(&mem, 0x4000));
    rig.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_STATS_VQ);
    rig.setup_queue(0, 16, &inflate);
    rig.setup_queue(1, 16, &deflate);
    rig.setup_queue(2, 16, &stats);
    rig.driver_ok();
    let slen = write_stats(&mem, 0x3_0000, &[(stat_tag::FREE_MEMORY, 1)]);
    add_chains(&stats, &[&[(0x3_0000, slen, R)]]);
    rig.notify(2);
    wait_for("stats", || handle.stats().is_some());

    // Paused with the buffer held: the ring shows it taken but not used.
    rig.t.pause().expect("balloon supports pause");
    let state = rig.t.state();
    assert_eq!((state.queues[2].next_avail, state.queues[2].next_used), (1, 0));
    // A target change while paused raises nothing now, but is announced on resume.
    let before = rig.line.count();
    handle.set_target_pages(64);
    assert_eq!(rig.line.count(), before);
    rig.t.resume();
    assert_eq!(rig.line.count(), before + 1, "config change announced on resume");
    handle.request_stats();
    wait_for("held buffer returned after resume", || stats.used().idx().load() == 1);

    // Same across a restore into a fresh device: hold again, capture, restore.
    add_chains(&stats, &[&[(0x3_0000, slen, R)]]);
    rig.notify(2);
    wait_for("second report", || handle.stats().is_some_and(|s| s.updates == 2));
    rig.t.pause().unwrap();
    let state = rig.t.state();
    drop(rig);
    let fresh_balloon = Balloon::new(false).unwrap();
    let fresh_handle = fresh_balloon.handle();
    let mut fresh = Rig::new(Box::new(fresh_balloon), &mem);
    fresh.t.restore(&state).unwrap();
    assert!(fresh.t.is_activated());
    fresh_handle.request_stats();
    wait_for("held buffer returned after restore", || stats.used().idx().load() == 2);
}
