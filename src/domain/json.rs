//! Limits on the JSON that crosses `sagad`: saga inputs and step outputs.
//! Checked before anything is stored: size first (cheap, before parsing),
//! then nesting depth (a scan, before a parser recurses), then syntax.

/// How large and how deep a JSON payload may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonLimits {
    /// Largest payload (bytes).
    pub bytes_max: usize,
    /// Deepest nesting of arrays and objects (`[[1]]` is 2).
    pub depth_max: usize,
}

impl JsonLimits {
    /// Why `text` is refused, if it is: too large, too deep, or not JSON.
    pub fn check(&self, text: &str) -> Result<(), String> {
        if text.len() > self.bytes_max {
            return Err(format!(
                "is {} bytes; the limit is {}",
                text.len(),
                self.bytes_max
            ));
        }
        if let Some(depth) = depth_beyond(text, self.depth_max) {
            return Err(format!(
                "nests deeper than {} levels (reached {depth}); the limit is {}",
                self.depth_max, self.depth_max
            ));
        }
        serde_json::from_str::<serde::de::IgnoredAny>(text)
            .map(|_| ())
            .map_err(|e| format!("not valid JSON: {e}"))
    }
}

/// The first nesting depth past `max` that `text` reaches, if any. Brackets
/// inside strings do not count; the scan does not judge syntax.
pub fn depth_beyond(text: &str, max: usize) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for b in text.bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Some(depth);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_brackets_outside_strings() {
        assert_eq!(depth_beyond(r#"{"a": [1, {"b": 2}]}"#, 3), None);
        assert_eq!(depth_beyond(r#"{"a": [1, {"b": 2}]}"#, 2), Some(3));
        assert_eq!(depth_beyond(r#"{"a": "[[[[[[\"[[["}"#, 1), None);
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let limits = JsonLimits {
            bytes_max: 1 << 20,
            depth_max: 64,
        };
        let err = limits.check(&deep).expect_err("too deep");
        assert!(err.contains("the limit is 64"), "{err}");
        assert!(limits.check(r#"{"ok": [1, 2]}"#).is_ok());
        assert!(limits
            .check("{")
            .expect_err("bad")
            .starts_with("not valid JSON"));
        assert!(JsonLimits {
            bytes_max: 3,
            depth_max: 64
        }
        .check("[1,2]")
        .expect_err("big")
        .contains("5 bytes"));
    }
}
