//! Requests that touch the guest system directly: file transfer, the clock
//! and the entropy pool (the last two are what a restored snapshot needs).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

use super::writer::FrameWriter;
use super::RequestError;
use crate::protocol::{DataFrame, ErrorKind, Message, MessageType, FILE_CHUNK};

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])` from <linux/random.h>.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

/// Streams `path` as `FileData` frames followed by `FileEnd`. Errors before
/// or during the transfer come back as `Err` (the caller sends `Error`,
/// which also terminates a partial transfer).
pub(crate) fn read_file(path: &str, max_len: u64, writer: &FrameWriter) -> Result<(), RequestError> {
    let mut file = File::open(path).map_err(|e| RequestError::io(path, &e))?;
    let meta = file.metadata().map_err(|e| RequestError::io(path, &e))?;
    if meta.is_dir() {
        return Err(RequestError::new(ErrorKind::InvalidRequest, format!("{path} is a directory")));
    }
    let too_large =
        || RequestError::new(ErrorKind::TooLarge, format!("{path} is larger than the {max_len} byte limit"));
    if meta.len() > max_len {
        return Err(too_large());
    }
    let mut frame = DataFrame::new(FILE_CHUNK);
    let mut total: u64 = 0;
    loop {
        let n = match file.read(frame.data_mut()) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(RequestError::io(path, &e)),
        };
        total += n as u64;
        // Files can grow while being read (or report size 0, like /proc).
        if total > max_len {
            return Err(too_large());
        }
        writer
            .send_frame(frame.seal(MessageType::FileData, n))
            .map_err(|e| RequestError::io("sending file data", &e))?;
    }
    writer.send(&Message::FileEnd).map_err(|e| RequestError::io("sending file data", &e))
}

/// An open `WriteFile` target; created (or truncated) with exactly `mode`.
pub(crate) struct FileSink {
    path: String,
    file: Result<File, RequestError>,
}

impl FileSink {
    /// Opens `path` for writing. A failure is remembered and reported after
    /// the host's data has been consumed.
    pub(crate) fn open(path: &str, mode: u32) -> FileSink {
        let mode = mode & 0o7777;
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)
            .and_then(|f| {
                // Exact bits: neither the umask nor an existing file's mode applies.
                f.set_permissions(std::fs::Permissions::from_mode(mode))?;
                Ok(f)
            })
            .map_err(|e| RequestError::io(path, &e));
        FileSink { path: path.to_owned(), file }
    }

    /// Appends a chunk (ignored after a failure).
    pub(crate) fn write(&mut self, data: &[u8]) {
        if let Ok(f) = &mut self.file {
            if let Err(e) = f.write_all(data) {
                self.file = Err(RequestError::io(&self.path, &e));
            }
        }
    }

    /// The outcome of the whole transfer.
    pub(crate) fn finish(self) -> Result<(), RequestError> {
        self.file.map(drop)
    }
}

/// Sets CLOCK_REALTIME.
pub(crate) fn set_time(unix_nanos: u64) -> Result<(), RequestError> {
    let ts = libc::timespec {
        tv_sec: (unix_nanos / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_nanos % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec that outlives the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(RequestError::io("clock_settime(CLOCK_REALTIME)", &io::Error::last_os_error()));
    }
    Ok(())
}

/// Mixes `bytes` into the kernel's pool and credits 8 bits per byte.
pub(crate) fn add_entropy(bytes: &[u8]) -> Result<(), RequestError> {
    let size = libc::c_int::try_from(bytes.len())
        .map_err(|_| RequestError::new(ErrorKind::InvalidRequest, "too many entropy bytes"))?;
    let bits = size.saturating_mul(8);
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; },
    // built in a u32 buffer so the header ints are aligned.
    let mut info = vec![0u32; 2 + bytes.len().div_ceil(4)];
    info[0] = bits as u32;
    info[1] = size as u32;
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(word);
    }
    let urandom =
        OpenOptions::new().write(true).open("/dev/urandom").map_err(|e| RequestError::io("/dev/urandom", &e))?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info header and `buf_size`
    // bytes after it; `info` holds both and outlives the call.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if rc != 0 {
        return Err(RequestError::io("RNDADDENTROPY", &io::Error::last_os_error()));
    }
    Ok(())
}
