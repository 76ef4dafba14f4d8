//! The agent's frames, as the host reads them from a guest (and the agent
//! from the host): a stream of arbitrary bytes decoded frame after frame.

use sm_agent::protocol::{decode_frame, encode_frame, read_message};
use sm_agent::{ErrorKind, ExecRequest, Message, MountRequest};

use crate::Target;

pub fn frames() -> Target {
    Target {
        name: "agent-frames",
        what: "sm-agent protocol: decode_frame and read_message over a byte stream",
        run,
        seeds,
        max_len: 512,
        cost: 1,
    }
}

fn run(data: &[u8]) {
    let mut rest = data;
    while let Ok((_, used)) = decode_frame(rest) {
        assert!(used > 0 && used <= rest.len(), "decode_frame consumed {used} of {} bytes", rest.len());
        rest = &rest[used..];
    }
    let mut reader = data;
    while read_message(&mut reader).is_ok() {}
}

fn seeds() -> Vec<Vec<u8>> {
    let messages = [
        Message::Hello { version: 1 },
        Message::Ping,
        Message::Exec(ExecRequest::new(["/bin/sh", "-c", "echo hi"])),
        Message::Stdin { data: b"input".to_vec() },
        Message::error(ErrorKind::NotFound, "no such file".to_string()),
        Message::Mount(MountRequest {
            source: "/dev/vdb".into(),
            target: "/data".into(),
            fstype: "ext4".into(),
            read_only: false,
            expect_sectors: 2048,
            dax: false,
        }),
        Message::Connect { port: 8080 },
        Message::Started { pid: 7, stdin_window: 65536 },
    ];
    let frames: Vec<Vec<u8>> = messages.iter().map(|m| encode_frame(m).expect("seed encodes")).collect();
    let mut all = frames.clone();
    all.push(frames.concat());
    all
}
