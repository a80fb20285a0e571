//! The five-minute tour: three small participants (inventory, payments,
//! shipping) register with a running `sagad` by heartbeat, then one order
//! saga completes and one, whose payment is refused, compensates.
//!
//! ```sh
//! cargo run --release --bin sagad          # terminal 1
//! cargo run --release --example tour       # terminal 2
//! ```
//! Flags: `--coordinator URL` (default http://127.0.0.1:50051).
//!
//! The participants here speak the raw `saga.v1.ParticipantService`
//! contract, as a service in any language would.

use std::time::Duration;

use saga_coordinator::proto::participant_service_server::{
    ParticipantService, ParticipantServiceServer,
};
use saga_coordinator::proto::{self, coordinator_service_client::CoordinatorServiceClient};
use serde_json::{json, Value};
use tonic::{Request, Response, Status};

/// One participant: a name and how it answers each handler.
#[derive(Clone)]
struct Service {
    name: &'static str,
}

#[tonic::async_trait]
impl ParticipantService for Service {
    async fn invoke(
        &self,
        r: Request<proto::InvokeRequest>,
    ) -> Result<Response<proto::InvokeResponse>, Status> {
        let r = r.into_inner();
        let input: Value = serde_json::from_str(&r.input_json).unwrap_or(Value::Null);
        let phase = if r.phase == proto::Phase::Compensation as i32 {
            "compensation"
        } else {
            "action"
        };
        println!(
            "    [{:<9}] {phase:<12} {:<16} attempt {} key {}",
            self.name, r.handler, r.attempt, r.idempotency_key
        );
        let (outcome, output, error) = match r.handler.as_str() {
            "reserve" => (
                proto::Outcome::Succeeded,
                json!({"reservation": format!("R-{}", &r.saga_id[..8])}),
                "",
            ),
            "release" => (proto::Outcome::Succeeded, json!({"released": true}), ""),
            "charge" if input["amount"].as_f64().unwrap_or(0.0) > 100.0 => (
                proto::Outcome::Failed,
                Value::Null,
                "card declined: amount over the limit",
            ),
            "charge" => (
                proto::Outcome::Succeeded,
                json!({"payment": format!("P-{}", &r.saga_id[..8])}),
                "",
            ),
            "refund" => (proto::Outcome::Succeeded, json!({"refunded": true}), ""),
            "ship" => (proto::Outcome::Succeeded, json!({"tracking": "TRK-42"}), ""),
            other => return Err(Status::unimplemented(format!("no handler {other}"))),
        };
        Ok(Response::new(proto::InvokeResponse {
            outcome: outcome as i32,
            output_json: if output.is_null() {
                String::new()
            } else {
                output.to_string()
            },
            error: error.into(),
        }))
    }
}

/// Serves a participant on 127.0.0.1 and keeps announcing it.
async fn run_participant(name: &'static str, coordinator: String) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ParticipantServiceServer::new(Service { name }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut client = CoordinatorServiceClient::connect(coordinator).await?;
    let instance_id = format!("{name}-{}", std::process::id());
    let beat = proto::HeartbeatRequest {
        participant: name.into(),
        instance_id,
        endpoint,
        ttl: Some(prost_types::Duration {
            seconds: 10,
            nanos: 0,
        }),
        weight: 0,
    };
    client.heartbeat(beat.clone()).await?;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(3)).await;
            if let Err(e) = client.heartbeat(beat.clone()).await {
                eprintln!("heartbeat of {name} failed: {e}");
            }
        }
    });
    Ok(())
}

fn step(
    name: &str,
    participant: &str,
    action: &str,
    compensation: &str,
    idempotent: bool,
) -> proto::StepDefinition {
    proto::StepDefinition {
        name: name.into(),
        participant: participant.into(),
        action: action.into(),
        compensation: compensation.into(),
        idempotent,
        ..Default::default()
    }
}

async fn run_order(
    client: &mut CoordinatorServiceClient<tonic::transport::Channel>,
    input: Value,
) -> anyhow::Result<()> {
    let started = client
        .start_saga(proto::StartSagaRequest {
            definition: "order".into(),
            input_json: input.to_string(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .saga
        .ok_or_else(|| anyhow::anyhow!("no saga in the answer"))?;
    println!("\nstarted saga {} with input {input}", started.saga_id);
    let wait = proto::WaitSagaRequest {
        saga_id: started.saga_id.clone(),
        timeout: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
    };
    let saga = client
        .wait_saga(wait)
        .await?
        .into_inner()
        .saga
        .ok_or_else(|| anyhow::anyhow!("no saga"))?;
    let state = proto::SagaState::try_from(saga.state)
        .map(|s| s.as_str_name().trim_start_matches("SAGA_STATE_"))
        .unwrap_or("?");
    println!(
        "  => {state}{}",
        if saga.error.is_empty() {
            String::new()
        } else {
            format!(" ({})", saga.error)
        }
    );
    for s in &saga.steps {
        let st = proto::StepState::try_from(s.state)
            .map(|s| s.as_str_name().trim_start_matches("STEP_STATE_"))
            .unwrap_or("?");
        println!(
            "     step {:<8} {st:<12} output {}",
            s.name,
            if s.output_json.is_empty() {
                "-"
            } else {
                &s.output_json
            }
        );
    }
    let events = client
        .get_saga_events(proto::GetSagaEventsRequest {
            saga_id: saga.saga_id.clone(),
        })
        .await?
        .into_inner()
        .events;
    println!(
        "     history: {}",
        events
            .iter()
            .map(|e| if e.step.is_empty() {
                e.kind.clone()
            } else {
                format!("{}({})", e.kind, e.step)
            })
            .collect::<Vec<_>>()
            .join(" → ")
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut coordinator = "http://127.0.0.1:50051".to_owned();
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--coordinator", Some(url)) => coordinator = url,
            _ => anyhow::bail!("usage: tour [--coordinator URL]"),
        }
    }
    let mut client = CoordinatorServiceClient::connect(coordinator.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach sagad at {coordinator} ({e}); start it with `cargo run --release --bin sagad`"))?;
    for name in ["inventory", "payments", "shipping"] {
        run_participant(name, coordinator.clone()).await?;
    }
    println!("participants inventory, payments and shipping registered by heartbeat");

    // reserve (compensatable) → charge (compensatable) → ship (pivot: once
    // shipped, there is no way back).
    let definition = proto::SagaDefinition {
        name: "order".into(),
        steps: vec![
            step("reserve", "inventory", "reserve", "release", true),
            step("charge", "payments", "charge", "refund", true),
            step("ship", "shipping", "ship", "", true),
        ],
        ..Default::default()
    };
    let reg = client
        .register_definition(proto::RegisterDefinitionRequest {
            definition: Some(definition),
        })
        .await?
        .into_inner();
    let version = reg.definition.map(|d| d.version).unwrap_or_default();
    println!(
        "definition order@{version} ({})",
        if reg.created { "new" } else { "unchanged" }
    );

    run_order(&mut client, json!({"order": 1001, "amount": 42.5})).await?;
    run_order(&mut client, json!({"order": 1002, "amount": 250.0})).await?;
    Ok(())
}
