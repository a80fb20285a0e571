//! Decoding SQLite rows into domain values (the column layouts shared with
//! PostgreSQL are in `store::encode`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use uuid::Uuid;

use super::Db;
use crate::domain::{Definition, EventKind, Saga, SagaId};
use crate::store::encode::{
    corrupt, decode_definition_content, decode_steps, decode_trace, parse_state,
};
use crate::store::{OwnerId, Registered, StoreError, StoredEvent};

/// The columns [`decode_saga`] reads.
pub const SAGA_COLUMNS: &str = "saga_id, definition, version, state, suspended_from, input, \
     steps, error, deadline_at, created_at, updated_at, started_by, trace_context";

/// A time as stored: microseconds since the epoch.
pub fn us(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// A stored time.
pub fn from_us(v: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(v).ok_or_else(|| corrupt("time", v))
}

fn time(row: &SqliteRow, col: &str) -> Result<DateTime<Utc>, StoreError> {
    from_us(row.try_get(col).db()?)
}

fn time_opt(row: &SqliteRow, col: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
    row.try_get::<Option<i64>, _>(col)
        .db()?
        .map(from_us)
        .transpose()
}

pub fn uuid(text: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(text).map_err(|e| corrupt("id", e))
}

/// The lease's owner column.
pub fn owner(row: &SqliteRow) -> Result<Option<OwnerId>, StoreError> {
    row.try_get::<Option<String>, _>("owner")
        .db()?
        .map(|o| uuid(&o).map(OwnerId))
        .transpose()
}

/// A saga from a row holding [`SAGA_COLUMNS`].
pub fn decode_saga(row: &SqliteRow) -> Result<Saga, StoreError> {
    let state: String = row.try_get("state").db()?;
    let suspended_from: Option<String> = row.try_get("suspended_from").db()?;
    let steps: String = row.try_get("steps").db()?;
    let steps = serde_json::from_str(&steps).map_err(|e| corrupt("steps", e))?;
    Ok(Saga {
        id: SagaId(uuid(&row.try_get::<String, _>("saga_id").db()?)?),
        definition: row.try_get("definition").db()?,
        version: row
            .try_get::<i64, _>("version")
            .db()?
            .clamp(0, u32::MAX.into()) as u32,
        state: parse_state(&state)?,
        suspended_from: suspended_from.as_deref().map(parse_state).transpose()?,
        input: row.try_get("input").db()?,
        steps: decode_steps(steps)?,
        error: row.try_get("error").db()?,
        deadline_at: time_opt(row, "deadline_at")?,
        created_at: time(row, "created_at")?,
        updated_at: time(row, "updated_at")?,
        started_by: row.try_get("started_by").db()?,
        trace: decode_trace(row.try_get("trace_context").db()?)?,
    })
}

/// A definition and its registration from `(version, content, created_at,
/// registered_by)`.
pub fn decode_definition(row: &SqliteRow) -> Result<(Definition, Registered), StoreError> {
    let content: String = row.try_get("content").db()?;
    let content = serde_json::from_str(&content).map_err(|e| corrupt("definition", e))?;
    let def = decode_definition_content(content, row.try_get("version").db()?)?;
    Ok((
        def,
        Registered {
            at: time(row, "created_at")?,
            by: row.try_get("registered_by").db()?,
        },
    ))
}

/// One history entry.
pub fn decode_event(r: &SqliteRow) -> Result<StoredEvent, StoreError> {
    let kind: String = r.try_get("kind").db()?;
    Ok(StoredEvent {
        seq: r.try_get("seq").db()?,
        at: time(r, "at")?,
        kind: EventKind::parse(&kind).ok_or_else(|| corrupt("event kind", &kind))?,
        step: r.try_get("step").db()?,
        attempt: r
            .try_get::<i64, _>("attempt")
            .db()?
            .clamp(0, u32::MAX.into()) as u32,
        detail: r.try_get("detail").db()?,
        took: r
            .try_get::<Option<i64>, _>("took_ms")
            .db()?
            .map(|ms| Duration::from_millis(ms.max(0) as u64)),
    })
}
