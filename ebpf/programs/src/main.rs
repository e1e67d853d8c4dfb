//! tern's kernel programs: capture a Pod's TCP traffic for the sidecar without NAT.
//!
//! - `connect4`/`connect6` (cgroup): rewrite the destination of every captured TCP connect to
//!   the proxy's outbound listener, keeping the original destination in the application's
//!   socket's own storage (`ORIG_BY_SOCKET`, freed with the socket, even when the connect fails).
//! - `sockops` (cgroup): when such a connection is established, publish the original
//!   destination under its 4-tuple (`ORIG_BY_TUPLE`); when the proxy's side of the same
//!   connection is established, move it into the accepted socket's storage (`ORIG_ON_ACCEPTED`).
//!   A 4-tuple entry lives only in between, or until the application's socket closes first.
//! - `getsockopt` (cgroup): answer `SO_ORIGINAL_DST` on the proxy's accepted socket from its
//!   storage, so the proxy reads the original destination exactly as under iptables.
//! - `getpeername4`/`getpeername6` (cgroup): show the application the address it dialled.
//! - `sk_lookup` (network namespace): steer new inbound connections on captured ports to the
//!   proxy's inbound listener held in a sockmap; its local address stays the original one.
//!
//! Every hook fails open: a connection the programs cannot handle goes where it was sent,
//! unless the loader asked for fail-closed. Programs are short: read the context, look up a
//! map, decide. Context fields are written one at a time with `write_volatile` because LLVM
//! otherwise merges adjacent 4-byte stores into one 8-byte store that the verifier refuses.
#![no_std]
#![no_main]

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_NO_PREALLOC, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE, bpf_sock, bpf_sock_tuple, sk_action,
    },
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_uid_gid, bpf_sk_lookup_tcp, bpf_sk_release, generated::bpf_sk_storage_get,
    },
    macros::{btf_map, cgroup_sock_addr, cgroup_sockopt, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, SockMap, lpm_trie::Key},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext, SockoptContext},
};
use tern_ebpf_common::{
    AF_INET, AF_INET6, CidrKey, Config, Counter, INBOUND_PORT_CAPTURE, INBOUND_PORT_EXCLUDE,
    LISTENER_INBOUND_V4, LISTENER_INBOUND_V6, MAX_EXCLUSIONS, MAX_PENDING_HANDOVERS, OrigDst,
    SO_ORIGINAL_DST, SOL_IP, SOL_IPV6, TupleKey, flags, is_v4_mapped, v4_mapped,
};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// connect/getpeername verdicts.
const ALLOW: i32 = 1;
const DENY: i32 = 0;
/// A getsockopt buffer larger than this is passed through untouched (see `pass_through`).
const PAGE_SIZE: i32 = 4096;
/// Source address the proxy uses to reach the local application (as Istio does).
const INBOUND_PASSTHROUGH_SRC: u32 = u32::from_be_bytes([127, 0, 0, 6]);
/// `BPF_F_CURRENT_NETNS`: look sockets up in the caller's network namespace.
const CURRENT_NETNS: u64 = u64::MAX;

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[map]
static EXCLUDED_PORTS: HashMap<u16, u8> =
    HashMap::with_max_entries(MAX_EXCLUSIONS, BPF_F_NO_PREALLOC);

#[map]
static EXCLUDED_CIDRS: LpmTrie<CidrKey, u8> = LpmTrie::with_max_entries(MAX_EXCLUSIONS, 0);

#[map]
static INBOUND_PORTS: HashMap<u16, u8> =
    HashMap::with_max_entries(MAX_EXCLUSIONS, BPF_F_NO_PREALLOC);

/// The original destination on the application's socket that dialled it.
#[btf_map]
static ORIG_BY_SOCKET: SkStorage<OrigDst> = SkStorage::new();

/// The original destination on the proxy's accepted socket of the same connection.
#[btf_map]
static ORIG_ON_ACCEPTED: SkStorage<OrigDst> = SkStorage::new();

