//! Pictures for the admin pages, drawn on the server as inline SVG (no
//! script): the last hour's activity on the list page, and a saga's calls on
//! a timeline on its own page.
//!
//! ```text
//!  activity (per minute, last 60)      timeline (one row per call)
//!   n │    started ╱╲                   action reserve #1  ██
//!     │  completed╱  ╲__                action charge #1      ░░░██        ░ waited
//!     └──────────────────▶ now          action charge #2             ░░░░██
//! ```
//!
//! The activity counts come from the database per minute; minutes that are
//! over do not change, so [`ActivityCache`] keeps them and counts only the
//! last few minutes again — at most once per `ACTIVITY_FRESH_SECS`, and off
//! the page load once the hour has been counted: that count grows with the
//! recent load (a fifth of a second after minutes at 5,000 sagas/s) while
//! the chart moves by the minute. A page shows the counts as they were at
//! most a few seconds ago, and never waits for them but the first time.
//!
//! ```text
//!   load ─▶ fresh (< 5 s)? ─yes─▶ draw the cache
//!              │ no
//!              ├─ never counted ─▶ count the hour, wait, draw
//!              └─ counted before ─▶ count the last minutes in the
//!                                   background (one at a time), draw
//!                                   the cache now
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, DurationRound, Utc};

use super::html::esc;
use crate::domain::{EventKind, Saga};
use crate::store::{ActivityMinute, StoredEvent};

/// Minutes the activity chart shows.
pub const ACTIVITY_MINUTES: i64 = 60;
/// Minutes counted again on every load: a settling event may be written a
/// little after the time it records.
const RECOUNT_MINUTES: i64 = 2;
/// Seconds a count serves page loads before the database counts again.
const ACTIVITY_FRESH_SECS: i64 = 5;
/// Seconds after which a background count that never reported back is
/// given up and another may start.
const ACTIVITY_COUNT_GIVE_UP_SECS: i64 = 30;

/// What a page load does about the activity counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recount {
    /// The cache is fresh, or a count is under way: draw it.
    No,
    /// Nothing counted yet: count from here and wait for it.
    Wait(DateTime<Utc>),
    /// Count from here in the background; draw the cache meanwhile.
    Background(DateTime<Utc>),
}
/// Rows of the timeline drawn; the table lists them all.
const TIMELINE_ROWS_MAX: usize = 200;

/// The activity of the last hour, by minute, as counted so far.
#[derive(Debug, Default)]
pub struct ActivityCache {
    minutes: BTreeMap<DateTime<Utc>, ActivityMinute>,
    counted_at: Option<DateTime<Utc>>,
    /// When the background count under way started.
    counting_since: Option<DateTime<Utc>>,
}

impl ActivityCache {
    /// The first minute the chart shows at `now`.
    pub fn window_start(now: DateTime<Utc>) -> DateTime<Utc> {
        let minute = now
            .duration_trunc(chrono::Duration::minutes(1))
            .unwrap_or(now);
        minute - chrono::Duration::minutes(ACTIVITY_MINUTES - 1)
    }

    /// What a page load at `now` does; a background count it asks for is
    /// taken as started (one at a time).
    pub fn plan(&mut self, now: DateTime<Utc>) -> Recount {
        let within = |at: Option<DateTime<Utc>>, secs| {
            at.is_some_and(|at| at <= now && now - at < chrono::Duration::seconds(secs))
        };
        let Some(from) = self.recount_from(now) else {
            return Recount::No;
        };
        if self.counted_at.is_none() {
            return Recount::Wait(from);
        }
        if within(self.counting_since, ACTIVITY_COUNT_GIVE_UP_SECS) {
            return Recount::No;
        }
        self.counting_since = Some(now);
        Recount::Background(from)
    }

    /// A background count failed: the next load may start another.
    pub fn count_failed(&mut self) {
        self.counting_since = None;
    }

    /// From when the database must count again; none while the last
    /// count is fresh.
    fn recount_from(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let fresh = chrono::Duration::seconds(ACTIVITY_FRESH_SECS);
        if self
            .counted_at
            .is_some_and(|at| at <= now && now - at < fresh)
        {
            return None;
        }
        let start = Self::window_start(now);
        Some(match self.counted_at {
            Some(at) => Self::window_start(at)
                .max(start)
                .max(at - chrono::Duration::minutes(RECOUNT_MINUTES))
                .duration_trunc(chrono::Duration::minutes(1))
                .unwrap_or(start),
            None => start,
        })
    }

