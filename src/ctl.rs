//! `sagactl`: the command line for operators, over the gRPC API.
//!
//! Exit codes, for scripts: 0 done; 1 the coordinator refused (bad
//! argument, wrong state, missing or wrong token); 2 bad usage or an
//! unreadable file; 3 no such saga or definition; 4 the coordinator cannot
//! be reached or is unavailable; 5 anything else.

use std::fmt::Write as _;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Deserialize;
use serde_json::{json, Value};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::proto;
use crate::proto::coordinator_service_client::CoordinatorServiceClient;

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(
    name = "sagactl",
    version,
    about = "Operate sagad: find stuck sagas, see why, act"
)]
pub struct Cli {
    /// The coordinator's gRPC address.
    #[arg(
        long,
        env = "SAGACTL_COORDINATOR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub coordinator: String,
    /// The admin token, when the coordinator has one.
    #[arg(long, env = "SAGAD_ADMIN_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Who acts (recorded in the saga's history).
    #[arg(long, env = "USER", default_value = "sagactl", global = true)]
    pub actor: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List sagas, newest first.
    List {
        /// Only these states (repeatable): running, compensating, completed,
        /// compensated, suspended, resolved.
        #[arg(long = "state")]
        states: Vec<String>,
        /// Only this definition.
        #[arg(long)]
        definition: Option<String>,
        /// Only stuck sagas.
        #[arg(long)]
        stuck: bool,
        /// Only sagas at least this many seconds old.
        #[arg(long)]
        older_than: Option<u64>,
        /// Page size.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue from a previous page.
        #[arg(long)]
        page_token: Option<String>,
    },
    /// One saga: state, input, steps.
    Show {
        /// Saga id.
        id: String,
    },
    /// A saga's history.
    Events {
        /// Saga id.
        id: String,
    },
    /// Resume a suspended saga (or run a waiting retry now).
    Retry {
        /// Saga id.
        id: String,
        /// Why.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Force compensation (only before the pivot).
    Abort {
        /// Saga id.
        id: String,
        /// Why.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Mark a suspended saga resolved by hand.
    Resolve {
        /// Saga id.
        id: String,
        /// What was done (required).
        #[arg(long)]
        note: String,
    },
    /// Saga definitions.
    Definitions {
        /// list | register FILE
        #[command(subcommand)]
        command: DefinitionsCommand,
    },
}

/// `definitions` subcommands.
#[derive(Debug, Subcommand)]
pub enum DefinitionsCommand {
    /// Every version of every definition.
    List,
    /// Register a definition from a JSON or YAML file.
    Register {
        /// The file (`.json`, `.yaml` or `.yml`).
        file: std::path::PathBuf,
    },
}

/// A failure with its exit code.
#[derive(Debug)]
pub struct Failure {
    /// Process exit code.
    pub code: u8,
    /// One line for people.
    pub message: String,
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        let code = match s.code() {
            Code::NotFound => 3,
            Code::Unavailable | Code::DeadlineExceeded => 4,
            Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::Aborted
            | Code::Unauthenticated
            | Code::PermissionDenied => 1,
            _ => 5,
        };
        fail(
            code,
            format!(
                "{}: {}",
                crate::participant::code_name(s.code()),
                s.message()
            ),
        )
    }
}

/// Runs a command; returns what to print.
pub async fn run(cli: Cli) -> Result<String, Failure> {
    let endpoint = Endpoint::from_shared(cli.coordinator.clone())
        .map_err(|e| fail(2, format!("--coordinator {}: {e}", cli.coordinator)))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    let channel = endpoint.connect().await.map_err(|e| {
        fail(
            4,
            format!("cannot reach the coordinator at {}: {e}", cli.coordinator),
        )
    })?;
    let mut c = CoordinatorServiceClient::new(channel);
    let ctx = Ctx {
        token: cli.token.clone(),
        actor: cli.actor.clone(),
    };
    match cli.command {
        Command::List {
            states,
            definition,
            stuck,
            older_than,
            limit,
            page_token,
        } => {
            let states = states
                .iter()
                .map(|s| parse_state(s))
                .collect::<Result<Vec<_>, _>>()?;
            let r = c
                .list_sagas(proto::ListSagasRequest {
                    states,
                    definition: definition.unwrap_or_default(),
                    stuck_only: stuck,
                    page_size: limit,
                    page_token: page_token.unwrap_or_default(),
                    min_age: older_than.map(|s| prost_types::Duration {
                        seconds: s.min(i64::MAX as u64) as i64,
                        nanos: 0,
                    }),
                })
                .await?
                .into_inner();
            Ok(if cli.json {
                json!({"sagas": r.sagas.iter().map(saga_json).collect::<Vec<_>>(), "next_page_token": non_empty(&r.next_page_token)}).to_string()
            } else {
                saga_table(&r.sagas, &r.next_page_token)
            })
        }
        Command::Show { id } => {
            let s = c
                .get_saga(proto::GetSagaRequest { saga_id: id })
                .await?
                .into_inner()
                .saga
                .unwrap_or_default();
            Ok(if cli.json {
                saga_json(&s).to_string()
            } else {
                saga_detail(&s)
            })
        }
        Command::Events { id } => {
            let evs = c
                .get_saga_events(proto::GetSagaEventsRequest { saga_id: id })
                .await?
                .into_inner()
                .events;
            Ok(if cli.json {
                json!({"events": evs.iter().map(event_json).collect::<Vec<_>>()}).to_string()
            } else {
                events_table(&evs)
            })
        }
        Command::Retry { id, note } => {
            let r = c
                .retry_saga(ctx.req(proto::RetrySagaRequest { saga_id: id, note }))
                .await?
                .into_inner();
            Ok(acted(&cli.json, "retried", r.saga))
        }
        Command::Abort { id, note } => {
            let r = c
                .abort_saga(ctx.req(proto::AbortSagaRequest { saga_id: id, note }))
                .await?
                .into_inner();
            Ok(acted(&cli.json, "aborted", r.saga))
        }
        Command::Resolve { id, note } => {
            let r = c
                .resolve_saga(ctx.req(proto::ResolveSagaRequest { saga_id: id, note }))
                .await?
                .into_inner();
            Ok(acted(&cli.json, "resolved", r.saga))
        }
        Command::Definitions { command } => definitions(&mut c, command, cli.json).await,
    }
}

struct Ctx {
    token: Option<String>,
    actor: String,
}

impl Ctx {
    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Ok(v) = self.actor.parse() {
            r.metadata_mut().insert("x-saga-actor", v);
        }
        if let Some(Ok(v)) = self.token.as_ref().map(|t| format!("Bearer {t}").parse()) {
            r.metadata_mut().insert("authorization", v);
        }
        r
    }
}

