//! A machine: one VM with its memory, vCPUs, platform devices and console, and the
//! life cycle create -> load -> start -> (pause -> save/restore -> start)* -> wait/stop.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sm_hypervisor::x86_64::LongModeBoot;
use sm_hypervisor::{Hypervisor, Vcpu, VcpuState, Vm, VmConfig, VmState};

use crate::vcpu_thread::VcpuThread;

use crate::arch::x86_64::{linux, mptable, paging};
use crate::console::{Console, ConsoleOutput};
use crate::control::{ExitReason, RunControl};
use crate::devices::{
    insert_kernel_args, MmioBus, PortBus, Serial, SharedTransport, VirtioIrq, VirtioSlot, COM1_BASE, COM1_IRQ, I8042,
};
use crate::layout::{
    BOOT_STACK_TOP, FIRST_DEVICE_MEMORY_SLOT, FIRST_VIRTIO_IRQ, GDT_ADDR, IDT_ADDR, PML4_ADDR, VIRTIO_MMIO_BASE,
    ZERO_PAGE_ADDR,
};
use crate::memory::{self, GuestMemory};
use crate::run_state::STOP_TIMEOUT;
use crate::vcpu_loop::VcpuContext;
use crate::{Error, Result};

/// The i8042 occupies ports 0x60..0x65 (data 0x60, command/status 0x64).
const I8042_BASE: u16 = 0x60;
const I8042_LEN: u16 = 5;

/// Shape of a machine.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Where the console goes (besides the in-memory transcript).
    pub console: ConsoleOutput,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig { vcpus: 1, memory_mib: 128, console: ConsoleOutput::Null }
    }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct LinuxBoot {
    /// vmlinux (ELF) or bzImage.
    pub kernel: PathBuf,
    /// Uncompressed (or gzip) cpio initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
}

/// Host-side timings of a machine, from the start of `Machine::new`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineTimings {
    /// VM, memory and vCPUs created.
    pub created: Duration,
    /// Guest loaded, vCPU threads about to start.
    pub started: Option<Duration>,
}

/// Captured state of a paused machine, without guest RAM.
#[derive(Debug, Clone)]
pub struct MachineState {
    /// One blob per vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// VM-wide devices.
    pub vm: VmState,
    /// COM1 registers and receive FIFO; `None` leaves the UART as it is (snapshots
    /// written before COM1 state was captured).
    pub com1: Option<Vec<u8>>,
}

/// One virtual machine.
pub struct Machine {
    // Field order is drop order: the vCPU threads (and their vCPUs) go before
    // the VM, the VM before the memory it maps.
    /// One thread per vCPU, for the machine's life (see [`VcpuThread`]).
    pub(crate) vcpus: Vec<VcpuThread>,
    /// The vCPU threads run the guest (started, not yet paused or stopped).
    pub(crate) running: bool,
    pub(crate) context: Arc<VcpuContext>,
    pub(crate) console: Console,
    /// COM1, also on the port bus; held here for snapshots.
    pub(crate) serial: Arc<Mutex<Serial<Console>>>,
    pub(crate) vm: Arc<dyn Vm>,
    pub(crate) mem: GuestMemory,
    /// For a machine made as a shell: the anonymous mappings its RAM slots were
    /// registered on; snapshot RAM is mapped over them (`MAP_FIXED`). Dropped
    /// after `mem`, it unmaps the range.
    pub(crate) reservation: Option<GuestMemory>,
    /// Made by [`Machine::new_shell`] and not filled yet.
    pub(crate) shell: bool,
    pub(crate) start: Instant,
    pub(crate) timings: MachineTimings,
    pub(crate) config: MachineConfig,
    /// The snapshot this machine was restored from (for reset in place).
    pub(crate) origin: Option<crate::snapshot::Origin>,
    /// Where the next device memory region goes (`None`: at the base).
    pub(crate) next_device_memory: Option<u64>,
    /// Device memory slots mapped.
    pub(crate) device_memory_slots: u32,
    /// See [`STOP_TIMEOUT`]; [`Machine::set_stop_timeout`] changes it.
    pub(crate) stop_timeout: Duration,
    /// vCPU threads abandoned (did not leave within `stop_timeout`, or
    /// panicked): the machine can no longer run or be snapshotted.
    pub(crate) lost_vcpus: usize,
    /// Of those, the threads still inside the guest or a device (not the
    /// ones that panicked, whose vCPU is gone): they may still touch RAM.
    pub(crate) abandoned_vcpus: usize,
}

