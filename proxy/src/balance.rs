//! Per-request load balancing over a cluster's endpoints.
//!
//! An [`EndpointPicker`] is built once per configuration snapshot (schedules, rings and tables
//! are precomputed there) and then picks without locks: round robin is an atomic cursor over
//! a weighted schedule (built earliest-deadline-first, in O(n log n)), random draws by weight
//! in O(log n) (a binary search over running totals), least request is the
//! power of two such draws, between two different endpoints, by in-flight count times latency
//! (linkerd2-proxy's peak EWMA, see [`crate::latency`]; latencies under 10 ms weigh the same,
//! so between endpoints that answer in time the counts decide, as in Envoy; counts alone kept
//! sending to a server that accepts and never answers whenever both choices fell on it),
//! ring hash and Maglev map a request's hash
//! key to an endpoint exactly as Envoy does (xxHash64 over the same strings, the same ring
//! and table construction), so tern and Envoy sidecars send one key to one endpoint. Priorities are tried in
//! order: the first level with an available endpoint serves. Within a level an endpoint's
//! share is its weight times its locality's weight, normalised per locality. Endpoints that
//! are UNHEALTHY, DRAINING, ejected by outlier detection, or excluded (already tried for this
//! request) are skipped; if only ejected ones remain, ejection is ignored (Envoy's panic mode)
//! rather than failing every request.
use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap},
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use rand::Rng;
use xxhash_rust::xxh64::xxh64;

use crate::{
    budget::{BufferBudget, Held},
    config::{Endpoint, HashTable, LbPolicy, Target},
};

/// What the picker needs to know about an endpoint at pick time.
pub trait Candidate {
    fn config(&self) -> &Endpoint;
    /// Requests in flight to it now.
    fn active(&self) -> u64;
    /// The latency to weigh it with at `now` (seconds; see [`crate::latency`]).
    fn latency(&self, now: Instant) -> f64;
    /// Ejected by outlier detection now.
    fn ejected(&self) -> bool;
}

/// Weighted draws an endpoint filter may refuse before the draw walks the accepted ones.
const DRAWS: usize = 4;

/// Round-robin schedules longer than this many turns (or 8 per endpoint, if more) are
/// scaled down; weights keep their proportions to within an eighth of a turn.
const SCHEDULE_MAX: u64 = 4_096;

/// Picks endpoints for one cluster; built per snapshot.
#[derive(Debug)]
pub struct EndpointPicker {
    policy: LbPolicy,
    levels: Vec<Level>,
    cursor: AtomicUsize,
    /// What its ring hash or Maglev tables hold of the budget all clusters share.
    _tables: Held,
}

#[derive(Debug)]
struct Level {
    /// Indices of the endpoints at this priority, each with the running total of the
    /// effective weights of the routable ones up to and including it: a weighted draw is a
    /// binary search, and an endpoint that is not routable takes no width.
    members: Vec<(usize, u64)>,
    /// Round robin: endpoint indices interleaved by weight.
    schedule: Vec<u32>,
    /// Ring hash: (point, endpoint index), sorted by point.
    ring: Vec<(u64, usize)>,
    /// Maglev lookup table of endpoint indices.
    maglev: Vec<u32>,
}

/// Hashes a request key (a header value) for ring hash and Maglev: Envoy's xxHash64.
pub fn hash_key(key: &[u8]) -> u64 {
    xxh64(key, 0)
}

/// The hash key of a connection's source, as Envoy's `source_ip` hash policy (Istio's
/// `useSourceIp`) computes it: xxHash64 of the address as text.
pub fn source_hash(ip: IpAddr) -> u64 {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    hash_key(ip.to_string().as_bytes())
}

impl EndpointPicker {
    /// A picker whose tables are bounded only by the cluster's own sizes.
    pub fn new(
        policy: LbPolicy,
        endpoints: &[Endpoint],
        locality_weights: &BTreeMap<Arc<str>, u32>,
        table: &HashTable,
    ) -> Self {
        let unbounded = BufferBudget::new(usize::MAX);
        Self::within(policy, endpoints, locality_weights, table, &unbounded)
    }

    /// A picker whose ring hash or Maglev tables come out of `tables`, a budget all clusters
    /// share: Envoy bounds each ring, not their sum, and one cluster with weights 1 and
    /// 4294967295 makes an 8 Mi-entry ring. A table the budget cannot take is not built: the
    /// cluster balances at random by weight instead, with a warning (never an allocation that
    /// takes the proxy down).
    pub fn within(
        policy: LbPolicy,
        endpoints: &[Endpoint],
        locality_weights: &BTreeMap<Arc<str>, u32>,
        table: &HashTable,
        tables: &Arc<BufferBudget>,
    ) -> Self {
        let mut held = tables.hold();
        let mut priorities: Vec<u32> = endpoints.iter().map(|e| e.priority).collect();
        priorities.sort_unstable();
        priorities.dedup();
        let levels = priorities
            .into_iter()
            .map(|p| Level::new(policy, endpoints, p, locality_weights, table, &mut held))
            .collect();
        Self {
            policy,
            levels,
            cursor: AtomicUsize::new(0),
            _tables: held,
        }
    }

