//! A stand-in for Cilium's socket-level load balancer, for tern's coexistence tests (never
//! loaded by tern): `connect4` translates a service address to a backend from `SERVICES`
//! and remembers the service by socket cookie; `getpeername4` shows the service again.
#![no_std]
#![no_main]

use core::ptr::write_volatile;

use aya_ebpf::{
    EbpfContext,
    helpers::bpf_get_socket_cookie,
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LruHashMap},
    programs::SockAddrContext,
};

/// `(ip << 32) | port`, both as the context holds them (network order).
type Addr = u64;

#[map]
static SERVICES: HashMap<Addr, Addr> = HashMap::with_max_entries(64, 0);

#[map]
static TRANSLATED: LruHashMap<u64, Addr> = LruHashMap::with_max_entries(4096, 0);

#[inline(always)]
fn pack(ip: u32, port: u32) -> Addr {
    ((ip as u64) << 32) | (port as u64 & 0xffff)
}

#[inline(always)]
fn write(ctx: &SockAddrContext, addr: Addr) {
    let sa = ctx.sock_addr;
    // SAFETY: user_ip4 and user_port are writable in connect4 and getpeername4 programs;
    // each is written with its own 4-byte store.
    unsafe {
        write_volatile(&mut (*sa).user_ip4, (addr >> 32) as u32);
        write_volatile(&mut (*sa).user_port, (addr & 0xffff) as u32);
    }
}

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: reading this program's own context.
    let service = unsafe { pack((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    // SAFETY: the value is copied out at once.
    if let Some(backend) = unsafe { SERVICES.get(&service) }.copied() {
        // SAFETY: the cookie helper is allowed for sock_addr programs.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = TRANSLATED.insert(&cookie, &service, 0);
        write(&ctx, backend);
    }
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_peername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the cookie helper is allowed for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    if let Some(service) = unsafe { TRANSLATED.get(&cookie) }.copied() {
        write(&ctx, service);
    }
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
