//! Prometheus metrics of this process, rendered in the text exposition
//! format at `/metrics`.
//!
//! Hand-rolled on purpose: a handful of counters and one histogram family,
//! whose labels (participant names, outcomes) are already restricted to
//! `[A-Za-z0-9_.-]`, do not need a metrics framework.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::domain::{CallResult, Phase, SagaState};

/// Upper bounds of the step latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
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
        let secs = elapsed.as_secs_f64();
        let mut steps = self.steps.lock().unwrap_or_else(|p| p.into_inner());
        let h = steps.entry(key).or_default();
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
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
            for (i, le) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "sagad_step_duration_seconds_bucket{{{labels},le=\"{le}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "sagad_step_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "sagad_step_duration_seconds_sum{{{labels}}} {}", h.sum);
            let _ = writeln!(
                out,
                "sagad_step_duration_seconds_count{{{labels}}} {}",
                h.count
            );
        }
        out
    }
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
        let text = m.render();
        assert!(text.contains("sagad_sagas_started_total 1\n"));
        assert!(text.contains("sagad_sagas_completed_total 1\n"));
        assert!(text.contains(
            r#"sagad_step_attempts_total{participant="pay",phase="action",outcome="succeeded"} 2"#
        ));
        assert!(text.contains(r#"sagad_step_duration_seconds_bucket{participant="pay",phase="action",outcome="succeeded",le="0.005"} 1"#));
        assert!(text.contains(r#"sagad_step_duration_seconds_bucket{participant="pay",phase="action",outcome="succeeded",le="0.05"} 2"#));
        assert!(text.contains(r#"le="+Inf"} 2"#));
    }
}