    /// Picks an endpoint index for a request at `now`; `hash` is the request's hash key (ring
    /// hash, Maglev), `exclude` the endpoints already tried for it. (The caller's clock read:
    /// a request already has one.)
    pub fn pick<C: Candidate>(
        &self,
        endpoints: &[C],
        hash: Option<u64>,
        exclude: &[usize],
        now: Instant,
    ) -> Option<usize> {
        let usable = |i: usize, honour_ejection: bool| {
            let e = &endpoints[i];
            e.config().health.routable()
                && !exclude.contains(&i)
                && !(honour_ejection && e.ejected())
        };
        for honour_ejection in [true, false] {
            let ok = |i: usize| usable(i, honour_ejection);
            // A level with no usable member is passed over by a pass that stops at the first
            // usable one: the policy's own search would walk its whole schedule or ring (up
            // to millions of entries) on every request while a priority is down.
            for level in &self.levels {
                if !level.members.iter().any(|&(i, _)| ok(i)) {
                    continue;
                }
                return self.pick_in(level, endpoints, hash, &ok, now);
            }
        }
        None
    }

    fn pick_in<C: Candidate>(
        &self,
        level: &Level,
        endpoints: &[C],
        hash: Option<u64>,
        ok: &dyn Fn(usize) -> bool,
        now: Instant,
    ) -> Option<usize> {
        match (self.policy, hash) {
            (LbPolicy::RingHash, Some(h)) if !level.ring.is_empty() => {
                let start = level.ring.partition_point(|&(p, _)| p < h);
                (0..level.ring.len())
                    .map(|k| level.ring[(start + k) % level.ring.len()].1)
                    .find(|&i| ok(i))
            }
            (LbPolicy::Maglev, Some(h)) if !level.maglev.is_empty() => {
                let n = level.maglev.len();
                let start = usize::try_from(h % n as u64).unwrap_or(0);
                (0..n)
                    .map(|k| level.maglev[(start + k) % n] as usize)
                    .find(|&i| ok(i))
            }
            (LbPolicy::RoundRobin, _) if !level.schedule.is_empty() => {
                let n = level.schedule.len();
                let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|k| level.schedule[(start + k) % n] as usize)
                    .find(|&i| ok(i))
            }
            (LbPolicy::LeastRequest, _) => {
                let a = level.draw(ok)?;
                let index = |at: usize| level.members[at].0;
                // Another draw is another endpoint but for the heaviest few: draw again
                // before drawing among the others only.
                let b = (0..3)
                    .filter_map(|_| level.draw(ok))
                    .find(|&b| b != a)
                    .or_else(|| level.draw(&|i| i != index(a) && ok(i)));
                let Some(b) = b else {
                    return Some(index(a));
                };
                let alike = crate::latency::ALIKE.as_secs_f64();
                let cost = |at: usize| {
                    let e = &endpoints[index(at)];
                    let active = e.active();
                    e.latency(now).max(alike) * (active + 1) as f64 / level.weight_at(at) as f64
                };
                Some(index(if cost(b) < cost(a) { b } else { a }))
            }
            // Random, and hash policies for requests without a hash key.
            _ => level.draw(ok).map(|at| level.members[at].0),
        }
    }
}

/// The cluster for one request or connection: weighted clusters pick by weight.
pub fn cluster_of(target: &Target) -> &str {
    match target {
        Target::Cluster(c) => c,
        // Validation refuses weights that are all zero; the first is the fallback anyway.
        Target::Weighted(w) => {
            weighted_pick(w.iter().map(|(c, weight)| (c.as_str(), *weight))).unwrap_or(&w[0].0)
        }
    }
}

/// Picks one item at random in proportion to its weight; `None` when every weight is zero.
pub fn weighted_pick<T: Copy>(items: impl Iterator<Item = (T, u32)> + Clone) -> Option<T> {
    let total: u64 = items.clone().map(|(_, w)| u64::from(w)).sum();
    if total == 0 {
        return None;
    }
    let mut r = rand::rng().random_range(0..total);
    for (item, w) in items {
        if r < u64::from(w) {
            return Some(item);
        }
        r -= u64::from(w);
    }
    None
}

