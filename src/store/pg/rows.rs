//! Decoding PostgreSQL rows into domain values (the column layouts shared
//! with the other store are in `store::encode`).

use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use crate::domain::{Definition, Saga, SagaId};
use crate::store::encode::{decode_definition_content, decode_steps, decode_trace, parse_state};
use crate::store::{Registered, StoreError};

/// The columns [`decode_saga`] reads, qualified with `s.` (alias `sagas s`).
pub const SAGA_COLUMNS: &str = "s.saga_id, s.definition, s.version, s.state, s.suspended_from, \
     s.input, s.steps, s.error, s.deadline_at, s.created_at, s.updated_at, s.started_by, s.trace_context";

/// A saga from a row holding [`SAGA_COLUMNS`].
pub fn decode_saga(row: &PgRow) -> Result<Saga, StoreError> {
    let state: String = row.try_get("state")?;
    let suspended_from: Option<String> = row.try_get("suspended_from")?;
    Ok(Saga {
        id: SagaId(row.try_get::<Uuid, _>("saga_id")?),
        definition: row.try_get("definition")?,
        version: row.try_get::<i32, _>("version")?.max(0) as u32,
        state: parse_state(&state)?,
        suspended_from: suspended_from.as_deref().map(parse_state).transpose()?,
        input: row.try_get("input")?,
        steps: decode_steps(row.try_get("steps")?)?,
        error: row.try_get("error")?,
        deadline_at: row.try_get("deadline_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        started_by: row.try_get("started_by")?,
        trace: decode_trace(row.try_get("trace_context")?)?,
    })
}

/// A definition and its registration from `(version, content, created_at,
/// registered_by)`.
pub fn decode_definition(row: &PgRow) -> Result<(Definition, Registered), StoreError> {
    let def = decode_definition_content(
        row.try_get("content")?,
        i64::from(row.try_get::<i32, _>("version")?),
    )?;
    Ok((
        def,
        Registered {
            at: row.try_get("created_at")?,
            by: row.try_get("registered_by")?,
        },
    ))
}
