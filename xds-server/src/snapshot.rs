//! What the server serves: resources by type and name, each with a version derived from its
//! bytes, so the same input gives the same versions in every process (a restarted server does
//! not make its clients rebuild anything). A snapshot made [`Snapshot::since`] its predecessor
//! also knows which names of each type changed, so that streams compare only those.
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
    /// Shared by every snapshot and client that holds the resource.
    pub name: Arc<str>,
    pub version: Arc<str>,
    pub body: Any,
}

impl Resource {
    pub fn new(name: impl Into<Arc<str>>, body: Any) -> Self {
        let hash = fnv1a(
            body.type_url
                .bytes()
                .chain([0])
                .chain(body.value.iter().copied()),
            FNV_OFFSET,
        );
        Self {
            name: name.into(),
            version: format!("{hash:016x}").into(),
            body,
        }
    }
}

/// The resources of one type, and the version of the set (for state-of-the-world responses).
#[derive(Clone, Debug, Default)]
pub struct TypeResources {
    pub version: String,
    pub resources: BTreeMap<Arc<str>, Arc<Resource>>,
    /// The names added, changed or removed since the set of the previous snapshot, and that
    /// set's version; `None` when not known.
    changed: Option<(String, Vec<Arc<str>>)>,
}

impl PartialEq for TypeResources {
    /// The same resources (what changed since an earlier set is no part of a set's identity).
    fn eq(&self, other: &Self) -> bool {
        self.version == other.version && self.resources == other.resources
    }
}

impl TypeResources {
    fn new(resources: BTreeMap<Arc<str>, Arc<Resource>>) -> Self {
        let mut hash = FNV_OFFSET;
        for r in resources.values() {
            hash = fnv1a(r.name.bytes().chain([0]), hash);
            hash = fnv1a(r.version.bytes().chain([0]), hash);
        }
        Self {
            version: format!("{hash:016x}"),
            resources,
            changed: None,
        }
    }
}

/// The names in either map whose resources differ (by version; the same `Arc` is the same).
fn changed_names(
    old: &BTreeMap<Arc<str>, Arc<Resource>>,
    new: &BTreeMap<Arc<str>, Arc<Resource>>,
) -> Vec<Arc<str>> {
    let mut changed = Vec::new();
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return changed,
            (Some((name, _)), None) => {
                changed.push((*name).clone());
                a.next();
            }
            (None, Some((name, _))) => {
                changed.push((*name).clone());
                b.next();
            }
            (Some((x, rx)), Some((y, ry))) => match x.cmp(y) {
                std::cmp::Ordering::Less => {
                    changed.push((*x).clone());
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    changed.push((*y).clone());
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if !Arc::ptr_eq(rx, ry) && rx.version != ry.version {
                        changed.push((*x).clone());
                    }
                    a.next();
                    b.next();
                }
            },
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
        Self::of(
            resources
                .into_iter()
                .map(|(name, body)| Arc::new(Resource::new(name, body))),
        )
    }

    /// A snapshot of these resources (already versioned, perhaps shared with other
    /// snapshots); a later one of the same type and name replaces an earlier one.
    pub fn of(resources: impl IntoIterator<Item = Arc<Resource>>) -> Self {
        let mut by_type: BTreeMap<String, BTreeMap<Arc<str>, Arc<Resource>>> = BTreeMap::new();
        for r in resources {
            by_type
                .entry(r.body.type_url.clone())
                .or_default()
                .insert(r.name.clone(), r);
        }
        Self {
            types: by_type
                .into_iter()
                .map(|(t, r)| (t, TypeResources::new(r)))
                .collect(),
        }
    }

    /// This snapshot, knowing which names of each type changed since `previous`.
    pub fn since(mut self, previous: &Snapshot) -> Self {
        let empty = BTreeMap::new();
        for (type_url, now) in &mut self.types {
            let before = previous.types.get(type_url);
            let names = if before.is_some_and(|b| b.version == now.version) {
                Vec::new()
            } else {
                changed_names(before.map_or(&empty, |b| &b.resources), &now.resources)
            };
            now.changed = Some((previous.version(type_url).to_owned(), names));
        }
        // A type that is gone entirely: every name it had changed.
        for (type_url, before) in &previous.types {
            if !self.types.contains_key(type_url) {
                let mut gone = TypeResources::new(BTreeMap::new());
                gone.changed = Some((
                    before.version.clone(),
                    before.resources.keys().cloned().collect(),
                ));
                self.types.insert(type_url.clone(), gone);
            }
        }
        self
    }

    /// The names of `type_url` that changed since its set at `version`, if this snapshot
    /// knows (it does for its predecessor's set, and for its own: nothing).
    pub fn changed_since(&self, type_url: &str, version: &str) -> Option<&[Arc<str>]> {
        if self.version(type_url) == version {
            return Some(&[]);
        }
        match &self.types.get(type_url)?.changed {
            Some((from, names)) if from == version => Some(names),
            _ => None,
        }
    }

    /// Whether both serve the same resources (compared by the versions of their sets).
    pub fn same_as(&self, other: &Snapshot) -> bool {
        let versions = |s: &Snapshot| -> Vec<(String, String)> {
            s.types
                .iter()
                .filter(|(_, t)| !t.resources.is_empty())
                .map(|(u, t)| (u.clone(), t.version.clone()))
                .collect()
        };
        versions(self) == versions(other)
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
        assert_eq!(&*a.get("t", "a").unwrap().version, "566e051943eea1d8");
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
