//! Types shared by tern's kernel programs and the user-space loader.
//!
//! Everything here is `#[repr(C)]` with explicit padding-free layouts, because the kernel
//! programs and the loader read the same bytes from the same maps. Addresses are kept in
//! network byte order as four `u32` words (IPv4 as the v4-mapped IPv6 form `::ffff:a.b.c.d`),
//! so one key type serves both families and a connection made through `connect6` with a
//! v4-mapped address meets the proxy's IPv4 socket under the same key.
#![no_std]

/// Names of the maps in the kernel object; the loader looks them up and pins them by these.
pub mod map_names {
    pub const CONFIG: &str = "CONFIG";
    pub const COUNTERS: &str = "COUNTERS";
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    pub const EXCLUDED_CIDRS: &str = "EXCLUDED_CIDRS";
    pub const INBOUND_PORTS: &str = "INBOUND_PORTS";
    pub const ORIG_BY_SOCKET: &str = "ORIG_BY_SOCKET";
    pub const ORIG_ON_ACCEPTED: &str = "ORIG_ON_ACCEPTED";
    pub const ORIG_BY_TUPLE: &str = "ORIG_BY_TUPLE";
    pub const LISTENERS: &str = "LISTENERS";

    /// Every map, in the order the loader pins them.
    pub const ALL: [&str; 9] = [
        CONFIG,
        COUNTERS,
        EXCLUDED_PORTS,
        EXCLUDED_CIDRS,
        INBOUND_PORTS,
        ORIG_BY_SOCKET,
        ORIG_ON_ACCEPTED,
        ORIG_BY_TUPLE,
        LISTENERS,
    ];
}

/// Names of the programs in the kernel object (also their names in the kernel, ≤ 15 bytes).
pub mod program_names {
    pub const CONNECT4: &str = "tern_connect4";
    pub const CONNECT6: &str = "tern_connect6";
    pub const SOCKOPS: &str = "tern_sockops";
    pub const GETSOCKOPT: &str = "tern_getsockopt";
    pub const GETPEERNAME4: &str = "tern_peername4";
    pub const GETPEERNAME6: &str = "tern_peername6";
    pub const INBOUND: &str = "tern_inbound";

    /// Every program, in attach order: the ones that record state come before the ones that use it.
    pub const ALL: [&str; 7] = [
        SOCKOPS,
        GETSOCKOPT,
        GETPEERNAME4,
        GETPEERNAME6,
        CONNECT4,
        CONNECT6,
        INBOUND,
    ];
}

/// Capacity of the hand-over map: captured connections established on the application's
/// side and not yet on the proxy's (microseconds on loopback, or until the application's
/// socket closes). It is not preallocated, so an idle capture holds only its buckets; a
/// connection that finds it full is not captured (the connect hook runs first and keeps its
/// record in socket storage, so the proxy would get no original destination and close it).
pub const MAX_PENDING_HANDOVERS: u32 = 8_192;
/// Capacity of the exclusion maps (ports, CIDRs) and of the inbound port set; the hash maps
/// among them are not preallocated either, as a Pod lists a handful of ports.
pub const MAX_EXCLUSIONS: u32 = 4_096;

/// `SO_ORIGINAL_DST` (and `IP6T_SO_ORIGINAL_DST`), answered by the getsockopt hook.
pub const SO_ORIGINAL_DST: i32 = 80;
pub const SOL_IP: i32 = 0;
pub const SOL_IPV6: i32 = 41;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Slots of the `LISTENERS` sockmap, where the proxy puts its inbound listening sockets.
pub const LISTENER_INBOUND_V4: u32 = 0;
pub const LISTENER_INBOUND_V6: u32 = 1;

/// Values of the `INBOUND_PORTS` map.
pub const INBOUND_PORT_CAPTURE: u8 = 1;
pub const INBOUND_PORT_EXCLUDE: u8 = 0;

