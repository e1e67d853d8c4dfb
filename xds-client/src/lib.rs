//! tern's xDS client: the Aggregated Discovery Service protocol (state of the world and
//! delta) over gRPC, handing decoded resources to handlers registered per type URL.
//!
//! Empty until the xDS issue: the crate exists now so the workspace layout is fixed.
