//! The vsock device's worker thread: waits on queue notifications and host sockets
//! with epoll, moves packets between the virtqueues and the [`Muxer`].

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::connection::ConnState;
use super::muxer::{ConnKey, Muxer, StreamId};
use super::packet::Header;
use crate::{GuestMemory, VirtioInterrupt};

/// Largest payload accepted in one packet.
const MAX_PKT_DATA: u32 = 64 * 1024;

const TOKEN_STOP: u64 = 0;
const TOKEN_RX: u64 = 1;
const TOKEN_TX: u64 = 2;
const TOKEN_EVENT: u64 = 3;
const TOKEN_LISTENER: u64 = 4;
const FIRST_STREAM_TOKEN: u64 = 16;

/// Queues and events handed to the worker.
pub struct WorkerQueues {
    pub mem: GuestMemory,
    pub rx: Queue,
    pub tx: Queue,
    pub event: Queue,
    pub rx_evt: EventFd,
    pub tx_evt: EventFd,
    pub event_evt: EventFd,
    pub interrupt: Arc<VirtioInterrupt>,
}

pub struct Worker {
    q: WorkerQueues,
    stop: EventFd,
    epoll: Epoll,
    muxer: Muxer,
    token_of: HashMap<StreamId, u64>,
    stream_of: HashMap<u64, StreamId>,
    next_token: u64,
    rx_starved: bool,
    buf: Vec<u8>,
}

fn ev(events: EventSet, token: u64) -> EpollEvent {
    EpollEvent::new(events, token)
}

