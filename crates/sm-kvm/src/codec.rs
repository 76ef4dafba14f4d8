//! Versioned, length-checked binary encoding of KVM state.
//!
//! Layout (little endian):
//! ```text
//! magic "SMKV" | version u16 | kind u16 | body_len u32 | body
//! body = section*
//! section = tag u16 | reserved u16 (0) | len u32 | len bytes
//! ```
//! Each section holds one KVM structure byte for byte; its length must equal the size
//! of that structure in this build, so a blob from an incompatible layout is refused.

use sm_hypervisor::{Error, Result};
use zerocopy::{FromBytes, Immutable, IntoBytes};

const MAGIC: [u8; 4] = *b"SMKV";
/// Current encoding version. Bump on any incompatible change.
pub const VERSION: u16 = 1;
const HEADER_LEN: usize = 12;

/// Which kind of state a blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// One vCPU.
    Vcpu = 1,
    /// VM-wide devices.
    Vm = 2,
}

/// Views a KVM structure as its bytes (kvm-bindings derives zerocopy's traits for them).
pub fn pod_bytes<T: IntoBytes + Immutable>(value: &T) -> &[u8] {
    value.as_bytes()
}

/// Reads a KVM structure from exactly `size_of::<T>()` bytes.
pub fn pod_read<T: FromBytes>(bytes: &[u8], what: &str) -> Result<T> {
    T::read_from_bytes(bytes).map_err(|_| {
        Error::InvalidState(format!("{what}: section is {} bytes, expected {}", bytes.len(), std::mem::size_of::<T>()))
    })
}

/// Builds an encoded blob section by section.
pub struct Encoder {
    kind: Kind,
    body: Vec<u8>,
}

impl Encoder {
    /// Starts a blob of `kind`.
    pub fn new(kind: Kind) -> Self {
        Encoder { kind, body: Vec::new() }
    }

    /// Appends a section.
    pub fn section(&mut self, tag: u16, bytes: &[u8]) {
        self.body.extend_from_slice(&tag.to_le_bytes());
        self.body.extend_from_slice(&0u16.to_le_bytes());
        self.body.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        self.body.extend_from_slice(bytes);
    }

    /// Appends a KVM structure as a section.
    pub fn pod<T: IntoBytes + Immutable>(&mut self, tag: u16, value: &T) {
        self.section(tag, pod_bytes(value));
    }

    /// Finishes the blob.
    pub fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.body.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.kind as u16).to_le_bytes());
        out.extend_from_slice(&(self.body.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.body);
        out
    }
}

/// Sections of a decoded blob, in order.
#[derive(Debug)]
pub struct Decoded<'a> {
    sections: Vec<(u16, &'a [u8])>,
}

impl<'a> Decoded<'a> {
    /// Validates the header and splits the body into sections.
    pub fn parse(blob: &'a [u8], kind: Kind) -> Result<Self> {
        if blob.len() < HEADER_LEN {
            return Err(Error::InvalidState(format!(
                "KVM state blob truncated: {} bytes, header alone is {HEADER_LEN}",
                blob.len()
            )));
        }
        if blob[0..4] != MAGIC {
            return Err(Error::InvalidState("not a supermachine KVM state blob (bad magic)".into()));
        }
        let version = u16::from_le_bytes([blob[4], blob[5]]);
        if version != VERSION {
            return Err(Error::InvalidState(format!(
                "KVM state format version {version} is not supported (this build reads version {VERSION})"
            )));
        }
        let found_kind = u16::from_le_bytes([blob[6], blob[7]]);
        if found_kind != kind as u16 {
            return Err(Error::InvalidState(format!(
                "KVM state blob holds kind {found_kind}, expected {:?} ({})",
                kind, kind as u16
            )));
        }
        let body_len = u32::from_le_bytes([blob[8], blob[9], blob[10], blob[11]]) as usize;
        let body = &blob[HEADER_LEN..];
        if body.len() != body_len {
            return Err(Error::InvalidState(format!(
                "KVM state blob length mismatch: header says {body_len} body bytes, found {}",
                body.len()
            )));
        }
        let mut sections = Vec::new();
        let mut rest = body;
        while !rest.is_empty() {
            if rest.len() < 8 {
                return Err(Error::InvalidState("KVM state blob: truncated section header".into()));
            }
            let tag = u16::from_le_bytes([rest[0], rest[1]]);
            let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
            let data = rest.get(8..8 + len).ok_or_else(|| {
                Error::InvalidState(format!("KVM state blob: section {tag} claims {len} bytes, fewer remain"))
            })?;
            sections.push((tag, data));
            rest = &rest[8 + len..];
        }
        Ok(Decoded { sections })
    }

    /// The bytes of section `tag`, if present.
    pub fn get(&self, tag: u16) -> Option<&'a [u8]> {
        self.sections.iter().find(|(t, _)| *t == tag).map(|(_, b)| *b)
    }

    /// The bytes of section `tag`; an error naming `what` if missing.
    pub fn require(&self, tag: u16, what: &str) -> Result<&'a [u8]> {
        self.get(tag).ok_or_else(|| Error::InvalidState(format!("KVM state blob lacks the {what} section")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut enc = Encoder::new(Kind::Vcpu);
        enc.section(1, &[1, 2, 3, 4]);
        enc.section(7, &[9; 16]);
        enc.finish()
    }

    #[test]
    fn round_trip_keeps_sections() {
        let blob = sample();
        let dec = Decoded::parse(&blob, Kind::Vcpu).unwrap();
        assert_eq!(dec.get(1), Some(&[1u8, 2, 3, 4][..]));
        assert_eq!(dec.get(7).map(|b| b.len()), Some(16));
        assert!(dec.get(2).is_none());
    }

    #[test]
    fn every_truncation_is_rejected() {
        let blob = sample();
        for len in 0..blob.len() {
            let err = Decoded::parse(&blob[..len], Kind::Vcpu).unwrap_err();
            assert!(matches!(err, Error::InvalidState(_)), "len {len}: {err}");
        }
    }

    #[test]
    fn wrong_version_kind_and_magic_are_rejected() {
        let mut blob = sample();
        blob[4] = 9;
        let msg = Decoded::parse(&blob, Kind::Vcpu).unwrap_err().to_string();
        assert!(msg.contains("version 9"), "{msg}");
        let blob = sample();
        let msg = Decoded::parse(&blob, Kind::Vm).unwrap_err().to_string();
        assert!(msg.contains("expected Vm"), "{msg}");
        let mut blob = sample();
        blob[0] = b'X';
        let msg = Decoded::parse(&blob, Kind::Vcpu).unwrap_err().to_string();
        assert!(msg.contains("bad magic"), "{msg}");
    }

    #[test]
    fn pod_read_checks_size() {
        #[derive(Clone, Copy, IntoBytes, FromBytes, Immutable)]
        #[repr(C)]
        struct Two(u32, u32);
        let v = Two(5, 6);
        let back: Two = pod_read(pod_bytes(&v), "two").unwrap();
        assert_eq!((back.0, back.1), (5, 6));
        assert!(pod_read::<Two>(&[0; 7], "two").is_err());
    }
}