impl Level {
    fn new(
        policy: LbPolicy,
        endpoints: &[Endpoint],
        priority: u32,
        locality_weights: &BTreeMap<Arc<str>, u32>,
        table: &HashTable,
        held: &mut Held,
    ) -> Self {
        let indices: Vec<usize> = (0..endpoints.len())
            .filter(|&i| endpoints[i].priority == priority)
            .collect();
        // Effective weight: endpoint weight × locality weight, normalised within the locality.
        let mut per_locality: BTreeMap<&str, u64> = BTreeMap::new();
        for &i in &indices {
            *per_locality.entry(&endpoints[i].locality).or_default() +=
                u64::from(endpoints[i].weight);
        }
        let uses_localities = !locality_weights.is_empty() && per_locality.len() > 1;
        let weighted: Vec<(usize, u32)> = indices
            .iter()
            .map(|&i| {
                let e = &endpoints[i];
                let w = if uses_localities {
                    // In u128: 1000 × u32 × u32 does not fit u64.
                    let lw = u128::from(*locality_weights.get(&*e.locality).unwrap_or(&1));
                    let share = 1000 * lw * u128::from(e.weight)
                        / u128::from(per_locality[&*e.locality].max(1));
                    u32::try_from(share.max(1)).unwrap_or(u32::MAX)
                } else {
                    e.weight.max(1)
                };
                (i, w)
            })
            .collect();
        // Configured health is known now: unroutable endpoints stay out of schedules and
        // tables, so skipping them cannot skew the rotation.
        let routable: Vec<usize> = indices
            .iter()
            .copied()
            .filter(|&i| endpoints[i].health.routable())
            .collect();
        let mut total = 0;
        let members = weighted
            .iter()
            .map(|&(i, w)| {
                if endpoints[i].health.routable() {
                    total += u64::from(w);
                }
                (i, total)
            })
            .collect();
        let mut level = Self {
            schedule: Vec::new(),
            ring: Vec::new(),
            maglev: Vec::new(),
            members,
        };
        match policy {
            LbPolicy::RoundRobin => {
                let turns: Vec<(usize, u32)> = weighted
                    .into_iter()
                    .filter(|&(i, _)| endpoints[i].health.routable())
                    .collect();
                level.schedule = schedule(&turns);
            }
            LbPolicy::RingHash | LbPolicy::Maglev => {
                let weights = if uses_localities {
                    normalized_by_locality(&routable, endpoints, locality_weights)
                } else {
                    normalized(&routable, endpoints, 1.0)
                };
                let bytes = if policy == LbPolicy::RingHash {
                    ring_size(&weights, table) * std::mem::size_of::<(u64, usize)>()
                } else {
                    usize::try_from(table.maglev_table_size.max(2))
                        .unwrap_or(usize::MAX)
                        .saturating_mul(std::mem::size_of::<u32>())
                };
                if let Err(e) = held.grow(bytes) {
                    tracing::warn!(bytes, error = %e, ?policy, "hash table not built: the cluster balances at random by weight");
                } else if policy == LbPolicy::RingHash {
                    level.ring = ring(&weights, endpoints, table);
                } else {
                    level.maglev = maglev(&weights, endpoints, table.maglev_table_size);
                }
            }
            LbPolicy::LeastRequest | LbPolicy::Random => {}
        }
        level
    }

    /// The effective weight of the member at `at` (0 when it is not routable).
    fn weight_at(&self, at: usize) -> u64 {
        let before = at.checked_sub(1).map_or(0, |b| self.members[b].1);
        self.members[at].1 - before
    }

    /// A member (its position) drawn in proportion to its weight among the endpoints `ok`
    /// accepts. A draw over all routable members that `ok` refuses is drawn again (so the
    /// draw it accepts is still in proportion among the accepted ones); after a few refusals
    /// the accepted ones are walked instead. O(log n) while few are refused.
    fn draw(&self, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        let total = self.members.last().map_or(0, |&(_, end)| end);
        if total == 0 {
            return None;
        }
        let mut rng = rand::rng();
        for _ in 0..DRAWS {
            let r = rng.random_range(0..total);
            let at = self.members.partition_point(|&(_, end)| end <= r);
            if ok(self.members[at].0) {
                return Some(at);
            }
        }
        let accepted = (0..self.members.len()).filter(|&at| ok(self.members[at].0));
        weighted_pick(
            accepted.map(|at| (at, u32::try_from(self.weight_at(at)).unwrap_or(u32::MAX))),
        )
    }
}