fn acted(json: &bool, what: &str, saga: Option<proto::Saga>) -> String {
    let s = saga.unwrap_or_default();
    if *json {
        saga_json(&s).to_string()
    } else {
        format!("{what} {}: now {}", s.saga_id, state_name(s.state))
    }
}

async fn definitions(
    c: &mut CoordinatorServiceClient<Channel>,
    command: DefinitionsCommand,
    json_out: bool,
) -> Result<String, Failure> {
    match command {
        DefinitionsCommand::List => {
            let defs = c
                .list_definitions(proto::ListDefinitionsRequest {})
                .await?
                .into_inner()
                .definitions;
            if json_out {
                return Ok(
                    json!({"definitions": defs.iter().map(definition_json).collect::<Vec<_>>()})
                        .to_string(),
                );
            }
            let rows = defs
                .iter()
                .map(|d| {
                    let steps = d
                        .steps
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(" → ");
                    vec![
                        d.name.clone(),
                        d.version.to_string(),
                        d.steps.len().to_string(),
                        steps,
                    ]
                })
                .collect();
            Ok(table(&["DEFINITION", "VERSION", "STEPS", "ORDER"], rows))
        }
        DefinitionsCommand::Register { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| fail(2, format!("{}: {e}", file.display())))?;
            let yaml = matches!(
                file.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            );
            let parsed: DefinitionFile = if yaml {
                serde_norway::from_str(&text)
                    .map_err(|e| fail(2, format!("{}: {e}", file.display())))?
            } else {
                serde_json::from_str(&text)
                    .map_err(|e| fail(2, format!("{}: {e}", file.display())))?
            };
            let r = c
                .register_definition(proto::RegisterDefinitionRequest {
                    definition: Some(parsed.into_proto()),
                })
                .await?
                .into_inner();
            let d = r.definition.unwrap_or_default();
            Ok(if json_out {
                json!({"definition": definition_json(&d), "created": r.created}).to_string()
            } else {
                format!(
                    "{} {}@{}",
                    if r.created { "registered" } else { "unchanged" },
                    d.name,
                    d.version
                )
            })
        }
    }
}