    /// Takes fresh counts of the minutes from `from` on, counted at `now`.
    pub fn merge(&mut self, from: DateTime<Utc>, fresh: Vec<ActivityMinute>, now: DateTime<Utc>) {
        self.minutes.retain(|m, _| *m < from);
        for m in fresh {
            self.minutes.insert(m.minute, m);
        }
        let start = Self::window_start(now);
        self.minutes.retain(|m, _| *m >= start);
        self.counted_at = Some(now);
        self.counting_since = None;
    }

    /// Every minute of the window at `now`, zeros included.
    pub fn minutes(&self, now: DateTime<Utc>) -> Vec<ActivityMinute> {
        let start = Self::window_start(now);
        (0..ACTIVITY_MINUTES)
            .map(|i| {
                let minute = start + chrono::Duration::minutes(i);
                self.minutes
                    .get(&minute)
                    .copied()
                    .unwrap_or(ActivityMinute {
                        minute,
                        ..Default::default()
                    })
            })
            .collect()
    }
}

/// The activity chart: four lines over the window, a legend with totals.
pub fn activity_svg(minutes: &[ActivityMinute]) -> String {
    type Series = (&'static str, &'static str, fn(&ActivityMinute) -> i64);
    let series: [Series; 4] = [
        ("started", "#1d4ed8", |m| m.started),
        ("completed", "#1a7f37", |m| m.completed),
        ("compensated", "#9a6700", |m| m.compensated),
        ("suspended", "#b3261e", |m| m.suspended),
    ];
    let (w, h, left, top, bottom) = (720.0, 150.0, 44.0, 8.0, 20.0);
    let max = minutes
        .iter()
        .flat_map(|m| series.iter().map(move |(_, _, f)| f(m)))
        .max()
        .unwrap_or(0)
        .max(1);
    let n = minutes.len().max(2) as f64 - 1.0;
    let x = |i: usize| left + (w - left - 4.0) * i as f64 / n;
    let y = |v: i64| top + (h - top - bottom) * (1.0 - v as f64 / max as f64);
    let mut svg = format!(
        "<svg id=activity-chart class=chart viewBox='0 0 {w} {h}' role=img \
         aria-label='Sagas per minute over the last hour'>\
         <line x1={left} y1={b} x2={w} y2={b} class=axis />\
         <line x1={left} y1={top} x2={left} y2={b} class=axis />\
         <text x={tx} y={ty} text-anchor=end>{max}</text>\
         <text x={tx} y={b} text-anchor=end>0</text>\
         <text x={left} y={h} >{ACTIVITY_MINUTES} min ago</text>\
         <text x={w} y={h} text-anchor=end>now</text>",
        b = h - bottom,
        tx = left - 4.0,
        ty = top + 8.0,
    );
    let mut legend = String::from("<div class=legend>");
    for (name, color, f) in series {
        let points: Vec<String> = minutes
            .iter()
            .enumerate()
            .map(|(i, m)| format!("{:.1},{:.1}", x(i), y(f(m))))
            .collect();
        let _ = write!(
            svg,
            "<polyline id=activity-line-{name} fill=none stroke='{color}' stroke-width=2 points='{}' />",
            points.join(" ")
        );
        let total: i64 = minutes.iter().map(f).sum();
        let _ = write!(
            legend,
            "<span id=activity-{name}><i style='background:{color}'></i>{name} <b>{total}</b></span>"
        );
    }
    svg.push_str("</svg>");
    legend.push_str("</div>");
    format!("<h2>Last hour, per minute</h2><div class=chart-box>{svg}{legend}</div>")
}

/// One call, as the history records it.
struct Call<'a> {
    label: String,
    outcome: &'a str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    waited: chrono::Duration,
}

