//! What ships in `deploy/` speaks of metrics sagad really exposes: every
//! `sagad_*` name in the Grafana dashboard's queries and in the alert rules
//! is a metric family of a live coordinator's `/metrics` (after a saga, so
//! the labelled families have series).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

use common::*;
use tonic::Code;

/// The `sagad_*` identifiers in `text`.
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("sagad_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// The metric families of an exposition: `# TYPE` names, with a
/// histogram's `_bucket`, `_sum` and `_count` series.
fn families(exposition: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            out.insert(name.to_owned());
            if kind == "histogram" {
                for s in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{s}"));
                }
            }
        }
    }
    out
}

#[tokio::test]
async fn the_dashboard_and_the_alert_rules_use_metrics_sagad_exposes() {
    let db = TestDb::new().await;
    let (svc, cfg) = with_svc(&db).await;
    let coord = TestCoordinator::start(cfg).await;
    let mut c = coord.client().await;
    register(
        &mut c,
        definition("abc", vec![step("a", "svc", true, true)]),
    )
    .await;
    let s = start(&mut c, "abc", "{}").await;
    wait(&mut c, &s.saga_id).await;
    svc.script("a.do", vec![Reply::Status(Code::Unimplemented)]);
    let s = start(&mut c, "abc", "{}").await;
    wait(&mut c, &s.saga_id).await;
    let exposed = families(&http(coord.admin, "GET", "/metrics", &[], "").await.body);
    assert!(exposed.contains("sagad_sagas"), "{exposed:?}");

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/sagad.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = String::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            exprs.push_str(t["expr"].as_str().unwrap());
            exprs.push('\n');
        }
    }
    let rules: serde_json::Value = serde_norway::from_str(
        &std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).unwrap(),
    )
    .unwrap();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            exprs.push_str(rule["expr"].as_str().unwrap());
            exprs.push('\n');
            assert!(
                ["critical", "warning", "info"]
                    .contains(&rule["labels"]["severity"].as_str().unwrap()),
                "{rule}"
            );
            assert!(rule["annotations"]["runbook"].is_string(), "{rule}");
        }
    }
    let used = names(&exprs);
    assert!(used.len() >= 10, "{used:?}");
    let unknown: Vec<_> = used.difference(&exposed).collect();
    assert!(unknown.is_empty(), "not exposed by sagad: {unknown:?}");
}
