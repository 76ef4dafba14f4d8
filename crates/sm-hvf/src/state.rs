//! The saved state of this backend in the seam's opaque blobs: what a
//! snapshot must carry for an aarch64 guest under Hypervisor.framework to
//! go on where it stopped.
//!
//! A blob is a header — magic, layout version, payload length — then the
//! payload in little endian. Decoding checks all three and every count
//! against its bound, so a damaged or foreign blob is refused by name,
//! never half-loaded.

use sm_hypervisor::{Error, Result, VcpuState, VmState};

const VCPU_MAGIC: [u8; 4] = *b"SMHC";
const VM_MAGIC: [u8; 4] = *b"SMHG";
/// Layout version of both blobs.
pub const LAYOUT_VERSION: u16 = 1;
const HEADER_LEN: usize = 12;
/// Most registers of one list (system, GIC CPU interface, redistributor).
pub const MAX_REGS: usize = 1024;
/// Largest GIC state the framework hands out that is accepted back.
pub const MAX_GIC_STATE: usize = 4 << 20;

/// The virtual timer of one vCPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VtimerState {
    /// CNTV_CTL_EL0.
    pub ctl: u64,
    /// CNTV_CVAL_EL0.
    pub cval: u64,
    /// The host masked the timer after it fired (until the guest acks it).
    pub masked: bool,
}

/// One vCPU's registers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VcpuRegisters {
    /// x0..x30.
    pub x: [u64; 31],
    /// PC.
    pub pc: u64,
    /// PSTATE (CPSR).
    pub pstate: u64,
    /// SP_EL0.
    pub sp_el0: u64,
    /// SP_EL1.
    pub sp_el1: u64,
    /// v0..v31.
    pub simd: [u128; 32],
    /// FPCR.
    pub fpcr: u64,
    /// FPSR.
    pub fpsr: u64,
    /// System registers by the framework's id (`hv_sys_reg_t`).
    pub sys_regs: Vec<(u16, u64)>,
    /// GIC CPU interface registers (`hv_gic_icc_reg_t`).
    pub icc_regs: Vec<(u16, u64)>,
    /// GIC redistributor registers (`hv_gic_redistributor_reg_t`).
    pub redistributor_regs: Vec<(u16, u64)>,
    /// The virtual timer.
    pub vtimer: VtimerState,
    /// Started (the boot vCPU, or one PSCI CPU_ON started), not off.
    pub powered_on: bool,
}

/// The VM-wide state: the distributor's (the framework's opaque GIC state)
/// and the virtual timer offset all vCPUs share.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmDeviceState {
    /// `hv_gic_state_get_data`'s bytes.
    pub gic: Vec<u8>,
    /// The VM's virtual counter offset (`hv_vcpu_get_vtimer_offset`).
    pub vtimer_offset: u64,
}

fn header(magic: [u8; 4], payload: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&magic);
    out.extend_from_slice(&LAYOUT_VERSION.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

fn put_list(out: &mut Vec<u8>, list: &[(u16, u64)]) {
    out.extend_from_slice(&(list.len() as u32).to_le_bytes());
    for (id, value) in list {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&value.to_le_bytes());
    }
}

impl VcpuRegisters {
    /// The blob (more than [`MAX_REGS`] in a list is a caller's bug: refused).
    pub fn encode(&self) -> Result<VcpuState> {
        for list in [&self.sys_regs, &self.icc_regs, &self.redistributor_regs] {
            if list.len() > MAX_REGS {
                return Err(Error::InvalidArgument(format!("{} registers in one list, most {MAX_REGS}", list.len())));
            }
        }
        let mut p = Vec::new();
        for v in self.x.iter().chain([&self.pc, &self.pstate, &self.sp_el0, &self.sp_el1]) {
            p.extend_from_slice(&v.to_le_bytes());
        }
        for v in &self.simd {
            p.extend_from_slice(&v.to_le_bytes());
        }
        for v in [self.fpcr, self.fpsr, self.vtimer.ctl, self.vtimer.cval] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        p.push(u8::from(self.vtimer.masked));
        p.push(u8::from(self.powered_on));
        put_list(&mut p, &self.sys_regs);
        put_list(&mut p, &self.icc_regs);
        put_list(&mut p, &self.redistributor_regs);
        Ok(VcpuState(header(VCPU_MAGIC, p)))
    }

