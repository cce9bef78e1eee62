//! Bounds on what strangers can make an endpoint do (DESIGN §7): token buckets, per-key buckets
//! with a bounded key set, per-source connection counts, and a log limiter so an attack produces
//! one line per interval rather than one per packet.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// The source a per-source limit counts an address under: an IPv4 address (also when it
/// arrives IPv4-mapped on a dual-stack socket) by itself, an IPv6 address by its /64. One host
/// usually holds a whole /64, so counting single IPv6 addresses would let it dodge every
/// per-source bound by rotating addresses.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Addresses seen recently doing something only a trusted key can (completing a handshake as
/// a trusted peer, or answering our dial of one), at most `cap` of them, each for `ttl`. The
/// daemon exempts them from per-source limits, so strangers who share a /64 (or a NAT) with a
/// trusted peer cannot spend its budget. Spoofing such an address gains nothing under load:
/// then the daemon validates addresses (QUIC Retry) before it counts them.
#[derive(Debug)]
pub struct RecentSources {
    seen: Mutex<HashMap<IpAddr, Instant>>,
    cap: usize,
    ttl: Duration,
}

impl RecentSources {
    pub fn new(cap: usize, ttl: Duration) -> Self {
        Self {
            seen: Mutex::new(HashMap::new()),
            cap,
            ttl,
        }
    }

    /// Remembers `ip` (canonical form) from now on.
    pub fn insert(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.contains_key(&ip.to_canonical()) && seen.len() >= self.cap {
            seen.retain(|_, at| now.saturating_duration_since(*at) < self.ttl);
            if seen.len() >= self.cap {
                // Forget the stalest to make room.
                if let Some(oldest) = seen.iter().min_by_key(|(_, at)| **at).map(|(ip, _)| *ip) {
                    seen.remove(&oldest);
                }
            }
        }
        seen.insert(ip.to_canonical(), now);
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(&ip.to_canonical())
            .is_some_and(|at| at.elapsed() < self.ttl)
    }
}

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.try_take_n(now, 1.0)
    }

    /// Takes `n` tokens if there are that many (`n` at most `burst`, else never).
    pub fn try_take_n(&mut self, now: Instant, n: f64) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }
}

/// One token bucket per key (a source address, a terminal ID), with a bounded number of keys.
#[derive(Debug)]
pub struct KeyedLimiter<K> {
    buckets: Mutex<HashMap<K, TokenBucket>>,
    rate: f64,
    burst: f64,
    max_keys: usize,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// `rate` per second per key, bursts of up to `rate` (at least 1).
    pub fn new(rate: u32, max_keys: usize) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            buckets: Mutex::new(HashMap::new()),
            rate,
            burst: rate,
            max_keys,
        }
    }

    /// Whether `key` may act now (and counts the act).
    pub fn allow(&self, key: &K) -> bool {
        self.allow_n(key, 1)
    }

    /// Whether `key` may act now at a cost of `n` tokens, counted if so; a cost over the burst
    /// counts as the burst, so every act is possible with a full bucket.
    pub fn allow_n(&self, key: &K, n: u64) -> bool {
        let n = (n as f64).min(self.burst);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(key) && buckets.len() >= self.max_keys {
            // Forget keys whose buckets refilled: they hold no information.
            buckets.retain(|_, b| !b.is_full(now));
            if buckets.len() >= self.max_keys {
                return false;
            }
        }
        buckets
            .entry(key.clone())
            .or_insert_with(|| TokenBucket::new(self.rate, self.burst))
            .try_take_n(now, n)
    }
}

/// Handshakes in progress, at most `max`: a new one past that drops the oldest. A real
/// handshake takes a round trip or two, so the oldest is most likely a stalled one.
#[derive(Debug)]
pub struct PendingHandshakes {
    /// The next key, and the handshakes in progress, oldest first, each with its drop token.
    state: Mutex<(u64, BTreeMap<u64, CancellationToken>)>,
    max: usize,
}

/// A handshake's place among those in progress; leaves when dropped. `dropped` fires when a
/// newer handshake took the place.
pub struct PendingHandshake {
    owner: Arc<PendingHandshakes>,
    key: u64,
    pub dropped: CancellationToken,
}

