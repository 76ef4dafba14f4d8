//! Taking a FUSE request apart: the header, fixed-size argument structs (by
//! zerocopy, copied out, so alignment never matters), and NUL-terminated
//! names. Every read is bounds-checked; a short or malformed body is EINVAL.

use fuse_abi::linux::{fuse_in_header, fuse_out_header};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::sys::Errno;

/// The longest name a request may carry (NAME_MAX).
pub const MAX_NAME: usize = 255;

/// A request: its header and the bytes after it.
pub struct Request<'a> {
    /// The header.
    pub header: fuse_in_header,
    /// Arguments.
    pub body: &'a [u8],
}

impl<'a> Request<'a> {
    /// Splits `bytes`; `None` when not even a header is there (nothing can be
    /// answered: the reply needs the header's `unique`). A header whose `len`
    /// disagrees with the bytes given is answered with EINVAL by the caller.
    pub fn parse(bytes: &'a [u8]) -> Option<(Request<'a>, bool)> {
        let (header, body) = fuse_in_header::read_from_prefix(bytes).ok()?;
        let consistent = header.len as usize == bytes.len();
        Some((Request { header, body }, consistent))
    }
}

/// A cursor over a request body.
pub struct Args<'a>(pub &'a [u8]);

impl<'a> Args<'a> {
    /// The next `T`.
    pub fn take<T: FromBytes + KnownLayout + Immutable>(&mut self) -> Result<T, Errno> {
        let (value, rest) = T::read_from_prefix(self.0).map_err(|_| Errno(libc::EINVAL))?;
        self.0 = rest;
        Ok(value)
    }

    /// The next NUL-terminated string (without the NUL), at most `max` bytes.
    pub fn string(&mut self, max: usize) -> Result<&'a [u8], Errno> {
        let end = self.0.iter().position(|&b| b == 0).ok_or(Errno(libc::EINVAL))?;
        if end > max {
            return Err(Errno(libc::ENAMETOOLONG));
        }
        let (s, rest) = self.0.split_at(end);
        self.0 = &rest[1..];
        Ok(s)
    }

    /// The next name: one path component, not `.` or `..`, no `/`.
    pub fn name(&mut self) -> Result<&'a [u8], Errno> {
        let name = self.string(MAX_NAME)?;
        check_name(name)?;
        Ok(name)
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Errno> {
        if self.0.len() < n {
            return Err(Errno(libc::EINVAL));
        }
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(b)
    }
}

/// A single path component: not empty, not `.` or `..`, no `/`.
pub fn check_name(name: &[u8]) -> Result<(), Errno> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(Errno(libc::EINVAL));
    }
    Ok(())
}

/// A reply: the out header and `payload`.
pub fn reply(unique: u64, payload: &[u8]) -> Vec<u8> {
    let len = std::mem::size_of::<fuse_out_header>() + payload.len();
    let header = fuse_out_header { len: len as u32, error: 0, unique };
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
    out
}

/// An error reply (`errno` positive; sent negated).
pub fn error(unique: u64, errno: Errno) -> Vec<u8> {
    let header = fuse_out_header { len: std::mem::size_of::<fuse_out_header>() as u32, error: -errno.0, unique };
    header.as_bytes().to_vec()
}