/// Hand-over from the application's socket to the proxy's: entries exist only while a
/// connection is between the two sides' establishment. Not preallocated, never evicting.
#[map]
static ORIG_BY_TUPLE: HashMap<TupleKey, OrigDst> =
    HashMap::with_max_entries(MAX_PENDING_HANDOVERS, BPF_F_NO_PREALLOC);

/// The storage of `map` on socket `sk`, created from `init` when given; null when absent.
///
/// # Safety
/// `map` is one of this object's socket storage maps and `sk` a socket pointer the verifier
/// accepts for `bpf_sk_storage_get` in the calling program type, non-null.
#[inline(always)]
unsafe fn sk_storage<T>(map: &SkStorage<T>, sk: *mut bpf_sock, init: Option<&T>) -> *mut T {
    let map = core::ptr::from_ref(map).cast_mut().cast();
    let (value, flags) = match init {
        Some(v) => (
            core::ptr::from_ref(v).cast_mut().cast(),
            BPF_SK_STORAGE_GET_F_CREATE as u64,
        ),
        None => (core::ptr::null_mut(), 0),
    };
    // SAFETY: per this function's contract.
    unsafe { bpf_sk_storage_get(map, sk.cast(), value, flags) }.cast()
}

#[map]
static LISTENERS: SockMap = SockMap::with_max_entries(2, 0);

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the slot is this CPU's own copy of a per-CPU array entry; nothing else
        // writes it while this program runs.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn config() -> Option<Config> {
    CONFIG.get(0).copied()
}

/// Whether `ip` (network-order IPv6 words, IPv4 v4-mapped) falls in an excluded CIDR.
#[inline(always)]
fn cidr_excluded(ip: &[u32; 4]) -> bool {
    let mut bytes: CidrKey = [0; 16];
    let mut i = 0;
    while i < 4 {
        let w = ip[i].to_ne_bytes();
        bytes[i * 4] = w[0];
        bytes[i * 4 + 1] = w[1];
        bytes[i * 4 + 2] = w[2];
        bytes[i * 4 + 3] = w[3];
        i += 1;
    }
    EXCLUDED_CIDRS.get(Key::new(128, bytes)).is_some()
}

