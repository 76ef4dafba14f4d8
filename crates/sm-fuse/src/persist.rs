//! A FUSE session in a snapshot: the node ids and open-file handles the guest
//! holds, each recorded by its path inside the share, and reopened by path
//! when the snapshot is restored (into another process, possibly onto another
//! directory with the same contents).
//!
//! What cannot come back, and how the guest learns of it:
//! - a node or handle whose file was deleted (an open but unlinked file) or
//!   moved out of the share on the host is not recorded; after the restore the
//!   guest gets `ESTALE` (node) or `EBADF` (handle) when it uses it;
//! - a recorded path that is gone at restore time, or is now another kind of
//!   file (a directory where a file was), or is reached through a symlink, is
//!   likewise not restored;
//! - a handle open for writing does not come back on a share restored
//!   read-only.
//!
//! Both sides count and log what they leave out ([`SessionReport`]). Node ids
//! and handles not restored are never handed out again, so the guest can never
//! reach another file through an id it held.
//!
//! Reopening goes through [`sys::open_beneath`] (`openat2` beneath the share
//! with `RESOLVE_NO_SYMLINKS`), so a crafted state cannot name a file outside
//! the share either.

use std::os::fd::{AsFd, OwnedFd};

use fuse_abi::linux::FUSE_ROOT_ID;

use crate::dax::DaxMapping;
use crate::server::{lock, FuseServer};
use crate::sys::{self, Errno};
use crate::tables::{Handle, Inode};

const MAGIC: &[u8; 4] = b"SMFS";
const VERSION: u32 = 1;
/// Longest path recorded (PATH_MAX).
const MAX_PATH: usize = libc::PATH_MAX as usize;
/// Largest node id or handle a saved session may hold (2^48: no guest gets
/// near it, and counting on from it cannot wrap).
const MAX_ID: u64 = 1 << 48;
/// Open flags a restored handle keeps (no O_CREAT, O_TRUNC, O_EXCL).
const KEPT_FLAGS: i32 = libc::O_ACCMODE | libc::O_APPEND | libc::O_DIRECT | libc::O_SYNC | libc::O_DSYNC;

/// Why a session could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The bytes are not a session state this version wrote.
    #[error("virtio-fs session state is corrupt: {0}")]
    Corrupt(&'static str),
    /// It holds more than this server's tables may.
    #[error("virtio-fs session state holds {count} {what}, more than the limit {limit}")]
    TooMany {
        /// Nodes or handles.
        what: &'static str,
        /// How many.
        count: usize,
        /// The limit of the restoring server.
        limit: usize,
    },
    /// The share's root cannot be named (to make paths relative to it).
    #[error("cannot name the shared directory: {0:?}")]
    Root(Errno),
    /// The snapshot's DAX window and this share's differ.
    #[error(
        "the snapshot's share had a DAX window of {snapshot} bytes, this one {here} bytes: restore with the same \
         DAX setting"
    )]
    DaxWindow {
        /// Bytes in the snapshot (0: none).
        snapshot: u64,
        /// Bytes here (0: none).
        here: u64,
    },
    /// A file the guest has mapped through DAX has no path in the share now
    /// (deleted while mapped, or moved out): a restore could not map it again,
    /// so the snapshot is refused.
    #[error(
        "a file mapped into the DAX window at offset {offset:#x} was deleted or moved out of the share: a \
         snapshot could not bring it back; snapshot again once the guest has let it go"
    )]
    DaxUnnamed {
        /// Its window offset.
        offset: u64,
    },
    /// A file the guest had mapped through DAX cannot be mapped again: the
    /// guest would fault on that memory, so the restore is refused.
    #[error(
        "the snapshot has {} mapped into its DAX window, which cannot be mapped again ({errno:?}): the file \
         is gone, changed kind or moved",
        path.escape_ascii()
    )]
    DaxMapping {
        /// The file, inside the share.
        path: Vec<u8>,
        /// Why.
        errno: Errno,
    },
}

/// What a save or a restore kept and left out.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SessionReport {
    /// Nodes kept.
    pub nodes: usize,
    /// Open files kept.
    pub handles: usize,
    /// Nodes left out (deleted, moved out, gone or changed kind).
    pub lost_nodes: usize,
    /// Open files left out.
    pub lost_handles: usize,
}

struct SavedNode {
    id: u64,
    lookups: u64,
    kind: u32,
    path: Vec<u8>,
}

struct SavedHandle {
    fh: u64,
    flags: i32,
    path: Vec<u8>,
}