/// Weighted round robin unrolled into a schedule, earliest deadline first: every endpoint
/// is due again `1/weight` after its last turn, so weights interleave instead of bunching
/// and equal weights give plain rotation. Long schedules are scaled down.
fn schedule(members: &[(usize, u32)]) -> Vec<u32> {
    let total: u64 = members.iter().map(|&(_, w)| u64::from(w)).sum();
    if total == 0 {
        return Vec::new();
    }
    let longest = SCHEDULE_MAX.max(8 * members.len() as u64);
    let scale = (total as f64 / longest as f64).max(1.0);
    let index = |i: usize| u32::try_from(i).unwrap_or(u32::MAX);
    let weights: Vec<u64> = members
        .iter()
        .map(|&(_, w)| ((f64::from(w) / scale).round() as u64).max(1))
        .collect();
    if weights.iter().all(|&w| w == weights[0]) {
        return members.iter().map(|&(i, _)| index(i)).collect();
    }
    let turns: u64 = weights.iter().sum();
    // Deadlines as exact fractions k/w compared by cross-multiplication (no float drift):
    // (numerator, weight, member); ties go to the earlier member.
    let mut heap: BinaryHeap<Reverse<Due>> = weights
        .iter()
        .enumerate()
        .map(|(k, &w)| {
            Reverse(Due {
                turn: 1,
                weight: w,
                member: k,
            })
        })
        .collect();
    let mut out = Vec::with_capacity(usize::try_from(turns).unwrap_or(0));
    for _ in 0..turns {
        let Some(Reverse(due)) = heap.pop() else {
            break;
        };
        out.push(index(members[due.member].0));
        heap.push(Reverse(Due {
            turn: due.turn + 1,
            ..due
        }));
    }
    out
}

/// When a member of a schedule is next due: at `turn / weight`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Due {
    turn: u64,
    weight: u64,
    member: usize,
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (u128::from(self.turn) * u128::from(other.weight))
            .cmp(&(u128::from(other.turn) * u128::from(self.weight)))
            .then(self.member.cmp(&other.member))
    }
}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Envoy's host weights normalised to sum to `share` (`normalizeHostWeights`).
fn normalized(members: &[usize], endpoints: &[Endpoint], share: f64) -> Vec<(usize, f64)> {
    let sum: u64 = members
        .iter()
        .map(|&i| u64::from(endpoints[i].weight))
        .sum();
    members
        .iter()
        .map(|&i| {
            let w = f64::from(endpoints[i].weight) * share / (sum.max(1) as f64);
            (i, w)
        })
        .collect()
}

/// Envoy's locality-weighted normalisation: each locality gets its share of the weights
/// (`normalizeLocalityWeights`), split among its endpoints by weight.
fn normalized_by_locality(
    members: &[usize],
    endpoints: &[Endpoint],
    locality_weights: &BTreeMap<Arc<str>, u32>,
) -> Vec<(usize, f64)> {
    let mut localities: Vec<&str> = Vec::new();
    for &i in members {
        if !localities.contains(&&*endpoints[i].locality) {
            localities.push(&endpoints[i].locality);
        }
    }
    let weight = |l: &str| u64::from(*locality_weights.get(l).unwrap_or(&1));
    let sum: u64 = localities.iter().map(|l| weight(l)).sum();
    if sum == 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    for l in localities {
        let in_locality: Vec<usize> = members
            .iter()
            .copied()
            .filter(|&i| &*endpoints[i].locality == l)
            .collect();
        out.extend(normalized(
            &in_locality,
            endpoints,
            weight(l) as f64 / sum as f64,
        ));
    }
    out
}

/// Envoy's ring: the least-weighted host gets a whole number of points, `minimum_ring_size`
/// in all at least (`maximum_ring_size` at most); point k of a host is the xxHash64 of
/// `"<address>_<k>"`.
fn ring(weights: &[(usize, f64)], endpoints: &[Endpoint], table: &HashTable) -> Vec<(u64, usize)> {
    let Some(scale) = ring_scale(weights, table) else {
        return Vec::new();
    };
    let mut ring = Vec::with_capacity(scale.ceil() as usize);
    let (mut current, mut target) = (0.0f64, 0.0f64);
    let mut key = String::new();
    for &(i, w) in weights {
        target += scale * w;
        let mut k = 0u64;
        while current < target {
            use std::fmt::Write;
            key.clear();
            let _ = write!(key, "{}_{k}", endpoints[i].address);
            ring.push((xxh64(key.as_bytes(), 0), i));
            k += 1;
            current += 1.0;
        }
    }
    ring.sort_by_key(|&(point, _)| point);
    ring
}

/// How many points Envoy's ring has for these weights (none: no weight).
fn ring_scale(weights: &[(usize, f64)], table: &HashTable) -> Option<f64> {
    let min = weights
        .iter()
        .map(|&(_, w)| w)
        .filter(|w| *w > 0.0)
        .min_by(f64::total_cmp)?;
    Some(((min * table.minimum_ring_size as f64).ceil() / min).min(table.maximum_ring_size as f64))
}