/// Whether the proxy has a listening socket on `ip:port` (both network order) in this netns.
/// Fail-open rests on this: with no listener the connect is left alone.
#[inline(always)]
fn proxy_listening(ctx: &SockAddrContext, ip: &[u32; 4], port_be: u16, v4: bool) -> bool {
    // SAFETY: an all-zero `bpf_sock_tuple` is valid (a union of plain integers).
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if v4 {
        tuple.__bindgen_anon_1.ipv4.daddr = ip[3];
        tuple.__bindgen_anon_1.ipv4.dport = port_be;
        core::mem::size_of_val(unsafe { &tuple.__bindgen_anon_1.ipv4 }) as u32
    } else {
        tuple.__bindgen_anon_1.ipv6.daddr = *ip;
        tuple.__bindgen_anon_1.ipv6.dport = port_be;
        core::mem::size_of_val(unsafe { &tuple.__bindgen_anon_1.ipv6 }) as u32
    };
    // SAFETY: `tuple` lives on the stack for the call; the helper is allowed for sock_addr
    // programs and every socket it returns is released below.
    let sk = unsafe { bpf_sk_lookup_tcp(ctx.as_ptr(), &mut tuple, size, CURRENT_NETNS, 0) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is a referenced socket returned by the lookup helper.
    unsafe { bpf_sk_release(sk.cast()) };
    true
}

/// Decides whether an outbound connect to `dst` (network-order words) is captured.
/// Returns the counter that explains a skip, or `None` to capture.
#[inline(always)]
fn skip_reason(ctx: &SockAddrContext, cfg: &Config, dst: &[u32; 4], port: u16) -> Option<Counter> {
    let v4_loopback = is_v4_mapped(dst) && (u32::from_be(dst[3]) >> 24) == 127;
    let v6_loopback = dst[0] == 0 && dst[1] == 0 && dst[2] == 0 && dst[3] == u32::from_be(1);
    if v4_loopback || v6_loopback {
        return Some(Counter::ConnectSkippedLoopback);
    }
    // SAFETY: `sock_addr` points at the context the kernel handed this program.
    let sk: *mut bpf_sock = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if !sk.is_null() {
        // SAFETY: `sk` is the socket doing the connect, non-null checked above.
        let mark = unsafe { read_volatile(&(*sk).mark) };
        if mark == cfg.mark {
            return Some(Counter::ConnectSkippedMark);
        }
    }
    if cfg.flags & flags::SKIP_UID != 0 {
        let uid = bpf_get_current_uid_gid() as u32;
        if uid == cfg.skip_uid {
            return Some(Counter::ConnectSkippedUid);
        }
    }
    // SAFETY: reading a plain value from a hash map the programs never hold across calls.
    if unsafe { EXCLUDED_PORTS.get(&port) }.is_some() {
        return Some(Counter::ConnectSkippedPort);
    }
    if cidr_excluded(dst) {
        return Some(Counter::ConnectSkippedCidr);
    }
    None
}

/// The shared body of connect4 and connect6. `dst` is the destination in network-order
/// words (IPv4 v4-mapped); `native_v4` is true for connect4.
#[inline(always)]
fn redirect_connect(ctx: &SockAddrContext, dst: [u32; 4], native_v4: bool) -> i32 {
    // SAFETY: `sock_addr` points at the context the kernel handed this program.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return ALLOW;
    }
    let Some(cfg) = config() else {
        return ALLOW;
    };
    let port_be = sa.user_port as u16;
    let port = u16::from_be(port_be);
    if let Some(reason) = skip_reason(ctx, &cfg, &dst, port) {
        count(reason);
        return ALLOW;
    }

    // A v4-mapped destination goes to the IPv4 listener through its mapped form.
    let to_v4 = native_v4 || is_v4_mapped(&dst);
    let proxy_ip = if to_v4 {
        v4_mapped(cfg.outbound_ip4)
    } else {
        cfg.outbound_ip6
    };
    let proxy_port_be = (cfg.outbound_port as u16).to_be();
    if !proxy_listening(ctx, &proxy_ip, proxy_port_be, to_v4) {
        if cfg.flags & flags::OUTBOUND_FAIL_OPEN != 0 {
            count(Counter::ConnectFailedOpen);
            return ALLOW;
        }
        count(Counter::ConnectRefused);
        return DENY;
    }

    let mut orig = OrigDst {
        ip: dst,
        port: port_be,
        family: if native_v4 { AF_INET } else { AF_INET6 },
    };
    // SAFETY: the storage helper is allowed for sock_addr programs on the context's socket.
    let slot = unsafe { ORIG_BY_SOCKET.get_or_insert_ptr_mut(ctx, Some(&mut orig)) };
    if slot.is_null() {
        // Without a record the proxy could not learn where to go: leave the connect alone.
        count(Counter::ConnectFailedOpen);
        return ALLOW;
    }
    // A socket that connects again (after a failed attempt) records its new destination.
    // SAFETY: a non-null storage pointer is this socket's value, valid for this program run.
    unsafe { *slot = orig };

    let sa = ctx.sock_addr;
    // SAFETY: user_ip4/user_ip6/user_port are writable in connect hooks; each is written
    // with its own 4-byte store.
    unsafe {
        if native_v4 {
            write_volatile(&mut (*sa).user_ip4, cfg.outbound_ip4);
        } else {
            write_volatile(&mut (*sa).user_ip6[0], proxy_ip[0]);
            write_volatile(&mut (*sa).user_ip6[1], proxy_ip[1]);
            write_volatile(&mut (*sa).user_ip6[2], proxy_ip[2]);
            write_volatile(&mut (*sa).user_ip6[3], proxy_ip[3]);
        }
        write_volatile(&mut (*sa).user_port, proxy_port_be as u32);
    }
    count(Counter::ConnectRedirected);
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn tern_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: reading the destination from this program's own context.
    let ip4 = unsafe { (*ctx.sock_addr).user_ip4 };
    redirect_connect(&ctx, v4_mapped(ip4), true)
}

