//! Envoy's `StringMatcher`: exact, prefix, suffix, contains, and RE2-style regular
//! expressions matched against the whole string.
use std::hash::{Hash, Hasher};

/// A string matcher.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(Regex),
}

impl StringMatch {
    pub fn matches(&self, s: &str) -> bool {
        match self {
            StringMatch::Exact(v) => s == v,
            StringMatch::Prefix(v) => s.starts_with(v.as_str()),
            StringMatch::Suffix(v) => s.ends_with(v.as_str()),
            StringMatch::Contains(v) => s.contains(v.as_str()),
            StringMatch::Regex(r) => r.compiled.is_match(s),
        }
    }
}

/// A regular expression that must match the whole string (Envoy's `safe_regex`). Compared
/// and shown by its pattern.
#[derive(Clone, Debug)]
pub struct Regex {
    pub pattern: String,
    compiled: regex::Regex,
}

/// The largest compiled program a pattern may make (RE2's default program size, roughly).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

impl Regex {
    pub fn new(pattern: &str) -> Result<Self, regex::Error> {
        let compiled = regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
            .size_limit(REGEX_SIZE_LIMIT)
            .build()?;
        Ok(Self {
            pattern: pattern.to_owned(),
            compiled,
        })
    }
}

impl PartialEq for Regex {
    fn eq(&self, other: &Self) -> bool {
        self.pattern == other.pattern
    }
}

impl Eq for Regex {}

impl Hash for Regex {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.pattern.hash(state);
    }
}

impl serde::Serialize for Regex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.pattern)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matchers_as_envoy_has_them() {
        let id = "spiffe://cluster.local/ns/foo/sa/bar";
        assert!(StringMatch::Exact(id.into()).matches(id));
        assert!(StringMatch::Prefix("spiffe://cluster.local/".into()).matches(id));
        assert!(!StringMatch::Prefix("spiffe://other/".into()).matches(id));
        assert!(StringMatch::Suffix("/sa/bar".into()).matches(id));
        assert!(StringMatch::Contains("/ns/foo/".into()).matches(id));
        // istiod's namespace match, and a regex matches the whole string only.
        let ns = StringMatch::Regex(Regex::new(".*/ns/foo/.*").unwrap());
        assert!(ns.matches(id));
        assert!(!StringMatch::Regex(Regex::new("/ns/foo/").unwrap()).matches(id));
        assert!(Regex::new("(").is_err());
    }
}
