//! Spreading calls over a participant's instances, and holding them back
//! when the participant has enough: a picker per participant (round robin,
//! or least outstanding requests), a circuit breaker per instance, a cap on
//! calls in flight and a rate limit per participant.
//!
//! ```text
//!   call ─▶ admit: a slot under the in-flight cap and a token of the rate
//!           limit, waited for (never refused) until the call's arrival
//!           limit; none by then ─▶ not sent (the driver re-covers the lease
//!           and asks again: no attempt is counted)
//!        ─▶ pick: instances whose breaker is closed, by policy; if none, one
//!           whose breaker has been open long enough, as the half-open probe
//!        ─▶ call ─┬─ reached the service (any answer) ─▶ breaker closes
//!                 └─ never reached it (connect failure) ─▶ breaker counts it;
//!                    the same attempt is tried on another instance
//!
//!   breaker:  closed ──N unreached in a row──▶ open ──after open_for──▶ half-open
//!               ▲                               ▲                       │ one probe
//!               └────────── reached ────────────┴──── unreached ────────┘
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How a participant's calls are spread over its instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// In turn.
    #[default]
    RoundRobin,
    /// To the instance with the fewest calls in flight from here (ties in
    /// turn).
    LeastOutstanding,
}

impl Policy {
    /// From its flag value.
    pub fn parse(s: &str) -> Option<Policy> {
        match s {
            "round-robin" => Some(Policy::RoundRobin),
            "least-outstanding" => Some(Policy::LeastOutstanding),
            _ => None,
        }
    }

    /// Its flag value.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round-robin",
            Policy::LeastOutstanding => "least-outstanding",
        }
    }
}

/// Balancing settings, per participant where named.
#[derive(Debug, Clone)]
pub struct BalanceConfig {
    /// Policy by participant (others: round robin).
    pub policies: HashMap<String, Policy>,
    /// Most calls in flight by participant (others: no cap).
    pub in_flight_max: HashMap<String, usize>,
    /// Calls per second by participant (others: no limit).
    pub rate_per_sec: HashMap<String, f64>,
    /// Unreached calls in a row that open an instance's breaker.
    pub breaker_failures: u32,
    /// How long an open breaker waits before its half-open probe.
    pub breaker_open: Duration,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            policies: HashMap::new(),
            in_flight_max: HashMap::new(),
            rate_per_sec: HashMap::new(),
            breaker_failures: 5,
            breaker_open: Duration::from_secs(5),
        }
    }
}

/// Every participant's pool, made on first use.
#[derive(Debug)]
pub struct Balancer {
    cfg: BalanceConfig,
    pools: Mutex<HashMap<String, Arc<Pool>>>,
}

impl Balancer {
    /// A balancer with these settings.
    pub fn new(cfg: BalanceConfig) -> Balancer {
        Balancer {
            cfg,
            pools: Mutex::new(HashMap::new()),
        }
    }

    /// The pool of `participant`.
    pub fn pool(&self, participant: &str) -> Arc<Pool> {
        let mut pools = lock(&self.pools);
        if let Some(p) = pools.get(participant) {
            return p.clone();
        }
        let rate = self.cfg.rate_per_sec.get(participant).copied();
        let pool = Arc::new(Pool {
            name: participant.to_owned(),
            policy: self
                .cfg
                .policies
                .get(participant)
                .copied()
                .unwrap_or_default(),
            in_flight_max: self.cfg.in_flight_max.get(participant).copied(),
            slots: self
                .cfg
                .in_flight_max
                .get(participant)
                .map(|n| Arc::new(Semaphore::new((*n).max(1)))),
            bucket: rate.map(|r| Mutex::new(Bucket::new(r))),
            breaker_failures: self.cfg.breaker_failures.max(1),
            breaker_open: self.cfg.breaker_open,
            instances: Mutex::new(HashMap::new()),
            turn: AtomicUsize::new(0),
            waited: AtomicU64::new(0),
            rerouted: AtomicU64::new(0),
            not_sent: AtomicU64::new(0),
        });
        pools.insert(participant.to_owned(), pool.clone());
        pool
    }

    /// Every pool, by participant name.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        let mut pools: Vec<Arc<Pool>> = lock(&self.pools).values().cloned().collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        pools
    }
}

