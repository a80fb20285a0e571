//! HTML helpers: escaping (every piece of user-supplied text goes through
//! [`esc`]) and the page frame. No scripts: the pages work without
//! JavaScript and have no front-end build step.

use chrono::{DateTime, Utc};

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query parameter value.
pub fn url(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// "3m 12s" from a duration.
pub fn age(from: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let s = (now - from).num_seconds().max(0);
    match s {
        0..=59 => format!("{s}s"),
        60..=3_599 => format!("{}m {}s", s / 60, s % 60),
        3_600..=86_399 => format!("{}h {}m", s / 3_600, (s % 3_600) / 60),
        _ => format!("{}d {}h", s / 86_400, (s % 86_400) / 3_600),
    }
}

/// A CSS class per saga or step state.
pub fn state_class(state: &str) -> &'static str {
    match state {
        "SUSPENDED" | "FAILED" => "bad",
        "COMPENSATING" | "COMPENSATED" | "RUNNING" => "warn",
        "COMPLETED" | "SUCCEEDED" | "RESOLVED" => "good",
        _ => "",
    }
}

/// The page frame. `logged_in`: `None` when no admin token is configured.
pub fn page(title: &str, logged_in: Option<bool>, body: &str) -> String {
    let session = match logged_in {
        None => String::new(),
        Some(true) => "<form method=post action=/logout class=inline><button id=logout>Log out</button></form>".into(),
        Some(false) => "<a id=login-link href=/login>Log in</a>".into(),
    };
    format!(
        r#"<!doctype html>
<html lang=en><head><meta charset=utf-8><title>{title} · sagad</title>
<meta name=viewport content="width=device-width, initial-scale=1">
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; }}
header {{ background: #1d2330; color: #fff; padding: .6rem 1.2rem; display: flex; gap: 1.2rem; align-items: center; }}
header a {{ color: #fff; text-decoration: none; }} header .grow {{ flex: 1; }}
main {{ padding: 1rem 1.2rem; }}
table {{ border-collapse: collapse; width: 100%; background: #fff; margin-bottom: 1rem; }}
th, td {{ text-align: left; padding: .35rem .5rem; border-bottom: 1px solid #e3e6eb; vertical-align: top; }}
th {{ background: #eef0f4; font-weight: 600; }}
code, pre {{ font: 12px ui-monospace, monospace; }} pre {{ white-space: pre-wrap; word-break: break-all; margin: 0; }}
.bad {{ color: #b3261e; font-weight: 600; }} .warn {{ color: #9a6700; }} .good {{ color: #1a7f37; }}
.counts {{ display: flex; gap: .6rem; flex-wrap: wrap; margin-bottom: 1rem; }}
.count {{ background: #fff; border: 1px solid #e3e6eb; border-radius: 6px; padding: .4rem .8rem; }}
.count b {{ font-size: 1.3rem; display: block; }}
.alarm {{ border-color: #b3261e; background: #fdecea; }}
.flash {{ padding: .6rem .8rem; border-radius: 6px; margin-bottom: 1rem; background: #e6f4ea; }}
.flash.error {{ background: #fdecea; }}
form.inline {{ display: inline; }} fieldset {{ background: #fff; border: 1px solid #e3e6eb; margin-bottom: .6rem; }}
ol.timeline {{ background: #fff; padding: .6rem 2rem; }} ol.timeline li {{ margin: .2rem 0; }}
.muted {{ color: #6b7280; }}
.chart-box {{ background: #fff; border: 1px solid #e3e6eb; padding: .6rem; margin-bottom: 1rem; max-width: 760px; }}
svg.chart {{ width: 100%; height: auto; display: block; background: #fff; margin-bottom: .6rem; }}
svg.chart text {{ font: 11px system-ui, sans-serif; fill: #4b5563; }}
svg .axis {{ stroke: #9aa1ad; }} svg .wait {{ stroke: #9aa1ad; stroke-dasharray: 3 2; }}
rect.bar {{ fill: #1a7f37; }} rect.step_retry, rect.compensation_retry {{ fill: #9a6700; }}
rect.compensating {{ fill: #9a6700; }}
rect.step_failed, rect.step_unknown, rect.suspended {{ fill: #b3261e; }}
.legend {{ display: flex; gap: 1rem; }} .legend i {{ display: inline-block; width: 10px; height: 10px; margin-right: 4px; }}
</style></head>
<body><header><b>sagad</b><a href=/>Sagas</a><a href=/definitions>Definitions</a><a href=/participants>Participants</a><span class=grow></span>{session}</header>
<main>{body}</main></body></html>"#,
        title = esc(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
        assert_eq!(url("a b/é"), "a%20b%2F%C3%A9");
    }
}