    /// Reads a blob [`Self::encode`] made.
    pub fn decode(state: &VcpuState) -> Result<VcpuRegisters> {
        let mut r = Reader::new(&state.0, VCPU_MAGIC, "vCPU")?;
        let mut regs = VcpuRegisters::default();
        for x in regs.x.iter_mut() {
            *x = r.u64()?;
        }
        regs.pc = r.u64()?;
        regs.pstate = r.u64()?;
        regs.sp_el0 = r.u64()?;
        regs.sp_el1 = r.u64()?;
        for v in regs.simd.iter_mut() {
            *v = u128::from_le_bytes(r.take(16)?.try_into().expect("16 bytes"));
        }
        regs.fpcr = r.u64()?;
        regs.fpsr = r.u64()?;
        regs.vtimer.ctl = r.u64()?;
        regs.vtimer.cval = r.u64()?;
        regs.vtimer.masked = r.flag()?;
        regs.powered_on = r.flag()?;
        regs.sys_regs = r.list("system registers")?;
        regs.icc_regs = r.list("GIC CPU interface registers")?;
        regs.redistributor_regs = r.list("GIC redistributor registers")?;
        r.finish()?;
        Ok(regs)
    }
}

impl VmDeviceState {
    /// The blob.
    pub fn encode(&self) -> Result<VmState> {
        if self.gic.len() > MAX_GIC_STATE {
            return Err(Error::InvalidArgument(format!("GIC state of {} bytes, most {MAX_GIC_STATE}", self.gic.len())));
        }
        let mut p = Vec::with_capacity(12 + self.gic.len());
        p.extend_from_slice(&self.vtimer_offset.to_le_bytes());
        p.extend_from_slice(&(self.gic.len() as u32).to_le_bytes());
        p.extend_from_slice(&self.gic);
        Ok(VmState(header(VM_MAGIC, p)))
    }

    /// Reads a blob [`Self::encode`] made.
    pub fn decode(state: &VmState) -> Result<VmDeviceState> {
        let mut r = Reader::new(&state.0, VM_MAGIC, "VM")?;
        let vtimer_offset = r.u64()?;
        let len = r.u32()? as usize;
        if len > MAX_GIC_STATE {
            return Err(Error::InvalidState(format!("GIC state of {len} bytes claimed, most {MAX_GIC_STATE}")));
        }
        let gic = r.take(len)?.to_vec();
        r.finish()?;
        Ok(VmDeviceState { gic, vtimer_offset })
    }
}