impl PendingHandshakes {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            max,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, BTreeMap<u64, CancellationToken>)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Handshakes in progress now.
    pub fn len(&self) -> usize {
        self.lock().1.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A place for a new handshake; when all are taken, the oldest is dropped for it (the
    /// `bool` says so).
    pub fn begin(self: &Arc<Self>) -> (PendingHandshake, bool) {
        let mut state = self.lock();
        let mut evicted = false;
        while state.1.len() >= self.max.max(1) {
            if let Some((_, token)) = state.1.pop_first() {
                token.cancel();
                evicted = true;
            }
        }
        let key = state.0;
        state.0 += 1;
        let dropped = CancellationToken::new();
        state.1.insert(key, dropped.clone());
        let slot = PendingHandshake {
            owner: self.clone(),
            key,
            dropped,
        };
        (slot, evicted)
    }
}

impl Drop for PendingHandshake {
    fn drop(&mut self) {
        self.owner.lock().1.remove(&self.key);
    }
}

/// Counts connections per source address; a slot is released when its guard drops.
#[derive(Debug, Clone)]
pub struct SourceCounter {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max: usize,
}

pub struct SourceGuard {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl SourceCounter {
    pub fn new(max: usize) -> Self {
        Self {
            counts: Arc::new(Mutex::new(HashMap::new())),
            max,
        }
    }

    /// Takes a slot for `ip`, or `None` if it holds `max` already.
    pub fn acquire(&self, ip: IpAddr) -> Option<SourceGuard> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceGuard {
            counts: self.counts.clone(),
            ip,
        })
    }
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Lets a message through at most once per interval per key, counting what it held back.
#[derive(Debug)]
pub struct LogLimiter {
    last: Mutex<HashMap<&'static str, (Instant, u64)>>,
    interval: Duration,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> Self {
        Self {
            last: Mutex::new(HashMap::new()),
            interval,
        }
    }

    /// `Some(suppressed)` when a line about `key` may be logged now; `suppressed` is how many were
    /// held back since the last one.
    pub fn check(&self, key: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match last.get_mut(key) {
            Some((at, held)) if now.duration_since(*at) < self.interval => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                let suppressed = *held;
                *at = now;
                *held = 0;
                Some(suppressed)
            }
            None => {
                last.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_at_its_rate() {
        let start = Instant::now();
        let mut b = TokenBucket::new(10.0, 2.0);
        b.last = start;
        assert!(b.try_take(start));
        assert!(b.try_take(start));
        assert!(!b.try_take(start));
        assert!(b.try_take(start + Duration::from_millis(100)));
        assert!(!b.try_take(start + Duration::from_millis(100)));
    }

    #[test]
    fn keyed_limiter_separates_keys_and_bounds_them() {
        let l = KeyedLimiter::new(2, 2);
        assert!(l.allow(&1) && l.allow(&1));
        assert!(!l.allow(&1));
        assert!(l.allow(&2));
        // A third key while both buckets are drained: refused rather than growing the map.
        assert!(!l.allow(&3));
    }

    #[test]
    fn pending_handshakes_drop_the_oldest_when_full() {
        let p = PendingHandshakes::new(2);
        let (first, evicted) = p.begin();
        assert!(!evicted);
        let (second, _) = p.begin();
        let (_third, evicted) = p.begin();
        assert!(evicted && first.dropped.is_cancelled() && !second.dropped.is_cancelled());
        assert_eq!(p.len(), 2);
        drop(first);
        assert_eq!(p.len(), 2, "an evicted place was already freed");
        drop(second);
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn source_counter_releases_on_drop() {
        let c = SourceCounter::new(1);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let g = c.acquire(ip).unwrap();
        assert!(c.acquire(ip).is_none());
        drop(g);
        assert!(c.acquire(ip).is_some());
    }

    #[test]
    fn ipv6_sources_count_per_64() {
        let key = |s: &str| source_key(s.parse().unwrap());
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:10.0.0.1"), key("10.0.0.1"));
        assert_ne!(key("10.0.0.1"), key("10.0.0.2"));
    }

    #[test]
    fn recent_sources_are_bounded() {
        let r = RecentSources::new(2, Duration::from_secs(3600));
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        r.insert(ip("10.0.0.1"));
        assert!(r.contains(ip("::ffff:10.0.0.1")));
        r.insert(ip("10.0.0.2"));
        r.insert(ip("10.0.0.3"));
        assert!(!r.contains(ip("10.0.0.1")) && r.contains(ip("10.0.0.3")));
        assert!(!RecentSources::new(2, Duration::ZERO).contains(ip("10.0.0.9")));
    }

    #[test]
    fn log_limiter_counts_what_it_holds_back() {
        let l = LogLimiter::new(Duration::from_secs(3600));
        assert_eq!(l.check("x"), Some(0));
        assert_eq!(l.check("x"), None);
        assert_eq!(l.check("x"), None);
        assert_eq!(l.check("y"), Some(0));
    }
}