/// Bits of [`Config::flags`].
pub mod flags {
    /// Let outbound connections through while the proxy is not listening (an opt-in for
    /// availability). Inbound never fails open: while the proxy is down it is refused.
    /// (Bit 0, once "fail closed" for both directions, is retired.)
    pub const OUTBOUND_FAIL_OPEN: u32 = 1 << 5;
    /// Capture inbound connections to every port not marked `INBOUND_PORT_EXCLUDE`.
    pub const INBOUND_ALL_PORTS: u32 = 1 << 1;
    /// Skip sockets created by [`super::Config::skip_uid`].
    pub const SKIP_UID: u32 = 1 << 2;
    /// Leave inbound connections from [`super::Config::node_ip4`] alone (kubelet probes).
    pub const NODE_IP4: u32 = 1 << 3;
    /// Leave inbound connections from [`super::Config::node_ip6`] alone (kubelet probes).
    pub const NODE_IP6: u32 = 1 << 4;
}

/// The single entry of the `CONFIG` array: where to send captured connections and what to skip.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// IPv4 address of the outbound listener, network byte order.
    pub outbound_ip4: u32,
    /// IPv6 address of the outbound listener (for native IPv6 destinations), network byte order.
    pub outbound_ip6: [u32; 4],
    /// Port of the outbound listener, host byte order.
    pub outbound_port: u32,
    /// Port of the inbound listener, host byte order (informational: the sockmap holds the socket).
    pub inbound_port: u32,
    /// `SO_MARK` the proxy puts on its own sockets; marked sockets are never redirected.
    pub mark: u32,
    /// uid whose sockets are never redirected, when `flags::SKIP_UID` is set.
    pub skip_uid: u32,
    /// `flags::*`.
    pub flags: u32,
    /// The node's IPv4 address (network order), when `flags::NODE_IP4` is set.
    pub node_ip4: u32,
    /// The node's IPv6 address (network-order words), when `flags::NODE_IP6` is set.
    pub node_ip6: [u32; 4],
}

/// Where an application meant to connect: the destination before the connect hook rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Address, network byte order, IPv4 as v4-mapped IPv6.
    pub ip: [u32; 4],
    /// Port, network byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`: the family the application dialled.
    pub family: u16,
}

/// A captured connection as the application's socket sees it: its own address (`src`) and
/// the proxy's listener it was sent to (`dst`). The proxy's accepted socket sees the same
/// pair reversed, which is how the getsockopt hook finds the entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub src_ip: [u32; 4],
    pub dst_ip: [u32; 4],
    /// Host byte order.
    pub src_port: u16,
    /// Host byte order.
    pub dst_port: u16,
}

/// Key of the `EXCLUDED_CIDRS` LPM trie (after the prefix length): IPv6 bytes, IPv4 v4-mapped.
pub type CidrKey = [u8; 16];

/// Builds the v4-mapped form (`::ffff:a.b.c.d`) of an IPv4 address given in network byte order.
#[inline(always)]
pub const fn v4_mapped(ip4_be: u32) -> [u32; 4] {
    [0, 0, u32::from_be(0x0000_ffff), ip4_be]
}

/// Whether a network-order IPv6 address is v4-mapped; the IPv4 part is word 3.
#[inline(always)]
pub const fn is_v4_mapped(ip6: &[u32; 4]) -> bool {
    ip6[0] == 0 && ip6[1] == 0 && ip6[2] == u32::from_be(0x0000_ffff)
}

