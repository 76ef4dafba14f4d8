//! x86_64 boot conventions shared by the VMM (which writes tables into guest memory)
//! and the backends (which load the matching segment registers).

/// GDT entries loaded at boot: null, 64-bit kernel code, kernel data, TSS,
/// 64-bit user code, user data. Flat segments (base 0, limit 4 GiB).
pub const BOOT_GDT: [u64; 6] = [
    0,                     // 0x00 null
    0x00af_9b00_0000_ffff, // 0x08 kernel code: P, DPL0, code RX accessed, L
    0x00cf_9300_0000_ffff, // 0x10 kernel data: P, DPL0, data RW accessed, D/B, G
    0x008f_8b00_0000_ffff, // 0x18 TSS (busy)
    0x00af_fb00_0000_ffff, // 0x20 user code: P, DPL3, L
    0x00cf_f300_0000_ffff, // 0x28 user data: P, DPL3
];

/// Selector of the kernel code segment in [`BOOT_GDT`].
pub const KERNEL_CS: u16 = 0x08;
/// Selector of the kernel data segment in [`BOOT_GDT`].
pub const KERNEL_DS: u16 = 0x10;
/// Selector of the TSS in [`BOOT_GDT`].
pub const TSS_SEL: u16 = 0x18;
/// Selector (with RPL 3) of the user code segment in [`BOOT_GDT`].
pub const USER_CS: u16 = 0x20 | 3;
/// Selector (with RPL 3) of the user data segment in [`BOOT_GDT`].
pub const USER_DS: u16 = 0x28 | 3;

/// Where a vCPU starts in long mode (paging on, identity-mapped tables already in
/// guest memory).
#[derive(Debug, Clone, Copy)]
pub struct LongModeBoot {
    /// First instruction.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// RSI (the Linux 64-bit boot protocol passes the zero page here).
    pub rsi: u64,
    /// RFLAGS (bit 1 is always set by the backend).
    pub rflags: u64,
    /// Guest-physical address of the PML4 table (CR3).
    pub pml4: u64,
    /// Guest-physical address of [`BOOT_GDT`] in guest memory.
    pub gdt_addr: u64,
    /// Guest-physical address of an (empty) IDT.
    pub idt_addr: u64,
    /// Start in ring 3 with the user segments (test stubs), else ring 0.
    pub user_mode: bool,
}

/// What only an x86_64 vCPU does (reached through
/// [`crate::Vcpu::as_x86_64`]).
pub trait X86Vcpu {
    /// Puts the vCPU in 64-bit long mode as described.
    fn setup_long_mode(&mut self, boot: &LongModeBoot) -> crate::Result<()>;
}
