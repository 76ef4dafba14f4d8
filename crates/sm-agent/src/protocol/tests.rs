//! Round-trip, property and edge tests of the framing and payload codec.

use std::io::Cursor;

use super::*;

/// xorshift64*: deterministic pseudo-random input without extra crates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn string(&mut self) -> String {
        let pool = ["", "a", "sh", "PATH=/bin", "é", "日本", "x=y=z", " ", "\u{1f600}"];
        (0..self.below(4)).map(|_| pool[self.below(pool.len())]).collect()
    }
}

/// One example of every message type, with random field values.
fn sample_messages(rng: &mut Rng) -> Vec<Message> {
    let n = rng.below(200);
    vec![
        Message::Hello { version: rng.next() as u32 },
        Message::Ping,
        Message::Pong,
        Message::Ok,
        Message::error(ErrorKind::CommandNotFound, rng.string()),
        Message::Exec(ExecRequest {
            argv: (0..rng.below(5)).map(|_| rng.string()).collect(),
            env: (0..rng.below(5)).map(|_| rng.string()).collect(),
            cwd: (rng.below(2) == 0).then(|| rng.string()),
            user: (rng.below(2) == 0).then(|| rng.string()),
            tty: rng.below(2) == 0,
            stdin: rng.below(2) == 0,
            timeout_ms: (rng.below(2) == 0).then(|| rng.next()),
        }),
        Message::Stdin { data: rng.bytes(n) },
        Message::StdinClose,
        Message::Signal { signo: rng.next() as i32 },
        Message::ReadFile { path: rng.string(), max_len: rng.next() },
        Message::WriteFile { path: rng.string(), mode: rng.next() as u32 },
        Message::FileData { data: rng.bytes(n) },
        Message::FileEnd,
        Message::SetTime { unix_nanos: rng.next() },
        Message::AddEntropy { bytes: rng.bytes(n) },
        Message::Started { pid: rng.next() as i32, stdin_window: rng.next() as u32 },
        Message::Stdout { data: rng.bytes(n) },
        Message::Stderr { data: rng.bytes(n) },
        Message::Exited(ExitReport {
            status: if rng.below(2) == 0 {
                ExitStatus::Code(rng.next() as i32)
            } else {
                ExitStatus::Signal(rng.next() as i32)
            },
            timed_out: rng.below(2) == 0,
            duration_us: rng.next(),
            cost: GuestCost {
                spawn_us: rng.next(),
                finish_us: rng.next(),
                user_us: rng.next(),
                system_us: rng.next(),
                minor_faults: rng.next(),
                major_faults: rng.next(),
                agent_system_us: rng.next(),
            },
        }),
        Message::StdinAck { bytes: rng.next() as u32 },
        Message::Mount(MountRequest {
            source: rng.string(),
            target: rng.string(),
            fstype: rng.string(),
            read_only: rng.below(2) == 0,
            expect_sectors: rng.next(),
            dax: rng.below(2) == 0,
        }),
        Message::Unmount { target: rng.string() },
        Message::Connect { port: rng.next() as u16 },
        Message::Prefetch { programs: (0..rng.below(4)).map(|_| rng.string()).collect() },
        Message::Resize { rows: rng.next() as u16, cols: rng.next() as u16 },
    ]
}

#[test]
fn every_message_type_round_trips() {
    let mut rng = Rng(0x5eed);
    for _ in 0..50 {
        let msgs = sample_messages(&mut rng);
        let mut seen: Vec<MessageType> = msgs.iter().map(Message::message_type).collect();
        seen.sort_by_key(|t| *t as u8);
        seen.dedup();
        assert_eq!(seen.len(), MessageType::ALL.len(), "samples cover every type");
        for msg in msgs {
            let frame = encode_frame(&msg).expect("encodes");
            assert_eq!(frame[4], msg.message_type() as u8);
            let len = u32::from_le_bytes(frame[..4].try_into().expect("4 bytes")) as usize;
            assert_eq!(len, frame.len() - FRAME_HEADER_LEN);
            let (back, used) = decode_frame(&frame).expect("decodes");
            assert_eq!(back, msg);
            assert_eq!(used, frame.len());
            let read = read_message(&mut Cursor::new(&frame)).expect("reads");
            assert_eq!(read, msg);
        }
    }
}

#[test]
fn a_stream_of_frames_reads_back_in_order_then_closed() {
    let mut rng = Rng(7);
    let msgs = sample_messages(&mut rng);
    let mut stream = Vec::new();
    for m in &msgs {
        write_message(&mut stream, m).expect("writes");
    }
    let mut cur = Cursor::new(stream);
    for m in &msgs {
        assert_eq!(&read_message(&mut cur).expect("reads"), m);
    }
    assert!(matches!(read_message(&mut cur), Err(ProtocolError::Closed)));
}