#[cgroup_sock_addr(connect6)]
pub fn tern_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: reading the destination from this program's own context.
    let ip6 = unsafe { (*ctx.sock_addr).user_ip6 };
    redirect_connect(&ctx, ip6, false)
}

/// Reads a network-order IPv6 address from a context field one word at a time, as the
/// verifier wants context fields read.
#[inline(always)]
fn read_ip6(field: *const [u32; 4]) -> [u32; 4] {
    let words = field as *const u32;
    // SAFETY: `field` points at a 16-byte address field of a context the kernel handed us;
    // each access is one aligned 4-byte load, which every such field allows.
    unsafe {
        [
            read_volatile(words),
            read_volatile(words.add(1)),
            read_volatile(words.add(2)),
            read_volatile(words.add(3)),
        ]
    }
}

/// Reads an IPv4 address field (network order) as its v4-mapped form.
#[inline(always)]
fn read_ip4_mapped(field: *const u32) -> [u32; 4] {
    // SAFETY: one aligned 4-byte load of a context field.
    v4_mapped(unsafe { read_volatile(field) })
}

/// The key of a connection from its own socket's point of view, in sock_ops terms.
#[inline(always)]
fn sockops_key(ctx: &SockOpsContext) -> TupleKey {
    let ops = ctx.ops;
    // Both families' fields are read and the values selected afterwards: a branch between
    // field addresses is merged by LLVM into pointer arithmetic the verifier refuses.
    // SAFETY: `ops` is this program's context; only its address fields are read.
    let (v4_src, v4_dst, v6_src, v6_dst) = unsafe {
        (
            read_ip4_mapped(&(*ops).local_ip4),
            read_ip4_mapped(&(*ops).remote_ip4),
            read_ip6(&(*ops).local_ip6),
            read_ip6(&(*ops).remote_ip6),
        )
    };
    let (src_ip, dst_ip) = if ctx.family() == AF_INET as u32 {
        (v4_src, v4_dst)
    } else {
        (v6_src, v6_dst)
    };
    TupleKey {
        src_ip,
        dst_ip,
        // sock_ops: local_port is host order, remote_port network order in the upper half.
        src_port: ctx.local_port() as u16,
        dst_port: u32::from_be(ctx.remote_port()) as u16,
    }
}

/// The socket of a sock_ops context, when it is a full socket.
#[inline(always)]
fn sockops_sk(ctx: &SockOpsContext) -> *mut bpf_sock {
    // SAFETY: reading the `sk` pointer of this program's own context.
    unsafe { (*ctx.ops).__bindgen_anon_2.sk }
}

#[sock_ops]
pub fn tern_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let sk = sockops_sk(&ctx);
            if sk.is_null() {
                return 0;
            }
            // SAFETY: `sk` is this context's full socket, non-null checked above.
            let slot = unsafe { sk_storage(&ORIG_BY_SOCKET, sk, None) };
            if slot.is_null() {
                return 0;
            }
            // SAFETY: a non-null storage pointer is this socket's value; copied out at once.
            let orig = unsafe { *slot };
            if ORIG_BY_TUPLE.insert(&sockops_key(&ctx), &orig, 0).is_ok() {
                count(Counter::SockopsRecorded);
            }
            // Ask for state callbacks so a hand-over nobody took goes away with the connection.
            let _ = ctx.set_cb_flags(ctx.cb_flags() as i32 | BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            // The proxy's side of a captured connection: its peer is the application's socket.
            let own = sockops_key(&ctx);
            let key = TupleKey {
                src_ip: own.dst_ip,
                dst_ip: own.src_ip,
                src_port: own.dst_port,
                dst_port: own.src_port,
            };
            // SAFETY: the value is copied out at once.
            let Some(orig) = (unsafe { ORIG_BY_TUPLE.get(&key) }).copied() else {
                return 0;
            };
            let sk = sockops_sk(&ctx);
            if sk.is_null() {
                return 0;
            }
            // SAFETY: `sk` is this context's full socket, non-null checked above.
            if !unsafe { sk_storage(&ORIG_ON_ACCEPTED, sk, Some(&orig)) }.is_null() {
                let _ = ORIG_BY_TUPLE.remove(&key);
                count(Counter::SockopsHandedOver);
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            if ORIG_BY_TUPLE.remove(&sockops_key(&ctx)).is_ok() {
                count(Counter::SockopsRemoved);
            }
        }
        _ => {}
    }
    0
}