/// A definition file (JSON or YAML). Durations are in milliseconds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefinitionFile {
    name: String,
    #[serde(default)]
    deadline_ms: Option<u64>,
    steps: Vec<StepFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFile {
    name: String,
    participant: String,
    action: String,
    #[serde(default)]
    compensation: Option<String>,
    #[serde(default)]
    idempotent: bool,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    retry: Option<RetryFile>,
    #[serde(default)]
    compensation_retry: Option<RetryFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryFile {
    #[serde(default)]
    max_attempts: u32,
    #[serde(default)]
    initial_backoff_ms: Option<u64>,
    #[serde(default)]
    multiplier: f64,
    #[serde(default)]
    max_backoff_ms: Option<u64>,
}

fn ms(v: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (v / 1_000).min(i64::MAX as u64) as i64,
        nanos: ((v % 1_000) * 1_000_000) as i32,
    }
}

impl RetryFile {
    fn into_proto(self) -> proto::RetryPolicy {
        proto::RetryPolicy {
            max_attempts: self.max_attempts,
            initial_backoff: self.initial_backoff_ms.map(ms),
            multiplier: self.multiplier,
            max_backoff: self.max_backoff_ms.map(ms),
        }
    }
}

impl DefinitionFile {
    fn into_proto(self) -> proto::SagaDefinition {
        proto::SagaDefinition {
            name: self.name,
            version: 0,
            deadline: self.deadline_ms.map(ms),
            created_at: None,
            steps: self
                .steps
                .into_iter()
                .map(|s| proto::StepDefinition {
                    name: s.name,
                    participant: s.participant,
                    action: s.action,
                    compensation: s.compensation.unwrap_or_default(),
                    idempotent: s.idempotent,
                    timeout: s.timeout_ms.map(ms),
                    retry: s.retry.map(RetryFile::into_proto),
                    compensation_retry: s.compensation_retry.map(RetryFile::into_proto),
                })
                .collect(),
        }
    }
}

fn parse_state(s: &str) -> Result<i32, Failure> {
    let name = format!("SAGA_STATE_{}", s.to_ascii_uppercase());
    proto::SagaState::from_str_name(&name)
        .filter(|s| *s != proto::SagaState::Unspecified)
        .map(|s| s as i32)
        .ok_or_else(|| fail(2, format!("--state {s}: use running, compensating, completed, compensated, suspended or resolved")))
}

fn state_name(v: i32) -> &'static str {
    proto::SagaState::try_from(v)
        .map(|s| s.as_str_name().trim_start_matches("SAGA_STATE_"))
        .unwrap_or("?")
}

fn step_state_name(v: i32) -> &'static str {
    proto::StepState::try_from(v)
        .map(|s| s.as_str_name().trim_start_matches("STEP_STATE_"))
        .unwrap_or("?")
}

fn non_empty(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        Value::String(s.to_owned())
    }
}

fn ts(t: &Option<prost_types::Timestamp>) -> Value {
    t.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|d| Value::String(d.to_rfc3339()))
        .unwrap_or(Value::Null)
}

fn json_text(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_owned()))
    }
}

fn saga_json(s: &proto::Saga) -> Value {
    json!({
        "saga_id": s.saga_id, "definition": s.definition, "version": s.version,
        "state": state_name(s.state), "error": non_empty(&s.error), "input": json_text(&s.input_json),
        "created_at": ts(&s.created_at), "updated_at": ts(&s.updated_at),
        "steps": s.steps.iter().map(|st| json!({
            "name": st.name, "state": step_state_name(st.state), "attempts": st.attempts,
            "compensation_attempts": st.compensation_attempts, "last_error": non_empty(&st.last_error),
            "output": json_text(&st.output_json), "next_attempt_at": ts(&st.next_attempt_at),
        })).collect::<Vec<_>>(),
    })
}