#[test]
fn every_truncation_of_every_frame_is_rejected_as_truncated() {
    let mut rng = Rng(99);
    for msg in sample_messages(&mut rng) {
        let frame = encode_frame(&msg).expect("encodes");
        for cut in 1..frame.len() {
            let part = &frame[..cut];
            match decode_frame(part) {
                Err(ProtocolError::Truncated { expected, got }) => {
                    assert_eq!(got, cut, "{msg:?} cut at {cut}");
                    assert!(expected > got);
                }
                other => panic!("{msg:?} cut at {cut}: {other:?}"),
            }
            match read_message(&mut Cursor::new(part)) {
                Err(ProtocolError::Truncated { got, .. }) => assert_eq!(got, cut),
                other => panic!("{msg:?} read cut at {cut}: {other:?}"),
            }
        }
        assert!(matches!(decode_frame(&[]), Err(ProtocolError::Closed)));
    }
}

#[test]
fn oversized_frames_are_rejected_before_reading_the_payload() {
    for len in [MAX_FRAME + 1, u32::MAX as usize] {
        let mut frame = (len as u32).to_le_bytes().to_vec();
        frame.push(MessageType::Ping as u8);
        match read_message(&mut Cursor::new(&frame)) {
            Err(ProtocolError::Oversized { len: l, max }) => {
                assert_eq!((l, max), (len, MAX_FRAME));
            }
            other => panic!("len {len}: {other:?}"),
        }
        assert!(matches!(decode_frame(&frame), Err(ProtocolError::Oversized { .. })));
    }
    // Exactly MAX_FRAME is allowed.
    let data = vec![0xab; MAX_FRAME - 4];
    let frame = encode_frame(&Message::Stdout { data: data.clone() }).expect("fits");
    assert_eq!(frame.len(), FRAME_HEADER_LEN + MAX_FRAME);
    assert_eq!(decode_frame(&frame).expect("decodes").0, Message::Stdout { data });
    // One byte more does not encode.
    let too_big = Message::Stdout { data: vec![0; MAX_FRAME - 3] };
    assert!(matches!(encode_frame(&too_big), Err(ProtocolError::Oversized { .. })));
}

#[test]
fn unknown_types_are_rejected_and_the_stream_stays_in_sync() {
    let known: Vec<u8> = MessageType::ALL.iter().map(|t| *t as u8).collect();
    let ping = encode_frame(&Message::Ping).expect("encodes");
    for ty in 0..=255u8 {
        if known.contains(&ty) {
            continue;
        }
        let mut stream = vec![3, 0, 0, 0, ty, 1, 2, 3];
        stream.extend_from_slice(&ping);
        let mut cur = Cursor::new(stream);
        match read_message(&mut cur) {
            Err(e @ ProtocolError::UnknownType(t)) => {
                assert_eq!(t, ty);
                assert!(e.frame_was_consumed());
            }
            other => panic!("type {ty:#x}: {other:?}"),
        }
        assert_eq!(read_message(&mut cur).expect("next frame"), Message::Ping);
    }
}

/// Builds a frame with a hand-made payload.
fn raw_frame(ty: MessageType, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_le_bytes().to_vec();
    f.push(ty as u8);
    f.extend_from_slice(payload);
    f
}

fn expect_malformed(ty: MessageType, payload: &[u8], what: &str) {
    match decode_frame(&raw_frame(ty, payload)) {
        Err(e @ ProtocolError::Malformed { .. }) => {
            assert!(e.frame_was_consumed());
            assert!(e.to_string().contains(&ty.to_string()), "{e}");
        }
        other => panic!("{what}: expected Malformed, got {other:?}"),
    }
}

#[test]
fn malformed_payloads_are_rejected_with_a_reason() {
    // Trailing bytes after a complete payload.
    expect_malformed(MessageType::Ping, &[0], "ping with a payload");
    expect_malformed(MessageType::Hello, &[1, 0, 0, 0, 9], "hello + 1 byte");
    // Too short.
    expect_malformed(MessageType::Hello, &[1, 0], "short hello");
    expect_malformed(MessageType::Signal, &[], "empty signal");
    // A byte-string length pointing past the payload.
    expect_malformed(MessageType::Stdout, &[10, 0, 0, 0, 1, 2], "long data length");
    expect_malformed(MessageType::Stdout, &[0xff, 0xff, 0xff, 0xff], "huge data length");
    // Invalid UTF-8 in a string.
    let mut p = vec![2, 0, 0, 0, 0xc3, 0x28];
    p.extend_from_slice(&0u64.to_le_bytes());
    expect_malformed(MessageType::ReadFile, &p, "bad utf-8 path");
    // A list count far beyond the bytes present (must not allocate it).
    expect_malformed(MessageType::Exec, &[0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0], "huge argv count");
    // Invalid bool and option tags in Exec.
    let mut e = Encoder::default();
    e.str_list(&["true".into()]);
    e.str_list(&[]);
    e.opt_str(None);
    e.opt_str(None);
    let prefix = e.into_bytes();
    let mut bad_bool = prefix.clone();
    bad_bool.extend_from_slice(&[2, 0, 0]);
    expect_malformed(MessageType::Exec, &bad_bool, "tty = 2");
    let mut bad_tag = prefix.clone();
    bad_tag.extend_from_slice(&[0, 0, 7]);
    expect_malformed(MessageType::Exec, &bad_tag, "timeout tag 7");
    let mut good = prefix;
    good.extend_from_slice(&[0, 1, 0]);
    assert!(decode_frame(&raw_frame(MessageType::Exec, &good)).is_ok());
    // Invalid exit status kind.
    let mut x = vec![2];
    x.extend_from_slice(&0i32.to_le_bytes());
    x.push(0);
    x.extend_from_slice(&0u64.to_le_bytes());
    expect_malformed(MessageType::Exited, &x, "status kind 2");
}

