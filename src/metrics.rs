//! Prometheus metrics of this process, rendered in the text exposition
//! format at `/metrics`.
//!
//! Hand-rolled on purpose: a handful of counters and two histogram
//! families, whose labels (participant names, outcomes) are already
//! restricted to `[A-Za-z0-9_.-]`, do not need a metrics framework.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::domain::{CallResult, Phase, SagaState};

/// Upper bounds of the latency buckets, in seconds: from a tenth of a
/// millisecond (a call or a commit on the same host) to ten seconds.
const BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// Upper bounds of the start-to-settle buckets, in seconds: from a few
/// milliseconds (a quick saga) to an hour (one that waited out retries).
const SETTLE_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0, 900.0, 3_600.0,
];

#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::with_bounds(&BUCKETS)
    }
}

impl Histogram {
    fn with_bounds(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            count: 0,
            sum: 0.0,
        }
    }

    fn observe(&mut self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        for (i, le) in self.bounds.iter().enumerate() {
            if secs <= *le {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }

    /// The `_bucket`, `_sum` and `_count` lines of `name{labels}`.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, le) in self.bounds.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {}",
                self.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let set = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{set} {}", self.sum);
        let _ = writeln!(out, "{name}_count{set} {}", self.count);
    }
}

/// The write lanes' work (see `store::pg`): requests, the statements that
/// wrote them (each one commit), and each statement's round trip.
#[derive(Debug, Default)]
pub struct DbWrites {
    requests: AtomicU64,
    statements: AtomicU64,
    latency: Mutex<Histogram>,
}

impl DbWrites {
    /// One statement wrote `requests` requests (or failed) in `elapsed`.
    pub fn statement(&self, requests: usize, elapsed: Duration) {
        self.requests.fetch_add(requests as u64, Ordering::Relaxed);
        self.statements.fetch_add(1, Ordering::Relaxed);
        self.latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(elapsed);
    }

    /// (requests, statements) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.statements.load(Ordering::Relaxed),
        )
    }

    fn render(&self, out: &mut String) {
        let (requests, statements) = self.counts();
        let _ = writeln!(
            out,
            "# HELP sagad_db_write_requests_total Saga starts and decisions written by the write lanes.\n\
             # TYPE sagad_db_write_requests_total counter\nsagad_db_write_requests_total {requests}"
        );
        let _ = writeln!(
            out,
            "# HELP sagad_db_write_statements_total Statements (one commit each) that wrote them.\n\
             # TYPE sagad_db_write_statements_total counter\nsagad_db_write_statements_total {statements}"
        );
        let _ = writeln!(out, "# HELP sagad_db_write_duration_seconds Round trip of one write statement, commit included.");
        let _ = writeln!(out, "# TYPE sagad_db_write_duration_seconds histogram");
        self.latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .render(out, "sagad_db_write_duration_seconds", "");
    }
}

/// The metrics of one coordinator process.
#[derive(Default)]
pub struct Metrics {
    started: AtomicU64,
    completed: AtomicU64,
    compensated: AtomicU64,
    suspended: AtomicU64,
    resolved: AtomicU64,
    /// Keyed by (participant, phase, outcome).
    steps: Mutex<BTreeMap<(String, &'static str, &'static str), Histogram>>,
    /// Start to settle, by definition.
    settle: Mutex<BTreeMap<String, Histogram>>,
    takeovers: AtomicU64,
    leases_lost: AtomicU64,
    calls_in_flight: AtomicU64,
    purged: AtomicU64,
    renewed: AtomicU64,
    renewals_failed: AtomicU64,
    db_writes: Option<std::sync::Arc<DbWrites>>,
}

/// Counts of sagas in the database, read when `/metrics` is scraped.
#[derive(Debug, Clone, Default)]
pub struct StateCounts {
    /// By state (settled states over the admin window), each capped.
    pub by_state: Vec<(SagaState, i64)>,
    /// Stuck sagas, capped.
    pub stuck: i64,
}

/// A participant call in flight, counted until dropped.
#[derive(Debug)]
pub struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The label of a call's outcome.
pub fn outcome_label(r: &CallResult) -> &'static str {
    match r {
        CallResult::Succeeded(_) => "succeeded",
        CallResult::Failed(_) => "failed",
        CallResult::Retry(_) => "retry",
        CallResult::Transient(_) => "transient",
        CallResult::Misconfigured(_) => "misconfigured",
    }
}

