//! What differs between the guest architectures: the x86_64 boot the
//! machine runs today (zero page, MP table, identity map; its memory map is
//! [`crate::layout`]), and the aarch64 pieces a second backend needs (memory
//! map, device tree, arm64 `Image` loading), which build and are tested on
//! any host.

pub mod aarch64;
pub(crate) mod x86_64;
