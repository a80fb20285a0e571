//! `sagactl`: the command line for operators, on the SDK's client.
//!
//! Exit codes, for scripts: 0 done; 1 the coordinator refused (bad
//! argument, wrong state, missing or wrong token); 2 bad usage or an
//! unreadable file; 3 no such saga or definition; 4 the coordinator cannot
//! be reached or is unavailable; 5 anything else.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use clap::{Parser, Subcommand};
use saga_sdk::proto::status_code_name;
use saga_sdk::{
    Client, ClientError, ListQuery, RetryPolicy, Saga, SagaDefinition, SagaEvent, SagaState,
    StepState, StepStatus,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tonic::Code;
use uuid::Uuid;

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
    /// The credential to send (`authorization: Bearer`): the admin token, a
    /// token of sagad's auth file, or a JWT. Reads need role viewer, acts
    /// operator.
    #[arg(long, env = "SAGAD_ADMIN_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// PEM CA certificate(s) the coordinator's TLS certificate must chain
    /// to (for an `https://` coordinator; default: the system's roots).
    #[arg(long, env = "SAGACTL_CA", global = true)]
    pub ca: Option<std::path::PathBuf>,
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

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = e.code();
        let exit = match &e {
            ClientError::Connect { .. } => 4,
            _ => match code {
                Code::NotFound => 3,
                Code::Unavailable | Code::DeadlineExceeded => 4,
                Code::InvalidArgument
                | Code::FailedPrecondition
                | Code::AlreadyExists
                | Code::Aborted
                | Code::Unauthenticated
                | Code::PermissionDenied => 1,
                _ => 5,
            },
        };
        let message = match e {
            ClientError::Connect { url, source } => {
                format!("cannot reach the coordinator at {url}: {source}")
            }
            ClientError::Status(s) => format!("{}: {}", status_code_name(code), s.message()),
            ClientError::InvalidArgument(m)
            | ClientError::NotFound(m)
            | ClientError::AlreadyExists(m)
            | ClientError::FailedPrecondition(m)
            | ClientError::Unavailable(m) => format!("{}: {m}", status_code_name(code)),
            ClientError::Definition(d) => format!("{}: definition.{d}", status_code_name(code)),
            other => other.to_string(),
        };
        fail(exit, message)
    }
}

/// Runs a command; returns what to print.
pub async fn run(cli: Cli) -> Result<String, Failure> {
    let c = match &cli.ca {
        None => Client::connect(cli.coordinator.clone()).await?,
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| fail(2, format!("--ca {}: {e}", path.display())))?;
            let tls = saga_sdk::ClientTls {
                ca_pem: Some(pem),
                identity: None,
            };
            Client::connect_tls(cli.coordinator.clone(), tls).await?
        }
    };
    let mut c = c.with_actor(&cli.actor)?;
    if let Some(t) = &cli.token {
        c = c.with_token(t)?;
    }
    let json_out = cli.json;
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
            let page = c
                .list(ListQuery {
                    states,
                    definition,
                    stuck_only: stuck,
                    min_age: older_than.map(Duration::from_secs),
                    page_size: limit,
                    page_token,
                })
                .await?;
            Ok(if json_out {
                json!({"sagas": page.sagas.iter().map(saga_json).collect::<Vec<_>>(), "next_page_token": page.next_page_token}).to_string()
            } else {
                saga_table(&page.sagas, page.next_page_token.as_deref())
            })
        }
        Command::Show { id } => {
            let s = c.get(parse_id(&id)?).await?;
            Ok(if json_out {
                saga_json(&s).to_string()
            } else {
                saga_detail(&s)
            })
        }
        Command::Events { id } => {
            let evs = c.events(parse_id(&id)?).await?;
            Ok(if json_out {
                json!({"events": evs.iter().map(event_json).collect::<Vec<_>>()}).to_string()
            } else {
                events_table(&evs)
            })
        }
        Command::Retry { id, note } => {
            let s = c.retry(parse_id(&id)?, &note).await?;
            Ok(acted(json_out, "retried", &s))
        }
        Command::Abort { id, note } => {
            let s = c.abort(parse_id(&id)?, &note).await?;
            Ok(acted(json_out, "aborted", &s))
        }
        Command::Resolve { id, note } => {
            let s = c.resolve(parse_id(&id)?, &note).await?;
            Ok(acted(json_out, "resolved", &s))
        }
        Command::Definitions { command } => definitions(&c, command, json_out).await,
    }
}