impl Metrics {
    /// Metrics that also render the write lanes' figures.
    pub fn with_db_writes(db_writes: std::sync::Arc<DbWrites>) -> Self {
        Metrics {
            db_writes: Some(db_writes),
            ..Metrics::default()
        }
    }

    /// A saga was started here.
    pub fn saga_started(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    /// A saga reached `state` through this process.
    pub fn saga_settled(&self, state: SagaState) {
        let c = match state {
            SagaState::Completed => &self.completed,
            SagaState::Compensated => &self.compensated,
            SagaState::Suspended => &self.suspended,
            SagaState::Resolved => &self.resolved,
            SagaState::Running | SagaState::Compensating => return,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A saga of `definition` settled `elapsed` after it was started.
    pub fn saga_settle_time(&self, definition: &str, elapsed: Duration) {
        let mut all = self.settle.lock().unwrap_or_else(|p| p.into_inner());
        all.entry(definition.to_owned())
            .or_insert_with(|| Histogram::with_bounds(&SETTLE_BUCKETS))
            .observe(elapsed);
    }

    /// This process took over a saga another coordinator had not given
    /// back (its lease expired).
    pub fn lease_takeover(&self) {
        self.takeovers.fetch_add(1, Ordering::Relaxed);
    }

    /// A renewal round renewed `n` leases, or failed.
    pub fn leases_renewed(&self, n: Option<u64>) {
        match n {
            Some(n) => self.renewed.fetch_add(n, Ordering::Relaxed),
            None => self.renewals_failed.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Retention deleted `n` settled sagas.
    pub fn sagas_purged(&self, n: u64) {
        self.purged.fetch_add(n, Ordering::Relaxed);
    }

    /// A write found that another coordinator or an operator had taken the
    /// saga (its epoch moved on).
    pub fn lease_lost(&self) {
        self.leases_lost.fetch_add(1, Ordering::Relaxed);
    }

    /// A participant call starts; it is counted until the guard drops.
    pub fn call_started(&self) -> InFlight<'_> {
        self.calls_in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.calls_in_flight)
    }

    /// A participant call returned after `elapsed`.
    pub fn step_attempt(
        &self,
        participant: &str,
        phase: Phase,
        result: &CallResult,
        elapsed: Duration,
    ) {
        let key = (
            participant.to_owned(),
            phase.as_str(),
            outcome_label(result),
        );
        let mut steps = self.steps.lock().unwrap_or_else(|p| p.into_inner());
        steps.entry(key).or_default().observe(elapsed);
    }

    /// The text exposition format, with `counts` (read from the database
    /// by the caller) as gauges when given.
    pub fn render(&self, counts: Option<&StateCounts>) -> String {
        let mut out = String::new();
        if let Some(c) = counts {
            render_counts(&mut out, c);
        }
        self.render_leases(&mut out);
        let counters = [
            (
                "sagad_sagas_started_total",
                "Sagas started through this coordinator.",
                &self.started,
            ),
            (
                "sagad_sagas_completed_total",
                "Sagas this coordinator brought to COMPLETED.",
                &self.completed,
            ),
            (
                "sagad_sagas_compensated_total",
                "Sagas this coordinator brought to COMPENSATED.",
                &self.compensated,
            ),
            (
                "sagad_sagas_suspended_total",
                "Sagas this coordinator suspended.",
                &self.suspended,
            ),
            (
                "sagad_sagas_resolved_total",
                "Sagas resolved by an operator through this coordinator.",
                &self.resolved,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let steps = self.steps.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "# HELP sagad_step_attempts_total Participant calls, by participant, phase and outcome.");
        let _ = writeln!(out, "# TYPE sagad_step_attempts_total counter");
        for ((p, phase, outcome), h) in steps.iter() {
            let _ = writeln!(out, "sagad_step_attempts_total{{participant=\"{p}\",phase=\"{phase}\",outcome=\"{outcome}\"}} {}", h.count);
        }
        let _ = writeln!(out, "# HELP sagad_step_duration_seconds Participant call latency, by participant, phase and outcome.");
        let _ = writeln!(out, "# TYPE sagad_step_duration_seconds histogram");
        for ((p, phase, outcome), h) in steps.iter() {
            let labels = format!("participant=\"{p}\",phase=\"{phase}\",outcome=\"{outcome}\"");
            h.render(&mut out, "sagad_step_duration_seconds", &labels);
        }
        drop(steps);
        let settle = self.settle.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "# HELP sagad_saga_settle_seconds Time from start to a settled state (COMPLETED, COMPENSATED, SUSPENDED, RESOLVED), by definition, for sagas settled here.");
        let _ = writeln!(out, "# TYPE sagad_saga_settle_seconds histogram");
        for (d, h) in settle.iter() {
            h.render(
                &mut out,
                "sagad_saga_settle_seconds",
                &format!("definition=\"{d}\""),
            );
        }
        drop(settle);
        if let Some(w) = &self.db_writes {
            w.render(&mut out);
        }
        out
    }
}

impl Metrics {
    fn render_leases(&self, out: &mut String) {
        let rows = [
            ("sagad_lease_takeovers_total", "counter", "Sagas this coordinator took over after another's lease expired.", self.takeovers.load(Ordering::Relaxed)),
            ("sagad_leases_lost_total", "counter", "Sagas this coordinator dropped because another coordinator or an operator took them.", self.leases_lost.load(Ordering::Relaxed)),
            ("sagad_participant_calls_in_flight", "gauge", "Participant calls waiting for an answer.", self.calls_in_flight.load(Ordering::Relaxed)),
            ("sagad_leases_renewed_total", "counter", "Leases renewed in the background (one statement per round for all of them).", self.renewed.load(Ordering::Relaxed)),
            ("sagad_lease_renewal_failures_total", "counter", "Renewal rounds that failed (the database did not answer); leases not renewed may expire and be taken over.", self.renewals_failed.load(Ordering::Relaxed)),
            ("sagad_sagas_purged_total", "counter", "Settled sagas this coordinator deleted under --retention-days, with their history.", self.purged.load(Ordering::Relaxed)),
        ];
        for (name, kind, help, v) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
    }
}

/// The database's saga counts as gauges.
fn render_counts(out: &mut String, c: &StateCounts) {
    let _ = writeln!(out, "# HELP sagad_sagas Sagas in the database by state (settled states over the last 24 h), each counted up to 10,000.");
    let _ = writeln!(out, "# TYPE sagad_sagas gauge");
    for s in SagaState::ALL {
        let n = c
            .by_state
            .iter()
            .find(|(x, _)| x == s)
            .map_or(0, |(_, n)| *n);
        let _ = writeln!(out, "sagad_sagas{{state=\"{}\"}} {n}", s.as_str());
    }
    let _ = writeln!(out, "# HELP sagad_sagas_stuck Stuck sagas (SUSPENDED, idle past --stuck-after-ms, or at --stuck-attempts), counted up to 10,000.\n# TYPE sagad_sagas_stuck gauge\nsagad_sagas_stuck {}", c.stuck);
}

/// The participants' balancing state (see `participant::balance`), by
/// participant and instance.
pub fn render_pools(out: &mut String, pools: &[crate::participant::PoolSnapshot]) {
    let families: [(&str, &str, &str); 7] = [
        ("sagad_participant_in_flight", "gauge", "Calls in flight to the participant from this coordinator."),
        ("sagad_participant_in_flight_max", "gauge", "The cap on them (--participant-in-flight-max); absent: none."),
        ("sagad_participant_waits_total", "counter", "Calls that waited for a slot under the cap or a token of the rate limit."),
        ("sagad_participant_not_sent_total", "counter", "Calls that waited until their arrival limit and were asked again later (no attempt counted)."),
        ("sagad_participant_rerouted_total", "counter", "Attempts sent to another instance after one was not reached."),
        ("sagad_participant_instance_in_flight", "gauge", "Calls in flight to one instance from this coordinator."),
        ("sagad_participant_instance_breaker_open", "gauge", "1 while the instance's circuit breaker is open, 0.5 half-open, 0 closed."),
    ];
    for (name, kind, help) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for p in pools {
            let who = format!("participant=\"{}\"", label(&p.participant));
            let value = match name {
                "sagad_participant_in_flight" => Some(p.in_flight as f64),
                "sagad_participant_in_flight_max" => p.in_flight_max.map(|m| m as f64),
                "sagad_participant_waits_total" => Some(p.waited as f64),
                "sagad_participant_not_sent_total" => Some(p.not_sent as f64),
                "sagad_participant_rerouted_total" => Some(p.rerouted as f64),
                _ => None,
            };
            if let Some(v) = value {
                let _ = writeln!(out, "{name}{{{who}}} {v}");
            }
            for i in &p.instances {
                let v = match (name, i.breaker.as_str()) {
                    ("sagad_participant_instance_in_flight", _) => i.outstanding as f64,
                    ("sagad_participant_instance_breaker_open", "open") => 1.0,
                    ("sagad_participant_instance_breaker_open", "half_open") => 0.5,
                    ("sagad_participant_instance_breaker_open", _) => 0.0,
                    _ => continue,
                };
                let _ = writeln!(
                    out,
                    "{name}{{{who},endpoint=\"{}\"}} {v}",
                    label(&i.endpoint)
                );
            }
        }
    }
}

/// A Prometheus label value: backslashes, quotes and newlines escaped.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.saga_started();
        m.saga_settled(SagaState::Completed);
        m.step_attempt(
            "pay",
            Phase::Action,
            &CallResult::Succeeded(None),
            Duration::from_millis(3),
        );
        m.step_attempt(
            "pay",
            Phase::Action,
            &CallResult::Succeeded(None),
            Duration::from_millis(30),
        );
        m.lease_takeover();
        m.saga_settle_time("order", Duration::from_millis(40));
        let flying = m.call_started();
        let counts = StateCounts {
            by_state: vec![(SagaState::Suspended, 2)],
            stuck: 3,
        };
        let text = m.render(Some(&counts));
        assert!(text.contains("sagad_participant_calls_in_flight 1\n"));
        drop(flying);
        assert!(m
            .render(None)
            .contains("sagad_participant_calls_in_flight 0\n"));
        assert!(text.contains("sagad_lease_takeovers_total 1\n"));
        assert!(text.contains("sagad_leases_lost_total 0\n"));
        assert!(text.contains("sagad_sagas{state=\"SUSPENDED\"} 2\n"));
        assert!(text.contains("sagad_sagas{state=\"RUNNING\"} 0\n"));
        assert!(text.contains("sagad_sagas_stuck 3\n"));
        assert!(
            text.contains("sagad_saga_settle_seconds_bucket{definition=\"order\",le=\"0.05\"} 1\n")
        );
        assert!(text
            .contains("sagad_saga_settle_seconds_bucket{definition=\"order\",le=\"0.025\"} 0\n"));
        assert!(text.contains("sagad_sagas_started_total 1\n"));
        assert!(text.contains("sagad_sagas_completed_total 1\n"));
        assert!(text.contains(
            r#"sagad_step_attempts_total{participant="pay",phase="action",outcome="succeeded"} 2"#
        ));
        assert!(text.contains(r#"sagad_step_duration_seconds_bucket{participant="pay",phase="action",outcome="succeeded",le="0.005"} 1"#));
        assert!(text.contains(r#"sagad_step_duration_seconds_bucket{participant="pay",phase="action",outcome="succeeded",le="0.05"} 2"#));
        assert!(text.contains(r#"le="+Inf"} 2"#));
        assert!(
            !text.contains("sagad_db_write"),
            "no lanes, no lane figures"
        );
    }

    #[test]
    fn renders_the_write_lanes_figures() {
        let w = std::sync::Arc::new(DbWrites::default());
        let m = Metrics::with_db_writes(w.clone());
        w.statement(3, Duration::from_micros(400));
        w.statement(1, Duration::from_millis(2));
        assert_eq!(w.counts(), (4, 2));
        let text = m.render(None);
        assert!(text.contains("sagad_db_write_requests_total 4\n"));
        assert!(text.contains("sagad_db_write_statements_total 2\n"));
        assert!(text.contains("sagad_db_write_duration_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(text.contains("sagad_db_write_duration_seconds_bucket{le=\"0.0025\"} 2\n"));
        assert!(text.contains("sagad_db_write_duration_seconds_count 2\n"));
    }
}