impl Machine {
    /// Creates the VM, its RAM, vCPUs, COM1 and the i8042.
    pub fn new(hypervisor: &dyn Hypervisor, config: MachineConfig) -> Result<Self> {
        let start = Instant::now();
        let mem = memory::create_guest_memory(config.memory_mib.saturating_mul(1 << 20))?;
        Self::with_memory(hypervisor, config, mem, start)
    }

    /// A machine with its VM, vCPUs, platform devices and RAM slots (over an
    /// empty reservation of `memory_mib`) created, but no guest contents and no
    /// virtio devices: a shell that [`Machine::restore_into`] fills from a
    /// snapshot without paying then for VM/vCPU creation and RAM slot
    /// registration (the bulk of a restore's host time). Make shells ahead.
    pub fn new_shell(hypervisor: &dyn Hypervisor, vcpus: u32, memory_mib: u64, console: ConsoleOutput) -> Result<Self> {
        let mut m = Self::new(hypervisor, MachineConfig { vcpus, memory_mib, console })?;
        m.shell = true;
        Ok(m)
    }

    /// Whether this is a shell from [`Machine::new_shell`] not filled yet.
    pub fn is_shell(&self) -> bool {
        self.shell
    }

    /// Maps a snapshot chain's RAM over a shell's reserved, already registered
    /// RAM ranges.
    pub(crate) fn fill_shell(&mut self, chain: &sm_snapshot::SnapshotChain) -> Result<()> {
        if !self.shell || !self.virtio_devices().is_empty() {
            return Err(Error::State("only an unused shell (no devices) can take snapshot RAM".into()));
        }
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let ours: Vec<(u64, u64)> = self.mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        let theirs: Vec<(u64, u64)> = chain.top().regions().iter().map(|r| (r.guest_addr, r.size)).collect();
        if ours != theirs {
            return Err(Error::State(format!(
                "the shell was made for {} MiB of RAM, the snapshot has {} MiB",
                self.config.memory_mib,
                chain.top().ram_size() >> 20
            )));
        }
        let bases: Vec<*mut u8> = self.mem.iter().map(|r| r.as_ptr()).collect();
        // SAFETY: each base is the start of one of this shell's own RAM mappings
        // of exactly the snapshot region's size (checked above); nothing runs on
        // them (no vCPU thread, no device), and the replaced mapping stays owned
        // by `reservation`, which unmaps the range after `mem` is dropped.
        let mem = unsafe { chain.map_ram_at(&bases) }?;
        self.reservation = Some(std::mem::replace(&mut self.mem, mem));
        self.shell = false;
        Ok(())
    }

