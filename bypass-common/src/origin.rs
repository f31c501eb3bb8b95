//! The reverse map: for each redirected socket, which destination the application asked for.
//!
//! A redirect records one entry keyed by the socket cookie and the new destination. The
//! `recvmsg` and `getpeername` programs look up the socket's current peer there and, on a
//! hit, report the original destination instead, so the application gets back the address it
//! connected or sent to. The cookie keeps the mapping exact per socket even when two rules share one target.
//!
//! Addresses are stored in IPv6 form, IPv4 ones IPv4-mapped (`::ffff:a.b.c.d`), as four
//! network-order words. An `AF_INET6` socket that talks to an IPv4 peer meets the same
//! mapped form in `connect6`, `recvmsg6` and `getpeername6`, while its unconnected sends go
//! through `sendmsg4`, so one form lets all of them share entries.
//!
//! NOTE: entries are not removed when a socket closes; the LRU map drops them when full.
//! A socket that was redirected to T and later sends to T directly (an unconnected UDP socket,
//! or one connected again) still sees replies from T as coming from the original address.

/// Name of the LRU hash map `OriginKey -> Origin`.
pub const ORIGINS_MAP: &str = "ORIGINS";

/// Capacity of [`ORIGINS_MAP`]: redirected sockets remembered at once, about 2 MiB of
/// locked kernel memory. When it is full, the least recently used entries are dropped first.
pub const DEFAULT_MAX_ORIGINS: u32 = 16_384;

/// Key of the reverse map: one socket and the destination it was redirected to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OriginKey {
    /// `bpf_get_socket_cookie()` of the socket; unique per socket until reboot.
    pub cookie: u64,
    /// New destination address, IPv6 form, network byte order.
    pub addr: [u32; 4],
    /// New destination port, network byte order.
    pub port: u16,
    /// Always zero.
    pub _pad: [u8; 6],
}

/// Value of the reverse map: the destination the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// Original destination address, IPv6 form, network byte order.
    pub addr: [u32; 4],
    /// Original destination port, network byte order.
    pub port: u16,
    /// Always zero.
    pub _pad: u16,
}

const _: () = assert!(core::mem::size_of::<OriginKey>() == 32);
const _: () = assert!(core::mem::size_of::<Origin>() == 20);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `repr(C)` integers only, every padding byte spelled out as a field.
    unsafe impl aya::Pod for super::OriginKey {}
    unsafe impl aya::Pod for super::Origin {}
}

impl OriginKey {
    /// Builds a key from a socket cookie, an IPv6-form address and the raw 32-bit
    /// `bpf_sock_addr.user_port` (network-order port in its low 16 bits).
    #[inline(always)]
    pub fn new(cookie: u64, addr: [u32; 4], user_port: u32) -> Self {
        Self {
            cookie,
            addr,
            port: user_port as u16,
            _pad: [0; 6],
        }
    }
}

impl Origin {
    /// Builds a value from an IPv6-form address and the raw 32-bit `user_port`.
    #[inline(always)]
    pub fn new(addr: [u32; 4], user_port: u32) -> Self {
        Self {
            addr,
            port: user_port as u16,
            _pad: 0,
        }
    }

    /// Returns the original address as IPv4, for an `AF_INET` socket: the last word of the mapped
    /// form.
    #[inline(always)]
    pub fn ipv4(&self) -> u32 {
        self.addr[3]
    }

    /// Returns the original port in the 32-bit form of `bpf_sock_addr.user_port`.
    #[inline(always)]
    pub fn user_port(&self) -> u32 {
        u32::from(self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ipv4_from_mapped, ipv4_to_mapped};

    #[test]
    fn key_takes_low_port_bits_and_zero_padding() {
        let port = 5353u16.to_be();
        let key = OriginKey::new(7, [1, 2, 3, 4], 0xdead_0000 | u32::from(port));
        assert_eq!(key.port, port);
        assert_eq!(key._pad, [0; 6]);
        assert_eq!(key.cookie, 7);
    }

    #[test]
    fn ipv4_origin_round_trips_through_mapped_form() {
        let addr = u32::from_ne_bytes([10, 0, 0, 22]);
        let port = u32::from(53u16.to_be());
        let origin = Origin::new(ipv4_to_mapped(addr), port);
        assert_eq!(origin.ipv4(), addr);
        assert_eq!(ipv4_from_mapped(origin.addr), Some(addr));
        assert_eq!(origin.user_port(), port);
    }

    #[test]
    fn keys_differ_by_socket_and_target() {
        let target = ipv4_to_mapped(u32::from_ne_bytes([10, 0, 0, 22]));
        let port = u32::from(3000u16.to_be());
        assert_ne!(
            OriginKey::new(1, target, port),
            OriginKey::new(2, target, port)
        );
        assert_ne!(
            OriginKey::new(1, target, port),
            OriginKey::new(1, target, port + 1)
        );
    }
}
