//! A map kept as a sorted vector, for what each client holds: a fleet's clients each hold
//! thousands of names, and a vector of shared names costs half of what a B-tree does per
//! entry. Lookups are binary searches; changes after the first answer are few.
use std::sync::Arc;

/// Names (shared with the snapshot's resources) to values, in name order.
#[derive(Clone, Debug, PartialEq)]
pub struct NameMap<V>(Vec<(Arc<str>, V)>);

impl<V> Default for NameMap<V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<V> NameMap<V> {
    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| (**n).cmp(name))
    }

    pub fn get(&self, name: &str) -> Option<&V> {
        self.find(name).ok().map(|i| &self.0[i].1)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }

    /// Sets `name`'s value; returns whether the name is new.
    pub fn insert(&mut self, name: Arc<str>, value: V) -> bool {
        match self.find(&name) {
            Ok(i) => {
                self.0[i].1 = value;
                false
            }
            Err(i) => {
                self.0.insert(i, (name, value));
                true
            }
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<V> {
        self.find(name).ok().map(|i| self.0.remove(i).1)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(n, _)| &**n)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl<V> FromIterator<(Arc<str>, V)> for NameMap<V> {
    /// The last value of a name given twice wins.
    fn from_iter<I: IntoIterator<Item = (Arc<str>, V)>>(items: I) -> Self {
        let mut v: Vec<(Arc<str>, V)> = items.into_iter().collect();
        v.reverse();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.dedup_by(|a, b| a.0 == b.0);
        Self(v)
    }
}

/// A set of names, in order.
pub type NameSet = NameMap<()>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sorted_vector_behaves_as_a_map() {
        let mut m: NameMap<u32> = [("b".into(), 1), ("a".into(), 2), ("b".into(), 3)]
            .into_iter()
            .collect();
        assert_eq!(m.names().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(m.get("b"), Some(&3), "the last of a name wins");
        assert!(m.insert("c".into(), 4));
        assert!(!m.insert("a".into(), 5));
        assert_eq!(m.get("a"), Some(&5));
        assert_eq!(m.remove("b"), Some(3));
        assert_eq!(m.remove("b"), None);
        assert!(m.contains("c") && !m.contains("b"));
        assert_eq!(m.len(), 2);
    }
}