impl SavedHandle {
    /// Open for writing (from the flags, the only record of it).
    fn writable(&self) -> bool {
        self.flags & libc::O_ACCMODE != libc::O_RDONLY
    }
}

struct SavedMapping {
    offset: u64,
    len: u64,
    file_offset: u64,
    writable: bool,
    path: Vec<u8>,
}

/// The decoded state.
struct Session {
    initialized: bool,
    next_node: u64,
    next_handle: u64,
    nodes: Vec<SavedNode>,
    handles: Vec<SavedHandle>,
    /// DAX window length (0: none) and what was mapped in it.
    dax_window: u64,
    mappings: Vec<SavedMapping>,
}

impl FuseServer {
    /// The session's state for a snapshot (call while no request is served).
    pub fn save_session(&self) -> Result<(Vec<u8>, SessionReport), SessionError> {
        let inodes = lock(&self.inodes);
        let handles = lock(&self.handles);
        let root = inodes.get(FUSE_ROOT_ID).map_err(SessionError::Root)?;
        let root_path = sys::fd_path(root.fd.as_fd()).map_err(SessionError::Root)?;
        let mut report = SessionReport::default();
        let mut session = Session {
            initialized: self.is_initialized(),
            next_node: inodes.next_id(),
            next_handle: handles.next_handle(),
            nodes: Vec::new(),
            handles: Vec::new(),
            dax_window: 0,
            mappings: Vec::new(),
        };
        if let Some(window) = &self.dax {
            let window = lock(window);
            session.dax_window = window.len();
            for (offset, m) in window.mappings() {
                // Named as it is now (renames since the mapping included); a
                // mapped file without a name is memory the guest may still
                // touch that no restore could bring back: refuse.
                let path =
                    relative_path(&root, &root_path, m.file.as_fd()).ok_or(SessionError::DaxUnnamed { offset })?;
                session.mappings.push(SavedMapping {
                    offset,
                    len: m.len,
                    file_offset: m.file_offset,
                    writable: m.writable,
                    path,
                });
            }
        }
        for (id, inode, lookups) in inodes.entries() {
            match relative_path(&root, &root_path, inode.fd.as_fd()) {
                Some(path) => session.nodes.push(SavedNode { id, lookups, kind: inode.kind, path }),
                None => report.lost_nodes += 1,
            }
        }
        for (fh, handle) in handles.entries() {
            let flags = sys::status_flags(handle.fd.as_fd());
            match (relative_path(&root, &root_path, handle.fd.as_fd()), flags) {
                (Some(path), Ok(flags)) => session.handles.push(SavedHandle { fh, flags: flags & KEPT_FLAGS, path }),
                _ => report.lost_handles += 1,
            }
        }
        report.nodes = session.nodes.len();
        report.handles = session.handles.len();
        if report.lost_nodes + report.lost_handles > 0 {
            tracing::warn!(
                share = %self.root().display(),
                "virtio-fs snapshot: {} node(s) and {} open file(s) were deleted or moved out of the share and will be \
                 stale after a restore",
                report.lost_nodes,
                report.lost_handles
            );
        }
        Ok((session.encode(), report))
    }