/// The calls of a saga in its history: entries that record an answer and
/// how long the call took.
fn calls<'a>(saga: &Saga, events: &'a [StoredEvent]) -> Vec<Call<'a>> {
    let mut out: Vec<Call<'a>> = Vec::new();
    let mut free_at = saga.created_at;
    for e in events {
        let (Some(took), Some(step)) = (e.took, e.step.as_deref()) else {
            continue;
        };
        let phase = match e.kind {
            EventKind::StepCompensated | EventKind::CompensationRetry => "compensation",
            _ => "action",
        };
        let took = chrono::Duration::from_std(took).unwrap_or_default();
        let start = e.at - took;
        out.push(Call {
            label: format!("{phase} {step} #{}", e.attempt),
            outcome: e.kind.as_str(),
            start,
            end: e.at,
            waited: (start - free_at).max(chrono::Duration::zero()),
        });
        free_at = e.at;
    }
    out
}

/// The saga's calls on a timeline, with a table of their durations and the
/// waits between them.
pub fn timeline(saga: &Saga, events: &[StoredEvent]) -> String {
    let calls = calls(saga, events);
    let mut out = String::from("<h2>Timeline</h2>");
    if calls.is_empty() {
        out.push_str("<p class=muted id=timeline-empty>No calls recorded yet.</p>");
        return out;
    }
    let t0 = saga.created_at;
    let t1 = calls
        .iter()
        .map(|c| c.end)
        .chain(events.last().map(|e| e.at))
        .max()
        .unwrap_or(t0);
    let shown = &calls[..calls.len().min(TIMELINE_ROWS_MAX)];
    let _ = write!(
        out,
        "<div class=chart-box>{}</div>",
        timeline_svg(shown, t0, t1)
    );
    if calls.len() > shown.len() {
        let _ = write!(
            out,
            "<p class=muted>The first {} calls of {} are drawn; the table lists them all.</p>",
            shown.len(),
            calls.len()
        );
    }
    out.push_str(
        "<table id=timeline><tr><th>Call</th><th>Began</th><th>Took</th>\
         <th>Waited before</th><th>Answer</th></tr>",
    );
    for c in &calls {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>+{}</td><td class=took>{}</td><td class=waited>{}</td><td>{}</td></tr>",
            esc(&c.label),
            human(c.start - t0),
            human(c.end - c.start),
            human(c.waited),
            esc(c.outcome),
        );
    }
    out.push_str("</table>");
    out
}

