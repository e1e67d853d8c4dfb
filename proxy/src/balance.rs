//! Per-request load balancing over a cluster's endpoints.
//!
//! An [`EndpointPicker`] is built once per configuration snapshot (schedules, rings and tables
//! are precomputed there) and then picks without locks: round robin is an atomic cursor over
//! a weighted schedule, least request is the power of two choices on live in-flight counts,
//! ring hash and Maglev map a request's hash key to an endpoint. Priorities are tried in
//! order: the first level with an available endpoint serves. Within a level an endpoint's
//! share is its weight times its locality's weight, normalised per locality. Endpoints that
//! are UNHEALTHY, DRAINING, ejected by outlier detection, or excluded (already tried for this
//! request) are skipped; if only ejected ones remain, ejection is ignored (Envoy's panic mode)
//! rather than failing every request.
use std::{
    collections::BTreeMap,
    hash::{DefaultHasher, Hash, Hasher},
    sync::atomic::{AtomicUsize, Ordering},
};

use rand::Rng;

use crate::config::{Endpoint, LbPolicy};

/// What the picker needs to know about an endpoint at pick time.
pub trait Candidate {
    fn config(&self) -> &Endpoint;
    /// Requests in flight to it now.
    fn active(&self) -> u64;
    /// Ejected by outlier detection now.
    fn ejected(&self) -> bool;
}

const RING_POINTS_PER_WEIGHT: usize = 64;
const MAGLEV_TABLE: usize = 65_537;
const SCHEDULE_MAX: usize = 4_096;

/// Picks endpoints for one cluster; built per snapshot.
#[derive(Debug)]
pub struct EndpointPicker {
    policy: LbPolicy,
    levels: Vec<Level>,
    cursor: AtomicUsize,
}

#[derive(Debug)]
struct Level {
    /// Indices of the endpoints at this priority and their effective weights.
    members: Vec<(usize, u32)>,
    /// Round robin: endpoint indices interleaved by weight.
    schedule: Vec<usize>,
    /// Ring hash: (point, endpoint index), sorted by point.
    ring: Vec<(u64, usize)>,
    /// Maglev lookup table of endpoint indices.
    maglev: Vec<usize>,
}

