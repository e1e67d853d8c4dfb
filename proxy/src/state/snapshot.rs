//! One immutable configuration with what the data path needs precomputed: listeners indexed
//! by destination, and per cluster its endpoints, picker and live state.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::SystemTime,
};

use super::{
    outlier::Failure,
    runtime::{ClusterRuntime, EndpointRuntime},
};
use crate::{
    balance::{Candidate, EndpointPicker},
    config::{ChainMatch, Cluster, Config, Endpoint, FilterChain, Listener, Passthrough},
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
        endpoint.errors.fetch_add(1, Ordering::Relaxed);
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
    /// No listener or chain, and unknown destinations are refused.
    Deny,
}

/// One immutable configuration with everything precomputed for the data path.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub clusters: HashMap<String, Arc<ClusterState>>,
    pub applied_at: SystemTime,
    pub(super) exact: HashMap<SocketAddr, usize>,
    pub(super) wildcard: HashMap<u16, usize>,
}

impl Snapshot {
    pub(super) fn empty() -> Self {
        Snapshot {
            config: Arc::new(Config::default()),
            clusters: HashMap::new(),
            applied_at: SystemTime::now(),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        }
    }

    /// Envoy's listener selection: the listener bound to the destination exactly, else the
    /// wildcard listener on its port; then the most specific filter chain that matches.
    pub fn select(&self, dst: SocketAddr, src: SocketAddr) -> Selection<'_> {
        let listener = self
            .exact
            .get(&dst)
            .or_else(|| self.wildcard.get(&dst.port()))
            .map(|&i| &*self.config.listeners[i]);
        match listener.and_then(|l| best_chain(l, dst, src).map(|c| (l, c))) {
            Some((l, c)) => Selection::Chain(l, c),
            None if self.config.passthrough == Passthrough::Deny => Selection::Deny,
            None => Selection::Passthrough,
        }
    }

    /// The inbound filter chain for a connection to a local port. With no inbound listener
    /// the connection goes to the application; with one, a connection no chain matches is
    /// refused, as Envoy does.
    pub fn select_inbound(&self, dst: SocketAddr, src: SocketAddr) -> Selection<'_> {
        let Some(l) = self.config.inbound.as_ref() else {
            return Selection::Passthrough;
        };
        match best_chain(l, dst, src) {
            Some(c) => Selection::Chain(l, c),
            None => Selection::Deny,
        }
    }

    /// A chain by listener and chain name (a connection follows its chain across snapshots).
    pub fn chain(&self, listener: &str, chain: &str) -> Option<&FilterChain> {
        self.config
            .listeners
            .iter()
            .map(|l| &**l)
            .chain(&self.config.inbound)
            .find(|l| l.name == listener)?
            .filter_chains
            .iter()
            .find(|c| c.name == chain)
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

/// What tern knows of a connection's first bytes when it picks a chain. Until it inspects
/// a ClientHello (as Envoy's tls_inspector does), every connection counts as plaintext with
/// no application protocol, so chains that ask for TLS, an ALPN or a server name never match.
#[derive(Clone, Copy, Debug, Default)]
pub struct Peeked<'a> {
    pub tls: bool,
    pub application_protocols: &'a [&'a str],
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
/// source prefix.
fn best_chain(l: &Listener, dst: SocketAddr, src: SocketAddr) -> Option<&FilterChain> {
    let peeked = Peeked::default();
    let unmap = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let (dip, sip) = (unmap(dst.ip()), unmap(src.ip()));
    l.filter_chains
        .iter()
        .filter_map(|c| {
            let ChainMatch {
                destination_port,
                destination_prefixes,
                source_prefixes,
                transport_protocol,
                application_protocols,
                server_names,
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
                .any(|p| peeked.application_protocols.contains(&p.as_str()))
            {
                1
            } else {
                return None;
            };
            let s = prefix_len(source_prefixes, sip)?;
            Some(((port, d, names, transport, alpn, s), c))
        })
        .max_by_key(|(score, _)| *score)
        .map(|(_, c)| c)
}
