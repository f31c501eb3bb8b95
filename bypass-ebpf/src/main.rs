//! cgroup sock_addr programs that redirect a socket's destination by rule.
//!
//! Every entry point is a thin wrapper around one lookup-and-rewrite helper. All of them
//! return [`ALLOW`], so bypass can change where a connection goes but never blocks one. A miss
//! leaves the syscall unchanged. A failed helper call or a full ring buffer loses only a log
//! line or a reverse mapping, never the redirect.
#![no_std]
#![no_main]
// For the atomic add in `count_hit`; aya-ebpf needs the same feature.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

use aya_ebpf::{
    Global,
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, bpf_sock_addr},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::bpf_get_socket_cookie,
    },
    macros::{cgroup_sock, cgroup_sock_addr, map},
    maps::{Array, HashMap, PerCpuArray},
    programs::{SockAddrContext, SockContext},
};
use aya_log_ebpf::macro_support::{
    AYA_LOGS, Argument as _, DisplayHint, Field, Header, Level, LogValueLength, level_enabled,
};
use bypass_common::{
    DEFAULT_LOG_RATE, DEFAULT_MAX_RULES, LOG_STATS_LEN, LogStat, RuleKey4, RuleKey6, RuleTarget4,
    RuleTarget6,
    hit::{AddrForm, HIT_PREFIX, HIT_RECORD_LEN, HitRecord, Hook},
    ipv4_from_mapped, ipv4_to_mapped,
    origin::{MAX_SOCKETS, OriginSlot, SocketOrigins},
    ratelimit::RateWindow,
};

/// Return value that lets the syscall proceed. (0 would fail it with `EPERM`.)
const ALLOW: i32 = 1;

// Not preallocated: creating a preallocated map of 16,384 entries took milliseconds of every
// start, and rules change only from user space, where the allocation costs nothing visible.
#[map]
static RULES4: HashMap<RuleKey4, RuleTarget4> =
    HashMap::with_max_entries(DEFAULT_MAX_RULES, BPF_F_NO_PREALLOC);

#[map]
static RULES6: HashMap<RuleKey6, RuleTarget6> =
    HashMap::with_max_entries(DEFAULT_MAX_RULES, BPF_F_NO_PREALLOC);

/// Hits of each rule. One shared counter per rule, added to atomically: a per-CPU array needs a
/// per-CPU allocation for every slot, which took over 10 ms of every start with 16,384 slots.
#[map]
static HITS: Array<u64> = Array::with_max_entries(DEFAULT_MAX_RULES, 0);

/// Original destinations of each redirected socket, by socket cookie, for `recvmsg` and
/// `getpeername`. `sock_release` deletes a socket's entry when the socket is closed.
/// Not preallocated, so that it costs memory only for the sockets open at a time.
#[map]
static ORIGINS: HashMap<u64, SocketOrigins> =
    HashMap::with_max_entries(MAX_SOCKETS, BPF_F_NO_PREALLOC);

#[map]
static LOG_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOG_STATS_LEN, 0);

#[map]
static LOG_WINDOW: PerCpuArray<RateWindow> = PerCpuArray::with_max_entries(1, 0);

/// Hit log lines per second and CPU; the loader sets it before load.
#[unsafe(no_mangle)]
static LOG_RATE: Global<u32> = Global::new(DEFAULT_LOG_RATE);

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    redirect4(&ctx, Hook::Connect4);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    redirect6(&ctx, Hook::Connect6);
    ALLOW
}

/// Unconnected UDP sends (`sendto`, `sendmsg` with an address) from `AF_INET` sockets, and
/// IPv4-mapped ones from `AF_INET6` sockets, which the kernel passes here.
#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    redirect4(&ctx, Hook::Sendmsg4);
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    redirect6(&ctx, Hook::Sendmsg6);
    ALLOW
}

