//! The fixed guest addressing (IPv4), the same for every VM: a restored VM
//! keeps its configuration while its back end is new. The gateway is where
//! passt answers for the host (its loopback, as `host.supermachine.internal`
//! once the egress policy allows it) and the DNS address is forwarded by passt
//! to the host's resolver.

use std::net::Ipv4Addr;

/// The guest's address.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// Prefix length of the guest network.
pub const PREFIX_LEN: u8 = 24;
/// The gateway (passt; maps to the host).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The DNS server the guest is given (passt forwards it to the host's resolver).
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The guest NIC's MAC address (locally administered).
pub const GUEST_MAC: [u8; 6] = [0x02, 0x53, 0x4d, 0x00, 0x00, 0x02];
/// The MTU on the guest's link.
pub const MTU: u16 = 1500;

/// The netmask of [`PREFIX_LEN`].
pub fn netmask() -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX << (32 - u32::from(PREFIX_LEN)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_and_dns_are_on_the_guest_network() {
        let mask = u32::from(netmask());
        assert_eq!(netmask(), Ipv4Addr::new(255, 255, 255, 0));
        for other in [GATEWAY, DNS] {
            assert_eq!(u32::from(other) & mask, u32::from(GUEST_IP) & mask, "{other}");
            assert_ne!(other, GUEST_IP);
        }
        assert_eq!(GUEST_MAC[0] & 0b11, 0b10, "unicast, locally administered");
    }
}