/// For options this program does not answer: a buffer over a page was not copied in full,
/// so tell the kernel to use the caller's original buffer (`optlen = 0`), or the caller
/// would get `EFAULT`. The kernel's own return value is left as it is.
#[inline(always)]
fn pass_through(ctx: &SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: `sockopt` points at this program's context; optlen is readable and writable.
    unsafe {
        if read_volatile(&(*so).optlen) > PAGE_SIZE {
            write_volatile(&mut (*so).optlen, 0);
        }
    }
    1
}

#[cgroup_sockopt(getsockopt)]
pub fn tern_getsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: reading this program's own context.
    let (level, optname) = unsafe { ((*so).level, (*so).optname) };
    if optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
        return pass_through(&ctx);
    }
    // SAFETY: reading this program's own context.
    let sk: *mut bpf_sock = unsafe { (*so).__bindgen_anon_1.sk };
    if sk.is_null() {
        return pass_through(&ctx);
    }
    // SAFETY: `sk` is the socket getsockopt was called on, non-null checked above.
    let slot = unsafe { sk_storage(&ORIG_ON_ACCEPTED, sk, None) };
    if slot.is_null() {
        return pass_through(&ctx);
    }
    // SAFETY: a non-null storage pointer is this socket's value; copied out at once.
    let orig = unsafe { *slot };

    // SAFETY: optval/optval_end delimit the kernel's copy of the caller's buffer; every
    // write below is bounds-checked against optval_end first.
    unsafe {
        let optval = (*so).__bindgen_anon_2.optval as *mut u8;
        let end = (*so).__bindgen_anon_3.optval_end as *mut u8;
        let written: i32 = if level == SOL_IP {
            // struct sockaddr_in: family, port, addr, 8 bytes of zero.
            if !is_v4_mapped(&orig.ip) || optval.wrapping_add(16) > end {
                return pass_through(&ctx);
            }
            let p = optval as *mut u32;
            write_volatile(p, (AF_INET as u32) | ((orig.port as u32) << 16));
            write_volatile(p.add(1), orig.ip[3]);
            write_volatile(p.add(2), 0);
            write_volatile(p.add(3), 0);
            16
        } else {
            // struct sockaddr_in6: family, port, flowinfo, addr, scope id.
            if optval.wrapping_add(28) > end {
                return pass_through(&ctx);
            }
            let p = optval as *mut u32;
            write_volatile(p, (AF_INET6 as u32) | ((orig.port as u32) << 16));
            write_volatile(p.add(1), 0);
            write_volatile(p.add(2), orig.ip[0]);
            write_volatile(p.add(3), orig.ip[1]);
            write_volatile(p.add(4), orig.ip[2]);
            write_volatile(p.add(5), orig.ip[3]);
            write_volatile(p.add(6), 0);
            28
        };
        write_volatile(&mut (*so).optlen, written);
        write_volatile(&mut (*so).retval, 0);
    }
    count(Counter::GetsockoptAnswered);
    1
}