/// Deletes the reverse map entry of a socket that is closed. Sockets that were never
/// redirected have none, and the delete finds nothing.
///
/// NOTE: this runs on every close of an inet socket in the cgroup, redirected or not. Each
/// close pays a hash lookup and the cookie read, which touches a cold cache line and gives a
/// cookie to a socket that had none. The bench's "no rule matches" variant includes it.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    // SAFETY: `ctx.sock` is the socket of this run, which the helper reads.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    let _ = ORIGINS.remove(&cookie);
    ALLOW
}

/// Restores the source address of a received UDP datagram, on connected sockets too.
#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    restore4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    restore6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    restore4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    restore6(&ctx);
    ALLOW
}

/// Rewrites `user_ip4`/`user_port` when the destination has a rule.
#[inline(always)]
fn redirect4(ctx: &SockAddrContext, hook: Hook) {
    // SAFETY: the kernel passes a valid `bpf_sock_addr` for the whole program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let key = RuleKey4::from_sock_addr(sa.user_ip4, sa.user_port, sa.protocol);
    let Some(target) = lookup4(&key) else {
        return;
    };

    sa.user_ip4 = target.addr;
    sa.user_port = u32::from(target.port);
    hit(ctx, &hit4(hook, &key, &target, AddrForm::Ipv4));
}

/// Rewrites `user_ip6`/`user_port`: IPv4-mapped destinations by the IPv4 rules, written back
/// IPv4-mapped, and native IPv6 destinations by the IPv6 rules.
#[inline(always)]
fn redirect6(ctx: &SockAddrContext, hook: Hook) {
    // SAFETY: as in `redirect4`.
    let sa = unsafe { &mut *ctx.sock_addr };
    let user_ip6 = sa.user_ip6;

    // One call of `hit` for both branches, so the verifier walks the hit log code once.
    let record = if let Some(ip4) = ipv4_from_mapped(user_ip6) {
        let key = RuleKey4::from_sock_addr(ip4, sa.user_port, sa.protocol);
        let Some(target) = lookup4(&key) else {
            return;
        };
        write_user_ip6(sa, ipv4_to_mapped(target.addr));
        sa.user_port = u32::from(target.port);
        hit4(hook, &key, &target, AddrForm::Ipv4Mapped)
    } else {
        let key = RuleKey6::from_sock_addr(user_ip6, sa.user_port, sa.protocol);
        // SAFETY: the value is copied out at once, as in `lookup4`.
        let Some(target) = (unsafe { RULES6.get(&key) }).copied() else {
            return;
        };
        write_user_ip6(sa, target.addr);
        sa.user_port = u32::from(target.port);
        HitRecord {
            from_addr: key.addr,
            to_addr: target.addr,
            from_port: key.port,
            to_port: target.port,
            rule_id: target.rule_id,
            hook: hook as u8,
            protocol: key.protocol,
            form: AddrForm::Ipv6 as u8,
            ..HitRecord::default()
        }
    };
    hit(ctx, &record);
}

/// Returns the target of the IPv4 rule for `key`, if there is one.
#[inline(always)]
fn lookup4(key: &RuleKey4) -> Option<RuleTarget4> {
    // SAFETY: the value is copied out at once and no reference is kept, because the kernel may
    // free or reuse an element that user space replaces concurrently.
    unsafe { RULES4.get(key) }.copied()
}

/// Returns the record of a hit of an IPv4 rule, addresses in IPv4-mapped form.
#[inline(always)]
fn hit4(hook: Hook, key: &RuleKey4, target: &RuleTarget4, form: AddrForm) -> HitRecord {
    HitRecord {
        from_addr: ipv4_to_mapped(key.addr),
        to_addr: ipv4_to_mapped(target.addr),
        from_port: key.port,
        to_port: target.port,
        rule_id: target.rule_id,
        hook: hook as u8,
        protocol: key.protocol,
        form: form as u8,
        ..HitRecord::default()
    }
}

/// Records, counts and logs a redirect that is done.
#[inline(always)]
fn hit(ctx: &SockAddrContext, record: &HitRecord) {
    remember(
        ctx,
        record.to_addr,
        record.to_port,
        record.from_addr,
        record.from_port,
    );
    count_hit(record.rule_id);

    if admit_log_line() {
        let mut record = *record;
        record.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        record.comm = bpf_get_current_comm().unwrap_or([0; 16]);
        log_hit(&record);
    }
}

