//! What one stream may hold: its state grows with what its client asks for, so a client that
//! asks for too much is refused (its stream ends with `RESOURCE_EXHAUSTED`), and the server's
//! memory is bounded by these times `--max-clients`.

/// Resource types on one stream (xDS has eight or so).
pub const MAX_TYPES: usize = 16;
/// Names subscribed to one type on one stream (a mesh of 100,000 services is far beyond any
/// istiod's).
pub const MAX_NAMES: usize = 100_000;

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("more than {MAX_TYPES} resource types on one stream")]
    TooManyTypes,
    #[error("more than {MAX_NAMES} names of {type_url} on one stream")]
    TooManyNames { type_url: String },
}

/// Checks a request that would make a stream hold `types` types (`new_type`: one more) and
/// `names` names of `type_url`.
pub(crate) fn check(
    types: usize,
    new_type: bool,
    type_url: &str,
    names: usize,
) -> Result<(), Refused> {
    if new_type && types >= MAX_TYPES {
        return Err(Refused::TooManyTypes);
    }
    if names > MAX_NAMES {
        return Err(Refused::TooManyNames {
            type_url: type_url.to_owned(),
        });
    }
    Ok(())
}
