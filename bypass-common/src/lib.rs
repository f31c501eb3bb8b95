//! Map types, constants and matching logic shared by the bypass eBPF programs and the
//! user-space loader.
//!
//! Every type here is part of the map ABI between the two sides: `#[repr(C)]`, fixed-width
//! integers, padding spelled out as fields that are always zero. Addresses and ports are kept
//! in network byte order, exactly as the kernel presents them in `struct bpf_sock_addr`, so
//! the programs compare and copy them without conversion.
#![no_std]

pub mod hit;
pub mod origin;
pub mod ratelimit;

/// `IPPROTO_TCP`, as found in `bpf_sock_addr.protocol`.
pub const PROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`, as found in `bpf_sock_addr.protocol`.
pub const PROTO_UDP: u8 = 17;

/// Name of the IPv4 rule map (`HashMap<RuleKey4, RuleTarget4>`).
pub const RULES4_MAP: &str = "RULES4";
/// Name of the IPv6 rule map (`HashMap<RuleKey6, RuleTarget6>`).
pub const RULES6_MAP: &str = "RULES6";
/// Name of the hit counters, indexed by rule id.
pub const HITS_MAP: &str = "HITS";
/// Name of the per-CPU hit log statistics, indexed by [`LogStat`].
pub const LOG_STATS_MAP: &str = "LOG_STATS";
/// Name of the global that caps hit log lines per second on each CPU (`u32`, 0 = no lines).
pub const LOG_RATE_GLOBAL: &str = "LOG_RATE";

/// Default capacity of the rule maps and of the hit counters.
pub const DEFAULT_MAX_RULES: u32 = 16_384;
/// Default cap of hit log lines per second and CPU; hits over it are counted, not logged.
pub const DEFAULT_LOG_RATE: u32 = 100;

/// Slots of the per-CPU `LOG_STATS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogStat {
    /// Hit log lines written to the ring buffer.
    Written = 0,
    /// Hits not logged because the per-CPU rate limit was reached.
    RateLimited = 1,
}

/// Number of slots in `LOG_STATS`.
pub const LOG_STATS_LEN: u32 = 2;

/// Key of the IPv4 rule map: the destination a program asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleKey4 {
    /// Destination address, network byte order (as `bpf_sock_addr.user_ip4`).
    pub addr: u32,
    /// Destination port, network byte order (the low 16 bits of `bpf_sock_addr.user_port`).
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub protocol: u8,
    /// Always zero, so that equal keys hash equally in the kernel.
    pub _pad: u8,
}

/// Value of the IPv4 rule map: where to send the connection instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleTarget4 {
    /// New destination address, network byte order.
    pub addr: u32,
    /// New destination port, network byte order.
    pub port: u16,
    /// Always zero.
    pub _pad: u16,
    /// Index of the rule in the hit counters.
    pub rule_id: u32,
}

/// Key of the IPv6 rule map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleKey6 {
    /// Destination address as four network-order words (as `bpf_sock_addr.user_ip6`).
    pub addr: [u32; 4],
    /// Destination port, network byte order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub protocol: u8,
    /// Always zero.
    pub _pad: u8,
}

/// Value of the IPv6 rule map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleTarget6 {
    /// New destination address as four network-order words.
    pub addr: [u32; 4],
    /// New destination port, network byte order.
    pub port: u16,
    /// Always zero.
    pub _pad: u16,
    /// Index of the rule in the hit counters.
    pub rule_id: u32,
}

const _: () = assert!(core::mem::size_of::<RuleKey4>() == 8);
const _: () = assert!(core::mem::size_of::<RuleTarget4>() == 12);
const _: () = assert!(core::mem::size_of::<RuleKey6>() == 20);
const _: () = assert!(core::mem::size_of::<RuleTarget6>() == 24);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all four types are `repr(C)`, made of integers only, with every padding byte
    // spelled out as a field, so any bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::RuleKey4 {}
    unsafe impl aya::Pod for super::RuleTarget4 {}
    unsafe impl aya::Pod for super::RuleKey6 {}
    unsafe impl aya::Pod for super::RuleTarget6 {}
}

impl RuleKey4 {
    /// Builds a key from the raw `user_ip4`, `user_port` and `protocol` fields of a
    /// `bpf_sock_addr`. The port field is 32 bits wide with the network-order port in its
    /// low 16 bits.
    #[inline(always)]
    pub fn from_sock_addr(user_ip4: u32, user_port: u32, protocol: u32) -> Self {
        Self {
            addr: user_ip4,
            port: user_port as u16,
            protocol: protocol as u8,
            _pad: 0,
        }
    }
}

impl RuleKey6 {
    /// Builds a key from the raw `user_ip6`, `user_port` and `protocol` fields of a
    /// `bpf_sock_addr`.
    #[inline(always)]
    pub fn from_sock_addr(user_ip6: [u32; 4], user_port: u32, protocol: u32) -> Self {
        Self {
            addr: user_ip6,
            port: user_port as u16,
            protocol: protocol as u8,
            _pad: 0,
        }
    }
}

/// Returns the IPv4 address inside an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), given as
/// four network-order words, or `None` for any other address.
#[inline(always)]
pub fn ipv4_from_mapped(addr: [u32; 4]) -> Option<u32> {
    if addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]) {
        Some(addr[3])
    } else {
        None
    }
}

/// Returns the IPv4-mapped IPv6 form (`::ffff:a.b.c.d`) of a network-order IPv4 address.
#[inline(always)]
pub fn ipv4_to_mapped(addr: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), addr]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net_ip4(octets: [u8; 4]) -> u32 {
        u32::from_ne_bytes(octets)
    }

    #[test]
    fn key4_takes_low_port_bits() {
        let port = 80u16.to_be();
        let key = RuleKey4::from_sock_addr(net_ip4([10, 0, 0, 22]), u32::from(port), 6);
        assert_eq!(key.port, port);
        assert_eq!(key.protocol, PROTO_TCP);
        assert_eq!(key.addr.to_ne_bytes(), [10, 0, 0, 22]);
        assert_eq!(key._pad, 0);
    }

    #[test]
    fn mapped_address_round_trips() {
        let addr = net_ip4([10, 0, 0, 22]);
        let mapped = ipv4_to_mapped(addr);
        assert_eq!(ipv4_from_mapped(mapped), Some(addr));
    }

    #[test]
    fn native_ipv6_is_not_mapped() {
        let fd00 = [
            u32::from_ne_bytes([0xfd, 0, 0, 0]),
            0,
            0,
            u32::from_ne_bytes([0, 0, 0, 0x22]),
        ];
        assert_eq!(ipv4_from_mapped(fd00), None);
        assert_eq!(ipv4_from_mapped([0, 0, 0, 1]), None);
    }
}
