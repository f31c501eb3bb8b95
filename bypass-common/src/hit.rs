//! The hit log record: the facts of one redirect, sent through aya-log as bytes.
//!
//! With `info!` and one argument per field, every argument adds code that the verifier walks
//! once for each buffer size aya-log may reserve, and the line of eleven fields made loading
//! take over 100 ms. A program therefore writes one aya-log message of constant size,
//! `hit <128 hex digits>`, and the loader turns it back into the line `redirect connect4 tcp
//! 10.0.0.22:80 -> 10.0.0.22:3000 rule 0 pid 7051 comm curl`. A message that is not a valid
//! record is shown unchanged.

/// Text before the hex digits of a record in the aya-log message.
pub const HIT_PREFIX: &str = "hit ";

/// Size of a [`HitRecord`] in bytes.
pub const HIT_RECORD_LEN: usize = 64;

/// Program that made the redirect, as stored in [`HitRecord::hook`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Connect4 = 0,
    Connect6 = 1,
    Sendmsg4 = 2,
    Sendmsg6 = 3,
}

impl Hook {
    /// Returns the program name, which is also its attach point.
    pub fn name(self) -> &'static str {
        match self {
            Hook::Connect4 => "connect4",
            Hook::Connect6 => "connect6",
            Hook::Sendmsg4 => "sendmsg4",
            Hook::Sendmsg6 => "sendmsg6",
        }
    }

    /// Returns the hook stored as `value`, if any.
    pub fn from_u8(value: u8) -> Option<Self> {
        [
            Hook::Connect4,
            Hook::Connect6,
            Hook::Sendmsg4,
            Hook::Sendmsg6,
        ]
        .into_iter()
        .find(|hook| *hook as u8 == value)
    }
}

/// The notation of a record's addresses in its line.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrForm {
    /// `a.b.c.d:port`, from an `AF_INET` socket.
    Ipv4 = 0,
    /// `::ffff:a.b.c.d:port`, an IPv4 destination of an `AF_INET6` socket.
    Ipv4Mapped = 1,
    /// `[v6]:port`.
    Ipv6 = 2,
}

/// One redirect. Addresses in IPv6 form (IPv4 ones IPv4-mapped), network order, as the
/// programs keep them; ports in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HitRecord {
    /// The destination requested by the socket.
    pub from_addr: [u32; 4],
    /// The destination it was given.
    pub to_addr: [u32; 4],
    pub from_port: u16,
    pub to_port: u16,
    pub rule_id: u32,
    /// Thread group id (the user-space pid) of the process.
    pub pid: u32,
    /// A [`Hook`].
    pub hook: u8,
    /// [`crate::PROTO_TCP`] or [`crate::PROTO_UDP`].
    pub protocol: u8,
    /// An [`AddrForm`].
    pub form: u8,
    /// Always zero.
    pub _pad: u8,
    /// Command name, NUL padded, as `bpf_get_current_comm` gives it.
    pub comm: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<HitRecord>() == HIT_RECORD_LEN);

impl HitRecord {
    /// Returns the record as bytes, in the order of its fields.
    #[inline(always)]
    pub fn to_bytes(&self) -> [u8; HIT_RECORD_LEN] {
        // SAFETY: `repr(C)` integers and arrays only, sizes asserted above: no padding byte
        // anywhere, and any bytes are a valid `[u8; N]`.
        unsafe { core::mem::transmute(*self) }
    }

    /// Returns the record whose bytes are `bytes`.
    pub fn from_bytes(bytes: &[u8; HIT_RECORD_LEN]) -> Self {
        // SAFETY: as in `to_bytes`; every bit pattern is a valid `HitRecord`.
        unsafe { core::mem::transmute(*bytes) }
    }

    /// Returns the record written in hex digits in `message` after [`HIT_PREFIX`], or `None`
    /// when `message` is not a hit record.
    pub fn parse(message: &str) -> Option<Self> {
        let hex = message.strip_prefix(HIT_PREFIX)?.as_bytes();
        if hex.len() != 2 * HIT_RECORD_LEN {
            return None;
        }
        let mut bytes = [0u8; HIT_RECORD_LEN];
        for (byte, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
            *byte = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
        }
        let record = Self::from_bytes(&bytes);
        Hook::from_u8(record.hook)?;
        record.addr_form()?;
        Some(record)
    }

    /// Returns how the addresses are written, if [`Self::form`] is valid.
    pub fn addr_form(&self) -> Option<AddrForm> {
        [AddrForm::Ipv4, AddrForm::Ipv4Mapped, AddrForm::Ipv6]
            .into_iter()
            .find(|form| *form as u8 == self.form)
    }
}

fn hex_digit(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> [u8; 2 * HIT_RECORD_LEN] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 2 * HIT_RECORD_LEN];
        for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
            pair[0] = DIGITS[usize::from(byte >> 4)];
            pair[1] = DIGITS[usize::from(byte & 0xf)];
        }
        out
    }

    fn record() -> HitRecord {
        HitRecord {
            from_addr: [
                0,
                0,
                0xffff_0000u32.to_be(),
                u32::from_ne_bytes([10, 0, 0, 22]),
            ],
            to_addr: [1, 2, 3, 4],
            from_port: 80u16.to_be(),
            to_port: 3000u16.to_be(),
            rule_id: 7,
            pid: 4242,
            hook: Hook::Sendmsg6 as u8,
            protocol: crate::PROTO_UDP,
            form: AddrForm::Ipv6 as u8,
            _pad: 0,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
        }
    }

    fn message(record: &HitRecord) -> ([u8; HIT_PREFIX.len() + 2 * HIT_RECORD_LEN], usize) {
        let mut out = [0u8; HIT_PREFIX.len() + 2 * HIT_RECORD_LEN];
        out[..HIT_PREFIX.len()].copy_from_slice(HIT_PREFIX.as_bytes());
        out[HIT_PREFIX.len()..].copy_from_slice(&hex(&record.to_bytes()));
        (out, HIT_PREFIX.len() + 2 * HIT_RECORD_LEN)
    }

    #[test]
    fn record_round_trips_through_hex() {
        let (text, len) = message(&record());
        let text = core::str::from_utf8(&text[..len]).unwrap();
        assert_eq!(HitRecord::parse(text), Some(record()));
    }

    #[test]
    fn other_messages_are_not_records() {
        assert_eq!(HitRecord::parse("hello"), None);
        assert_eq!(HitRecord::parse("hit 00"), None);
        let (mut text, len) = message(&record());
        text[HIT_PREFIX.len()] = b'G';
        assert_eq!(
            HitRecord::parse(core::str::from_utf8(&text[..len]).unwrap()),
            None
        );
    }

    #[test]
    fn unknown_hook_or_form_is_not_a_record() {
        for change in [
            |r: &mut HitRecord| r.hook = 9,
            |r: &mut HitRecord| r.form = 3,
        ] {
            let mut bad = record();
            change(&mut bad);
            let (text, len) = message(&bad);
            assert_eq!(
                HitRecord::parse(core::str::from_utf8(&text[..len]).unwrap()),
                None
            );
        }
    }
}