/// A bounds-checked cursor over a blob's payload.
struct Reader<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(blob: &'a [u8], magic: [u8; 4], what: &'static str) -> Result<Reader<'a>> {
        let bad = |why: String| Error::InvalidState(format!("{what} state of the HVF backend: {why}"));
        if blob.len() < HEADER_LEN {
            return Err(bad(format!("{} bytes, shorter than its header", blob.len())));
        }
        if blob[..4] != magic {
            return Err(bad(format!("magic {:02x?}, not this backend's {what} state", &blob[..4])));
        }
        let version = u16::from_le_bytes([blob[4], blob[5]]);
        if version != LAYOUT_VERSION {
            return Err(bad(format!("layout version {version}, this build reads {LAYOUT_VERSION}")));
        }
        let len = u32::from_le_bytes(blob[8..12].try_into().expect("4 bytes")) as usize;
        if len != blob.len() - HEADER_LEN {
            return Err(bad(format!("payload of {} bytes, the header says {len}", blob.len() - HEADER_LEN)));
        }
        Ok(Reader { rest: &blob[HEADER_LEN..], what })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.rest.len() < n {
            return Err(Error::InvalidState(format!("{} state of the HVF backend is truncated", self.what)));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn flag(&mut self) -> Result<bool> {
        match self.take(1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(Error::InvalidState(format!("{} state: flag byte {b}", self.what))),
        }
    }

    fn list(&mut self, name: &str) -> Result<Vec<(u16, u64)>> {
        let n = self.u32()? as usize;
        if n > MAX_REGS {
            return Err(Error::InvalidState(format!("{} state: {n} {name}, most {MAX_REGS}", self.what)));
        }
        (0..n)
            .map(|_| {
                let id = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes"));
                Ok((id, self.u64()?))
            })
            .collect()
    }

    fn finish(self) -> Result<()> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidState(format!("{} state: {} bytes after the end", self.what, self.rest.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VcpuRegisters {
        let mut r = VcpuRegisters::default();
        for (i, x) in r.x.iter_mut().enumerate() {
            *x = 0x1111_0000_0000_0000 | i as u64;
        }
        r.pc = 0x4008_0000;
        r.pstate = sm_hypervisor::aarch64::BOOT_PSTATE;
        r.sp_el1 = 0x4100_0000;
        r.simd[31] = u128::MAX - 5;
        r.fpcr = 0x0300_0000;
        r.sys_regs = vec![(0xc080, 0x30d0_1805), (0xc100, 0x4000_0000)];
        r.icc_regs = vec![(0xc230, 0xff)];
        r.vtimer = VtimerState { ctl: 1, cval: 123_456_789, masked: true };
        r.powered_on = true;
        r
    }

    #[test]
    fn vcpu_and_vm_state_round_trip() {
        let regs = sample();
        assert_eq!(VcpuRegisters::decode(&regs.encode().unwrap()).unwrap(), regs);
        let vm = VmDeviceState { gic: (0..=255u8).collect(), vtimer_offset: 0xfeed };
        assert_eq!(VmDeviceState::decode(&vm.encode().unwrap()).unwrap(), vm);
    }

    #[test]
    fn damaged_foreign_and_oversized_blobs_are_refused_by_name() {
        let good = sample().encode().unwrap().0;
        let refuse = |blob: Vec<u8>| VcpuRegisters::decode(&VcpuState(blob)).unwrap_err().to_string();
        for cut in [0, 5, HEADER_LEN, good.len() / 2, good.len() - 1] {
            assert!(refuse(good[..cut].to_vec()).contains("invalid saved state"), "cut at {cut}");
        }
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(refuse(magic).contains("magic"));
        let mut version = good.clone();
        version[4] = 9;
        assert!(refuse(version).contains("layout version 9"));
        let mut longer = good.clone();
        longer.push(0);
        assert!(refuse(longer).contains("header says"));
        // The VM blob is not a vCPU blob.
        let vm = VmDeviceState::default().encode().unwrap().0;
        assert!(refuse(vm).contains("magic"));
        // A list claiming more registers than the bound, header fixed up.
        let mut regs = sample();
        regs.sys_regs.clear();
        regs.icc_regs.clear();
        regs.redistributor_regs.clear();
        let mut blob = regs.encode().unwrap().0;
        let at = blob.len() - 12; // the first of the three (empty) list counts
        blob[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(refuse(blob).contains("most 1024"));
        let mut flag = sample().encode().unwrap().0;
        let flags_at = HEADER_LEN + 35 * 8 + 32 * 16 + 4 * 8;
        flag[flags_at] = 7;
        assert!(refuse(flag).contains("flag byte 7"));
        // The GIC blob's length is bounded before anything is copied.
        let mut gic = VmDeviceState::default().encode().unwrap().0;
        gic[HEADER_LEN + 8..HEADER_LEN + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(VmDeviceState::decode(&VmState(gic)).unwrap_err().to_string().contains("GIC state of"));
        let too_many = VcpuRegisters { sys_regs: vec![(0, 0); MAX_REGS + 1], ..sample() };
        assert!(too_many.encode().is_err());
    }
}
