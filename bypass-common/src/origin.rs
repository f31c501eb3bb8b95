//! The reverse map: for each redirected socket, which destination the application requested.
//!
//! Every redirect records, in a hash map keyed by the socket's cookie, the new destination and
//! the original one. The `recvmsg` and `getpeername` programs look the socket's current peer
//! up there and, on a hit, report the original destination instead, so the application gets
//! back the address it connected or sent to. Being per socket keeps the mapping exact even
//! when two rules share one target. The `sock_release` program deletes a socket's entry when
//! the socket is closed.
//!
//! The map is not socket storage (`BPF_MAP_TYPE_SK_STORAGE`), which frees entries by itself
//! but is slower to create. In one measurement on a 2-CPU VM (a Python connect loop),
//! `connect4` took 1,050 ns per redirect with socket storage and 520 ns with this map, of
//! which 140 ns went to reading the socket cookie.
//!
//! A socket keeps [`ORIGIN_SLOTS`] mappings, enough for an unconnected UDP socket that sends
//! to a few redirected destinations. A redirect to the destination of the newest slot updates
//! that slot; any other takes a free slot, then the oldest one. Lookups go newest first.
//!
//! Addresses are stored in IPv6 form, IPv4 ones IPv4-mapped (`::ffff:a.b.c.d`), as four
//! network-order words. An `AF_INET6` socket that talks to an IPv4 peer meets the same
//! mapped form in `connect6`, `recvmsg6` and `getpeername6`, while its unconnected sends go
//! through `sendmsg4`, so one form lets all of them share entries.
//!
//! NOTE: a socket that was redirected to T and later sends to T directly (an unconnected UDP
//! socket, or one connected again) still sees replies from T as coming from the original
//! address, until the mapping is pushed out by newer ones.
//!
//! NOTE: an entry is shared by all threads of the socket and written without a lock. Two
//! threads that redirect sends of one socket at the same moment may take the same slot, and
//! a reply read during such a write may see a mix of both mappings.

/// Name of the hash map (`BPF_MAP_TYPE_HASH`) from socket cookie to [`SocketOrigins`].
pub const ORIGINS_MAP: &str = "ORIGINS";

/// Redirected sockets open at one time that the reverse map can hold. Past it, new sockets
/// are still redirected, but report their new destination to `getpeername` and `recvmsg`.
pub const MAX_SOCKETS: u32 = 65_536;

/// Mappings one socket keeps; a power of two, so the oldest slot is a mask away.
pub const ORIGIN_SLOTS: usize = 4;

/// One redirect of a socket: where it goes now, and where the application sent it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginSlot {
    /// New destination address, IPv6 form, network byte order.
    pub new_addr: [u32; 4],
    /// Original destination address, IPv6 form, network byte order.
    pub addr: [u32; 4],
    /// New destination port, network byte order.
    pub new_port: u16,
    /// Original destination port, network byte order.
    pub port: u16,
}

/// Value of the reverse map: the last [`ORIGIN_SLOTS`] redirects of one socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketOrigins {
    /// Redirects recorded so far (wrapping); slot `n % ORIGIN_SLOTS` takes the next one.
    pub written: u32,
    /// The mappings; the first `min(written, ORIGIN_SLOTS)` are in use.
    pub slots: [OriginSlot; ORIGIN_SLOTS],
}

const _: () = assert!(ORIGIN_SLOTS.is_power_of_two());
const _: () = assert!(core::mem::size_of::<OriginSlot>() == 36);
const _: () = assert!(core::mem::size_of::<SocketOrigins>() == 4 + 36 * ORIGIN_SLOTS);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `repr(C)` integers only, sizes asserted above: no padding byte anywhere.
    unsafe impl aya::Pod for super::OriginSlot {}
    unsafe impl aya::Pod for super::SocketOrigins {}
}

impl SocketOrigins {
    /// Returns the mappings of a socket whose first redirect is the one given, with the
    /// arguments of [`Self::record`].
    #[inline(always)]
    pub fn first(new_addr: [u32; 4], new_user_port: u32, addr: [u32; 4], user_port: u32) -> Self {
        let mut slots = [OriginSlot::default(); ORIGIN_SLOTS];
        slots[0] = OriginSlot {
            new_addr,
            addr,
            new_port: new_user_port as u16,
            port: user_port as u16,
        };
        Self { written: 1, slots }
    }

