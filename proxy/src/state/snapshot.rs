//! One immutable configuration with what the data path needs precomputed: listeners indexed
//! by destination, and per cluster its endpoints, picker and live state.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::SystemTime,
};

use crate::{
    balance::{Candidate, EndpointPicker},
    config::{
        ChainMatch, Cluster, Config, DownstreamTls, Endpoint, FilterChain, Listener, Passthrough,
    },
    refusal::Refusal,
    tls::ServerTls,
    upstream::{ClusterRuntime, EndpointRuntime, Failure},
};

/// An endpoint as one snapshot configures it, with its shared live state.
#[derive(Debug)]
pub struct EndpointHandle {
    pub config: Endpoint,
    pub runtime: Arc<EndpointRuntime>,
}

impl Candidate for EndpointHandle {
    fn config(&self) -> &Endpoint {
        &self.config
    }
    fn active(&self) -> u64 {
        self.runtime.active.load(Ordering::Relaxed)
    }
    fn latency(&self, now: std::time::Instant) -> f64 {
        self.runtime.latency.weigh(now, self.active())
    }
    fn ejected(&self) -> bool {
        self.runtime.ejected()
    }
}

/// A cluster in one snapshot. A snapshot that keeps the cluster's configuration unchanged
/// shares this whole value (picker included) with the one before.
#[derive(Debug)]
pub struct ClusterState {
    pub config: Arc<Cluster>,
    pub endpoints: Vec<EndpointHandle>,
    pub picker: EndpointPicker,
    pub runtime: Arc<ClusterRuntime>,
}

impl ClusterState {
    /// A request or connection to `endpoint` succeeded.
    pub fn record_success(&self, endpoint: &EndpointRuntime) {
        endpoint.outlier.success();
    }

    /// A request or connection to `endpoint` failed; outlier detection (where the cluster
    /// asks for it) may eject the endpoint.
    pub fn record_failure(&self, endpoint: &EndpointRuntime, failure: Failure) {
        endpoint.traffic().errors.fetch_add(1, Ordering::Relaxed);
        let Some(config) = &self.config.outlier else {
            return;
        };
        let ejected_now = || {
            self.endpoints
                .iter()
                .filter(|e| e.runtime.ejected())
                .count()
        };
        if let Some(duration) =
            endpoint
                .outlier
                .failure(failure, config, ejected_now, self.endpoints.len())
        {
            tracing::info!(endpoint = %endpoint.address, cluster = %self.config.name, ?duration, ?failure, "ejected after consecutive errors");
        }
    }
}

/// What a connection's original destination selects.
#[derive(Clone, Copy, Debug)]
pub enum Selection<'a> {
    Chain(&'a Listener, &'a FilterChain),
    /// No listener or chain: relay to the original destination.
    Passthrough,
    /// Refused, and why.
    Refused(Refusal),
}

/// The clusters built for the data path, by name: a persistent map, so a snapshot that
/// rebuilds one cluster of 10,000 shares the rest with the snapshot before (neither copies
/// nor frees them).
pub type ClusterStates = imbl::HashMap<Arc<str>, Arc<ClusterState>>;

/// One immutable configuration with everything precomputed for the data path.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub clusters: ClusterStates,
    pub applied_at: SystemTime,
    /// Shared with the snapshot before while listeners do not change (an EDS push).
    pub(super) listeners: Arc<ListenerIndex>,
}

/// The listeners indexed for the data path, and their chains' TLS servers.
#[derive(Debug, Default)]
pub(super) struct ListenerIndex {
    pub(super) exact: HashMap<SocketAddr, usize>,
    pub(super) wildcard: HashMap<u16, usize>,
    /// Listeners by name, for connections that find their chain again in a new snapshot.
    pub(super) by_name: HashMap<String, usize>,
    /// The TLS servers of chains that terminate TLS, by listener, then chain name.
    pub(super) server_tls: HashMap<String, Vec<ChainTls>>,
}

/// A chain's TLS server, or why it could not be built (its connections are refused).
#[derive(Debug, Clone)]
pub struct ChainTls {
    pub chain: String,
    pub config: Arc<DownstreamTls>,
    pub server: Result<Arc<ServerTls>, String>,
}

impl Snapshot {
    pub(super) fn empty() -> Self {
        Snapshot {
            config: Arc::new(Config::default()),
            clusters: ClusterStates::new(),
            applied_at: SystemTime::now(),
            listeners: Arc::default(),
        }
    }

    /// The TLS server of a chain that terminates TLS.
    pub fn server_tls(&self, listener: &str, chain: &str) -> Option<&ChainTls> {
        self.listeners
            .server_tls
            .get(listener)?
            .iter()
            .find(|c| c.chain == chain)
    }