use super::codec::Encoder;

#[test]
fn mutated_and_random_payloads_never_panic_and_decoded_ones_reencode_identically() {
    let mut rng = Rng(0xdead_beef);
    let (mut decoded, mut rejected) = (0, 0);
    for round in 0..20_000 {
        let sample = sample_messages(&mut rng);
        let original = &sample[rng.below(sample.len())];
        let ty = original.message_type();
        let mut payload = encode_frame(original).expect("encodes")[FRAME_HEADER_LEN..].to_vec();
        match round % 4 {
            // Flip one byte.
            0 if !payload.is_empty() => {
                let i = rng.below(payload.len());
                payload[i] ^= 1 << rng.below(8);
            }
            // Cut the payload short.
            1 if !payload.is_empty() => payload.truncate(rng.below(payload.len())),
            // Append garbage.
            2 => {
                let n = 1 + rng.below(8);
                payload.extend(rng.bytes(n));
            }
            // Entirely random bytes.
            _ => {
                let n = rng.below(40);
                payload = rng.bytes(n);
            }
        }
        let frame = raw_frame(ty, &payload);
        match decode_frame(&frame) {
            Ok((msg, used)) => {
                decoded += 1;
                assert_eq!(used, frame.len());
                // Error kinds the decoder does not know map to Other, so
                // only compare byte-exactly when the kind is known.
                if !matches!(msg, Message::Error { kind: ErrorKind::Other, .. }) {
                    assert_eq!(encode_frame(&msg).expect("re-encodes"), frame, "{msg:?}");
                }
            }
            Err(ProtocolError::Malformed { .. }) => rejected += 1,
            Err(e) => panic!("unexpected error class for {ty}: {e:?}"),
        }
    }
    assert!(decoded > 2_000, "only {decoded} payloads decoded");
    assert!(rejected > 2_000, "only {rejected} payloads rejected");
}

#[test]
fn random_byte_streams_never_panic() {
    let mut rng = Rng(42);
    for _ in 0..2_000 {
        let n = rng.below(64);
        let mut bytes = rng.bytes(n);
        // Keep lengths plausible half of the time so payloads get parsed.
        if bytes.len() >= 4 && rng.below(2) == 0 {
            bytes[1] = 0;
            bytes[2] = 0;
            bytes[3] = 0;
            bytes[0] %= 40;
        }
        let mut cur = Cursor::new(bytes);
        for _ in 0..8 {
            match read_message(&mut cur) {
                Ok(_) => {}
                Err(e) if e.frame_was_consumed() => {}
                Err(_) => break,
            }
        }
    }
}

#[test]
fn data_frame_buffer_matches_the_regular_encoding() {
    let mut df = DataFrame::new(16);
    assert_eq!(df.data_mut().len(), 16);
    df.data_mut()[..5].copy_from_slice(b"hello");
    let sealed = df.seal(MessageType::Stderr, 5).to_vec();
    let regular = encode_frame(&Message::Stderr { data: b"hello".to_vec() }).expect("encodes");
    assert_eq!(sealed, regular);
    let empty = df.seal(MessageType::FileData, 0).to_vec();
    assert_eq!(decode_frame(&empty).expect("decodes").0, Message::FileData { data: vec![] });
    // Never larger than a frame allows.
    let mut big = DataFrame::new(usize::MAX / 2);
    assert_eq!(big.data_mut().len(), MAX_FRAME - 4);
}

#[test]
fn error_kinds_and_exit_status_helpers() {
    assert_eq!(ErrorKind::CommandNotFound.shell_exit_code(), Some(127));
    assert_eq!(ErrorKind::NotExecutable.shell_exit_code(), Some(126));
    assert_eq!(ErrorKind::Io.shell_exit_code(), None);
    assert_eq!(ErrorKind::from_wire(200), ErrorKind::Other);
    for k in ErrorKind::ALL {
        assert_eq!(ErrorKind::from_wire(k as u8), k);
    }
    assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
    assert_eq!(ExitStatus::Code(3).shell_code(), 3);
    assert!(ExitStatus::Code(0).success());
    assert!(!ExitStatus::Signal(15).success());
    let wire: Vec<u8> = MessageType::ALL.iter().map(|t| *t as u8).collect();
    let mut dedup = wire.clone();
    dedup.sort_unstable();
    dedup.dedup();
    assert_eq!(dedup.len(), wire.len(), "wire numbers are distinct");
    for t in MessageType::ALL {
        assert_eq!(MessageType::from_wire(t as u8), Some(t));
    }
}