/// One participant's instances and limits.
#[derive(Debug)]
pub struct Pool {
    name: String,
    policy: Policy,
    in_flight_max: Option<usize>,
    slots: Option<Arc<Semaphore>>,
    bucket: Option<Mutex<Bucket>>,
    breaker_failures: u32,
    breaker_open: Duration,
    instances: Mutex<HashMap<String, Arc<Instance>>>,
    turn: AtomicUsize,
    waited: AtomicU64,
    rerouted: AtomicU64,
    not_sent: AtomicU64,
}

/// A call admitted under the participant's cap (the slot is freed when
/// this drops).
#[derive(Debug)]
pub struct Admitted(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

impl Pool {
    /// The participant's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits for a slot under the in-flight cap and a token of the rate
    /// limit, until `send_by`; `None` if neither came by then (the call is
    /// not sent).
    pub async fn admit(&self, send_by: Instant) -> Option<Admitted> {
        let mut waited = false;
        let permit = match &self.slots {
            None => None,
            Some(slots) => match slots.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    waited = true;
                    let wait =
                        tokio::time::timeout_at(send_by.into(), slots.clone().acquire_owned());
                    match wait.await {
                        Ok(Ok(p)) => Some(p),
                        _ => return self.gave_up(),
                    }
                }
            },
        };
        if let Some(bucket) = &self.bucket {
            loop {
                let wait = match lock(bucket).take(Instant::now()) {
                    None => break,
                    Some(wait) => wait,
                };
                waited = true;
                if Instant::now() + wait > send_by {
                    return self.gave_up();
                }
                tokio::time::sleep(wait).await;
            }
        }
        if waited {
            self.waited.fetch_add(1, Ordering::Relaxed);
        }
        Some(Admitted(permit))
    }

    fn gave_up(&self) -> Option<Admitted> {
        self.waited.fetch_add(1, Ordering::Relaxed);
        self.not_sent.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Chooses among `endpoints` (URL and weight; less those in `tried`):
    /// an instance whose breaker has been open long enough (its one
    /// half-open probe), else by policy among instances whose breaker is
    /// closed; `None` if every breaker is open.
    pub fn pick(&self, endpoints: &[(String, u32)], tried: &[String]) -> Option<Arc<Instance>> {
        let now = Instant::now();
        let mut instances = lock(&self.instances);
        instances.retain(|e, _| endpoints.iter().any(|(url, _)| url == e));
        let candidates: Vec<Arc<Instance>> = endpoints
            .iter()
            .filter(|(e, _)| !tried.contains(e))
            .map(|(e, w)| {
                let i = instances
                    .entry(e.clone())
                    .or_insert_with(|| Arc::new(Instance::new(e)))
                    .clone();
                i.weight.store(u64::from((*w).max(1)), Ordering::Relaxed);
                i
            })
            .collect();
        // An instance whose breaker has been open long enough gets the
        // next call as its one probe, whatever else is closed.
        if let Some(probe) = candidates
            .iter()
            .find(|i| lock(&i.breaker).try_probe(now, self.breaker_open))
        {
            return Some(probe.clone());
        }
        let closed: Vec<&Arc<Instance>> = candidates
            .iter()
            .filter(|i| lock(&i.breaker).closed())
            .collect();
        if closed.is_empty() {
            return None;
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let chosen = match self.policy {
            Policy::RoundRobin => smooth_weighted(&closed),
            Policy::LeastOutstanding => least_outstanding(&closed, turn),
        };
        Some(chosen.clone())
    }

    /// The same attempt goes to another instance.
    pub fn rerouted(&self) {
        self.rerouted.fetch_add(1, Ordering::Relaxed);
    }

    /// The call reached `instance`'s service (whatever it answered).
    pub fn reached(&self, instance: &Instance) {
        lock(&instance.breaker).reached();
    }

    /// The call never reached `instance`'s service.
    pub fn unreached(&self, instance: &Instance) {
        let opened = lock(&instance.breaker).unreached(Instant::now(), self.breaker_failures);
        if opened {
            tracing::warn!(participant = %self.name, endpoint = %instance.endpoint, "circuit breaker opened: the instance is not reached");
        }
    }

    /// What `/metrics` and the admin page show.
    pub fn snapshot(&self) -> PoolSnapshot {
        let now = Instant::now();
        let mut instances: Vec<InstanceSnapshot> = lock(&self.instances)
            .values()
            .map(|i| InstanceSnapshot {
                endpoint: i.endpoint.clone(),
                weight: i.weight(),
                outstanding: i.outstanding.load(Ordering::Relaxed),
                calls: i.calls.load(Ordering::Relaxed),
                breaker: lock(&i.breaker).state(now, self.breaker_open),
            })
            .collect();
        instances.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
        PoolSnapshot {
            participant: self.name.clone(),
            policy: self.policy,
            in_flight: instances.iter().map(|i| i.outstanding).sum(),
            in_flight_max: self.in_flight_max,
            rate_per_sec: self.bucket.as_ref().map(|b| lock(b).rate),
            waited: self.waited.load(Ordering::Relaxed),
            not_sent: self.not_sent.load(Ordering::Relaxed),
            rerouted: self.rerouted.load(Ordering::Relaxed),
            instances,
        }
    }
}

/// Smooth weighted round robin (as nginx does it): every instance gains
/// its weight, the richest is chosen and pays the total. Equal weights take
/// turns; weights 3:1 give a a a b, interleaved. Called under the pool's
/// lock.
fn smooth_weighted<'a>(instances: &[&'a Arc<Instance>]) -> &'a Arc<Instance> {
    let total: i64 = instances.iter().map(|i| i.weight() as i64).sum();
    let mut best = instances[0];
    let mut best_current = i64::MIN;
    for i in instances {
        let current = i.current.fetch_add(i.weight() as i64, Ordering::Relaxed) + i.weight() as i64;
        if current > best_current {
            best = i;
            best_current = current;
        }
    }
    best.current.fetch_sub(total, Ordering::Relaxed);
    best
}