    /// Loads a session saved by [`save_session`](Self::save_session): what
    /// the tables held is dropped, each recorded path reopened beneath this
    /// share (see the module docs for what does not come back).
    pub fn restore_session(&self, bytes: &[u8]) -> Result<SessionReport, SessionError> {
        let session = Session::decode(bytes)?;
        let here = self.dax_window().map_or(0, |(_, len)| len);
        if session.dax_window != here {
            return Err(SessionError::DaxWindow { snapshot: session.dax_window, here });
        }
        let mut inodes = lock(&self.inodes);
        let mut handles = lock(&self.handles);
        let (max_inodes, max_handles) = (inodes.limit(), handles.limit());
        if session.nodes.len() > max_inodes {
            return Err(SessionError::TooMany { what: "nodes", count: session.nodes.len(), limit: max_inodes });
        }
        if session.handles.len() > max_handles {
            return Err(SessionError::TooMany { what: "open files", count: session.handles.len(), limit: max_handles });
        }
        handles.clear();
        inodes.clear();
        let root = inodes.get(FUSE_ROOT_ID).map_err(SessionError::Root)?;
        let mut report = SessionReport::default();
        for node in &session.nodes {
            let reopened = sys::open_beneath(root.fd.as_fd(), &node.path, libc::O_PATH, 0).and_then(|fd| {
                let st = sys::stat(fd.as_fd())?;
                let kind = st.st_mode & libc::S_IFMT;
                if kind != node.kind {
                    return Err(Errno(libc::ESTALE));
                }
                inodes.restore(node.id, Inode { fd, key: (st.st_dev, st.st_ino), kind }, node.lookups)
            });
            match reopened {
                Ok(()) => report.nodes += 1,
                Err(e) => {
                    tracing::debug!("virtio-fs restore: node {} ({}): {e:?}", node.id, node.path.escape_ascii());
                    report.lost_nodes += 1;
                }
            }
        }
        for h in &session.handles {
            let reopened = if h.writable() && self.read_only {
                Err(Errno(libc::EROFS))
            } else {
                open_file_beneath(&root, &h.path, h.flags, &[libc::S_IFREG, libc::S_IFDIR])
                    .and_then(|fd| handles.restore(h.fh, Handle { fd, writable: h.writable() }))
            };
            match reopened {
                Ok(()) => report.handles += 1,
                Err(e) => {
                    tracing::debug!("virtio-fs restore: handle {} ({}): {e:?}", h.fh, h.path.escape_ascii());
                    report.lost_handles += 1;
                }
            }
        }
        if let Some(window) = &self.dax {
            let mut window = lock(window);
            window.clear().map_err(|errno| SessionError::DaxMapping { path: Vec::new(), errno })?;
            for m in &session.mappings {
                let flags = if m.writable { libc::O_RDWR } else { libc::O_RDONLY };
                let mapped = if m.writable && self.read_only {
                    Err(Errno(libc::EROFS))
                } else {
                    open_file_beneath(&root, &m.path, flags, &[libc::S_IFREG]).and_then(|file| {
                        let mapping = DaxMapping { len: m.len, file_offset: m.file_offset, writable: m.writable, file };
                        window.map(m.offset, mapping)
                    })
                };
                mapped.map_err(|errno| SessionError::DaxMapping { path: m.path.clone(), errno })?;
            }
        }
        inodes.reserve_ids_below(session.next_node);
        handles.reserve_handles_below(session.next_handle);
        self.set_initialized(session.initialized);
        if report.lost_nodes + report.lost_handles > 0 {
            tracing::warn!(
                share = %self.root().display(),
                "virtio-fs restore: {} node(s) and {} open file(s) did not come back (gone, changed or moved on the \
                 host); the guest gets ESTALE/EBADF for them",
                report.lost_nodes,
                report.lost_handles
            );
        }
        Ok(report)
    }
}

/// `fd`'s path relative to the share (`root`, whose host path is
/// `root_path`); `None` when the file has no name in the share that leads back
/// to it (deleted, this name unlinked, moved out, or a path too long).
fn relative_path(root: &Inode, root_path: &[u8], fd: std::os::fd::BorrowedFd<'_>) -> Option<Vec<u8>> {
    let st = sys::stat(fd).ok()?;
    if st.st_nlink == 0 {
        return None;
    }
    let path = sys::fd_path(fd).ok()?;
    let rest = path.strip_prefix(root_path)?;
    let rest = if root_path == b"/" { rest } else { rest.strip_prefix(b"/")? };
    if !valid_path(rest) {
        return None;
    }
    // The name must lead back to this very inode (not "x (deleted)", not a
    // file that took the name since).
    let again = sys::open_beneath(root.fd.as_fd(), rest, libc::O_PATH, 0).ok()?;
    let st_again = sys::stat(again.as_fd()).ok()?;
    ((st_again.st_dev, st_again.st_ino) == (st.st_dev, st.st_ino)).then(|| rest.to_vec())
}

/// Opens `path` beneath the share with `flags`: first as `O_PATH` (so a FIFO
/// or device never blocks or opens), its type checked against `kinds`, then
/// reopened for I/O through that very inode.
fn open_file_beneath(root: &Inode, path: &[u8], flags: i32, kinds: &[u32]) -> Result<OwnedFd, Errno> {
    let at = sys::open_beneath(root.fd.as_fd(), path, libc::O_PATH, 0)?;
    let kind = sys::stat(at.as_fd())?.st_mode & libc::S_IFMT;
    if !kinds.contains(&kind) {
        return Err(Errno(libc::EPERM));
    }
    sys::reopen(at.as_fd(), flags)
}

/// A relative path of plain components (no empty, `.` or `..` ones).
fn valid_path(path: &[u8]) -> bool {
    !path.is_empty()
        && path.len() <= MAX_PATH
        && !path.contains(&0)
        && path.split(|&b| b == b'/').all(|c| !c.is_empty() && c != b"." && c != b"..")
}

