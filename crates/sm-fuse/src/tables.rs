//! The server's two bounded tables: inodes the guest has looked up (node id
//! -> `O_PATH` fd, with the kernel's lookup count) and open files (handle ->
//! fd). A guest that looks up or opens more than the bound gets ENFILE /
//! EMFILE, never unbounded host memory or fds.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use fuse_abi::linux::FUSE_ROOT_ID;

use crate::sys::Errno;

/// An inode the guest knows by a node id.
pub struct Inode {
    /// `O_PATH | O_NOFOLLOW` fd of the host inode.
    pub fd: OwnedFd,
    /// Host device and inode number (identity across names and hard links).
    pub key: (u64, u64),
    /// `st_mode & S_IFMT` when it was looked up (the type never changes).
    pub kind: u32,
}

/// Node ids -> inodes with the kernel's lookup counts, bounded.
pub struct InodeTable {
    by_id: HashMap<u64, (Arc<Inode>, u64)>,
    by_key: HashMap<(u64, u64), u64>,
    next_id: u64,
    limit: usize,
}

impl InodeTable {
    /// A table holding the root (node id 1, never forgotten) and at most
    /// `limit` inodes besides.
    pub fn new(root: OwnedFd, root_key: (u64, u64), limit: usize) -> InodeTable {
        let mut t = InodeTable { by_id: HashMap::new(), by_key: HashMap::new(), next_id: FUSE_ROOT_ID + 1, limit };
        let root = Inode { fd: root, key: root_key, kind: libc::S_IFDIR };
        t.by_id.insert(FUSE_ROOT_ID, (Arc::new(root), 1));
        t.by_key.insert(root_key, FUSE_ROOT_ID);
        t
    }

    /// The inode of `id`; ESTALE for ids never handed out (or forgotten).
    pub fn get(&self, id: u64) -> Result<Arc<Inode>, Errno> {
        self.by_id.get(&id).map(|(inode, _)| inode.clone()).ok_or(Errno(libc::ESTALE))
    }

    /// Records a lookup of the host inode `key` (opened as `fd`): the existing
    /// node id with its count raised (`fd` is then closed), or a new one.
    /// ENFILE past the bound.
    pub fn lookup(&mut self, fd: OwnedFd, key: (u64, u64), kind: u32) -> Result<u64, Errno> {
        if let Some(&id) = self.by_key.get(&key) {
            if let Some((_, lookups)) = self.by_id.get_mut(&id) {
                *lookups = lookups.saturating_add(1);
                return Ok(id);
            }
        }
        if self.by_id.len() > self.limit {
            return Err(Errno(libc::ENFILE));
        }
        let id = self.next_id;
        self.next_id = id.checked_add(1).ok_or(Errno(libc::ENFILE))?;
        self.by_id.insert(id, (Arc::new(Inode { fd, key, kind }), 1));
        self.by_key.insert(key, id);
        Ok(id)
    }

    /// The kernel forgets `n` lookups of `id`; at zero the inode is dropped.
    /// Unknown ids and the root are ignored.
    pub fn forget(&mut self, id: u64, n: u64) {
        if id == FUSE_ROOT_ID {
            return;
        }
        let Some((inode, lookups)) = self.by_id.get_mut(&id) else { return };
        *lookups = lookups.saturating_sub(n);
        if *lookups == 0 {
            let key = inode.key;
            self.by_id.remove(&id);
            self.by_key.remove(&key);
        }
    }

    /// Forgets everything but the root (FUSE_DESTROY, or a new INIT).
    pub fn clear(&mut self) {
        let root = self.by_id.remove(&FUSE_ROOT_ID);
        self.by_id.clear();
        self.by_key.clear();
        if let Some(root) = root {
            self.by_key.insert(root.0.key, FUSE_ROOT_ID);
            self.by_id.insert(FUSE_ROOT_ID, root);
        }
    }

    /// Inodes held (the root included).
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Every inode but the root, with its node id and lookup count.
    pub fn entries(&self) -> impl Iterator<Item = (u64, &Inode, u64)> {
        self.by_id.iter().filter(|(&id, _)| id != FUSE_ROOT_ID).map(|(&id, (inode, n))| (id, &**inode, *n))
    }

    /// Inodes it may hold besides the root.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The node id the next new inode gets.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Puts back an inode a snapshot held under node id `id` (restore): no
    /// id is reused, each host inode has one id, the bound holds.
    pub fn restore(&mut self, id: u64, inode: Inode, lookups: u64) -> Result<(), Errno> {
        if id <= FUSE_ROOT_ID || self.by_id.contains_key(&id) || self.by_key.contains_key(&inode.key) {
            return Err(Errno(libc::EEXIST));
        }
        if self.by_id.len() > self.limit {
            return Err(Errno(libc::ENFILE));
        }
        self.by_key.insert(inode.key, id);
        self.by_id.insert(id, (Arc::new(inode), lookups.max(1)));
        self.next_id = self.next_id.max(id.saturating_add(1));
        Ok(())
    }

    /// New node ids start at `next` or later (ids the guest held before a
    /// snapshot are never handed out again, even those that did not come back).
    pub fn reserve_ids_below(&mut self, next: u64) {
        self.next_id = self.next_id.max(next);
    }
}

/// An open file or directory of the guest.
pub struct Handle {
    /// The open fd.
    pub fd: OwnedFd,
    /// Opened for writing.
    pub writable: bool,
}

impl AsFd for Handle {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Handles -> open files, bounded.
pub struct HandleTable {
    open: HashMap<u64, Arc<Handle>>,
    next: u64,
    limit: usize,
}

impl HandleTable {
    /// At most `limit` open at once.
    pub fn new(limit: usize) -> HandleTable {
        HandleTable { open: HashMap::new(), next: 1, limit }
    }

    /// Stores an open file; EMFILE past the bound.
    pub fn insert(&mut self, handle: Handle) -> Result<u64, Errno> {
        if self.open.len() >= self.limit {
            return Err(Errno(libc::EMFILE));
        }
        let fh = self.next;
        self.next = fh.checked_add(1).ok_or(Errno(libc::EMFILE))?;
        self.open.insert(fh, Arc::new(handle));
        Ok(fh)
    }

    /// The open file `fh`; EBADF for handles never handed out or released.
    pub fn get(&self, fh: u64) -> Result<Arc<Handle>, Errno> {
        self.open.get(&fh).cloned().ok_or(Errno(libc::EBADF))
    }

    /// Closes `fh` (when the last request using it is done).
    pub fn remove(&mut self, fh: u64) {
        self.open.remove(&fh);
    }

    /// Closes everything.
    pub fn clear(&mut self) {
        self.open.clear();
    }

    /// Open handles.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Every open file with its handle.
    pub fn entries(&self) -> impl Iterator<Item = (u64, &Handle)> {
        self.open.iter().map(|(&fh, h)| (fh, &**h))
    }

    /// Files it may hold open.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The handle the next open gets.
    pub fn next_handle(&self) -> u64 {
        self.next
    }

    /// Puts back an open file a snapshot held as `fh` (restore).
    pub fn restore(&mut self, fh: u64, handle: Handle) -> Result<(), Errno> {
        if fh == 0 || self.open.contains_key(&fh) {
            return Err(Errno(libc::EEXIST));
        }
        if self.open.len() >= self.limit {
            return Err(Errno(libc::EMFILE));
        }
        self.open.insert(fh, Arc::new(handle));
        self.next = self.next.max(fh.saturating_add(1));
        Ok(())
    }

    /// New handles start at `next` or later.
    pub fn reserve_handles_below(&mut self, next: u64) {
        self.next = self.next.max(next);
    }
}