    /// Records that the socket asked for `addr`:`user_port` and now talks to
    /// `new_addr`:`new_user_port`. Addresses are in IPv6 form. Ports are raw 32-bit
    /// `bpf_sock_addr.user_port` values, with the network-order port in the low 16 bits.
    #[inline(always)]
    pub fn record(
        &mut self,
        new_addr: [u32; 4],
        new_user_port: u32,
        addr: [u32; 4],
        user_port: u32,
    ) {
        let new_port = new_user_port as u16;
        let slot = OriginSlot {
            new_addr,
            addr,
            new_port,
            port: user_port as u16,
        };
        // Only the newest slot is compared: a socket that sends to one destination again and
        // again keeps one slot, and the programs that write here stay small for the verifier.
        // Lookups go newest first, so an older slot for the same destination is never used.
        let newest = self.written.wrapping_sub(1) as usize % ORIGIN_SLOTS;
        if self.written > 0
            && self.slots[newest].new_port == new_port
            && self.slots[newest].new_addr == new_addr
        {
            self.slots[newest] = slot;
            return;
        }
        self.slots[self.written as usize % ORIGIN_SLOTS] = slot;
        self.written = self.written.wrapping_add(1);
    }

    /// Returns the slot of the redirect to `new_addr`:`new_user_port`, if the socket has one.
    #[inline(always)]
    pub fn lookup(&self, new_addr: [u32; 4], new_user_port: u32) -> Option<&OriginSlot> {
        self.find(new_addr, new_user_port as u16)
            .map(|index| &self.slots[index])
    }

    /// Returns the index of the newest slot for `new_addr`:`new_port`.
    #[inline(always)]
    fn find(&self, new_addr: [u32; 4], new_port: u16) -> Option<usize> {
        let used = if self.written < ORIGIN_SLOTS as u32 {
            self.written as usize
        } else {
            ORIGIN_SLOTS
        };
        (0..ORIGIN_SLOTS).find_map(|age| {
            let index = self.written.wrapping_sub(1 + age as u32) as usize % ORIGIN_SLOTS;
            let slot = &self.slots[index];
            (age < used && slot.new_port == new_port && slot.new_addr == new_addr).then_some(index)
        })
    }
}

impl OriginSlot {
    /// Returns the original address as IPv4, for an `AF_INET` socket: the last word of the
    /// mapped form.
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

    fn ip(last: u8) -> [u32; 4] {
        ipv4_to_mapped(u32::from_ne_bytes([10, 0, 0, last]))
    }

    fn port(port: u16) -> u32 {
        u32::from(port.to_be())
    }

    #[test]
    fn empty_socket_has_no_origin() {
        let origins = SocketOrigins::default();
        assert_eq!(origins.lookup([0; 4], 0), None);
        assert_eq!(origins.lookup(ip(1), port(3000)), None);
    }

    #[test]
    fn ipv4_origin_round_trips_through_mapped_form() {
        let mut origins = SocketOrigins::default();
        origins.record(ip(1), 0xdead_0000 | port(3000), ip(22), port(53));
        let slot = origins.lookup(ip(1), port(3000)).unwrap();
        assert_eq!(ipv4_from_mapped(slot.addr), Some(slot.ipv4()));
        assert_eq!(slot.ipv4().to_ne_bytes(), [10, 0, 0, 22]);
        assert_eq!(slot.user_port(), port(53));
        assert_eq!(origins.lookup(ip(1), port(3001)), None);
        assert_eq!(origins.lookup(ip(2), port(3000)), None);
    }

    #[test]
    fn first_equals_one_record() {
        let mut recorded = SocketOrigins::default();
        recorded.record(ip(1), port(3000), ip(22), port(80));
        let first = SocketOrigins::first(ip(1), port(3000), ip(22), port(80));
        assert_eq!(first, recorded);
    }

    #[test]
    fn same_target_again_updates_its_slot() {
        let mut origins = SocketOrigins::default();
        origins.record(ip(1), port(3000), ip(22), port(80));
        origins.record(ip(1), port(3000), ip(23), port(81));
        assert_eq!(origins.written, 1);
        let slot = origins.lookup(ip(1), port(3000)).unwrap();
        assert_eq!((slot.ipv4(), slot.user_port()), (ip(23)[3], port(81)));
    }

    #[test]
    fn newest_original_wins_for_a_target_seen_before() {
        let mut origins = SocketOrigins::default();
        origins.record(ip(1), port(3000), ip(22), port(80));
        origins.record(ip(2), port(3000), ip(23), port(80));
        origins.record(ip(1), port(3000), ip(24), port(81));
        assert_eq!(origins.written, 3);
        let slot = origins.lookup(ip(1), port(3000)).unwrap();
        assert_eq!((slot.ipv4(), slot.user_port()), (ip(24)[3], port(81)));
        let other = origins.lookup(ip(2), port(3000)).unwrap();
        assert_eq!(other.ipv4(), ip(23)[3]);
    }

    #[test]
    fn keeps_the_newest_targets_when_full() {
        let mut origins = SocketOrigins::default();
        let targets = ORIGIN_SLOTS as u16 + 1;
        for n in 0..targets {
            origins.record(ip(1), port(3000 + n), ip(22), port(80 + n));
        }
        assert_eq!(origins.lookup(ip(1), port(3000)), None);
        for n in 1..targets {
            let slot = origins.lookup(ip(1), port(3000 + n)).unwrap();
            assert_eq!(slot.user_port(), port(80 + n));
        }
    }
}