/// One row per call from `t0` to `t1`: the wait before it dashed, the call
/// a bar.
fn timeline_svg(calls: &[Call<'_>], t0: DateTime<Utc>, t1: DateTime<Utc>) -> String {
    let span_ms = (t1 - t0).num_microseconds().unwrap_or(i64::MAX).max(1) as f64 / 1e3;
    let (w, label_w, row) = (720.0, 190.0, 18.0);
    let h = row * calls.len() as f64 + 18.0;
    let x = |t: DateTime<Utc>| {
        let ms = (t - t0).num_microseconds().unwrap_or(0) as f64 / 1e3;
        label_w + (w - label_w - 4.0) * (ms / span_ms).clamp(0.0, 1.0)
    };
    let mut svg = format!(
        "<svg id=timeline-chart class=chart viewBox='0 0 {w} {h}' role=img \
         aria-label='The saga&#39;s calls over time'>"
    );
    for (i, c) in calls.iter().enumerate() {
        let top = row * i as f64;
        let (x0, x1) = (x(c.start), x(c.end));
        let _ = write!(
            svg,
            "<text x=0 y={ty}>{label}</text>\
             <line x1={prev:.1} y1={ly} x2={x0:.1} y2={ly} class=wait />\
             <rect class='bar {outcome}' x={x0:.1} y={by} width={bw:.1} height=12>\
             <title>{label}: {took}, waited {waited} before</title></rect>",
            ty = top + 13.0,
            ly = top + 9.0,
            by = top + 3.0,
            prev = x(c.start - c.waited),
            bw = (x1 - x0).max(2.0),
            label = esc(&c.label),
            outcome = esc(c.outcome),
            took = human(c.end - c.start),
            waited = human(c.waited),
        );
    }
    let _ = write!(
        svg,
        "<text x={label_w} y={h}>0</text><text x={w} y={h} text-anchor=end>{}</text></svg>",
        human(t1 - t0)
    );
    svg
}

/// "850 µs", "12 ms", "1.25 s", "3.0 min".
fn human(d: chrono::Duration) -> String {
    let d = d.to_std().unwrap_or(Duration::ZERO);
    let us = d.as_micros();
    if us < 1_000 {
        format!("{us} µs")
    } else if us < 10_000_000 {
        format!("{} ms", us / 1_000)
    } else if us < 120_000_000 {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{:.1} min", d.as_secs_f64() / 60.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Definition, SagaId};

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .with_timezone(&Utc)
    }

    fn minute(m: &str, started: i64) -> ActivityMinute {
        ActivityMinute {
            minute: at(m),
            started,
            ..Default::default()
        }
    }

    #[test]
    fn a_background_count_that_fails_or_never_ends_does_not_stop_the_next() {
        let mut c = ActivityCache::default();
        let t = |s: &str| at(&format!("2026-12-01T10:{s}Z"));
        c.merge(t("00:00"), Vec::new(), t("30:00"));
        assert!(matches!(c.plan(t("30:10")), Recount::Background(_)));
        assert_eq!(c.plan(t("30:20")), Recount::No, "one at a time");
        c.count_failed();
        assert!(matches!(c.plan(t("30:21")), Recount::Background(_)));
        // This one never reports back: given up after a while.
        assert_eq!(c.plan(t("30:50")), Recount::No);
        assert!(matches!(c.plan(t("30:51")), Recount::Background(_)));
    }

    #[test]
    fn the_cache_counts_the_hour_once_then_only_the_last_minutes() {
        let mut c = ActivityCache::default();
        let now = at("2026-12-01T10:30:20Z");
        assert_eq!(c.plan(now), Recount::Wait(at("2026-12-01T09:31:00Z")));
        c.merge(
            at("2026-12-01T09:31:00Z"),
            vec![
                minute("2026-12-01T09:31:00Z", 1),
                minute("2026-12-01T10:29:00Z", 2),
                minute("2026-12-01T10:30:00Z", 3),
            ],
            now,
        );
        // A count serves the loads of the next few seconds.
        assert_eq!(c.plan(at("2026-12-01T10:30:24Z")), Recount::No);
        let later = at("2026-12-01T10:32:05Z");
        // Minutes over are kept; the last two are counted again, in the
        // background, one count at a time.
        assert_eq!(
            c.plan(later),
            Recount::Background(at("2026-12-01T10:28:00Z"))
        );
        assert_eq!(c.plan(at("2026-12-01T10:32:30Z")), Recount::No);
        c.merge(
            at("2026-12-01T10:28:00Z"),
            vec![minute("2026-12-01T10:30:00Z", 5)],
            later,
        );
        let shown = c.minutes(later);
        assert_eq!(shown.len(), ACTIVITY_MINUTES as usize);
        assert_eq!(shown[0].minute, at("2026-12-01T09:33:00Z"));
        let total: i64 = shown.iter().map(|m| m.started).sum();
        // 09:31 fell out of the window, 10:29 was recounted as nothing,
        // 10:30 as five.
        assert_eq!(total, 5);
    }

    #[test]
    fn the_timeline_shows_durations_and_waits() {
        let def: Definition = serde_json::from_value(serde_json::json!({
            "name": "t", "version": 1, "steps": [], "deadline": null
        }))
        .expect("definition");
        let t0 = at("2026-12-01T10:00:00Z");
        let saga = Saga::new(SagaId(uuid::Uuid::nil()), &def, "{}".into(), t0);
        let ev = |seq, ms: i64, kind, attempt, took_ms: Option<u64>| StoredEvent {
            seq,
            at: t0 + chrono::Duration::milliseconds(ms),
            kind,
            step: Some("charge".into()),
            attempt,
            detail: String::new(),
            took: took_ms.map(Duration::from_millis),
        };
        let events = vec![
            ev(1, 0, EventKind::Started, 0, None),
            ev(2, 30, EventKind::StepRetry, 1, Some(20)),
            ev(3, 250, EventKind::StepSucceeded, 2, Some(50)),
        ];
        let html = timeline(&saga, &events);
        assert!(html.contains("<td>action charge #1</td><td>+10 ms</td><td class=took>20 ms</td><td class=waited>10 ms</td>"), "{html}");
        assert!(html.contains("<td>action charge #2</td><td>+200 ms</td><td class=took>50 ms</td><td class=waited>170 ms</td>"), "{html}");
        assert_eq!(html.matches("<rect").count(), 2);
    }
}
