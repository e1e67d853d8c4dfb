//! Real istiod resources read from files (`tests/python/istio_dump.py` writes them from a
//! `/config_dump`), served as istiod sent them.
use std::collections::{BTreeMap, BTreeSet};

use tern_proto::{
    Any, Cluster, Listener, TcpProxy, build::eds_cluster, cluster_types, encode, listener_types,
    tcp_proxy_types, type_url,
};

use crate::{resources::load_assignment, snapshot::Snapshot};

/// Resources read from dump files, by type URL and name (encoded as istiod sent them).
#[derive(Clone, Debug, Default)]
pub(crate) struct Dumped(pub(crate) BTreeMap<String, BTreeMap<String, Any>>);

impl Dumped {
    /// Reads files of records: type URL, name, body (u16, u16, u32 big-endian lengths).
    pub(crate) fn read(paths: &[String]) -> Result<Self, String> {
        let mut out: BTreeMap<String, BTreeMap<String, Any>> = BTreeMap::new();
        for path in paths {
            let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
            let mut rest = bytes.as_slice();
            while !rest.is_empty() {
                let mut take = |width: usize| -> Result<Vec<u8>, String> {
                    let len = match width {
                        2 => rest
                            .get(..2)
                            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]]))),
                        _ => rest
                            .get(..4)
                            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize),
                    }
                    .ok_or(format!("{path}: truncated"))?;
                    let body = rest
                        .get(width..width + len)
                        .ok_or(format!("{path}: truncated"))?
                        .to_vec();
                    rest = &rest[width + len..];
                    Ok(body)
                };
                let type_url = String::from_utf8(take(2)?).map_err(|e| e.to_string())?;
                let name = String::from_utf8(take(2)?).map_err(|e| e.to_string())?;
                let value = take(4)?;
                out.entry(type_url.clone())
                    .or_default()
                    .insert(name, Any { type_url, value });
            }
        }
        Ok(Self(out))
    }

    fn of(&self, type_url: &str) -> impl Iterator<Item = (&String, &Any)> {
        self.0.get(type_url).into_iter().flatten()
    }

    /// The clusters the dump's listeners send to (tcp_proxy), whether the dump has them or not.
    fn clusters_named_by_listeners(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for (_, any) in self.of(type_url::LISTENER) {
            let Ok(l) = tern_proto::decode::<Listener>(any, type_url::LISTENER) else {
                continue;
            };
            for f in l
                .filter_chains
                .iter()
                .chain(&l.default_filter_chain)
                .flat_map(|c| &c.filters)
            {
                if let Some(listener_types::filter::ConfigType::TypedConfig(a)) = &f.config_type
                    && a.type_url == type_url::TCP_PROXY
                    && let Ok(t) = tern_proto::decode::<TcpProxy>(a, type_url::TCP_PROXY)
                    && let Some(tcp_proxy_types::ClusterSpecifier::Cluster(c)) = t.cluster_specifier
                {
                    names.insert(c);
                }
            }
        }
        names
    }
}

/// The dumps' resources, with what the test supplies: clusters the listeners name but the
/// dump lacks, and endpoints for EDS clusters.
pub(crate) fn from_dumps(s: &Snapshot, type_url: &str, names: &[String]) -> Vec<(String, Any)> {
    let d = &s.dumped;
    if d.0.is_empty() {
        return Vec::new();
    }
    let wanted = |n: &str| names.is_empty() || names.iter().any(|x| x == n);
    let dumped: BTreeMap<&String, Cluster> = d
        .of(type_url::CLUSTER)
        .filter_map(|(n, a)| Some((n, tern_proto::decode(a, type_url::CLUSTER).ok()?)))
        .collect();
    let missing: Vec<String> = d
        .clusters_named_by_listeners()
        .into_iter()
        .filter(|n| !dumped.contains_key(n))
        .collect();
    match type_url {
        type_url::LISTENER => d
            .of(type_url)
            .map(|(n, a)| (n.clone(), a.clone()))
            .collect(),
        type_url::CLUSTER => d
            .of(type_url)
            .map(|(n, a)| (n.clone(), a.clone()))
            .chain(
                missing
                    .iter()
                    .map(|n| (n.clone(), encode(&eds_cluster(n), type_url::CLUSTER))),
            )
            .collect(),
        type_url::CLUSTER_LOAD_ASSIGNMENT => {
            let eds_names = dumped
                .values()
                .filter(|c| {
                    c.cluster_discovery_type == Some(cluster_types::ClusterDiscoveryType::Type(3))
                })
                .map(|c| {
                    c.eds_cluster_config
                        .as_ref()
                        .map(|e| e.service_name.clone())
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| c.name.clone())
                })
                .chain(missing);
            let held: BTreeMap<&String, &Any> = d.of(type_url).collect();
            eds_names
                .filter(|n| wanted(n))
                .filter_map(|n| {
                    let any = match (s.endpoints.get(&n), held.get(&n)) {
                        (Some(eps), _) => encode(&load_assignment(&n, eps), type_url),
                        (None, Some(any)) => (*any).clone(),
                        (None, None) if !s.dump_endpoints.is_empty() => {
                            encode(&load_assignment(&n, &s.dump_endpoints), type_url)
                        }
                        (None, None) => return None,
                    };
                    Some((n, any))
                })
                .collect()
        }
        _ => Vec::new(),
    }
}
