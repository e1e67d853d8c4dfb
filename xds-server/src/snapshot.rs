//! What the server serves: resources by type and name, each with a version derived from its
//! bytes, so the same input gives the same versions in every process (a restarted server does
//! not make its clients rebuild anything).
use std::{collections::BTreeMap, sync::Arc};

use tern_proto::Any;

/// FNV-1a, 64 bits: a hash that is the same in every build and process (unlike the
/// standard library's, which may change between Rust releases).
fn fnv1a(bytes: impl IntoIterator<Item = u8>, mut hash: u64) -> u64 {
    for b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// The version of an empty set: the hash of nothing.
const EMPTY_VERSION: &str = "cbf29ce484222325";

/// One resource as served: its name, the version of its bytes, and the bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    pub name: String,
    pub version: String,
    pub body: Any,
}

impl Resource {
    pub fn new(name: impl Into<String>, body: Any) -> Self {
        let hash = fnv1a(
            body.type_url
                .bytes()
                .chain([0])
                .chain(body.value.iter().copied()),
            FNV_OFFSET,
        );
        Self {
            name: name.into(),
            version: format!("{hash:016x}"),
            body,
        }
    }
}

/// The resources of one type, and the version of the set (for state-of-the-world responses).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TypeResources {
    pub version: String,
    pub resources: BTreeMap<String, Arc<Resource>>,
}

impl TypeResources {
    fn new(resources: BTreeMap<String, Arc<Resource>>) -> Self {
        let mut hash = FNV_OFFSET;
        for r in resources.values() {
            hash = fnv1a(r.name.bytes().chain([0]), hash);
            hash = fnv1a(r.version.bytes().chain([0]), hash);
        }
        Self {
            version: format!("{hash:016x}"),
            resources,
        }
    }
}

/// Every resource served to one kind of client, by type URL.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    types: BTreeMap<String, TypeResources>,
}

impl Snapshot {
    /// A snapshot of these resources (type URL, name, body); a later one of the same type and
    /// name replaces an earlier one.
    pub fn new(resources: impl IntoIterator<Item = (String, Any)>) -> Self {
        let mut by_type: BTreeMap<String, BTreeMap<String, Arc<Resource>>> = BTreeMap::new();
        for (name, body) in resources {
            by_type
                .entry(body.type_url.clone())
                .or_default()
                .insert(name.clone(), Arc::new(Resource::new(name, body)));
        }
        Self {
            types: by_type
                .into_iter()
                .map(|(t, r)| (t, TypeResources::new(r)))
                .collect(),
        }
    }

    /// The version of the set of resources of `type_url` (that of an empty set when none).
    pub fn version(&self, type_url: &str) -> &str {
        self.types
            .get(type_url)
            .map_or(EMPTY_VERSION, |t| &t.version)
    }

    pub fn get(&self, type_url: &str, name: &str) -> Option<&Arc<Resource>> {
        self.types.get(type_url)?.resources.get(name)
    }

    /// Every resource of `type_url`, by name.
    pub fn of_type(&self, type_url: &str) -> impl Iterator<Item = &Arc<Resource>> {
        self.types
            .get(type_url)
            .into_iter()
            .flat_map(|t| t.resources.values())
    }

    /// How many resources of each type.
    pub fn counts(&self) -> BTreeMap<&str, usize> {
        self.types
            .iter()
            .map(|(t, r)| (t.as_str(), r.resources.len()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(type_url: &str, value: &[u8]) -> Any {
        Any {
            type_url: type_url.into(),
            value: value.to_vec(),
        }
    }

    #[test]
    fn versions_follow_the_bytes_and_nothing_else() {
        let a = Snapshot::new([
            ("a".to_owned(), any("t", b"1")),
            ("b".to_owned(), any("t", b"2")),
        ]);
        let again = Snapshot::new([
            ("b".to_owned(), any("t", b"2")),
            ("a".to_owned(), any("t", b"1")),
        ]);
        assert_eq!(a, again, "the order of the input does not matter");
        // Fixed values: the same in every process and build (FNV-1a of `t\0` `1`).
        assert_eq!(a.get("t", "a").unwrap().version, "566e051943eea1d8");
        let changed = Snapshot::new([
            ("a".to_owned(), any("t", b"1")),
            ("b".to_owned(), any("t", b"3")),
        ]);
        assert_eq!(
            changed.get("t", "a").unwrap().version,
            a.get("t", "a").unwrap().version
        );
        assert_ne!(
            changed.get("t", "b").unwrap().version,
            a.get("t", "b").unwrap().version
        );
        assert_ne!(changed.version("t"), a.version("t"));
        assert_eq!(a.version("none"), Snapshot::default().version("t"));
        assert_eq!(EMPTY_VERSION, TypeResources::new(BTreeMap::new()).version);
        assert_eq!(a.counts()["t"], 2);
    }
}