/// Shows the application its original destination instead of the proxy's listener.
#[inline(always)]
fn rewrite_peer(ctx: &SockAddrContext, v4: bool) -> i32 {
    // SAFETY: the storage helper is allowed for sock_addr programs on the context's socket.
    let slot = unsafe { ORIG_BY_SOCKET.get_ptr_mut(ctx) };
    if slot.is_null() {
        return ALLOW;
    }
    // SAFETY: a non-null storage pointer is this socket's value; copied out at once.
    let orig = unsafe { *slot };
    let sa = ctx.sock_addr;
    // SAFETY: user_ip4/user_ip6/user_port are writable in getpeername hooks; one store each.
    unsafe {
        if v4 {
            write_volatile(&mut (*sa).user_ip4, orig.ip[3]);
        } else {
            write_volatile(&mut (*sa).user_ip6[0], orig.ip[0]);
            write_volatile(&mut (*sa).user_ip6[1], orig.ip[1]);
            write_volatile(&mut (*sa).user_ip6[2], orig.ip[2]);
            write_volatile(&mut (*sa).user_ip6[3], orig.ip[3]);
        }
        write_volatile(&mut (*sa).user_port, orig.port as u32);
    }
    count(Counter::GetpeernameRewritten);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn tern_peername4(ctx: SockAddrContext) -> i32 {
    rewrite_peer(&ctx, true)
}

#[cgroup_sock_addr(getpeername6)]
pub fn tern_peername6(ctx: SockAddrContext) -> i32 {
    rewrite_peer(&ctx, false)
}

#[sk_lookup]
pub fn tern_inbound(ctx: SkLookupContext) -> u32 {
    // SAFETY: reading this program's own context.
    let (family, protocol, port, local_ip4, local_ip6, remote_ip4, remote_ip6) = unsafe {
        let l = &*ctx.lookup;
        (
            l.family,
            l.protocol,
            l.local_port as u16,
            l.local_ip4,
            l.local_ip6,
            l.remote_ip4,
            l.remote_ip6,
        )
    };
    if protocol != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }
    let Some(cfg) = config() else {
        return sk_action::SK_PASS;
    };
    // SAFETY: reading a plain value from a hash map.
    let mark = unsafe { INBOUND_PORTS.get(&port) }.copied();
    let captured = if cfg.flags & flags::INBOUND_ALL_PORTS != 0 {
        mark != Some(INBOUND_PORT_EXCLUDE)
    } else {
        mark == Some(INBOUND_PORT_CAPTURE)
    };
    if !captured {
        return sk_action::SK_PASS;
    }
    let v4 = family == AF_INET as u32;
    let loopback = if v4 {
        (u32::from_be(local_ip4) >> 24) == 127
    } else {
        local_ip6 == [0, 0, 0, u32::from_be(1)] || is_v4_mapped(&local_ip6)
    };
    // The proxy reaches the application from 127.0.0.6, or over IPv6 from the Pod's own
    // address (the destination itself).
    let own = if v4 {
        u32::from_be(remote_ip4) == INBOUND_PASSTHROUGH_SRC
    } else {
        remote_ip6 == local_ip6
    };
    if loopback || own {
        count(Counter::InboundSkipped);
        return sk_action::SK_PASS;
    }
    let from_node = if v4 {
        cfg.flags & flags::NODE_IP4 != 0 && remote_ip4 == cfg.node_ip4
    } else {
        cfg.flags & flags::NODE_IP6 != 0 && remote_ip6 == cfg.node_ip6
    };
    if from_node {
        count(Counter::InboundSkippedNode);
        return sk_action::SK_PASS;
    }
    let slot = if v4 {
        LISTENER_INBOUND_V4
    } else {
        LISTENER_INBOUND_V6
    };
    // Inbound never fails open: without the proxy's socket (tern down, restarting, exited)
    // a captured port refuses connections rather than skip TLS and authorization.
    match LISTENERS.redirect_sk_lookup(&ctx, slot, 0) {
        Ok(()) => {
            count(Counter::InboundRedirected);
            sk_action::SK_PASS
        }
        Err(_) => {
            count(Counter::InboundRefused);
            sk_action::SK_DROP
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
