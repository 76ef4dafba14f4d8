//! x86_64: everything written into guest memory before the first instruction
//! runs (the Linux zero page and kernel load, the MP table, the identity map).

pub mod linux;
pub mod mptable;
pub mod paging;