/// The entries a ring for these weights holds.
fn ring_size(weights: &[(usize, f64)], table: &HashTable) -> usize {
    ring_scale(weights, table).map_or(0, |s| s.ceil() as usize)
}

/// Envoy's Maglev table: hosts in order of their address text, each with an offset and a
/// skip from xxHash64 (seeds 0 and 1), taking turns in proportion to their weight.
fn maglev(weights: &[(usize, f64)], endpoints: &[Endpoint], size: u64) -> Vec<u32> {
    struct Entry {
        index: usize,
        offset: u64,
        skip: u64,
        weight: f64,
        target: f64,
        next: u64,
    }
    let size = size.max(2);
    let Some(max) = weights.iter().map(|&(_, w)| w).max_by(f64::total_cmp) else {
        return Vec::new();
    };
    if max <= 0.0 {
        return Vec::new();
    }
    let mut keyed: Vec<(String, usize, f64)> = weights
        .iter()
        .map(|&(i, w)| (endpoints[i].address.to_string(), i, w))
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    let mut entries: Vec<Entry> = keyed
        .iter()
        .map(|(key, i, w)| Entry {
            index: *i,
            offset: xxh64(key.as_bytes(), 0) % size,
            skip: xxh64(key.as_bytes(), 1) % (size - 1) + 1,
            weight: *w,
            target: 0.0,
            next: 0,
        })
        .collect();
    let Ok(len) = usize::try_from(size) else {
        return Vec::new();
    };
    let mut table = vec![u32::MAX; len];
    let mut filled = 0usize;
    let mut iteration = 1u64;
    while filled < len {
        for e in entries.iter_mut() {
            if filled == len {
                break;
            }
            if (iteration as f64) * e.weight < e.target {
                continue;
            }
            e.target += max;
            loop {
                let slot = ((e.offset + e.skip.wrapping_mul(e.next)) % size) as usize;
                e.next += 1;
                if table[slot] == u32::MAX {
                    table[slot] = u32::try_from(e.index).unwrap_or(u32::MAX);
                    filled += 1;
                    break;
                }
            }
        }
        iteration += 1;
    }
    table
}

#[cfg(test)]
mod tests {
    use std::{cell::Cell, collections::HashMap};

    use super::*;
    use crate::config::Health;

    struct Fake {
        config: Endpoint,
        active: Cell<u64>,
        latency: Cell<f64>,
        ejected: bool,
    }

    impl Candidate for Fake {
        fn config(&self) -> &Endpoint {
            &self.config
        }
        fn active(&self) -> u64 {
            self.active.get()
        }
        fn latency(&self, _: Instant) -> f64 {
            self.latency.get()
        }
        fn ejected(&self) -> bool {
            self.ejected
        }
    }

    fn ep(n: u8, weight: u32, priority: u32, locality: &str, health: Health) -> Endpoint {
        Endpoint {
            address: ([10, 0, 0, n], 9090).into(),
            weight,
            priority,
            locality: locality.into(),
            health,
            metadata: None,
        }
    }

    #[test]
    fn hash_tables_share_one_bound_and_degrade_to_weighted_random() {
        let budget = BufferBudget::new(1 << 20);
        // Weights 1 and u32::MAX: Envoy's ring would take its 8 Mi-entry maximum (128 MiB).
        let skewed = [
            ep(1, 1, 0, "", Health::Healthy),
            ep(2, u32::MAX, 0, "", Health::Healthy),
        ];
        let table = HashTable::default();
        let p = EndpointPicker::within(
            LbPolicy::RingHash,
            &skewed,
            &BTreeMap::new(),
            &table,
            &budget,
        );
        assert!(p.levels[0].ring.is_empty(), "the ring was built");
        assert_eq!(budget.used(), 0);
        let fakes: Vec<Fake> = skewed
            .iter()
            .map(|e| Fake {
                config: e.clone(),
                active: Cell::new(0),
                latency: Cell::new(1e-3),
                ejected: false,
            })
            .collect();
        assert!(
            p.pick(&fakes, Some(42), &[], Instant::now()).is_some(),
            "still balances"
        );
        // Maglev tables (65,537 × 4 bytes each): three fit in 1 MiB, the fourth does not.
        let eps = [
            ep(1, 1, 0, "", Health::Healthy),
            ep(2, 1, 0, "", Health::Healthy),
        ];
        let built: Vec<EndpointPicker> = (0..4)
            .map(|_| {
                EndpointPicker::within(LbPolicy::Maglev, &eps, &BTreeMap::new(), &table, &budget)
            })
            .collect();
        let tables = built
            .iter()
            .filter(|p| !p.levels[0].maglev.is_empty())
            .count();
        assert_eq!(tables, 3);
        drop(built);
        assert_eq!(budget.used(), 0, "freed with the pickers");
    }

