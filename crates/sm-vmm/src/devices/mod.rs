//! Platform devices of the VMM (legacy port I/O); virtio devices live in `sm-virtio`.

mod bus;
mod i8042;
mod serial;
mod virtio;

pub use bus::{PortBus, PortDevice};
pub use i8042::I8042;
pub use serial::{Serial, COM1_BASE, COM1_IRQ};
pub use virtio::{insert_kernel_args, MmioBus, SharedTransport, VirtioIrq, VirtioSlot};