/// Fewest calls in flight for its weight; ties in turn.
fn least_outstanding<'a>(instances: &[&'a Arc<Instance>], turn: usize) -> &'a Arc<Instance> {
    let n = instances.len();
    let mut best = instances[turn % n];
    for k in 1..n {
        let i = instances[(turn + k) % n];
        let (o, w) = (i.outstanding.load(Ordering::Relaxed) as u64, i.weight());
        let (bo, bw) = (
            best.outstanding.load(Ordering::Relaxed) as u64,
            best.weight(),
        );
        if o * bw < bo * w {
            best = i;
        }
    }
    best
}

/// One instance of a participant, as this coordinator sees it.
#[derive(Debug)]
pub struct Instance {
    /// Its URL.
    pub endpoint: String,
    /// Its relative share of calls (from its heartbeat; 1 when static).
    weight: AtomicU64,
    /// Smooth weighted round robin's running credit.
    current: AtomicI64,
    outstanding: AtomicUsize,
    calls: AtomicU64,
    breaker: Mutex<Breaker>,
}

/// A call in flight to an instance, counted until dropped.
#[derive(Debug)]
pub struct Outstanding(Arc<Instance>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Instance {
    fn new(endpoint: &str) -> Instance {
        Instance {
            endpoint: endpoint.to_owned(),
            weight: AtomicU64::new(1),
            current: AtomicI64::new(0),
            outstanding: AtomicUsize::new(0),
            calls: AtomicU64::new(0),
            breaker: Mutex::new(Breaker::default()),
        }
    }

    fn weight(&self) -> u64 {
        self.weight.load(Ordering::Relaxed).max(1)
    }

    /// A call to it starts.
    pub fn begin(self: &Arc<Self>) -> Outstanding {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        self.calls.fetch_add(1, Ordering::Relaxed);
        Outstanding(self.clone())
    }
}

/// An instance's circuit breaker (see the module diagram).
#[derive(Debug, Default)]
struct Breaker {
    /// Unreached calls in a row.
    failures: u32,
    /// When it opened, if it is open.
    opened: Option<Instant>,
    /// Its half-open probe is in flight.
    probing: bool,
}

/// A breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// No calls until it has been open long enough.
    Open,
    /// One probe may go (or is in flight).
    HalfOpen,
}