    #[test]
    fn the_largest_weights_do_not_overflow() {
        let eps = vec![
            ep(1, u32::MAX, 0, "a", Health::Healthy),
            ep(2, u32::MAX, 0, "b", Health::Healthy),
        ];
        let weights = BTreeMap::from([(Arc::from("a"), u32::MAX), (Arc::from("b"), 1)]);
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::Random,
            LbPolicy::LeastRequest,
        ] {
            let p = EndpointPicker::new(policy, &eps, &weights, &HashTable::default());
            assert!(
                p.pick(&fakes(&eps), None, &[], Instant::now()).is_some(),
                "{policy:?}"
            );
        }
    }

    fn fakes(eps: &[Endpoint]) -> Vec<Fake> {
        eps.iter()
            .map(|e| Fake {
                config: e.clone(),
                active: Cell::new(0),
                latency: Cell::new(1e-3),
                ejected: false,
            })
            .collect()
    }

    fn counts(picker: &EndpointPicker, f: &[Fake], n: usize) -> HashMap<usize, usize> {
        let mut c = HashMap::new();
        for _ in 0..n {
            *c.entry(picker.pick(f, None, &[], Instant::now()).unwrap())
                .or_default() += 1;
        }
        c
    }

    #[test]
    fn round_robin_spreads_evenly() {
        let eps: Vec<_> = (1..=3).map(|n| ep(n, 1, 0, "", Health::Healthy)).collect();
        let p = EndpointPicker::new(
            LbPolicy::RoundRobin,
            &eps,
            &BTreeMap::new(),
            &HashTable::default(),
        );
        let c = counts(&p, &fakes(&eps), 300);
        assert_eq!(c, HashMap::from([(0, 100), (1, 100), (2, 100)]));
    }

    #[test]
    fn weights_unhealthy_and_draining_endpoints() {
        let eps = vec![
            ep(1, 1, 0, "", Health::Healthy),
            ep(2, 3, 0, "", Health::Unknown),
            ep(3, 5, 0, "", Health::Unhealthy),
            ep(4, 5, 0, "", Health::Draining),
        ];
        let p = EndpointPicker::new(
            LbPolicy::RoundRobin,
            &eps,
            &BTreeMap::new(),
            &HashTable::default(),
        );
        let c = counts(&p, &fakes(&eps), 400);
        assert_eq!(c, HashMap::from([(0, 100), (1, 300)]));
    }

    #[test]
    fn lower_priorities_serve_only_when_higher_ones_cannot() {
        let eps = vec![
            ep(1, 1, 0, "", Health::Unhealthy),
            ep(2, 1, 1, "", Health::Healthy),
        ];
        let p = EndpointPicker::new(
            LbPolicy::Random,
            &eps,
            &BTreeMap::new(),
            &HashTable::default(),
        );
        assert_eq!(p.pick(&fakes(&eps), None, &[], Instant::now()), Some(1));
        let eps = vec![
            ep(1, 1, 0, "", Health::Healthy),
            ep(2, 1, 1, "", Health::Healthy),
        ];
        let p = EndpointPicker::new(
            LbPolicy::Random,
            &eps,
            &BTreeMap::new(),
            &HashTable::default(),
        );
        assert!((0..100).all(|_| p.pick(&fakes(&eps), None, &[], Instant::now()) == Some(0)));
    }

    #[test]
    fn ejected_and_excluded_endpoints_are_skipped_until_none_is_left() {
        let eps: Vec<_> = (1..=2).map(|n| ep(n, 1, 0, "", Health::Healthy)).collect();
        let mut f = fakes(&eps);
        f[0].ejected = true;
        let p = EndpointPicker::new(
            LbPolicy::RoundRobin,
            &eps,
            &BTreeMap::new(),
            &HashTable::default(),
        );
        assert!((0..10).all(|_| p.pick(&f, None, &[], Instant::now()) == Some(1)));
        assert_eq!(
            p.pick(&f, None, &[1], Instant::now()),
            Some(0),
            "panic mode: ejection ignored"
        );
        assert_eq!(p.pick(&f, None, &[0, 1], Instant::now()), None);
    }

    #[test]
    fn locality_weights_split_traffic_between_zones() {
        let eps = vec![
            ep(1, 1, 0, "a", Health::Healthy),
            ep(2, 1, 0, "a", Health::Healthy),
            ep(3, 1, 0, "b", Health::Healthy),
        ];
        let weights = BTreeMap::from([(Arc::from("a"), 1), (Arc::from("b"), 3)]);
        let p = EndpointPicker::new(LbPolicy::RoundRobin, &eps, &weights, &HashTable::default());
        let c = counts(&p, &fakes(&eps), 800);
        assert_eq!(c[&2], 600, "{c:?}");
        assert_eq!(c[&0] + c[&1], 200, "{c:?}");
    }

    #[test]
    fn random_draws_in_proportion_among_the_endpoints_left() {
        let eps = vec![
            ep(1, 1, 0, "", Health::Healthy),
            ep(2, 3, 0, "", Health::Healthy),
            ep(3, 5, 0, "", Health::Unhealthy),
            ep(4, 5, 0, "", Health::Healthy),
            ep(5, 5, 0, "", Health::Healthy),
        ];
        let mut f = fakes(&eps);
        f[3].ejected = true;
        let p = EndpointPicker::new(
            LbPolicy::Random,
            &eps,
            &BTreeMap::new(),
            &HashTable::default(),
        );
        let n = 40_000;
        let mut c: HashMap<usize, usize> = HashMap::new();
        for _ in 0..n {
            // Most weight is refused here (unhealthy, ejected, excluded): the draws that
            // are refused fall back to walking the rest, in the same proportions.
            *c.entry(p.pick(&f, None, &[4], Instant::now()).unwrap())
                .or_default() += 1;
        }
        assert_eq!(c.len(), 2, "{c:?}");
        let share = c[&1] as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.02, "{c:?}");
    }

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let eps: Vec<_> = (1..=2).map(|n| ep(n, 1, 0, "", Health::Healthy)).collect();
        let f = fakes(&eps);
        f[0].active.set(100);
        let p = EndpointPicker::new(
            LbPolicy::LeastRequest,
            &eps,
            &BTreeMap::new(),
            &HashTable::default(),
        );
        let c = counts(&p, &f, 1000);
        // Two different endpoints are compared: the busy one never wins.
        assert_eq!(c.get(&0), None, "{c:?}");
    }

    #[test]
    fn least_request_weighs_latency_with_the_count() {
        let eps: Vec<_> = (1..=3).map(|n| ep(n, 1, 0, "", Health::Healthy)).collect();
        let f = fakes(&eps);
        let p = EndpointPicker::new(
            LbPolicy::LeastRequest,
            &eps,
            &BTreeMap::new(),
            &HashTable::default(),
        );
        // A server that stopped answering: one request in flight, waiting for seconds.
        f[0].active.set(1);
        f[0].latency.set(5.0);
        // The others answer in 100 µs, with a few requests each.
        for e in &f[1..] {
            e.active.set(3);
            e.latency.set(1e-4);
        }
        let c = counts(&p, &f, 1000);
        assert_eq!(c.get(&0), None, "{c:?}");
        // Equally fast: the count decides.
        f[0].latency.set(1e-4);
        f[0].active.set(0);
        let c = counts(&p, &f, 1000);
        assert!(
            c[&0] > 600,
            "the idle one wins every comparison it is in: {c:?}"
        );
    }

    #[test]
    fn hash_policies_are_consistent_and_move_little() {
        for policy in [LbPolicy::RingHash, LbPolicy::Maglev] {
            let eps: Vec<_> = (1..=4).map(|n| ep(n, 1, 0, "", Health::Healthy)).collect();
            let p = EndpointPicker::new(policy, &eps, &BTreeMap::new(), &HashTable::default());
            let f = fakes(&eps);
            let keys: Vec<u64> = (0..1000).map(|k: i32| hash_key(&k.to_be_bytes())).collect();
            let before: Vec<usize> = keys
                .iter()
                .map(|&h| p.pick(&f, Some(h), &[], Instant::now()).unwrap())
                .collect();
            let again: Vec<usize> = keys
                .iter()
                .map(|&h| p.pick(&f, Some(h), &[], Instant::now()).unwrap())
                .collect();
            assert_eq!(before, again, "{policy:?} is consistent");
            let spread = (0..4)
                .map(|i| before.iter().filter(|&&b| b == i).count())
                .min()
                .unwrap();
            assert!(spread > 150, "{policy:?} spreads keys: {spread}");
            // Removing endpoint 3 moves only its keys.
            let p3 =
                EndpointPicker::new(policy, &eps[..3], &BTreeMap::new(), &HashTable::default());
            let moved = keys
                .iter()
                .zip(&before)
                .filter(|&(&h, &b)| {
                    b != 3 && p3.pick(&f[..3], Some(h), &[], Instant::now()).unwrap() != b
                })
                .count();
            assert!(
                moved < 100,
                "{policy:?} moved {moved} keys that stayed mapped"
            );
        }
    }

    /// Envoy's hosts 127.0.0.1:90 to :95, as its load balancer tests build them.
    fn envoy_hosts(weights: &[u32]) -> Vec<Endpoint> {
        weights
            .iter()
            .enumerate()
            .map(|(k, &w)| Endpoint {
                address: ([127, 0, 0, 1], 90 + k as u16).into(),
                weight: w,
                priority: 0,
                locality: "".into(),
                health: Health::Healthy,
                metadata: None,
            })
            .collect()
    }

    /// The ring of Envoy's `RingHashLoadBalancerTest.Basic` (minimum ring size 12): the
    /// points it lists, and the hosts it expects for its keys.
    #[test]
    fn ring_hash_places_keys_as_envoy_does() {
        let eps = envoy_hosts(&[1; 6]);
        let table = HashTable {
            minimum_ring_size: 12,
            ..HashTable::default()
        };
        let p = EndpointPicker::new(LbPolicy::RingHash, &eps, &BTreeMap::new(), &table);
        let ports: Vec<(u64, u16)> = p.levels[0]
            .ring
            .iter()
            .map(|&(point, i)| (point, eps[i].address.port()))
            .collect();
        assert_eq!(
            ports,
            [
                (833437586790550860, 94),
                (928266305478181108, 92),
                (1033482794131418490, 90),
                (3551244743356806947, 95),
                (3851675632748031481, 93),
                (5583722120771150861, 91),
                (6311230543546372928, 91),
                (7700377290971790572, 93),
                (13144177310400110813, 95),
                (13444792449719432967, 92),
                (15516499411664133160, 94),
                (16117243373044804889, 90),
            ]
        );
        let f = fakes(&eps);
        for (key, host) in [
            (0, 4),
            (u64::MAX, 4),
            (3551244743356806947, 5),
            (3551244743356806948, 3),
            (16117243373044804880, 0),
        ] {
            assert_eq!(
                p.pick(&f, Some(key), &[], Instant::now()),
                Some(host),
                "key {key}"
            );
        }
    }

    /// Envoy's `MaglevLoadBalancerTest.Basic` (table 7) and `.Weighted` (table 17, weights 1
    /// and 2): the host for each key `i` is `table[i % size]`.
    #[test]
    fn maglev_places_keys_as_envoy_does() {
        for (weights, size, expected) in [
            (&[1u32; 6][..], 7, &[2usize, 4, 0, 1, 5, 0, 3][..]),
            (
                &[1, 2][..],
                17,
                &[1, 0, 0, 1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 0, 1][..],
            ),
        ] {
            let eps = envoy_hosts(weights);
            let table = HashTable {
                maglev_table_size: size,
                ..HashTable::default()
            };
            let p = EndpointPicker::new(LbPolicy::Maglev, &eps, &BTreeMap::new(), &table);
            let f = fakes(&eps);
            let got: Vec<usize> = (0..size)
                .map(|key| p.pick(&f, Some(key), &[], Instant::now()).unwrap())
                .collect();
            assert_eq!(got, expected, "weights {weights:?}");
        }
    }

    #[test]
    fn source_keys_are_envoys_xxhash_of_the_address_text() {
        // xxHash64 of "10.0.0.1" with seed 0, as Envoy's `source_ip` hash policy computes it.
        assert_eq!(
            source_hash("10.0.0.1".parse().unwrap()),
            xxh64(b"10.0.0.1", 0)
        );
        assert_eq!(
            source_hash("::ffff:10.0.0.1".parse().unwrap()),
            source_hash("10.0.0.1".parse().unwrap())
        );
        // The published xxHash64 test vector for the empty input.
        assert_eq!(hash_key(b""), 0xef46db3751d8e999);
    }

    #[test]
    fn weighted_schedules_interleave_and_scale_linearly() {
        let eps = vec![
            ep(1, 2, 0, "", Health::Healthy),
            ep(2, 3, 0, "", Health::Healthy),
        ];
        let p = EndpointPicker::new(
            LbPolicy::RoundRobin,
            &eps,
            &BTreeMap::new(),
            &HashTable::default(),
        );
        assert_eq!(
            p.levels[0].schedule,
            [1, 0, 1, 0, 1],
            "interleaved, not bunched"
        );
        // 20,000 endpoints of two weights: one turn per weight unit (the bench times it).
        let many: Vec<Endpoint> = (0..20_000u32)
            .map(|n| Endpoint {
                address: (std::net::Ipv4Addr::from(0x0a00_0000 + n), 9090).into(),
                weight: 1 + n % 2,
                priority: 0,
                locality: "".into(),
                health: Health::Healthy,
                metadata: None,
            })
            .collect();
        let p = EndpointPicker::new(
            LbPolicy::RoundRobin,
            &many,
            &BTreeMap::new(),
            &HashTable::default(),
        );
        assert_eq!(p.levels[0].schedule.len(), 30_000);
    }
}