/// Size of the aya-log message written by [`log_hit`]: its length field, a header of six
/// fields, and three arguments: the text [`HIT_PREFIX`], the hex display hint, the record.
/// Each field is a kind byte, a 2-byte length, and the value.
const LOG_MESSAGE_LEN: usize = 2
    + (3 + LOG_TARGET.len())
    + (3 + 1)
    + (3 + LOG_TARGET.len())
    + (3 + file!().len())
    + (3 + 4)
    + (3 + 4)
    + (3 + HIT_PREFIX.len())
    + (3 + 1)
    + (3 + HIT_RECORD_LEN);

/// Target and module of the hit log messages: the crate's name, as `info!` would give.
const LOG_TARGET: &str = module_path!();

/// Writes the aya-log message `hit {:x}` with the bytes of `record`, as `info!` would, to the
/// ring buffer that aya-log reads.
///
/// `info!` reserves a power-of-two buffer whose size it hides from the verifier, which then
/// walks every write once for each of the eight sizes. This message has one constant size, so
/// the verifier walks it once. The loader checks the format end to end: its tests read the
/// hit lines that aya-log decodes from these messages.
///
/// NOTE: `macro_support` is aya-log-ebpf's interface to its own macros (0.2 here), hidden from
/// its docs and not a stable API; an upgrade of aya-log may need this function changed.
#[inline(always)]
fn log_hit(record: &HitRecord) {
    if !level_enabled(Level::Info) {
        return;
    }
    let Some(mut entry) = AYA_LOGS.reserve::<[u8; LOG_MESSAGE_LEN]>(0) else {
        return;
    };
    let bytes = record.to_bytes();
    let written = (|| {
        let header = Header::new(LOG_TARGET, Level::Info, LOG_TARGET, file!(), line!(), 3)?;
        let (kind, value) = HIT_PREFIX.as_argument();
        let prefix = Field::new(kind, value)?;
        let (kind, value) = DisplayHint::LowerHex.as_argument();
        let hint = Field::new(kind, value)?;
        let slice = &bytes[..];
        let (kind, value) = slice.as_argument();
        let record = Field::new(kind, value)?;

        // Zeroed first: every byte is written below, but only initialized bytes may be
        // borrowed as `[u8]`.
        let message = entry.write([0; LOG_MESSAGE_LEN]);
        let mut position = 0;
        let mut put = |part: &[u8]| {
            let end = position + part.len();
            message.get_mut(position..end)?.copy_from_slice(part);
            position = end;
            Some(())
        };
        put(&(LOG_MESSAGE_LEN as LogValueLength).to_ne_bytes())?;
        header.with_bytes(&mut put)?;
        prefix.with_bytes(&mut put)?;
        hint.with_bytes(&mut put)?;
        record.with_bytes(&mut put)?;
        (position == LOG_MESSAGE_LEN).then_some(())
    })();
    match written {
        Some(()) => entry.submit(0),
        None => entry.discard(0),
    }
}

/// Writes `addr` to `user_ip6`, one 32-bit word at a time as the context allows.
#[inline(always)]
fn write_user_ip6(sa: &mut bpf_sock_addr, addr: [u32; 4]) {
    sa.user_ip6[0] = addr[0];
    sa.user_ip6[1] = addr[1];
    sa.user_ip6[2] = addr[2];
    sa.user_ip6[3] = addr[3];
}