impl BreakerState {
    /// For `/metrics` and the admin page.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

impl Breaker {
    fn closed(&self) -> bool {
        self.opened.is_none()
    }

    fn state(&self, now: Instant, open_for: Duration) -> BreakerState {
        match self.opened {
            None => BreakerState::Closed,
            Some(_) if self.probing => BreakerState::HalfOpen,
            Some(at) if now.duration_since(at) >= open_for => BreakerState::HalfOpen,
            Some(_) => BreakerState::Open,
        }
    }

    /// Lets one probe through once open long enough.
    fn try_probe(&mut self, now: Instant, open_for: Duration) -> bool {
        if self.state(now, open_for) == BreakerState::HalfOpen && !self.probing {
            self.probing = true;
            return true;
        }
        false
    }

    fn reached(&mut self) {
        *self = Breaker::default();
    }

    /// Counts an unreached call; whether the breaker opened (again) now.
    fn unreached(&mut self, now: Instant, failures_max: u32) -> bool {
        self.failures = self.failures.saturating_add(1);
        if self.probing || (self.opened.is_none() && self.failures >= failures_max) {
            self.opened = Some(now);
            self.probing = false;
            return true;
        }
        false
    }
}

/// A token bucket: `rate` tokens a second, holding at most `max(rate, 1)`.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64) -> Bucket {
        let rate = rate.max(0.001);
        Bucket {
            rate,
            tokens: rate.max(1.0),
            at: Instant::now(),
        }
    }

    /// Takes a token (`None`), or says how long until one is due.
    fn take(&mut self, now: Instant) -> Option<Duration> {
        let burst = self.rate.max(1.0);
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return None;
        }
        Some(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
    }
}

/// A participant's pool as `/metrics` and the admin page show it.
#[derive(Debug, Clone)]
pub struct PoolSnapshot {
    /// The participant.
    pub participant: String,
    /// How calls are spread.
    pub policy: Policy,
    /// Calls in flight from here.
    pub in_flight: usize,
    /// The cap on them, if any.
    pub in_flight_max: Option<usize>,
    /// The rate limit, if any.
    pub rate_per_sec: Option<f64>,
    /// Calls that waited for a slot or a token.
    pub waited: u64,
    /// Calls that waited until their arrival limit and were not sent.
    pub not_sent: u64,
    /// Attempts sent to another instance after one was not reached.
    pub rerouted: u64,
    /// Its instances.
    pub instances: Vec<InstanceSnapshot>,
}

/// One instance in a [`PoolSnapshot`].
#[derive(Debug, Clone)]
pub struct InstanceSnapshot {
    /// Its URL.
    pub endpoint: String,
    /// Its relative share of calls.
    pub weight: u64,
    /// Calls in flight to it from here.
    pub outstanding: usize,
    /// Calls made to it.
    pub calls: u64,
    /// Its breaker.
    pub breaker: BreakerState,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn eps(n: usize) -> Vec<(String, u32)> {
        (0..n)
            .map(|i| (format!("http://127.0.0.1:{}", 7000 + i), 1))
            .collect()
    }

    fn urls(e: &[(String, u32)]) -> Vec<String> {
        e.iter().map(|(u, _)| u.clone()).collect()
    }

    fn pool(policy: Policy) -> Arc<Pool> {
        let mut cfg = BalanceConfig::default();
        cfg.policies.insert("p".into(), policy);
        cfg.breaker_failures = 3;
        cfg.breaker_open = Duration::from_millis(50);
        Balancer::new(cfg).pool("p")
    }

    #[test]
    fn round_robin_takes_each_instance_in_turn_and_by_weight() {
        let p = pool(Policy::RoundRobin);
        let e = eps(3);
        let u = urls(&e);
        let picks: Vec<String> = (0..6)
            .map(|_| p.pick(&e, &[]).unwrap().endpoint.clone())
            .collect();
        assert_eq!(picks, [&u[..], &u[..]].concat());
        // Weights 3:1 (from heartbeats): three calls to a for one to b,
        // interleaved.
        let p = pool(Policy::RoundRobin);
        let w = vec![(u[0].clone(), 3), (u[1].clone(), 1)];
        let picks: Vec<String> = (0..8)
            .map(|_| p.pick(&w, &[]).unwrap().endpoint.clone())
            .collect();
        assert_eq!(picks.iter().filter(|x| **x == u[0]).count(), 6, "{picks:?}");
        assert_ne!(
            picks[..4].iter().filter(|x| **x == u[1]).count(),
            0,
            "interleaved: {picks:?}"
        );
    }

