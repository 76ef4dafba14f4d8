//! Field-level binary encoding of message payloads.
//!
//! Integers are little-endian; `bool` is one byte 0 or 1; byte strings and
//! UTF-8 strings are a `u32` length followed by the bytes; `Option<T>` is a
//! tag byte 0 (none) or 1 (some) followed by `T`; lists are a `u32` count
//! followed by the items. Decoding never trusts a length or count beyond the
//! bytes actually present, so a hostile frame cannot make it allocate more
//! than the frame's own size.

/// Appends fields to a payload buffer.
#[derive(Debug, Default)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// An encoder writing after `prefix` (e.g. a reserved frame header).
    pub fn with_prefix(prefix: &[u8]) -> Self {
        Encoder { buf: prefix.to_vec() }
    }

    /// The bytes written so far (prefix included).
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// One byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    /// `false` as 0, `true` as 1.
    pub fn bool(&mut self, v: bool) {
        self.buf.push(u8::from(v));
    }

    /// Little-endian `u32`.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// Little-endian `u16`.
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// Little-endian `i32`.
    pub fn i32(&mut self, v: i32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// Little-endian `u64`.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// `u32` length + bytes. Lengths above `u32::MAX` cannot occur in a frame
    /// (the frame limit is far lower); they are clamped and caught by the
    /// frame size check.
    pub fn bytes(&mut self, v: &[u8]) {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.buf.extend_from_slice(v);
    }

    /// A UTF-8 string as length-prefixed bytes.
    pub fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }

    /// Tag byte + string.
    pub fn opt_str(&mut self, v: Option<&str>) {
        match v {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
        }
    }

    /// Tag byte + `u64`.
    pub fn opt_u64(&mut self, v: Option<u64>) {
        match v {
            None => self.u8(0),
            Some(x) => {
                self.u8(1);
                self.u64(x);
            }
        }
    }

    /// `u32` count + strings.
    pub fn str_list(&mut self, v: &[String]) {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        for s in v {
            self.str(s);
        }
    }
}

/// Why a payload did not decode (the caller adds the message type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

/// Reads fields from a payload, front to back.
#[derive(Debug)]
pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    /// A decoder over a whole payload.
    pub fn new(buf: &'a [u8]) -> Self {
        Decoder { buf, pos: 0 }
    }

    /// Bytes not consumed yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError(format!(
                "{what} needs {n} bytes at offset {}, only {} left",
                self.pos,
                self.remaining()
            )));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    /// One byte.
    pub fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    /// A byte that must be 0 or 1.
    pub fn bool(&mut self, what: &str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(DecodeError(format!("{what}: invalid bool byte {b}"))),
        }
    }

    /// Little-endian `u32`.
    pub fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    /// Little-endian `u16`.
    pub fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    /// Little-endian `i32`.
    pub fn i32(&mut self, what: &str) -> Result<i32, DecodeError> {
        Ok(i32::from_le_bytes(self.array(what)?))
    }

    /// Little-endian `u64`.
    pub fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Length-prefixed bytes.
    pub fn bytes(&mut self, what: &str) -> Result<Vec<u8>, DecodeError> {
        let len = self.u32(what)? as usize;
        Ok(self.take(len, what)?.to_vec())
    }

    /// Length-prefixed UTF-8.
    pub fn string(&mut self, what: &str) -> Result<String, DecodeError> {
        let len = self.u32(what)? as usize;
        let raw = self.take(len, what)?;
        std::str::from_utf8(raw).map(str::to_owned).map_err(|e| DecodeError(format!("{what}: not UTF-8 ({e})")))
    }

    fn tag(&mut self, what: &str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            t => Err(DecodeError(format!("{what}: invalid option tag {t}"))),
        }
    }

    /// Tag byte + string.
    pub fn opt_string(&mut self, what: &str) -> Result<Option<String>, DecodeError> {
        if self.tag(what)? {
            self.string(what).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Tag byte + `u64`.
    pub fn opt_u64(&mut self, what: &str) -> Result<Option<u64>, DecodeError> {
        if self.tag(what)? {
            self.u64(what).map(Some)
        } else {
            Ok(None)
        }
    }

    /// `u32` count + strings. The count is checked against the bytes left
    /// (every string needs at least its 4-byte length) before allocating.
    pub fn string_list(&mut self, what: &str) -> Result<Vec<String>, DecodeError> {
        let count = self.u32(what)? as usize;
        if count > self.remaining() / 4 {
            return Err(DecodeError(format!(
                "{what}: {count} items cannot fit in the {} bytes left",
                self.remaining()
            )));
        }
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            out.push(self.string(what)?);
        }
        Ok(out)
    }

    /// Succeeds only if the whole payload was consumed.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(DecodeError(format!("{} trailing bytes after the last field", self.remaining())))
        }
    }
}
