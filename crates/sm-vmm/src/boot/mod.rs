//! Everything written into guest memory before the first instruction runs.

pub mod linux;
pub mod mptable;
pub mod paging;