impl Session {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.push(u8::from(self.initialized));
        b.extend_from_slice(&self.next_node.to_le_bytes());
        b.extend_from_slice(&self.next_handle.to_le_bytes());
        b.extend_from_slice(&(self.nodes.len() as u32).to_le_bytes());
        for n in &self.nodes {
            b.extend_from_slice(&n.id.to_le_bytes());
            b.extend_from_slice(&n.lookups.to_le_bytes());
            b.extend_from_slice(&n.kind.to_le_bytes());
            put_path(&mut b, &n.path);
        }
        b.extend_from_slice(&(self.handles.len() as u32).to_le_bytes());
        for h in &self.handles {
            b.extend_from_slice(&h.fh.to_le_bytes());
            b.extend_from_slice(&h.flags.to_le_bytes());
            put_path(&mut b, &h.path);
        }
        b.extend_from_slice(&self.dax_window.to_le_bytes());
        b.extend_from_slice(&(self.mappings.len() as u32).to_le_bytes());
        for m in &self.mappings {
            b.extend_from_slice(&m.offset.to_le_bytes());
            b.extend_from_slice(&m.len.to_le_bytes());
            b.extend_from_slice(&m.file_offset.to_le_bytes());
            b.push(u8::from(m.writable));
            put_path(&mut b, &m.path);
        }
        b
    }

    fn decode(bytes: &[u8]) -> Result<Session, SessionError> {
        let mut r = Reader(bytes);
        if r.take(4)? != MAGIC {
            return Err(SessionError::Corrupt("not a virtio-fs session state"));
        }
        if r.u32()? != VERSION {
            return Err(SessionError::Corrupt("unknown version"));
        }
        let initialized = match r.take(1)?[0] {
            0 => false,
            1 => true,
            _ => return Err(SessionError::Corrupt("bad flag")),
        };
        let (next_node, next_handle) = (r.id()?, r.id()?);
        let count = r.count()?;
        let mut nodes = Vec::new();
        for _ in 0..count {
            let (id, lookups, kind) = (r.id()?, r.u64()?, r.u32()?);
            nodes.push(SavedNode { id, lookups, kind, path: r.path()? });
        }
        let count = r.count()?;
        let mut handles = Vec::new();
        for _ in 0..count {
            let (fh, flags) = (r.id()?, r.u32()? as i32);
            handles.push(SavedHandle { fh, flags: flags & KEPT_FLAGS, path: r.path()? });
        }
        let dax_window = r.u64()?;
        let count = r.count()?;
        let mut mappings = Vec::new();
        for _ in 0..count {
            let (offset, len, file_offset) = (r.u64()?, r.u64()?, r.u64()?);
            let writable = r.take(1)?[0] != 0;
            mappings.push(SavedMapping { offset, len, file_offset, writable, path: r.path()? });
        }
        if !r.0.is_empty() {
            return Err(SessionError::Corrupt("trailing bytes"));
        }
        Ok(Session { initialized, next_node, next_handle, nodes, handles, dax_window, mappings })
    }
}

fn put_path(b: &mut Vec<u8>, path: &[u8]) {
    b.extend_from_slice(&(path.len() as u32).to_le_bytes());
    b.extend_from_slice(path);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SessionError> {
        if self.0.len() < n {
            return Err(SessionError::Corrupt("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, SessionError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, SessionError> {
        Ok(u64::from(self.u32()?) | (u64::from(self.u32()?) << 32))
    }

    /// A node id or handle: below [`MAX_ID`], so that counting on from it
    /// can never wrap around to ids in use.
    fn id(&mut self) -> Result<u64, SessionError> {
        let id = self.u64()?;
        if id > MAX_ID {
            return Err(SessionError::Corrupt("node id or handle out of range"));
        }
        Ok(id)
    }

    /// A count no larger than the bytes left could hold (each entry takes at
    /// least 13 bytes), so a crafted count cannot make a huge allocation.
    fn count(&mut self) -> Result<usize, SessionError> {
        let n = self.u32()? as usize;
        if n > self.0.len() / 13 {
            return Err(SessionError::Corrupt("count beyond the data"));
        }
        Ok(n)
    }

    fn path(&mut self) -> Result<Vec<u8>, SessionError> {
        let len = self.u32()? as usize;
        if len > MAX_PATH {
            return Err(SessionError::Corrupt("path too long"));
        }
        let path = self.take(len)?;
        if !valid_path(path) {
            return Err(SessionError::Corrupt("path is not relative plain components"));
        }
        Ok(path.to_vec())
    }
}