/// Records that the socket requested `origin`:`origin_port` and now talks to `addr`:`port`
/// (IPv6 form, network order). If the reverse map is full, `recvmsg` and `getpeername` go on
/// reporting the new destination for this socket.
#[inline(always)]
fn remember(ctx: &SockAddrContext, addr: [u32; 4], port: u16, origin: [u32; 4], origin_port: u16) {
    let (port, origin_port) = (u32::from(port), u32::from(origin_port));
    // SAFETY: `ctx.sock_addr` is the context of this run, and the helper reads its `sk`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // Most sockets are redirected once, right after they were made: try a new entry first.
    let first = SocketOrigins::first(addr, port, origin, origin_port);
    if ORIGINS
        .insert(&cookie, &first, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        return;
    }
    if let Some(origins) = ORIGINS.get_ptr_mut(&cookie) {
        // SAFETY: a live entry of this socket, which only programs run for this socket touch.
        unsafe { (*origins).record(addr, port, origin, origin_port) };
    }
}

/// Reports the original destination instead of the current peer in `user_ip4`/`user_port`
/// when this socket was redirected to that peer.
#[inline(always)]
fn restore4(ctx: &SockAddrContext) {
    // SAFETY: as in `redirect4`.
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(origin) = lookup_origin(ctx, ipv4_to_mapped(sa.user_ip4), sa.user_port) {
        sa.user_ip4 = origin.ipv4();
        sa.user_port = origin.user_port();
    }
}

/// As [`restore4`], for `user_ip6`; IPv4-mapped peers are found in the same entries.
#[inline(always)]
fn restore6(ctx: &SockAddrContext) {
    // SAFETY: as in `redirect4`.
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(origin) = lookup_origin(ctx, read_user_ip6(sa), sa.user_port) {
        write_user_ip6(sa, origin.addr);
        sa.user_port = origin.user_port();
    }
}

/// Reads `user_ip6` one 32-bit word at a time. Copying the array whole lets LLVM load it
/// through a pointer into the context, which the verifier rejects.
#[inline(always)]
fn read_user_ip6(sa: &bpf_sock_addr) -> [u32; 4] {
    // SAFETY: aligned reads of fields of a valid `bpf_sock_addr`.
    unsafe {
        [
            core::ptr::read_volatile(&sa.user_ip6[0]),
            core::ptr::read_volatile(&sa.user_ip6[1]),
            core::ptr::read_volatile(&sa.user_ip6[2]),
            core::ptr::read_volatile(&sa.user_ip6[3]),
        ]
    }
}

/// Returns the mapping of this socket whose new destination is `addr`:`user_port`. A socket
/// that was never redirected costs one map lookup.
#[inline(always)]
fn lookup_origin(ctx: &SockAddrContext, addr: [u32; 4], user_port: u32) -> Option<OriginSlot> {
    // SAFETY: as in `remember`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: the slot is copied out at once.
    let origins = unsafe { ORIGINS.get(&cookie) }?;
    origins.lookup(addr, user_port).copied()
}

#[inline(always)]
fn count_hit(rule_id: u32) {
    if let Some(hits) = HITS.get_ptr_mut(rule_id) {
        // An atomic add instruction (BPF_ATOMIC | BPF_ADD, with no fetch). Rust offers no
        // `fetch_add` on this target, which lacks compare-and-swap.
        // SAFETY: `hits` points to a live, aligned `u64` of the map, which is only ever
        // changed by this instruction and by user space.
        #[cfg(target_arch = "bpf")]
        unsafe {
            core::arch::asm!(
                "lock *(u64 *)({hits} + 0) += {one}",
                hits = in(reg) hits,
                one = in(reg) 1u64,
                options(nostack),
            );
        }
    }
}

/// Returns whether this CPU may write one more hit log line this second, and counts the
/// outcome in `LOG_STATS`.
#[inline(always)]
fn admit_log_line() -> bool {
    let rate = LOG_RATE.load();
    if rate == 0 {
        // The hit log is off, so nothing is rate-limited either.
        return false;
    }
    let admitted = match LOG_WINDOW.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; no other program run touches it while this one runs.
        Some(window) => unsafe { (*window).admit(bpf_ktime_get_ns(), rate) },
        None => false,
    };
    let stat = if admitted {
        LogStat::Written
    } else {
        LogStat::RateLimited
    };
    if let Some(count) = LOG_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot; no other program run touches it while this one runs.
        unsafe { *count += 1 };
    }
    admitted
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