/// Indices of the per-CPU `COUNTERS` array. Each hook counts what it decided.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect4/6: sent to the outbound listener.
    ConnectRedirected = 0,
    /// connect4/6: destination is loopback.
    ConnectSkippedLoopback,
    /// connect4/6: the socket carries the proxy's mark.
    ConnectSkippedMark,
    /// connect4/6: the socket belongs to the skipped uid.
    ConnectSkippedUid,
    /// connect4/6: destination port excluded.
    ConnectSkippedPort,
    /// connect4/6: destination address in an excluded CIDR.
    ConnectSkippedCidr,
    /// connect4/6: proxy not listening, the connection went where the application sent it.
    ConnectFailedOpen,
    /// connect4/6: proxy not listening and fail-closed, the connect was refused.
    ConnectRefused,
    /// sockops: original destination tied to the established 4-tuple.
    SockopsRecorded,
    /// sockops: a hand-over left when the application's socket closed before the proxy took it.
    SockopsRemoved,
    /// getsockopt: `SO_ORIGINAL_DST` answered.
    GetsockoptAnswered,
    /// getpeername4/6: the application was shown the address it dialled.
    GetpeernameRewritten,
    /// sk_lookup: steered to the inbound listener.
    InboundRedirected,
    /// sk_lookup: loopback or the proxy's own traffic (from 127.0.0.6, or over IPv6 from the
    /// destination address itself), left alone.
    InboundSkipped,
    /// sk_lookup: no inbound listener, the connection went to the application.
    InboundFailedOpen,
    /// sk_lookup: no inbound listener and fail-closed, the connection was dropped.
    InboundRefused,
    /// sockops: the proxy's accepted socket took the original destination over.
    SockopsHandedOver,
    /// sk_lookup: from the node (kubelet probes), left alone.
    InboundSkippedNode,
}

impl Counter {
    pub const COUNT: u32 = 18;

    /// Every counter with the name it has in `tern capture status` and in metrics.
    pub const ALL: [(Counter, &'static str, &'static str); Self::COUNT as usize] = [
        (Counter::ConnectRedirected, "connect", "redirected"),
        (
            Counter::ConnectSkippedLoopback,
            "connect",
            "skipped_loopback",
        ),
        (Counter::ConnectSkippedMark, "connect", "skipped_mark"),
        (Counter::ConnectSkippedUid, "connect", "skipped_uid"),
        (Counter::ConnectSkippedPort, "connect", "skipped_port"),
        (Counter::ConnectSkippedCidr, "connect", "skipped_cidr"),
        (Counter::ConnectFailedOpen, "connect", "failed_open"),
        (Counter::ConnectRefused, "connect", "refused"),
        (Counter::SockopsRecorded, "sockops", "recorded"),
        (Counter::SockopsRemoved, "sockops", "removed"),
        (Counter::GetsockoptAnswered, "getsockopt", "answered"),
        (Counter::GetpeernameRewritten, "getpeername", "rewritten"),
        (Counter::InboundRedirected, "sk_lookup", "redirected"),
        (Counter::InboundSkipped, "sk_lookup", "skipped"),
        (Counter::InboundFailedOpen, "sk_lookup", "failed_open"),
        (Counter::InboundRefused, "sk_lookup", "refused"),
        (Counter::SockopsHandedOver, "sockops", "handed_over"),
        (Counter::InboundSkippedNode, "sk_lookup", "skipped_node"),
    ];
}

#[cfg(feature = "user")]
#[allow(unsafe_code)] // aya::Pod is an unsafe trait: these types are plain bytes
mod pod {
    // SAFETY: these are `#[repr(C)]`, contain only integers and have no padding bytes
    // (checked by the size assertions below), so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TupleKey {}

    const _: () = assert!(core::mem::size_of::<super::Config>() == 60);
    const _: () = assert!(core::mem::size_of::<super::OrigDst>() == 20);
    const _: () = assert!(core::mem::size_of::<super::TupleKey>() == 36);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_round_trips() {
        let ip = u32::from_be_bytes([10, 1, 2, 3]).to_be();
        let mapped = v4_mapped(ip);
        assert!(is_v4_mapped(&mapped));
        assert_eq!(mapped[3], ip);
        assert!(!is_v4_mapped(&[0, 0, 0, u32::from_be(1)]));
    }

    #[test]
    fn counters_are_indexed_in_order() {
        for (i, (c, _, _)) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
