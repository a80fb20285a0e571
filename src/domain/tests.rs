//! Table tests for `plan`/`decide`. Whole sagas under crashes, races and
//! operators are simulated with the real driver in `worker::sim`.

use std::time::Duration;

use super::*;

use super::testkit::{def, now};

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

/// "Not now" answers a step's last attempts after an earlier attempt's
/// outcome was unknown: that attempt may still apply, so the budget running
/// out does not mean "nothing took effect".
#[test]
fn not_now_after_an_unknown_attempt_keeps_the_step_maybe_applied() {
    let unknown = || CallResult::Transient("DEADLINE_EXCEEDED".into());
    let not_now = || CallResult::Retry("busy".into());
    let run = |kinds: &str, first: CallResult| {
        let d = def(kinds);
        let s = apply(&saga(&d), &d, invoked(0, Phase::Action, 1, ok()));
        let s = apply(&s, &d, invoked(1, Phase::Action, 1, first));
        let s = apply(&s, &d, invoked(1, Phase::Action, 2, not_now()));
        apply(&s, &d, invoked(1, Phase::Action, 3, not_now()))
    };

    let pivot = run("cp", unknown());
    assert_eq!(
        pivot.state,
        SagaState::Suspended,
        "the pivot may have applied"
    );
    assert!(pivot
        .error
        .as_deref()
        .is_some_and(|e| e.contains("outcome is unknown")));

    let compensatable = run("cc", unknown());
    assert_eq!(compensatable.state, SagaState::Compensating);
    assert_eq!(
        next_compensation(&compensatable, &def("cc")),
        Some(1),
        "the step that may have applied is compensated first"
    );

    let nothing_done = run("cp", not_now());
    assert_eq!(nothing_done.state, SagaState::Compensating);
    assert_eq!(nothing_done.steps[1].state, StepState::Failed);
    assert_eq!(next_compensation(&nothing_done, &def("cp")), Some(0));
}

/// A refusal after an earlier unknown attempt: the refused step is
/// compensated too when it can be (the unknown attempt may still land; the
/// compensation is harmless if it never does); the pivot trusts the refusal.
#[test]
fn a_refusal_after_an_unknown_attempt_compensates_a_compensatable_step_too() {
    let refused = |kinds: &str| {
        let d = def(kinds);
        let s = apply(&saga(&d), &d, invoked(0, Phase::Action, 1, ok()));
        let unknown = CallResult::Transient("DEADLINE_EXCEEDED".into());
        let s = apply(&s, &d, invoked(1, Phase::Action, 1, unknown));
        let no = CallResult::Failed("insufficient funds".into());
        (apply(&s, &d, invoked(1, Phase::Action, 2, no)), d)
    };
    let (s, d) = refused("cc");
    assert_eq!(s.state, SagaState::Compensating);
    assert_eq!(next_compensation(&s, &d), Some(1));

    let (s, d) = refused("cp");
    assert_eq!(s.state, SagaState::Compensating);
    assert_eq!(s.steps[1].state, StepState::Failed);
    assert_eq!(next_compensation(&s, &d), Some(0));
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