    /// Creates the machine over existing guest RAM (e.g. mapped from a snapshot).
    pub(crate) fn with_memory(
        hypervisor: &dyn Hypervisor,
        config: MachineConfig,
        mem: GuestMemory,
        start: Instant,
    ) -> Result<Self> {
        if config.vcpus as usize > mptable::max_cpus() {
            return Err(Error::Config(format!(
                "{} vCPUs requested; the MP table describes at most {}",
                config.vcpus,
                mptable::max_cpus()
            )));
        }
        let vm = hypervisor.create_vm(&VmConfig { vcpu_count: config.vcpus })?;
        memory::map_guest_memory(&*vm, &mem, false)?;
        // Each vCPU is made on the thread that will run it.
        let (vcpus, kicks): (Vec<_>, Vec<_>) = (0..config.vcpus)
            .map(|id| {
                let vm = Arc::clone(&vm);
                VcpuThread::spawn(id, move || vm.create_vcpu(id))
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        let console = Console::new(&config.console, start)
            .map_err(|e| Error::Io { what: format!("opening console output {:?}", config.console), source: e })?;
        let control = Arc::new(RunControl::new(kicks, console.clone()));

        let mut ports = PortBus::default();
        let serial = Arc::new(Mutex::new(Serial::new(vm.irq_line(COM1_IRQ)?, console.clone())));
        ports.insert(COM1_BASE, 8, serial.clone()).map_err(Error::Config)?;
        let on_reset = {
            let control = control.clone();
            Arc::new(move || control.finish(ExitReason::Reboot))
        };
        ports.insert(I8042_BASE, I8042_LEN, Arc::new(Mutex::new(I8042::new(on_reset)))).map_err(Error::Config)?;

        let timings = MachineTimings { created: start.elapsed(), started: None };
        Ok(Machine {
            vcpus,
            running: false,
            context: Arc::new(VcpuContext { ports, mmio: MmioBus::default(), control }),
            console,
            serial,
            vm,
            mem,
            reservation: None,
            shell: false,
            start,
            timings,
            config,
            origin: None,
            next_device_memory: None,
            device_memory_slots: 0,
            stop_timeout: STOP_TIMEOUT,
            lost_vcpus: 0,
            abandoned_vcpus: 0,
        })
    }

    /// Adds a virtio device behind a virtio-mmio transport: the next 4 KiB window
    /// from [`VIRTIO_MMIO_BASE`] and the next free interrupt from
    /// [`FIRST_VIRTIO_IRQ`]. Queue notifications use the hypervisor's ioeventfd fast
    /// path where available. Add devices before `load_linux`, which announces them
    /// on the kernel command line.
    pub fn add_virtio_device(&mut self, mut device: Box<dyn sm_virtio::VirtioDevice>) -> Result<VirtioSlot> {
        self.require_stopped("add a device")?;
        let index = self.context.mmio.devices().len() as u32;
        let irq = FIRST_VIRTIO_IRQ + index;
        if irq >= self.vm.irq_line_count() {
            return Err(Error::Config(format!(
                "too many virtio devices: at most {} fit the interrupt lines {FIRST_VIRTIO_IRQ}..{} of the IOAPIC",
                self.vm.irq_line_count() - FIRST_VIRTIO_IRQ,
                self.vm.irq_line_count() - 1
            )));
        }
        let (slots_before, next_before) = (self.device_memory_slots, self.next_device_memory);
        // The device owns the memory those slots point at: if it does not
        // make it into the machine, the slots go with it (no vCPU runs now).
        let added = self.map_device_memory(&mut *device).and_then(|()| self.attach_virtio_device(device, index, irq));
        if added.is_err() {
            for slot in slots_before..self.device_memory_slots {
                if let Err(e) = self.vm.unmap_memory(FIRST_DEVICE_MEMORY_SLOT + slot) {
                    tracing::error!("removing device memory slot {slot}: {e}");
                }
            }
            (self.device_memory_slots, self.next_device_memory) = (slots_before, next_before);
        }
        added
    }

    fn attach_virtio_device(
        &mut self,
        device: Box<dyn sm_virtio::VirtioDevice>,
        index: u32,
        irq: u32,
    ) -> Result<VirtioSlot> {
        self.require_whole("add a device")?;
        let slot = VirtioSlot { base: VIRTIO_MMIO_BASE + u64::from(index) * sm_virtio::mmio::MMIO_WINDOW_SIZE, irq };
        let line = Arc::new(VirtioIrq(self.vm.irq_line(irq)?));
        let transport = sm_virtio::mmio::MmioTransport::new(device, self.mem.clone(), line)
            .map_err(|e| Error::Io { what: "creating a virtio transport".into(), source: e })?;
        // Notifies through an eventfd without a vCPU exit where the backend can.
        #[cfg(target_os = "linux")]
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            match self.vm.register_mmio_notifier(slot.base + sm_virtio::mmio::REG_QUEUE_NOTIFY, queue as u32, evt) {
                Ok(()) | Err(sm_hypervisor::Error::Unsupported(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let transport: SharedTransport = Arc::new(Mutex::new(transport));
        let context = Arc::get_mut(&mut self.context)
            .ok_or_else(|| Error::State("cannot add a device while vCPU threads hold the machine".into()))?;
        context.mmio.insert(slot, transport);
        Ok(slot)
    }

    /// The virtio devices and where they sit.
    pub fn virtio_devices(&self) -> &[(VirtioSlot, SharedTransport)] {
        self.context.mmio.devices()
    }

    /// Loads a Linux kernel, initrd and command line and points vCPU 0 at the
    /// kernel's 64-bit entry. Other vCPUs wait for the guest to start them (SIPI).
    pub fn load_linux(&mut self, boot: &LinuxBoot) -> Result<linux::LoadedKernel> {
        self.require_whole("load a kernel")?;
        self.require_stopped("load a kernel")?;
        paging::write_boot_tables(&self.mem, false)?;
        mptable::write_mptable(&self.mem, self.config.vcpus as usize)?;
        let kernel = linux::load_kernel(&self.mem, &boot.kernel)?;
        let initrd = boot.initrd.as_deref().map(|p| linux::load_initrd(&self.mem, p, kernel.end)).transpose()?;
        let device_args: Vec<String> = self.virtio_devices().iter().map(|(slot, _)| slot.cmdline_arg()).collect();
        let cmdline = insert_kernel_args(&boot.cmdline, &device_args);
        linux::write_cmdline(&self.mem, &cmdline)?;
        linux::write_zero_page(&self.mem, &kernel, initrd, cmdline.len() + 1)?;
        let bsp = self.vcpus.first().ok_or_else(|| Error::State("machine has no vCPU".into()))?;
        let boot = LongModeBoot {
            rip: kernel.entry,
            rsp: BOOT_STACK_TOP,
            rsi: ZERO_PAGE_ADDR,
            rflags: 0,
            pml4: PML4_ADDR,
            gdt_addr: GDT_ADDR,
            idt_addr: IDT_ADDR,
            user_mode: false,
        };
        bsp.call(move |v| x86_vcpu(v)?.setup_long_mode(&boot).map_err(Error::from))??;
        Ok(kernel)
    }

    /// Prepares every vCPU to run bare code in long mode (test stubs): writes the
    /// boot GDT and identity map, then sets vCPU `i` to start at `entries[i]`
    /// with stack `stacks[i]`, in ring 3 if `user_mode` (with IOPL 3 so it may use
    /// ports).
    pub fn load_long_mode_code(&mut self, entries: &[u64], stacks: &[u64], user_mode: bool) -> Result<()> {
        self.require_whole("load code")?;
        self.require_stopped("load code")?;
        if entries.len() != self.vcpus.len() || stacks.len() != self.vcpus.len() {
            return Err(Error::Config(format!("need one entry and stack per vCPU ({})", self.vcpus.len())));
        }
        paging::write_boot_tables(&self.mem, user_mode)?;
        const IOPL3: u64 = 3 << 12;
        for (i, vcpu) in self.vcpus.iter().enumerate() {
            let boot = LongModeBoot {
                rip: entries[i],
                rsp: stacks[i],
                rsi: 0,
                rflags: if user_mode { IOPL3 } else { 0 },
                pml4: PML4_ADDR,
                gdt_addr: GDT_ADDR,
                idt_addr: IDT_ADDR,
                user_mode,
            };
            vcpu.call(move |v| x86_vcpu(v)?.setup_long_mode(&boot).map_err(Error::from))??;
        }
        Ok(())
    }

    /// Captures vCPU and VM device state. The machine must be paused.
    pub fn save_state(&mut self) -> Result<MachineState> {
        self.require_stopped("save state")?;
        self.require_whole("save state")?;
        let vcpus = self
            .vcpus
            .iter()
            .map(|t| t.call(|v| v.save_state().map_err(Error::from))?)
            .collect::<Result<Vec<VcpuState>>>()?;
        let com1 = Some(self.serial.lock().unwrap_or_else(|e| e.into_inner()).save_state());
        Ok(MachineState { vcpus, vm: self.vm.save_state()?, com1 })
    }

    /// Restores state captured by `save_state` (guest RAM is the caller's part). The
    /// machine must not be running; afterwards `start` resumes the guest.
    pub fn restore_state(&mut self, state: &MachineState) -> Result<()> {
        self.require_whole("restore state")?;
        self.require_stopped("restore state")?;
        if state.vcpus.len() != self.vcpus.len() {
            return Err(Error::State(format!(
                "state has {} vCPUs, machine has {}",
                state.vcpus.len(),
                self.vcpus.len()
            )));
        }
        if let Some(com1) = &state.com1 {
            self.serial.lock().unwrap_or_else(|e| e.into_inner()).restore_state(com1).map_err(Error::State)?;
        }
        self.vm.restore_state(&state.vm)?;
        for (vcpu, s) in self.vcpus.iter().zip(&state.vcpus) {
            let s = s.clone();
            vcpu.call(move |v| v.restore_state(&s).map_err(Error::from))??;
        }
        self.context.control.reset_exit();
        Ok(())
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The console.
    pub fn console(&self) -> &Console {
        &self.console
    }

    /// Host-side timings.
    pub fn timings(&self) -> MachineTimings {
        self.timings
    }

    /// The configuration the machine was created with.
    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// Whether the vCPUs run the guest.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// How the VM ended, if it has.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.context.control.exit_reason()
    }
}

/// The x86_64 side of `vcpu`, or an error naming the mismatch (this
/// machine's layout and boot are x86_64's).
fn x86_vcpu(vcpu: &mut dyn Vcpu) -> Result<&mut dyn sm_hypervisor::x86_64::X86Vcpu> {
    vcpu.as_x86_64()
        .ok_or_else(|| Error::Config("this machine boots x86_64 guests; the hypervisor's vCPUs are not x86_64".into()))
}

impl Drop for Machine {
    fn drop(&mut self) {
        if self.running {
            self.stop();
        }
        if self.abandoned_vcpus > 0 || self.vcpus.iter().any(|t| t.is_stuck()) {
            // An abandoned vCPU thread may still touch guest RAM (in KVM_RUN
            // or a device handler): its mappings stay, leaked, rather than
            // be unmapped under it.
            std::mem::forget(self.mem.clone());
            std::mem::forget(self.reservation.take());
            tracing::warn!("guest RAM of a VM with abandoned vCPU threads is left mapped");
        }
    }
}