    /// Envoy's listener selection: the listener bound to the destination exactly, else the
    /// wildcard listener on its port; then the most specific filter chain that matches.
    pub fn select(&self, dst: SocketAddr, src: SocketAddr, peeked: &Peeked) -> Selection<'_> {
        match self
            .listener_for(dst)
            .and_then(|l| best_chain(l, dst, src, peeked).map(|c| (l, c)))
        {
            Some((l, c)) => Selection::Chain(l, c),
            None if self.config.passthrough == Passthrough::Deny => {
                Selection::Refused(Refusal::RegistryOnly)
            }
            None => Selection::Passthrough,
        }
    }

    /// The inbound filter chain for a connection to a local port. With no inbound listener
    /// the connection is refused, unless tern runs without a control plane and its static
    /// configuration has no inbound listener (see [`crate::config::NoInbound`]); with one, a connection no
    /// chain matches is refused, as Envoy does.
    pub fn select_inbound(
        &self,
        dst: SocketAddr,
        src: SocketAddr,
        peeked: &Peeked,
    ) -> Selection<'_> {
        let Some(l) = self.config.inbound.as_ref() else {
            return match Refusal::without_inbound(self.config.no_inbound) {
                Some(refusal) => Selection::Refused(refusal),
                None => Selection::Passthrough,
            };
        };
        match best_chain(l, dst, src, peeked) {
            Some(c) => Selection::Chain(l, c),
            None => Selection::Refused(Refusal::NoFilterChain),
        }
    }

    /// The listener an outbound connection to `dst` is matched against.
    fn listener_for(&self, dst: SocketAddr) -> Option<&Listener> {
        self.listeners
            .exact
            .get(&dst)
            .or_else(|| self.listeners.wildcard.get(&dst.port()))
            .map(|&i| &*self.config.listeners[i])
    }

    /// Whether choosing a chain for a connection to `dst` needs its first bytes inspected
    /// (some chain there matches on TLS, ALPN or SNI).
    pub fn needs_inspection(&self, dst: SocketAddr, inbound: bool) -> bool {
        let listener = if inbound {
            self.config.inbound.as_deref()
        } else {
            self.listener_for(dst)
        };
        listener.is_some_and(|l| {
            l.filter_chains.iter().any(|c| {
                let m = &c.matcher;
                (m.destination_port.is_none() || m.destination_port == Some(dst.port()))
                    && (m.transport_protocol.is_some()
                        || !m.application_protocols.is_empty()
                        || !m.server_names.is_empty()
                        // A TLS server selects ALPN from what the client offers.
                        || c.tls.is_some())
            })
        })
    }

    /// A chain by listener and chain name (a connection follows its chain across snapshots).
    pub fn chain(&self, listener: &str, chain: &str) -> Option<&FilterChain> {
        let l = match self.listeners.by_name.get(listener) {
            Some(&i) => &*self.config.listeners[i],
            None => self
                .config
                .inbound
                .as_ref()
                .filter(|l| l.name == listener)?,
        };
        l.filter_chains.iter().find(|c| c.name == chain)
    }
}

fn prefix_len(nets: &[ipnet::IpNet], ip: IpAddr) -> Option<u8> {
    if nets.is_empty() {
        return Some(0);
    }
    nets.iter()
        .filter(|n| n.contains(&ip))
        .map(|n| n.prefix_len() + 1)
        .max()
}

/// What a connection's first bytes said (see `filters::inspect`), for chains that match on
/// them; a connection not inspected is plaintext with no application protocol.
#[derive(Clone, Copy, Debug, Default)]
pub struct Peeked<'a> {
    pub tls: bool,
    pub application_protocols: &'a [String],
    pub server_name: Option<&'a str>,
}

fn server_name_score(names: &[String], sni: Option<&str>) -> Option<usize> {
    if names.is_empty() {
        return Some(0);
    }
    let sni = sni?;
    names
        .iter()
        .filter_map(|n| match n.strip_prefix('*') {
            // `*.example.com` matches `a.example.com`, less specifically than an exact name.
            Some(suffix) => sni.ends_with(suffix).then_some(suffix.len()),
            None => (n == sni).then_some(usize::MAX),
        })
        .max()
}

/// The most specific matching chain, by Envoy's `filter_chain_match` order: destination
/// port, destination prefix, server name, transport protocol, application protocols, then
/// source prefix; the listener's default chain when none matches.
fn best_chain<'l>(
    l: &'l Listener,
    dst: SocketAddr,
    src: SocketAddr,
    peeked: &Peeked,
) -> Option<&'l FilterChain> {
    let unmap = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let (dip, sip) = (unmap(dst.ip()), unmap(src.ip()));
    let best = l
        .filter_chains
        .iter()
        .filter(|c| !c.matcher.default_chain)
        .filter_map(|c| {
            let ChainMatch {
                destination_port,
                destination_prefixes,
                source_prefixes,
                transport_protocol,
                application_protocols,
                server_names,
                default_chain: _,
            } = &c.matcher;
            let port = match destination_port {
                Some(p) if *p != dst.port() => return None,
                Some(_) => 1,
                None => 0,
            };
            let d = prefix_len(destination_prefixes, dip)?;
            let names = server_name_score(server_names, peeked.server_name)?;
            let transport = match transport_protocol.as_deref() {
                None => 0,
                Some("tls") if peeked.tls => 1,
                Some("raw_buffer") if !peeked.tls => 1,
                Some(_) => return None,
            };
            let alpn = if application_protocols.is_empty() {
                0
            } else if application_protocols
                .iter()
                .any(|p| peeked.application_protocols.contains(p))
            {
                1
            } else {
                return None;
            };
            let s = prefix_len(source_prefixes, sip)?;
            Some(((port, d, names, transport, alpn, s), c))
        })
        .max_by_key(|(score, _)| *score)
        .map(|(_, c)| c);
    best.or_else(|| l.filter_chains.iter().find(|c| c.matcher.default_chain))
}