fn event_json(e: &proto::SagaEvent) -> Value {
    json!({"seq": e.seq, "at": ts(&e.at), "kind": e.kind, "step": non_empty(&e.step), "attempt": e.attempt, "detail": e.detail})
}

fn definition_json(d: &proto::SagaDefinition) -> Value {
    json!({
        "name": d.name, "version": d.version, "created_at": ts(&d.created_at),
        "steps": d.steps.iter().map(|s| json!({
            "name": s.name, "participant": s.participant, "action": s.action,
            "compensation": non_empty(&s.compensation), "idempotent": s.idempotent,
        })).collect::<Vec<_>>(),
    })
}

/// The step in progress: the first not succeeded going forward, the last
/// touched one otherwise.
fn current_step(s: &proto::Saga) -> Option<&proto::StepStatus> {
    let succeeded = proto::StepState::Succeeded as i32;
    match proto::SagaState::try_from(s.state) {
        Ok(proto::SagaState::Running) => s.steps.iter().find(|st| st.state != succeeded),
        Ok(proto::SagaState::Completed) => None,
        _ => s.steps.iter().rev().find(|st| {
            st.attempts > 0 && (!st.last_error.is_empty() || st.compensation_attempts > 0)
        }),
    }
}

fn saga_table(sagas: &[proto::Saga], next: &str) -> String {
    let rows = sagas
        .iter()
        .map(|s| {
            let cur = current_step(s);
            vec![
                s.saga_id.clone(),
                format!("{}@{}", s.definition, s.version),
                state_name(s.state).to_owned(),
                cur.map(|c| c.name.clone()).unwrap_or_default(),
                cur.map(|c| c.attempts.to_string()).unwrap_or_default(),
                truncate(
                    cur.map(|c| c.last_error.as_str())
                        .filter(|e| !e.is_empty())
                        .unwrap_or(&s.error),
                    60,
                ),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "SAGA",
            "DEFINITION",
            "STATE",
            "STEP",
            "ATTEMPTS",
            "LAST ERROR",
        ],
        rows,
    );
    if !next.is_empty() {
        let _ = write!(out, "\nmore: --page-token {next}");
    }
    out
}

fn saga_detail(s: &proto::Saga) -> String {
    let mut out = format!(
        "saga        {}\ndefinition  {}@{}\nstate       {}\n",
        s.saga_id,
        s.definition,
        s.version,
        state_name(s.state)
    );
    if !s.error.is_empty() {
        let _ = writeln!(out, "why         {}", s.error);
    }
    let _ = writeln!(out, "input       {}\n", s.input_json);
    let rows = s
        .steps
        .iter()
        .map(|st| {
            vec![
                st.name.clone(),
                step_state_name(st.state).to_owned(),
                st.attempts.to_string(),
                st.compensation_attempts.to_string(),
                truncate(&st.output_json, 40),
                truncate(&st.last_error, 60),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "STEP",
            "STATE",
            "ATTEMPTS",
            "COMP.ATTEMPTS",
            "OUTPUT",
            "LAST ERROR",
        ],
        rows,
    ));
    out
}

fn events_table(evs: &[proto::SagaEvent]) -> String {
    let rows = evs
        .iter()
        .map(|e| {
            vec![
                e.seq.to_string(),
                ts(&e.at).as_str().unwrap_or("").to_owned(),
                e.kind.clone(),
                e.step.clone(),
                if e.attempt > 0 {
                    e.attempt.to_string()
                } else {
                    String::new()
                },
                truncate(&e.detail, 80),
            ]
        })
        .collect();
    table(&["SEQ", "AT", "KIND", "STEP", "ATTEMPT", "DETAIL"], rows)
}

fn truncate(s: &str, n: usize) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= n {
        one_line
    } else {
        one_line
            .chars()
            .take(n.saturating_sub(1))
            .collect::<String>()
            + "…"
    }
}

fn table(head: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = widths[i].saturating_sub(c.chars().count());
            l.push_str(c);
            if i + 1 < cells.len() {
                l.push_str(&" ".repeat(pad + 2));
            }
        }
        l.trim_end().to_owned()
    };
    let mut out = line(head.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r));
    }
    out
}
