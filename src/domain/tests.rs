//! Table tests for `plan`/`decide` and a seeded simulation of whole sagas with
//! random participant answers and crashes between any two writes.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::*;

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
}

fn policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(10),
        multiplier: 2.0,
        max_backoff: Duration::from_millis(100),
    }
}

/// `kinds`: 'c' compensatable, 'p' pivot, 'r' retriable; upper case = not
/// idempotent.
fn def(kinds: &str) -> Definition {
    let steps = kinds
        .chars()
        .enumerate()
        .map(|(i, k)| StepDefinition {
            name: format!("s{i}"),
            participant: "svc".into(),
            action: format!("s{i}.do"),
            compensation: k.eq_ignore_ascii_case(&'c').then(|| format!("s{i}.undo")),
            idempotent: k.is_ascii_lowercase(),
            timeout: Duration::from_secs(1),
            retry: policy(3),
            compensation_retry: policy(3),
        })
        .collect();
    Definition {
        name: "d".into(),
        version: 1,
        steps,
        deadline: None,
    }
}

fn saga(d: &Definition) -> Saga {
    Saga::new(SagaId(uuid::Uuid::nil()), d, "{}".into(), now())
}

fn invoked(step: usize, phase: Phase, attempt: u32, result: CallResult) -> Fact {
    Fact::Invoked {
        step,
        phase,
        attempt,
        result,
        took: std::time::Duration::from_millis(7),
    }
}

fn apply(s: &Saga, d: &Definition, f: Fact) -> Saga {
    match decide(s, d, f, now(), 0.5) {
        Ok(dec) => dec.saga,
        Err(e) => panic!("unexpected {e}"),
    }
}

fn ok() -> CallResult {
    CallResult::Succeeded(Some("{}".into()))
}

