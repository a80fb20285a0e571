//! Travel booking: flights, hotels and payment participants whose data lives
//! in PostgreSQL, each handler made exactly-once by the SDK's barrier.
//!
//! ```sh
//! cargo run --release --bin sagad                                   # terminal 1
//! cargo run --release -p saga-sdk --features postgres --example travel   # terminal 2
//! ```
//! Flags: `--coordinator URL` (default http://127.0.0.1:50051),
//! `--database-url URL` for the services' data (default
//! postgres://postgres@127.0.0.1:5432/travel, created if missing),
//! `--remote-hotels` to leave the `hotels` participant to another process
//! (the Python SDK's `sdk/python/examples/hotels.py`: a mixed-language saga).
//!
//! A trip books a flight and a hotel (both compensatable), then pays (the
//! pivot). The first trip completes; the second is over the card's limit, so
//! the payment is refused and the hotel and flight bookings are cancelled.
#![allow(dead_code)]

use std::time::Duration;

use futures::FutureExt;
use saga_sdk::barrier::Barrier;
use saga_sdk::{Client, Participant, RegisterOptions, Saga, SagaDefinition, Step, StepError};
use serde::{Deserialize, Serialize};
use sqlx::migrate::MigrateDatabase;
use sqlx::{PgPool, Row};

/// The saga's input.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trip {
    pub traveller: String,
    pub flight: String,
    pub hotel: String,
    pub nights: u32,
    pub amount: u32,
}

/// What the booking steps return.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Booking {
    pub reference: String,
}

/// Payments refuse anything above this.
pub const CARD_LIMIT: u32 = 1_000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS flight_bookings (saga_id text PRIMARY KEY, traveller text NOT NULL, flight text NOT NULL, status text NOT NULL);
CREATE TABLE IF NOT EXISTS hotel_bookings (saga_id text PRIMARY KEY, traveller text NOT NULL, hotel text NOT NULL, nights int NOT NULL, status text NOT NULL);
CREATE TABLE IF NOT EXISTS payments (saga_id text PRIMARY KEY, traveller text NOT NULL, amount int NOT NULL);
";

fn flights(pool: PgPool) -> Participant {
    let barrier = Barrier::new(pool);
    let undo = barrier.clone();
    Participant::builder("flights")
        .action("book_flight", move |ctx, trip: Trip| {
            let barrier = barrier.clone();
            async move {
                barrier
                    .action(&ctx, |tx| {
                        async move {
                            sqlx::query("INSERT INTO flight_bookings VALUES ($1, $2, $3, 'booked')")
                                .bind(ctx.saga_id.to_string())
                                .bind(&trip.traveller)
                                .bind(&trip.flight)
                                .execute(&mut *tx)
                                .await?;
                            Ok(Booking { reference: format!("FL-{}", &ctx.saga_id.to_string()[..8]) })
                        }
                        .boxed()
                    })
                    .await
            }
        })
        .compensation("cancel_flight", move |ctx, _trip: Trip, _booking: Option<Booking>| {
            let barrier = undo.clone();
            async move {
                barrier
                    .compensation(&ctx, |tx| {
                        async move {
                            sqlx::query("UPDATE flight_bookings SET status = 'cancelled' WHERE saga_id = $1")
                                .bind(ctx.saga_id.to_string())
                                .execute(&mut *tx)
                                .await?;
                            Ok(())
                        }
                        .boxed()
                    })
                    .await
            }
        })
        .build()
}

fn hotels(pool: PgPool) -> Participant {
    let barrier = Barrier::new(pool);
    let undo = barrier.clone();
    Participant::builder("hotels")
        .action("book_hotel", move |ctx, trip: Trip| {
            let barrier = barrier.clone();
            async move {
                barrier
                    .action(&ctx, |tx| {
                        async move {
                            sqlx::query("INSERT INTO hotel_bookings VALUES ($1, $2, $3, $4, 'booked')")
                                .bind(ctx.saga_id.to_string())
                                .bind(&trip.traveller)
                                .bind(&trip.hotel)
                                .bind(trip.nights as i32)
                                .execute(&mut *tx)
                                .await?;
                            Ok(Booking { reference: format!("HT-{}", &ctx.saga_id.to_string()[..8]) })
                        }
                        .boxed()
                    })
                    .await
            }
        })
        .compensation("cancel_hotel", move |ctx, _trip: Trip, _booking: Option<Booking>| {
            let barrier = undo.clone();
            async move {
                barrier
                    .compensation(&ctx, |tx| {
                        async move {
                            sqlx::query("UPDATE hotel_bookings SET status = 'cancelled' WHERE saga_id = $1")
                                .bind(ctx.saga_id.to_string())
                                .execute(&mut *tx)
                                .await?;
                            Ok(())
                        }
                        .boxed()
                    })
                    .await
            }
        })
        .build()
}

fn payment(pool: PgPool) -> Participant {
    let barrier = Barrier::new(pool);
    Participant::builder("payment")
        .action("pay", move |ctx, trip: Trip| {
            let barrier = barrier.clone();
            async move {
                if trip.amount > CARD_LIMIT {
                    return Err(StepError::refuse(format!(
                        "card declined: {} is over the limit of {CARD_LIMIT}",
                        trip.amount
                    )));
                }
                barrier
                    .action(&ctx, |tx| {
                        async move {
                            sqlx::query("INSERT INTO payments VALUES ($1, $2, $3)")
                                .bind(ctx.saga_id.to_string())
                                .bind(&trip.traveller)
                                .bind(trip.amount as i32)
                                .execute(&mut *tx)
                                .await?;
                            Ok(serde_json::json!({"charged": trip.amount}))
                        }
                        .boxed()
                    })
                    .await
            }
        })
        .build()
}