/// A saga id from the command line; refused as the coordinator would.
fn parse_id(s: &str) -> Result<Uuid, Failure> {
    Uuid::parse_str(s)
        .map_err(|_| fail(1, format!("INVALID_ARGUMENT: saga_id: {s:?} is not a UUID")))
}

fn acted(json_out: bool, what: &str, s: &Saga) -> String {
    if json_out {
        saga_json(s).to_string()
    } else {
        format!("{what} {}: now {}", s.id, s.state.as_str())
    }
}

async fn definitions(
    c: &Client,
    command: DefinitionsCommand,
    json_out: bool,
) -> Result<String, Failure> {
    match command {
        DefinitionsCommand::List => {
            let defs = c.definitions().await?;
            if json_out {
                return Ok(
                    json!({"definitions": defs.iter().map(definition_json).collect::<Vec<_>>()})
                        .to_string(),
                );
            }
            let rows = defs
                .iter()
                .map(|d| {
                    let d = d.to_proto();
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
            let def = read_definition(&file)?;
            let (d, created) = c.register(&def).await?;
            Ok(if json_out {
                json!({"definition": definition_json(&d), "created": created}).to_string()
            } else {
                format!(
                    "{} {}@{}",
                    if created { "registered" } else { "unchanged" },
                    d.name(),
                    d.version()
                )
            })
        }
    }
}

/// Reads a JSON or YAML definition file and builds it with the SDK's
/// builder, so the step order is checked before anything is sent.
fn read_definition(file: &std::path::Path) -> Result<SagaDefinition, Failure> {
    let text =
        std::fs::read_to_string(file).map_err(|e| fail(2, format!("{}: {e}", file.display())))?;
    let yaml = matches!(
        file.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    let parsed: DefinitionFile = if yaml {
        serde_norway::from_str(&text).map_err(|e| fail(2, format!("{}: {e}", file.display())))?
    } else {
        serde_json::from_str(&text).map_err(|e| fail(2, format!("{}: {e}", file.display())))?
    };
    Ok(parsed.build().map_err(ClientError::from)?)
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
    max_attempts: Option<u32>,
    #[serde(default)]
    initial_backoff_ms: Option<u64>,
    #[serde(default)]
    multiplier: Option<f64>,
    #[serde(default)]
    max_backoff_ms: Option<u64>,
}

impl RetryFile {
    fn policy(self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            initial_backoff: self.initial_backoff_ms.map(Duration::from_millis),
            multiplier: self.multiplier,
            max_backoff: self.max_backoff_ms.map(Duration::from_millis),
        }
    }
}

impl DefinitionFile {
    fn build(self) -> Result<SagaDefinition, saga_sdk::DefinitionError> {
        let mut b = SagaDefinition::builder(self.name);
        if let Some(ms) = self.deadline_ms {
            b = b.deadline(Duration::from_millis(ms));
        }
        for s in self.steps {
            let mut step = saga_sdk::Step::new(s.name, s.participant).action(s.action);
            if let Some(c) = s.compensation {
                step = step.compensation(c);
            }
            if s.idempotent {
                step = step.idempotent();
            }
            if let Some(ms) = s.timeout_ms {
                step = step.timeout(Duration::from_millis(ms));
            }
            if let Some(r) = s.retry {
                step = step.retry(r.policy());
            }
            if let Some(r) = s.compensation_retry {
                step = step.compensation_retry(r.policy());
            }
            b = b.step(step);
        }
        b.build()
    }
}

fn parse_state(s: &str) -> Result<SagaState, Failure> {
    SagaState::parse(s).ok_or_else(|| {
        fail(
            2,
            format!("--state {s}: use running, compensating, completed, compensated, suspended or resolved"),
        )
    })
}

fn ts(t: Option<SystemTime>) -> Value {
    t.map(|t| Value::String(chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339()))
        .unwrap_or(Value::Null)
}

fn json_text(s: Option<&str>) -> Value {
    match s {
        None | Some("") => Value::Null,
        Some(t) => serde_json::from_str(t).unwrap_or_else(|_| Value::String(t.to_owned())),
    }
}

fn saga_json(s: &Saga) -> Value {
    json!({
        "saga_id": s.id.to_string(), "definition": s.definition, "version": s.version,
        "state": s.state.as_str(), "error": s.error, "input": json_text(Some(&s.input_json)),
        "created_at": ts(s.created_at), "updated_at": ts(s.updated_at),
        "steps": s.steps.iter().map(|st| json!({
            "name": st.name, "state": st.state.as_str(), "attempts": st.attempts,
            "compensation_attempts": st.compensation_attempts, "last_error": st.last_error,
            "output": json_text(st.output_json.as_deref()), "next_attempt_at": ts(st.next_attempt_at),
        })).collect::<Vec<_>>(),
    })
}

fn event_json(e: &SagaEvent) -> Value {
    json!({"seq": e.seq, "at": ts(e.at), "kind": e.kind, "step": e.step, "attempt": e.attempt, "detail": e.detail})
}

fn definition_json(d: &SagaDefinition) -> Value {
    let d = d.to_proto();
    let created_at = d.created_at.and_then(|t| {
        chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
    });
    json!({
        "name": d.name, "version": d.version, "created_at": created_at.map(|t| t.to_rfc3339()),
        "steps": d.steps.iter().map(|s| json!({
            "name": s.name, "participant": s.participant, "action": s.action,
            "compensation": (!s.compensation.is_empty()).then_some(&s.compensation),
            "idempotent": s.idempotent,
        })).collect::<Vec<_>>(),
    })
}

/// The step in progress: the first not succeeded going forward, the last
/// touched one otherwise.
fn current_step(s: &Saga) -> Option<&StepStatus> {
    match s.state {
        SagaState::Running => s.steps.iter().find(|st| st.state != StepState::Succeeded),
        SagaState::Completed => None,
        _ => s.steps.iter().rev().find(|st| {
            st.attempts > 0 && (st.last_error.is_some() || st.compensation_attempts > 0)
        }),
    }
}

fn saga_table(sagas: &[Saga], next: Option<&str>) -> String {
    let rows = sagas
        .iter()
        .map(|s| {
            let cur = current_step(s);
            vec![
                s.id.to_string(),
                format!("{}@{}", s.definition, s.version),
                s.state.as_str().to_owned(),
                cur.map(|c| c.name.clone()).unwrap_or_default(),
                cur.map(|c| c.attempts.to_string()).unwrap_or_default(),
                truncate(
                    cur.and_then(|c| c.last_error.as_deref())
                        .or(s.error.as_deref())
                        .unwrap_or(""),
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
    if let Some(next) = next {
        let _ = write!(out, "\nmore: --page-token {next}");
    }
    out
}

fn saga_detail(s: &Saga) -> String {
    let mut out = format!(
        "saga        {}\ndefinition  {}@{}\nstate       {}\n",
        s.id,
        s.definition,
        s.version,
        s.state.as_str()
    );
    if let Some(e) = &s.error {
        let _ = writeln!(out, "why         {e}");
    }
    let _ = writeln!(out, "input       {}\n", s.input_json);
    let rows = s
        .steps
        .iter()
        .map(|st| {
            vec![
                st.name.clone(),
                st.state.as_str().to_owned(),
                st.attempts.to_string(),
                st.compensation_attempts.to_string(),
                truncate(st.output_json.as_deref().unwrap_or(""), 40),
                truncate(st.last_error.as_deref().unwrap_or(""), 60),
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

fn events_table(evs: &[SagaEvent]) -> String {
    let rows = evs
        .iter()
        .map(|e| {
            vec![
                e.seq.to_string(),
                ts(e.at).as_str().unwrap_or("").to_owned(),
                e.kind.clone(),
                e.step.clone().unwrap_or_default(),
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