fn hash_of(v: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// Hashes a request key (a header value) for ring hash and Maglev.
pub fn hash_key(key: &[u8]) -> u64 {
    hash_of(key)
}

impl EndpointPicker {
    pub fn new(
        policy: LbPolicy,
        endpoints: &[Endpoint],
        locality_weights: &BTreeMap<String, u32>,
    ) -> Self {
        let mut priorities: Vec<u32> = endpoints.iter().map(|e| e.priority).collect();
        priorities.sort_unstable();
        priorities.dedup();
        let levels = priorities
            .into_iter()
            .map(|p| Level::new(policy, endpoints, p, locality_weights))
            .collect();
        Self {
            policy,
            levels,
            cursor: AtomicUsize::new(0),
        }
    }

    /// Picks an endpoint index for a request; `hash` is the request's hash key (ring hash,
    /// Maglev), `exclude` the endpoints already tried for it.
    pub fn pick<C: Candidate>(
        &self,
        endpoints: &[C],
        hash: Option<u64>,
        exclude: &[usize],
    ) -> Option<usize> {
        let usable = |i: usize, honour_ejection: bool| {
            let e = &endpoints[i];
            e.config().health.routable()
                && !exclude.contains(&i)
                && !(honour_ejection && e.ejected())
        };
        for honour_ejection in [true, false] {
            let ok = |i: usize| usable(i, honour_ejection);
            for level in &self.levels {
                if !level.members.iter().any(|&(i, _)| ok(i)) {
                    continue;
                }
                return self.pick_in(level, endpoints, hash, &ok);
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
    ) -> Option<usize> {
        match (self.policy, hash) {
            (LbPolicy::RingHash, Some(h)) if !level.ring.is_empty() => {
                let start = level.ring.partition_point(|&(p, _)| p < h);
                (0..level.ring.len())
                    .map(|k| level.ring[(start + k) % level.ring.len()].1)
                    .find(|&i| ok(i))
            }
            (LbPolicy::Maglev, Some(h)) if !level.maglev.is_empty() => {
                let start = (h % level.maglev.len() as u64) as usize;
                (0..level.maglev.len())
                    .map(|k| level.maglev[(start + k) % level.maglev.len()])
                    .find(|&i| ok(i))
            }
            (LbPolicy::RoundRobin, _) if !level.schedule.is_empty() => {
                let n = level.schedule.len();
                let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|k| level.schedule[(start + k) % n])
                    .find(|&i| ok(i))
            }
            (LbPolicy::LeastRequest, _) => {
                let a = weighted_random(level, ok)?;
                let b = weighted_random(level, ok)?;
                let load =
                    |i: usize| endpoints[i].active() as f64 / f64::from(level.weight_of(i).max(1));
                Some(if load(b) < load(a) { b } else { a })
            }
            // Random, and hash policies for requests without a hash key.
            _ => weighted_random(level, ok),
        }
    }
}

fn weighted_random(level: &Level, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
    weighted_pick(level.members.iter().copied().filter(|&(i, _)| ok(i)))
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
        locality_weights: &BTreeMap<String, u32>,
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
        let members: Vec<(usize, u32)> = indices
            .iter()
            .map(|&i| {
                let e = &endpoints[i];
                let w = if uses_localities {
                    // In u128: 1000 × u32 × u32 does not fit u64.
                    let lw = u128::from(*locality_weights.get(&e.locality).unwrap_or(&1));
                    let share = 1000 * lw * u128::from(e.weight)
                        / u128::from(per_locality[e.locality.as_str()].max(1));
                    u32::try_from(share.max(1)).unwrap_or(u32::MAX)
                } else {
                    e.weight.max(1)
                };
                (i, w)
            })
            .collect();
        // Configured health is known now: unroutable endpoints stay out of schedules and
        // tables, so skipping them cannot skew the rotation.
        let routable: Vec<(usize, u32)> = members
            .iter()
            .copied()
            .filter(|&(i, _)| endpoints[i].health.routable())
            .collect();
        let schedule = if policy == LbPolicy::RoundRobin {
            schedule(&routable)
        } else {
            Vec::new()
        };
        let ring = if policy == LbPolicy::RingHash {
            ring(&routable, endpoints)
        } else {
            Vec::new()
        };
        let maglev = if policy == LbPolicy::Maglev {
            maglev(&routable, endpoints)
        } else {
            Vec::new()
        };
        Self {
            members,
            schedule,
            ring,
            maglev,
        }
    }

    fn weight_of(&self, i: usize) -> u32 {
        self.members
            .iter()
            .find(|&&(j, _)| j == i)
            .map_or(1, |&(_, w)| w)
    }
}

/// Smooth weighted round robin (nginx's), unrolled into a schedule: equal weights give plain
/// rotation; weights interleave instead of bunching. Long schedules are scaled down.
fn schedule(members: &[(usize, u32)]) -> Vec<usize> {
    let total: u64 = members.iter().map(|&(_, w)| u64::from(w)).sum();
    if total == 0 {
        return Vec::new();
    }
    let scale = (total as f64 / SCHEDULE_MAX as f64).max(1.0);
    let weights: Vec<i64> = members
        .iter()
        .map(|&(_, w)| ((f64::from(w) / scale).round() as i64).max(1))
        .collect();
    let sum: i64 = weights.iter().sum();
    let mut current = vec![0i64; members.len()];
    (0..sum)
        .map(|_| {
            for (c, w) in current.iter_mut().zip(&weights) {
                *c += w;
            }
            let best = (0..members.len())
                .max_by_key(|&k| (current[k], std::cmp::Reverse(k)))
                .expect("members");
            current[best] -= sum;
            members[best].0
        })
        .collect()
}

fn ring(members: &[(usize, u32)], endpoints: &[Endpoint]) -> Vec<(u64, usize)> {
    let min = members.iter().map(|&(_, w)| w).min().unwrap_or(1).max(1);
    let mut ring: Vec<(u64, usize)> = members
        .iter()
        .flat_map(|&(i, w)| {
            let points = RING_POINTS_PER_WEIGHT * (w / min).min(64) as usize;
            (0..points).map(move |k| (hash_of((endpoints[i].address, k)), i))
        })
        .collect();
    ring.sort_unstable();
    ring
}

/// Maglev's lookup table: each endpoint fills slots along its own permutation, in turns
/// proportional to its weight.
fn maglev(members: &[(usize, u32)], endpoints: &[Endpoint]) -> Vec<usize> {
    if members.is_empty() {
        return Vec::new();
    }
    let m = MAGLEV_TABLE as u64;
    let perms: Vec<(u64, u64)> = members
        .iter()
        .map(|&(i, _)| {
            let a = endpoints[i].address;
            (
                hash_of((a, "offset")) % m,
                hash_of((a, "skip")) % (m - 1) + 1,
            )
        })
        .collect();
    let max_w = members.iter().map(|&(_, w)| w).max().unwrap_or(1).max(1);
    let mut table = vec![usize::MAX; MAGLEV_TABLE];
    let mut next = vec![0u64; members.len()];
    let mut credit = vec![0u64; members.len()];
    let mut filled = 0;
    while filled < MAGLEV_TABLE {
        for (k, &(i, w)) in members.iter().enumerate() {
            credit[k] += u64::from(w);
            if credit[k] < u64::from(max_w) {
                continue;
            }
            credit[k] -= u64::from(max_w);
            let (offset, skip) = perms[k];
            loop {
                let slot = ((offset + next[k] * skip) % m) as usize;
                next[k] += 1;
                if table[slot] == usize::MAX {
                    table[slot] = i;
                    filled += 1;
                    break;
                }
            }
            if filled == MAGLEV_TABLE {
                break;
            }
        }
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
        ejected: bool,
    }

    impl Candidate for Fake {
        fn config(&self) -> &Endpoint {
            &self.config
        }
        fn active(&self) -> u64 {
            self.active.get()
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
        }
    }

    #[test]
    fn the_largest_weights_do_not_overflow() {
        let eps = vec![
            ep(1, u32::MAX, 0, "a", Health::Healthy),
            ep(2, u32::MAX, 0, "b", Health::Healthy),
        ];
        let weights = BTreeMap::from([("a".to_string(), u32::MAX), ("b".to_string(), 1)]);
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::Random,
            LbPolicy::LeastRequest,
        ] {
            let p = EndpointPicker::new(policy, &eps, &weights);
            assert!(p.pick(&fakes(&eps), None, &[]).is_some(), "{policy:?}");
        }
    }

    fn fakes(eps: &[Endpoint]) -> Vec<Fake> {
        eps.iter()
            .map(|e| Fake {
                config: e.clone(),
                active: Cell::new(0),
                ejected: false,
            })
            .collect()
    }

    fn counts(picker: &EndpointPicker, f: &[Fake], n: usize) -> HashMap<usize, usize> {
        let mut c = HashMap::new();
        for _ in 0..n {
            *c.entry(picker.pick(f, None, &[]).unwrap()).or_default() += 1;
        }
        c
    }

    #[test]
    fn round_robin_spreads_evenly() {
        let eps: Vec<_> = (1..=3).map(|n| ep(n, 1, 0, "", Health::Healthy)).collect();
        let p = EndpointPicker::new(LbPolicy::RoundRobin, &eps, &BTreeMap::new());
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
        let p = EndpointPicker::new(LbPolicy::RoundRobin, &eps, &BTreeMap::new());
        let c = counts(&p, &fakes(&eps), 400);
        assert_eq!(c, HashMap::from([(0, 100), (1, 300)]));
    }

    #[test]
    fn lower_priorities_serve_only_when_higher_ones_cannot() {
        let eps = vec![
            ep(1, 1, 0, "", Health::Unhealthy),
            ep(2, 1, 1, "", Health::Healthy),
        ];
        let p = EndpointPicker::new(LbPolicy::Random, &eps, &BTreeMap::new());
        assert_eq!(p.pick(&fakes(&eps), None, &[]), Some(1));
        let eps = vec![
            ep(1, 1, 0, "", Health::Healthy),
            ep(2, 1, 1, "", Health::Healthy),
        ];
        let p = EndpointPicker::new(LbPolicy::Random, &eps, &BTreeMap::new());
        assert!((0..100).all(|_| p.pick(&fakes(&eps), None, &[]) == Some(0)));
    }

    #[test]
    fn ejected_and_excluded_endpoints_are_skipped_until_none_is_left() {
        let eps: Vec<_> = (1..=2).map(|n| ep(n, 1, 0, "", Health::Healthy)).collect();
        let mut f = fakes(&eps);
        f[0].ejected = true;
        let p = EndpointPicker::new(LbPolicy::RoundRobin, &eps, &BTreeMap::new());
        assert!((0..10).all(|_| p.pick(&f, None, &[]) == Some(1)));
        assert_eq!(
            p.pick(&f, None, &[1]),
            Some(0),
            "panic mode: ejection ignored"
        );
        assert_eq!(p.pick(&f, None, &[0, 1]), None);
    }

    #[test]
    fn locality_weights_split_traffic_between_zones() {
        let eps = vec![
            ep(1, 1, 0, "a", Health::Healthy),
            ep(2, 1, 0, "a", Health::Healthy),
            ep(3, 1, 0, "b", Health::Healthy),
        ];
        let weights = BTreeMap::from([("a".to_string(), 1), ("b".to_string(), 3)]);
        let p = EndpointPicker::new(LbPolicy::RoundRobin, &eps, &weights);
        let c = counts(&p, &fakes(&eps), 800);
        assert_eq!(c[&2], 600, "{c:?}");
        assert_eq!(c[&0] + c[&1], 200, "{c:?}");
    }

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let eps: Vec<_> = (1..=2).map(|n| ep(n, 1, 0, "", Health::Healthy)).collect();
        let f = fakes(&eps);
        f[0].active.set(100);
        let p = EndpointPicker::new(LbPolicy::LeastRequest, &eps, &BTreeMap::new());
        let c = counts(&p, &f, 1000);
        // Two choices: the busy one wins only when both draws are it (about a quarter).
        assert!(c.get(&0).copied().unwrap_or(0) < 350, "{c:?}");
    }

    #[test]
    fn hash_policies_are_consistent_and_move_little() {
        for policy in [LbPolicy::RingHash, LbPolicy::Maglev] {
            let eps: Vec<_> = (1..=4).map(|n| ep(n, 1, 0, "", Health::Healthy)).collect();
            let p = EndpointPicker::new(policy, &eps, &BTreeMap::new());
            let f = fakes(&eps);
            let keys: Vec<u64> = (0..1000).map(|k: i32| hash_key(&k.to_be_bytes())).collect();
            let before: Vec<usize> = keys
                .iter()
                .map(|&h| p.pick(&f, Some(h), &[]).unwrap())
                .collect();
            let again: Vec<usize> = keys
                .iter()
                .map(|&h| p.pick(&f, Some(h), &[]).unwrap())
                .collect();
            assert_eq!(before, again, "{policy:?} is consistent");
            let spread = (0..4)
                .map(|i| before.iter().filter(|&&b| b == i).count())
                .min()
                .unwrap();
            assert!(spread > 150, "{policy:?} spreads keys: {spread}");
            // Removing endpoint 3 moves only its keys.
            let p3 = EndpointPicker::new(policy, &eps[..3], &BTreeMap::new());
            let moved = keys
                .iter()
                .zip(&before)
                .filter(|&(&h, &b)| b != 3 && p3.pick(&f[..3], Some(h), &[]).unwrap() != b)
                .count();
            assert!(
                moved < 100,
                "{policy:?} moved {moved} keys that stayed mapped"
            );
        }
    }
}
