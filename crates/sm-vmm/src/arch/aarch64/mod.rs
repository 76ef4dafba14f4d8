//! aarch64 guests: the memory map ([`layout`]), the flattened device tree a
//! Linux guest boots from ([`fdt`]) and the arm64 `Image` kernel format
//! ([`image`]). Host-independent: they build and are tested on x86_64 too;
//! the machine uses them once a backend with aarch64 vCPUs (sm-hvf) runs.

pub mod fdt;
pub mod image;
pub mod layout;

/// What can go wrong preparing an aarch64 guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel is not an arm64 `Image`.
    #[error("not an arm64 Image kernel: {0}")]
    NotAnImage(String),
    /// The kernel, initrd or device tree does not fit the guest's RAM.
    #[error("{what} does not fit in the guest's RAM ({needed} bytes needed, {available} available)")]
    DoesNotFit {
        /// What did not fit.
        what: &'static str,
        /// Bytes it needs.
        needed: u64,
        /// Bytes there are.
        available: u64,
    },
    /// The device tree could not be built.
    #[error("building the device tree: {0}")]
    Fdt(#[from] vm_fdt::Error),
    /// The device tree came out larger than the boot protocol allows.
    #[error("the device tree is {0} bytes, more than the 2 MiB the arm64 boot protocol allows")]
    FdtTooLarge(usize),
}