/// The trip saga.
pub fn definition() -> SagaDefinition {
    SagaDefinition::builder("trip")
        .step(
            Step::new("flight", "flights")
                .action("book_flight")
                .compensation("cancel_flight")
                .idempotent(),
        )
        .step(
            Step::new("hotel", "hotels")
                .action("book_hotel")
                .compensation("cancel_hotel")
                .idempotent(),
        )
        .step(Step::new("payment", "payment").action("pay").idempotent())
        .build()
        .expect("the trip definition is valid")
}

/// Sets up the services' tables, serves the three participants on
/// 127.0.0.1, registers them and the definition with the coordinator, and
/// runs two trips. Returns the settled sagas.
/// Which participants this process serves: all three, or all but `hotels`
/// (`--remote-hotels`: another process, such as the Python SDK's
/// `sdk/python/examples/hotels.py`, serves it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hotels {
    /// Served here.
    Local,
    /// Registered by another process.
    Remote,
}

/// Serves the participants (all but `hotels` when it is remote), registers
/// the `trip` definition, and runs two trips; returns them settled.
pub async fn run(
    coordinator: &str,
    database_url: &str,
    hotels_at: Hotels,
) -> anyhow::Result<Vec<Saga>> {
    if !sqlx::Postgres::database_exists(database_url).await? {
        sqlx::Postgres::create_database(database_url).await?;
    }
    let pool = PgPool::connect(database_url).await?;
    Barrier::new(pool.clone()).create_table().await?;
    sqlx::raw_sql(SCHEMA).execute(&pool).await?;

    let client = Client::connect(coordinator).await?;
    let mut registrations = Vec::new();
    let mut served = vec![flights(pool.clone()), payment(pool.clone())];
    if hotels_at == Hotels::Local {
        served.push(hotels(pool.clone()));
    }
    for p in served {
        let (addr, _server) = saga_sdk::serve_local(p.clone(), std::future::pending()).await?;
        registrations.push(
            p.register(
                [client.clone()],
                format!("http://{addr}"),
                RegisterOptions::default(),
            )
            .await?,
        );
    }
    let (def, _) = client.register(&definition()).await?;
    println!(
        "registered trip@{} and participants flights, payment{}",
        def.version(),
        if hotels_at == Hotels::Local {
            ", hotels"
        } else {
            " (hotels: remote)"
        }
    );

    let trips = [
        Trip {
            traveller: "Ada".into(),
            flight: "LH 400".into(),
            hotel: "Hotel Adlon".into(),
            nights: 3,
            amount: 800,
        },
        Trip {
            traveller: "Bob".into(),
            flight: "BA 117".into(),
            hotel: "The Savoy".into(),
            nights: 5,
            amount: 2_400,
        },
    ];
    let mut done = Vec::new();
    for trip in trips {
        let saga = client.start("trip", &trip).await?;
        let saga = client.wait(saga.id, Duration::from_secs(30)).await?;
        report(&pool, &trip, &saga).await?;
        done.push(saga);
    }
    for r in registrations {
        r.stop().await;
    }
    Ok(done)
}

async fn report(pool: &PgPool, trip: &Trip, saga: &Saga) -> anyhow::Result<()> {
    println!(
        "\ntrip of {} for {} → {:?}",
        trip.traveller, trip.amount, saga.state
    );
    if let Some(e) = &saga.error {
        println!("  why: {e}");
    }
    for s in &saga.steps {
        println!(
            "  step {:<8} {:?}{}",
            s.name,
            s.state,
            s.output_json
                .as_deref()
                .map(|o| format!(" {o}"))
                .unwrap_or_default()
        );
    }
    let id = saga.id.to_string();
    let one = |sql: &'static str| sqlx::query(sql).bind(id.clone()).fetch_optional(pool);
    let flight: Option<String> = one("SELECT status FROM flight_bookings WHERE saga_id = $1")
        .await?
        .map(|r| r.get(0));
    let hotel: Option<String> = one("SELECT status FROM hotel_bookings WHERE saga_id = $1")
        .await?
        .map(|r| r.get(0));
    let paid: Option<i32> = one("SELECT amount FROM payments WHERE saga_id = $1")
        .await?
        .map(|r| r.get(0));
    println!(
        "  data: flight {}, hotel {}, payment {}",
        flight.as_deref().unwrap_or("none"),
        hotel.as_deref().unwrap_or("none"),
        paid.map(|a| a.to_string()).unwrap_or_else(|| "none".into())
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut coordinator = "http://127.0.0.1:50051".to_owned();
    let mut database_url = "postgres://postgres@127.0.0.1:5432/travel".to_owned();
    let mut hotels_at = Hotels::Local;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--remote-hotels" {
            hotels_at = Hotels::Remote;
            continue;
        }
        match (flag.as_str(), args.next()) {
            ("--coordinator", Some(v)) => coordinator = v,
            ("--database-url", Some(v)) => database_url = v,
            _ => anyhow::bail!(
                "usage: travel [--coordinator URL] [--database-url URL] [--remote-hotels]"
            ),
        }
    }
    let sagas = run(&coordinator, &database_url, hotels_at).await?;
    let states: Vec<String> = sagas.iter().map(|s| format!("{:?}", s.state)).collect();
    println!("\noutcomes: {}", states.join(", "));
    Ok(())
}