#[test]
fn validation_resolves_defaults_and_checks_order() {
    let draft = |comp: [&str; 3], idem: [bool; 3]| DefinitionDraft {
        name: "d".into(),
        steps: (0..3)
            .map(|i| StepDraft {
                name: format!("s{i}"),
                participant: "p".into(),
                action: "a".into(),
                compensation: comp[i].into(),
                idempotent: idem[i],
                ..Default::default()
            })
            .collect(),
        deadline: None,
    };
    let d = draft(["u", "", ""], [true, false, true]).validate(&Defaults::default());
    let d = d.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(d.pivot(), Some(1));
    assert_eq!(
        (0..3).map(|i| d.kind(i)).collect::<Vec<_>>(),
        vec![
            StepKind::Compensatable,
            StepKind::Pivot,
            StepKind::Retriable
        ]
    );
    assert_eq!(
        d.steps[2].retry.max_attempts,
        Defaults::default().retriable_retry.max_attempts
    );
    let e = draft(["u", "", "u"], [true, true, true]).validate(&Defaults::default());
    assert_eq!(
        e.map_err(|e| e.field),
        Err("definition.steps[2].compensation".into())
    );
    let e = draft(["u", "", ""], [true, true, false]).validate(&Defaults::default());
    assert_eq!(
        e.map_err(|e| e.field),
        Err("definition.steps[2].idempotent".into())
    );
    // Sub-millisecond durations are truncated so equal content compares equal.
    let mut dr = draft(["u", "u", "u"], [true; 3]);
    dr.steps[0].timeout = Some(Duration::from_micros(1_500));
    let d = dr
        .validate(&Defaults::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(d.steps[0].timeout, Duration::from_millis(1));
}

#[test]
fn plan_table() {
    let d = def("cCp");
    let s = saga(&d);
    assert_eq!(
        plan(&s, &d, now()),
        Plan::Invoke {
            step: 0,
            phase: Phase::Action,
            attempt: 1,
            pre_write: false
        }
    );
    let s = apply(&s, &d, invoked(0, Phase::Action, 1, ok()));
    assert_eq!(
        plan(&s, &d, now()),
        Plan::Invoke {
            step: 1,
            phase: Phase::Action,
            attempt: 1,
            pre_write: true
        }
    );
    let s = apply(&s, &d, Fact::AttemptStarted { step: 1 });
    assert_eq!(s.steps[1].state, StepState::Running);
    // Seen again after a crash: the outcome is unknown.
    assert_eq!(plan(&s, &d, now()), Plan::Recover { step: 1 });
    let s = apply(&s, &d, Fact::Recovered { step: 1 });
    assert_eq!(s.state, SagaState::Compensating);
    assert_eq!(
        plan(&s, &d, now()),
        Plan::Invoke {
            step: 1,
            phase: Phase::Compensation,
            attempt: 1,
            pre_write: false
        }
    );
}

#[test]
fn backoff_waits_and_the_deadline_caps_them() {
    let d = def("cc");
    let mut s = saga(&d);
    s.deadline_at = Some(now() + chrono::Duration::milliseconds(3));
    let dec = decide(
        &s,
        &d,
        invoked(0, Phase::Action, 1, CallResult::Retry("later".into())),
        now(),
        0.99,
    );
    let s = dec.unwrap_or_else(|e| panic!("{e}")).saga;
    let next = s.steps[0].next_attempt_at.unwrap_or_default();
    assert!(next > now() && next <= now() + chrono::Duration::milliseconds(10));
    assert_eq!(
        plan(&s, &d, now()),
        Plan::Wait {
            until: now() + chrono::Duration::milliseconds(3)
        }
    );
    assert_eq!(
        plan(&s, &d, now() + chrono::Duration::milliseconds(3)),
        Plan::DeadlinePassed
    );
    let s = apply(&s, &d, Fact::DeadlinePassed);
    assert_eq!(s.state, SagaState::Compensated, "nothing had taken effect");
}

#[test]
fn terminal_states_absorb_and_stale_facts_are_refused() {
    let d = def("c");
    let s = apply(&saga(&d), &d, invoked(0, Phase::Action, 1, ok()));
    assert_eq!(s.state, SagaState::Completed);
    for f in [
        invoked(0, Phase::Action, 2, ok()),
        Fact::OperatorRetry {
            actor: "a".into(),
            note: String::new(),
        },
        Fact::OperatorAbort {
            actor: "a".into(),
            note: String::new(),
        },
        Fact::OperatorResolve {
            actor: "a".into(),
            note: "n".into(),
        },
        Fact::DeadlinePassed,
    ] {
        assert_eq!(
            decide(&s, &d, f, now(), 0.0),
            Err(TransitionError::Terminal(SagaState::Completed))
        );
    }
    let d = def("cc");
    let s = saga(&d);
    assert!(matches!(
        decide(&s, &d, invoked(1, Phase::Action, 1, ok()), now(), 0.0),
        Err(TransitionError::Stale(_))
    ));
    assert!(matches!(
        decide(&s, &d, invoked(0, Phase::Compensation, 1, ok()), now(), 0.0),
        Err(TransitionError::Stale(_))
    ));
}

#[test]
fn operator_retry_restarts_the_budget_and_reinvokes_an_unknown_pivot() {
    let d = def("cP");
    let s = apply(&saga(&d), &d, invoked(0, Phase::Action, 1, ok()));
    let s = apply(&s, &d, Fact::AttemptStarted { step: 1 });
    let s = apply(
        &s,
        &d,
        invoked(
            1,
            Phase::Action,
            1,
            CallResult::Transient("UNAVAILABLE".into()),
        ),
    );
    assert_eq!(s.state, SagaState::Suspended);
    assert_eq!(s.suspended_from, Some(SagaState::Running));
    let s = apply(
        &s,
        &d,
        Fact::OperatorRetry {
            actor: "op".into(),
            note: "checked".into(),
        },
    );
    assert_eq!(s.state, SagaState::Running);
    assert_eq!(
        s.steps[1].state,
        StepState::Pending,
        "the operator takes responsibility"
    );
    assert_eq!(s.steps[1].budget_from, 1);
    assert!(matches!(
        plan(&s, &d, now()),
        Plan::Invoke {
            step: 1,
            attempt: 2,
            pre_write: true,
            ..
        }
    ));
}

#[test]
fn abort_marks_the_step_in_flight_for_compensation() {
    let d = def("ccc");
    let s = apply(&saga(&d), &d, invoked(0, Phase::Action, 1, ok()));
    let s = apply(
        &s,
        &d,
        Fact::OperatorAbort {
            actor: "op".into(),
            note: String::new(),
        },
    );
    assert_eq!(s.state, SagaState::Compensating);
    assert_eq!(
        s.steps[1].state,
        StepState::Running,
        "step 1 may be in flight"
    );
    assert_eq!(next_compensation(&s, &d), Some(1));
    assert_eq!(s.steps[2].state, StepState::Pending);
    let again = decide(
        &s,
        &d,
        Fact::OperatorAbort {
            actor: "op".into(),
            note: String::new(),
        },
        now(),
        0.0,
    );
    assert_eq!(again, Err(TransitionError::AlreadyCompensating));
}

#[test]
fn resolve_needs_a_note_and_suspension() {
    let d = def("c");
    let s = saga(&d);
    let f = |note: &str| Fact::OperatorResolve {
        actor: "op".into(),
        note: note.into(),
    };
    assert_eq!(
        decide(&s, &d, f(" "), now(), 0.0),
        Err(TransitionError::NoteRequired)
    );
    assert_eq!(
        decide(&s, &d, f("x"), now(), 0.0),
        Err(TransitionError::NotSuspended(SagaState::Running))
    );
}

// ---------------------------------------------------------------------------
// Simulation.

/// splitmix64: small, deterministic, seedable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A participant with a per-key barrier for idempotent steps: a repeated
/// key returns the first result without a second effect.
#[derive(Default)]
struct World {
    /// Effects applied per (step, phase).
    effects: std::collections::HashMap<(usize, Phase), u32>,
    /// Whether an action may have taken effect (succeeded, or unknown).
    maybe_applied: Vec<bool>,
    /// Order of successful compensations.
    compensated: Vec<usize>,
    /// Whether a compensation was invoked yet.
    compensation_began: bool,
}

fn random_definition(rng: &mut Rng) -> Definition {
    let n = 1 + rng.below(5) as usize;
    let pivot = rng.below(n as u64 + 1) as usize; // n = no pivot
    let kinds: String = (0..n)
        .map(|i| {
            let k = if i < pivot {
                'c'
            } else if i == pivot {
                'p'
            } else {
                'r'
            };
            if i <= pivot && rng.below(3) == 0 {
                k.to_ascii_uppercase()
            } else {
                k
            }
        })
        .collect();
    def(&kinds)
}

fn random_result(rng: &mut Rng, phase: Phase) -> CallResult {
    match rng.below(100) {
        0..=54 => ok(),
        55..=64 if phase == Phase::Action => CallResult::Failed("no".into()),
        55..=74 => CallResult::Retry("later".into()),
        75..=96 => CallResult::Transient("UNAVAILABLE".into()),
        _ => CallResult::Misconfigured("UNIMPLEMENTED".into()),
    }
}

/// Runs one saga to rest. Crashes lose the in-memory saga and any result not
/// yet saved; the "store" keeps the last saved saga. An operator acts on
/// suspended sagas now and then.
fn simulate(seed: u64) -> Result<SagaState, String> {
    let mut rng = Rng(seed);
    let d = random_definition(&mut rng);
    let mut stored = saga(&d);
    let mut world = World {
        maybe_applied: vec![false; d.steps.len()],
        ..Default::default()
    };
    let mut t = now();
    let mut mem = stored.clone();
    // Memory holds decisions the store lacks (deferred, or recovery marks).
    let mut dirty = false;
    let mut operator_actions = 0;
    let trace = std::env::var_os("SIM_TRACE").is_some();
    // A crash: memory is lost; the next owner reads the store and assumes
    // that steps the lost owner could have reached without a write ran.
    let crash = |stored: &Saga, dirty: &mut bool, when: &str| {
        if trace {
            eprintln!("crash {when}");
        }
        let mut mem = stored.clone();
        let marked = assume_unrecorded(&mut mem, &d);
        if trace && !marked.is_empty() {
            eprintln!("recovery marks {marked:?} as may have taken effect");
        }
        *dirty = !marked.is_empty();
        mem
    };
    for _round in 0..500 {
        match plan(&mem, &d, t) {
            Plan::Idle if mem.state == SagaState::Suspended && operator_actions < 3 => {
                // An operator acts now and then, as a careful person would:
                // a non-idempotent step with an unknown outcome is checked at
                // the participant first, and resolved if it did apply.
                operator_actions += 1;
                let unknown = (0..d.steps.len())
                    .find(|&i| mem.steps[i].state == StepState::Running && !d.steps[i].idempotent);
                let fact = match unknown {
                    Some(i) if world.effects.get(&(i, Phase::Action)).copied().unwrap_or(0) > 0 => {
                        Fact::OperatorResolve {
                            actor: "sim".into(),
                            note: "applied; finished by hand".into(),
                        }
                    }
                    _ => Fact::OperatorRetry {
                        actor: "sim".into(),
                        note: String::new(),
                    },
                };
                if std::env::var_os("SIM_TRACE").is_some() {
                    eprintln!("operator {fact:?}; error={:?}", mem.error);
                }
                mem = decide(&mem, &d, fact, t, rng.unit())
                    .map_err(|e| e.to_string())?
                    .saga;
                stored = mem.clone();
            }
            Plan::Idle => break,
            Plan::Wait { until } => {
                if until <= t {
                    return Err(format!("wait for the past: {until} <= {t}"));
                }
                // Giving the saga back writes what memory holds.
                if dirty {
                    stored = mem.clone();
                    dirty = false;
                }
                t = until;
            }
            p => {
                let (fact, call) = match p {
                    Plan::DeadlinePassed => (Fact::DeadlinePassed, None),
                    Plan::Recover { step } => (Fact::Recovered { step }, None),
                    Plan::Invoke {
                        step,
                        phase,
                        attempt,
                        pre_write,
                    } => {
                        if pre_write {
                            mem = decide(&mem, &d, Fact::AttemptStarted { step }, t, 0.0)
                                .map_err(|e| e.to_string())?
                                .saga;
                            stored = mem.clone();
                            dirty = false;
                            if rng.below(10) == 0 {
                                // Crash after the pre-write, before the call.
                                mem = crash(&stored, &mut dirty, "after pre-write");
                                continue;
                            }
                        }
                        (
                            Fact::Invoked {
                                step,
                                phase,
                                attempt,
                                result: CallResult::Retry(String::new()),
                                took: std::time::Duration::from_millis(7),
                            },
                            Some((step, phase)),
                        )
                    }
                    _ => unreachable!(),
                };
                let fact = match (fact, call) {
                    (
                        Fact::Invoked {
                            step,
                            phase,
                            attempt,
                            ..
                        },
                        Some(_),
                    ) => {
                        let result = world_call(&mut world, &d, step, phase, &mut rng)?;
                        if rng.below(8) == 0 {
                            // Crash after the call, before its result is saved.
                            mem = crash(&stored, &mut dirty, "after call");
                            continue;
                        }
                        Fact::Invoked {
                            step,
                            phase,
                            attempt,
                            result,
                            took: std::time::Duration::from_millis(7),
                        }
                    }
                    (f, _) => f,
                };
                let before = mem.state;
                let keepable = deferrable(&fact, &d);
                let dec =
                    decide(&mem, &d, fact, t, rng.unit()).map_err(|e| format!("decide: {e}"))?;
                if before.is_terminal() {
                    return Err("a terminal state changed".into());
                }
                let defer = keepable && may_defer(&d, before, &dec.saga, &plan(&dec.saga, &d, t));
                mem = dec.saga;
                if defer {
                    dirty = true;
                    if trace {
                        eprintln!("deferred");
                    }
                } else {
                    stored = mem.clone();
                    dirty = false;
                }
            }
        }
        t += chrono::Duration::milliseconds(1);
    }
    check_end(&d, &mem, &world)?;
    Ok(mem.state)
}

fn world_call(
    world: &mut World,
    d: &Definition,
    step: usize,
    phase: Phase,
    rng: &mut Rng,
) -> Result<CallResult, String> {
    if phase == Phase::Action && world.compensation_began {
        return Err(format!("action of step {step} after compensation began"));
    }
    if phase == Phase::Compensation {
        world.compensation_began = true;
    }
    let mut result = random_result(rng, phase);
    let idempotent = d.steps[step].idempotent || phase == Phase::Compensation;
    let applied_before = world.effects.get(&(step, phase)).copied().unwrap_or(0) > 0;
    // The barrier answers a repeated key with the first result.
    if idempotent
        && applied_before
        && matches!(result, CallResult::Failed(_) | CallResult::Retry(_))
    {
        result = ok();
    }
    if std::env::var_os("SIM_TRACE").is_some() {
        eprintln!("call step={step} {phase} -> {result:?}");
    }
    // A transient failure may or may not have applied.
    let applies = match result {
        CallResult::Succeeded(_) => true,
        CallResult::Transient(_) => rng.below(2) == 0,
        _ => false,
    };
    if applies {
        let n = world.effects.entry((step, phase)).or_default();
        // The barrier: idempotent handlers apply once per key.
        if *n == 0 || !idempotent {
            *n += 1;
        }
        if *n > 1 {
            return Err(format!(
                "non-idempotent action of step {step} took effect twice"
            ));
        }
        if phase == Phase::Action {
            world.maybe_applied[step] = true;
        }
    }
    if phase == Phase::Compensation && matches!(result, CallResult::Succeeded(_)) {
        if world.compensated.contains(&step) {
            // Re-invoked after a crash lost the first success: allowed, the
            // barrier made it a no-op; record it once.
        } else {
            if world.compensated.last().is_some_and(|&last| last < step) {
                return Err(format!(
                    "compensation order: {step} after {:?}",
                    world.compensated
                ));
            }
            world.compensated.push(step);
        }
    }
    Ok(result)
}

fn check_end(d: &Definition, s: &Saga, world: &World) -> Result<(), String> {
    match s.state {
        SagaState::Completed => {
            if s.steps.iter().any(|st| st.state != StepState::Succeeded) {
                return Err("completed with a step not succeeded".into());
            }
        }
        SagaState::Compensated => {
            for (i, applied) in world.maybe_applied.iter().enumerate() {
                if *applied && d.steps[i].compensation.is_none() {
                    return Err(format!(
                        "compensated although step {i} (no compensation) may have applied"
                    ));
                }
                if *applied && !world.compensated.contains(&i) {
                    return Err(format!(
                        "compensated but step {i}, which may have applied, was not"
                    ));
                }
            }
        }
        SagaState::Suspended | SagaState::Resolved => {}
        other => return Err(format!("ended {other}, not at rest")),
    }
    Ok(())
}

#[test]
fn simulation_keeps_the_invariants() {
    let seeds: u64 = std::env::var("SAGA_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5_000);
    let mut ends = std::collections::HashMap::new();
    for seed in 0..seeds {
        match simulate(seed) {
            Ok(end) => *ends.entry(end).or_insert(0u64) += 1,
            Err(e) => panic!(
                "seed {seed}: {e} (trace: SIM_TRACE=1 SAGA_SIM_SEEDS={} cargo test simulation)",
                seed + 1
            ),
        }
    }
    // The seeds explore every way a saga can end.
    for end in [
        SagaState::Completed,
        SagaState::Compensated,
        SagaState::Suspended,
        SagaState::Resolved,
    ] {
        assert!(
            ends.get(&end).copied().unwrap_or(0) > 0,
            "no seed ended {end}: {ends:?}"
        );
    }
}