impl Worker {
    pub fn new(q: WorkerQueues, stop: EventFd, muxer: Muxer) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        for (fd, token) in [
            (stop.as_raw_fd(), TOKEN_STOP),
            (q.rx_evt.as_raw_fd(), TOKEN_RX),
            (q.tx_evt.as_raw_fd(), TOKEN_TX),
            (q.event_evt.as_raw_fd(), TOKEN_EVENT),
            (muxer.listener.as_raw_fd(), TOKEN_LISTENER),
        ] {
            epoll.ctl(ControlOperation::Add, fd, ev(EventSet::IN, token))?;
        }
        Ok(Worker {
            q,
            stop,
            epoll,
            muxer,
            token_of: HashMap::new(),
            stream_of: HashMap::new(),
            next_token: FIRST_STREAM_TOKEN,
            rx_starved: false,
            buf: vec![0; MAX_PKT_DATA as usize],
        })
    }

    /// Tells the driver that every connection it had is gone (after a restore into
    /// a new process): VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue.
    pub fn send_transport_reset(&mut self) {
        let mem = &self.q.mem;
        let Some(mut chain) = self.q.event.pop_descriptor_chain(mem) else {
            tracing::warn!("vsock: no event buffer for the transport reset");
            return;
        };
        let head = chain.head_index();
        let written = match chain.find(|d| d.is_write_only() && d.len() >= 4) {
            Some(d) => mem.write_obj(0u32, d.addr()).map(|_| 4).unwrap_or(0),
            None => 0,
        };
        if let Err(e) = self.q.event.add_used(mem, head, written) {
            tracing::warn!("vsock: event add_used: {e}");
        }
        self.q.interrupt.signal_used_queue();
    }

    /// Runs until the stop eventfd is written; returns the queues and connections so
    /// the device can resume (pause) or drop them (reset).
    pub fn run(mut self) -> (WorkerQueues, Muxer) {
        // Confined like every device worker (see sm-seccomp); unconfined it
        // serves nothing.
        if let Err(e) = sm_seccomp::confine_current_thread(sm_seccomp::ThreadKind::DeviceWorker, &[]) {
            tracing::error!("vsock worker: {e}");
            return (self.q, self.muxer);
        }
        let mut events = vec![EpollEvent::default(); 64];
        // A resumed device (after a pause for a snapshot) brings its open
        // connections and pending handshakes along: wait on them too, or
        // bytes a host client sends on them would never be noticed.
        let pending: Vec<u64> = self.muxer.handshakes.keys().copied().collect();
        for id in pending {
            self.register(StreamId::Handshake(id), EventSet::IN);
        }
        for c in self.muxer.conns.values_mut() {
            c.maybe_readable = true;
        }
        // Notifications may have arrived before the worker started.
        self.pump();
        while self.serve_once(&mut events, -1) {}
        (self.q, self.muxer)
    }

    /// Waits (up to `timeout_ms`, -1: no limit) for events and handles
    /// them; false once the stop eventfd is written (or epoll fails).
    fn serve_once(&mut self, events: &mut [EpollEvent], timeout_ms: i32) -> bool {
        let n = match self.epoll.wait(timeout_ms, events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return true,
            Err(e) => {
                tracing::error!("vsock worker: epoll: {e}");
                let _ = self.stop.read();
                return false;
            }
        };
        for e in &events[..n] {
            let set = EventSet::from_bits_truncate(e.events);
            match e.data() {
                TOKEN_STOP => {
                    let _ = self.stop.read();
                    return false;
                }
                TOKEN_RX => {
                    let _ = self.q.rx_evt.read();
                    self.rx_starved = false;
                }
                TOKEN_TX => {
                    let _ = self.q.tx_evt.read();
                }
                TOKEN_EVENT => {
                    let _ = self.q.event_evt.read();
                }
                TOKEN_LISTENER => {
                    for id in self.muxer.accept_clients() {
                        self.register(StreamId::Handshake(id), EventSet::IN);
                    }
                }
                token => self.stream_event(token, set),
            }
        }
        self.pump();
        true
    }

    /// Takes the guest's packets, delivers what waits for it, and updates
    /// which host streams are waited on. The transmit queue is always taken
    /// whole (replies a non-receiving guest earns are bounded in the muxer).
    pub(super) fn pump(&mut self) {
        self.process_tx();
        self.process_rx();
        self.sync_interest();
    }

    fn register(&mut self, id: StreamId, events: EventSet) {
        let fd = match id {
            StreamId::Handshake(h) => self.muxer.handshakes.get(&h).map(|s| s.stream.as_raw_fd()),
            StreamId::Conn(k) => self.muxer.conns.get(&k).map(|c| c.stream.as_raw_fd()),
        };
        let Some(fd) = fd else { return };
        let token = self.next_token;
        self.next_token += 1;
        if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, ev(events, token)) {
            tracing::warn!("vsock: epoll add: {e}");
            return;
        }
        self.token_of.insert(id, token);
        self.stream_of.insert(token, id);
    }

    fn forget(&mut self, id: StreamId) {
        if let Some(token) = self.token_of.remove(&id) {
            self.stream_of.remove(&token);
        }
    }

    fn stream_event(&mut self, token: u64, set: EventSet) {
        let Some(id) = self.stream_of.get(&token).copied() else { return };
        match id {
            StreamId::Handshake(h) => {
                let opened = self.muxer.progress_handshake(h);
                if !self.muxer.handshakes.contains_key(&h) {
                    // Done (or dropped): the same fd now belongs to a connection.
                    self.forget(id);
                    if let Some(key) = opened {
                        self.token_of.insert(StreamId::Conn(key), token);
                        self.stream_of.insert(token, StreamId::Conn(key));
                        if let Some(c) = self.muxer.conns.get_mut(&key) {
                            c.interest = EventSet::IN.bits();
                        }
                    }
                }
            }
            StreamId::Conn(key) => {
                // A full close (HUP), not a half-close: a client may send its
                // request and shut its writing side before the guest answers.
                let hung_up = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
                let connecting = self.muxer.conns.get(&key).is_some_and(|c| c.state == ConnState::Connecting);
                if connecting && hung_up {
                    // The host client gave up before the guest answered
                    // (its connect timed out): drop the entry, tell the guest.
                    self.muxer.host_closed(key);
                    return;
                }
                if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR) {
                    if let Some(c) = self.muxer.conns.get_mut(&key) {
                        c.maybe_readable = true;
                    }
                }
                if set.contains(EventSet::OUT) {
                    self.muxer.flush(key);
                }
            }
        }
    }

    /// Sets each connection's epoll interest from its state; streams with nothing
    /// to wait for are removed from epoll (so a hung-up peer cannot spin us).
    fn sync_interest(&mut self) {
        let gone: Vec<StreamId> = self
            .token_of
            .keys()
            .filter(|id| matches!(id, StreamId::Conn(k) if !self.muxer.conns.contains_key(k)))
            .copied()
            .collect();
        for id in gone {
            self.forget(id);
        }
        let keys: Vec<ConnKey> = self.muxer.conns.keys().copied().collect();
        for key in keys {
            let Some(c) = self.muxer.conns.get(&key) else { continue };
            let mut want = EventSet::empty();
            let readable_state = c.state == ConnState::Established && !c.no_more_to_guest;
            if readable_state && c.peer_credit() > 0 && !self.rx_starved {
                want |= EventSet::IN;
            }
            // A host connect the guest has not answered yet: only whether
            // the client gives up (HUP, reported whatever the interest; what
            // it may send waits for the guest, a half-close is no event).
            if c.state == ConnState::Connecting {
                want |= EventSet::HANG_UP;
            }
            if !c.to_host.is_empty() {
                want |= EventSet::OUT;
            }
            if want.bits() == c.interest && self.token_of.contains_key(&StreamId::Conn(key)) == (c.interest != 0) {
                continue;
            }
            let fd = c.stream.as_raw_fd();
            let id = StreamId::Conn(key);
            let result = match (self.token_of.get(&id).copied(), want.is_empty()) {
                (Some(_), true) => {
                    self.forget(id);
                    self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())
                }
                (Some(token), false) => self.epoll.ctl(ControlOperation::Modify, fd, ev(want, token)),
                (None, true) => Ok(()),
                (None, false) => {
                    let token = self.next_token;
                    self.next_token += 1;
                    self.token_of.insert(id, token);
                    self.stream_of.insert(token, id);
                    self.epoll.ctl(ControlOperation::Add, fd, ev(want, token))
                }
            };
            if let Err(e) = result {
                tracing::debug!(?key, "vsock: epoll interest update: {e}");
            }
            if let Some(c) = self.muxer.conns.get_mut(&key) {
                c.interest = want.bits();
            }
        }
    }

    /// Takes every transmit chain the guest posted.
    fn process_tx(&mut self) {
        let mem = &self.q.mem;
        let mut used = false;
        while let Some(mut chain) = self.q.tx.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let parsed = VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA).map(|pkt| {
                let h = Header {
                    src_cid: pkt.src_cid(),
                    dst_cid: pkt.dst_cid(),
                    src_port: pkt.src_port(),
                    dst_port: pkt.dst_port(),
                    len: pkt.len(),
                    type_: pkt.type_(),
                    op: pkt.op(),
                    flags: pkt.flags(),
                    buf_alloc: pkt.buf_alloc(),
                    fwd_cnt: pkt.fwd_cnt(),
                };
                let mut data = Vec::new();
                if let Some(slice) = pkt.data_slice() {
                    let n = slice.len().min(h.len as usize);
                    data.resize(n, 0);
                    if slice.read_slice(&mut data, 0).is_err() {
                        data.clear();
                    }
                }
                (h, data)
            });
            if let Err(e) = self.q.tx.add_used(mem, head, 0) {
                tracing::warn!("vsock: tx add_used: {e}");
            }
            used = true;
            match parsed {
                Ok((h, data)) => {
                    self.muxer.handle_guest_packet(&h, &data);
                }
                Err(e) => tracing::debug!("vsock: malformed tx packet dropped: {e}"),
            }
        }
        if used && self.q.tx.needs_notification(mem).unwrap_or(true) {
            self.q.interrupt.signal_used_queue();
        }
    }

    fn process_rx(&mut self) {
        let mem = &self.q.mem;
        let mut used = false;
        loop {
            let Some(mut chain) = self.q.rx.pop_descriptor_chain(mem) else {
                self.rx_starved =
                    self.muxer.has_control_packets() || self.muxer.conns.values().any(|c| c.maybe_readable);
                break;
            };
            let head = chain.head_index();
            let mut pkt = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!("vsock: unusable rx buffer: {e}");
                    let _ = self.q.rx.add_used(mem, head, 0);
                    used = true;
                    continue;
                }
            };
            let header = match self.muxer.next_control_packet() {
                Some(h) => Some(h),
                None => {
                    let cap = pkt.data_slice().map_or(0, |s| s.len());
                    self.muxer.next_data_packet(&mut self.buf[..cap]).or_else(|| self.muxer.next_control_packet())
                }
            };
            let Some(h) = header else {
                self.q.rx.go_to_previous_position();
                break;
            };
            pkt.set_src_cid(h.src_cid)
                .set_dst_cid(h.dst_cid)
                .set_src_port(h.src_port)
                .set_dst_port(h.dst_port)
                .set_type(h.type_)
                .set_op(h.op)
                .set_flags(h.flags)
                .set_buf_alloc(h.buf_alloc)
                .set_fwd_cnt(h.fwd_cnt)
                .set_len(h.len);
            let n = h.len as usize;
            if n > 0 {
                if let Some(slice) = pkt.data_slice() {
                    if let Err(e) = slice.write_slice(&self.buf[..n], 0) {
                        tracing::warn!("vsock: writing rx data: {e}");
                    }
                }
            }
            if let Err(e) = self.q.rx.add_used(mem, head, (PKT_HEADER_SIZE + n) as u32) {
                tracing::warn!("vsock: rx add_used: {e}");
            }
            used = true;
        }
        if used && self.q.rx.needs_notification(mem).unwrap_or(true) {
            self.q.interrupt.signal_used_queue();
        }
    }
}

#[cfg(test)]
mod tests;
