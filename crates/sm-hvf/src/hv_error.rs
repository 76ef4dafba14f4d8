//! Hypervisor.framework's return codes, named (what `hv_*` calls answer).

/// The name and meaning of `code` (an `hv_return_t`).
pub fn describe(code: i32) -> &'static str {
    match code as u32 {
        0 => "HV_SUCCESS",
        0xfae9_4001 => "HV_ERROR (the operation failed)",
        0xfae9_4002 => "HV_BUSY (the resource is busy)",
        0xfae9_4003 => "HV_BAD_ARGUMENT",
        0xfae9_4004 => "HV_ILLEGAL_GUEST_STATE",
        0xfae9_4005 => "HV_NO_RESOURCES (the host has none left)",
        0xfae9_4006 => "HV_NO_DEVICE (no VM or vCPU)",
        0xfae9_4007 => "HV_DENIED (the process lacks the com.apple.security.hypervisor entitlement)",
        0xfae9_4008 => "HV_FAULT",
        0xfae9_400f => "HV_UNSUPPORTED (this Mac or macOS version cannot)",
        _ => "an unknown Hypervisor.framework error",
    }
}

/// `Ok` for HV_SUCCESS, else the seam's error naming the call and code.
pub fn check(op: &'static str, code: i32) -> sm_hypervisor::Result<()> {
    match code as u32 {
        0 => Ok(()),
        0xfae9_4007 | 0xfae9_400f => Err(sm_hypervisor::Error::Unavailable(format!(
            "{op}: {}; sign the binary with the entitlement (codesign --entitlements) on an Apple silicon Mac \
             with macOS 15 or later",
            describe(code)
        ))),
        _ => Err(sm_hypervisor::Error::backend(
            op,
            std::io::Error::other(format!("{} ({:#x})", describe(code), code as u32)),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_named_and_denials_say_what_to_do() {
        assert!(check("hv_vm_create", 0).is_ok());
        let denied = check("hv_vm_create", 0xfae9_4007u32 as i32).unwrap_err();
        assert!(matches!(denied, sm_hypervisor::Error::Unavailable(_)), "{denied}");
        assert!(denied.to_string().contains("entitlement"), "{denied}");
        let busy = check("hv_vm_map", 0xfae9_4002u32 as i32).unwrap_err().to_string();
        assert!(busy.contains("hv_vm_map") && busy.contains("HV_BUSY") && busy.contains("0xfae94002"), "{busy}");
        assert_eq!(describe(42), "an unknown Hypervisor.framework error");
    }
}