    #[test]
    fn least_outstanding_goes_where_fewest_calls_wait() {
        let p = pool(Policy::LeastOutstanding);
        let e = eps(3);
        let u = urls(&e);
        // Instance 0 holds two calls, instance 1 one: new calls go to 2,
        // then to 1 and 2 alike, never to 0 while it is busier.
        let a = p.pick(&e, &[]).unwrap();
        assert_eq!(a.endpoint, u[0]);
        let busy0 = (a.begin(), a.begin());
        let b = p.pick(&e, &[]).unwrap();
        let _busy1 = b.begin();
        assert_eq!(b.endpoint, u[1]);
        let c = p.pick(&e, &[]).unwrap();
        assert_eq!(c.endpoint, u[2]);
        let _busy2 = c.begin();
        for _ in 0..4 {
            let i = p.pick(&e, &[]).unwrap();
            assert_ne!(i.endpoint, u[0], "the busiest is passed over");
        }
        drop(busy0);
        assert_eq!(p.pick(&e, &[]).unwrap().endpoint, u[0], "now the idlest");
        // By weight: 2 calls at a weight-4 instance count less than 1 at
        // a weight-1 one.
        let p = pool(Policy::LeastOutstanding);
        let w = vec![(u[0].clone(), 4), (u[1].clone(), 1)];
        let heavy = p.pick(&w, &[]).unwrap();
        assert_eq!(heavy.endpoint, u[0]);
        let _h = (heavy.begin(), heavy.begin());
        let light = p.pick(&w, &[]).unwrap();
        assert_eq!(light.endpoint, u[1]);
        let _l = light.begin();
        assert_eq!(p.pick(&w, &[]).unwrap().endpoint, u[0]);
    }

    #[test]
    fn the_breaker_opens_after_unreached_calls_probes_once_and_closes_on_success() {
        let p = pool(Policy::RoundRobin);
        let e = eps(2);
        let u = urls(&e);
        let other = [u[1].clone()];
        let bad = p.pick(&e, &other).unwrap();
        for _ in 0..3 {
            p.unreached(&bad);
        }
        // Open: every call goes to the other instance.
        for _ in 0..4 {
            assert_eq!(p.pick(&e, &[]).unwrap().endpoint, u[1]);
        }
        assert_eq!(state(&p, &u[0]), BreakerState::Open);
        // With the other excluded (tried already), nothing is left until
        // the breaker has been open long enough; then one probe.
        assert!(p.pick(&e, &other).is_none());
        std::thread::sleep(Duration::from_millis(60));
        let probe = p.pick(&e, &other).unwrap();
        assert_eq!(probe.endpoint, u[0]);
        assert!(p.pick(&e, &other).is_none(), "one probe at a time");
        // A failed probe opens it again; a reached one closes it.
        p.unreached(&probe);
        assert_eq!(state(&p, &u[0]), BreakerState::Open);
        std::thread::sleep(Duration::from_millis(60));
        let probe = p.pick(&e, &other).unwrap();
        p.reached(&probe);
        assert_eq!(state(&p, &u[0]), BreakerState::Closed);
    }

    fn state(p: &Pool, endpoint: &str) -> BreakerState {
        p.snapshot()
            .instances
            .iter()
            .find(|i| i.endpoint == endpoint)
            .unwrap()
            .breaker
    }

    #[test]
    fn the_bucket_gives_rate_tokens_a_second() {
        let start = Instant::now();
        let mut b = Bucket::new(10.0);
        b.at = start;
        let mut taken = 0;
        // Over 2 simulated seconds, tokens every 10 ms: 10 at once, then 10
        // a second.
        for ms in 0..2_050 {
            if b.take(start + Duration::from_millis(ms)).is_none() {
                taken += 1;
            }
        }
        assert_eq!(taken, 10 + 20);
    }
}
