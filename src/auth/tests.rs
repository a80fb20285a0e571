use super::*;

fn p(roles: &[&str]) -> Principal {
    Principal::named(
        "carol".into(),
        roles
            .iter()
            .map(|r| Role::parse(r).expect("role"))
            .collect(),
    )
}

#[test]
fn what_each_role_may_do() {
    use Need::*;
    let needs = [
        ReadDefinitions,
        ReadSagas,
        ReadSaga(Some("carol")),
        ReadSaga(Some("dave")),
        Start,
        Define,
        Operate,
        Heartbeat("bank_a"),
        Heartbeat("payments"),
    ];
    #[rustfmt::skip]
    let table: [(&[&str], [bool; 9]); 8] = [
        (&[],                       [false, false, false, false, false, false, false, false, false]),
        (&["viewer"],               [true,  true,  true,  true,  false, false, false, false, false]),
        (&["client"],               [false, false, true,  false, true,  false, false, false, false]),
        (&["definer"],              [true,  false, false, false, false, true,  false, false, false]),
        (&["operator"],             [true,  true,  true,  true,  false, false, true,  false, false]),
        (&["participant:bank_a"],   [false, false, false, false, false, false, false, true,  false]),
        (&["admin"],                [true,  true,  true,  true,  true,  true,  true,  true,  true]),
        (&["client", "viewer"],     [true,  true,  true,  true,  true,  false, false, false, false]),
    ];
    for (roles, allowed) in table {
        let who = p(roles);
        for (need, want) in needs.iter().zip(allowed) {
            assert_eq!(who.may(*need), want, "{roles:?} {need:?}");
        }
    }
    let denied = p(&["participant:bank_a"])
        .require(Heartbeat("payments"))
        .expect_err("denied");
    assert_eq!(
        denied.to_string(),
        "carol may not do this: it needs role participant:payments"
    );
}

#[test]
fn roles_parse_and_print() {
    for r in [
        "viewer",
        "client",
        "definer",
        "operator",
        "admin",
        "participant:bank_a",
    ] {
        assert_eq!(Role::parse(r).expect(r).to_string(), r);
    }
    assert!(Role::parse("participant:").is_err());
    assert!(Role::parse("Admin").is_err());
}

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("sagad-auth-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&d).expect("dir");
    d
}

fn hex(d: [u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn tokens_subjects_and_the_admin_token() {
    let d = dir();
    let file = d.join("auth.yaml");
    std::fs::write(
        &file,
        format!(
            "principals:\n  - {{name: ci, token_sha256: {}, roles: [client]}}\n  \
             - {{name: bank-a, cert_subject: 'CN=bank-a,O=Example', roles: ['participant:bank_a']}}\n",
            hex(sha256(b"ci-token"))
        ),
    )
    .expect("write");
    let auth = Authenticator::new(AuthConfig {
        auth_file: Some(file.clone()),
        admin_token: Some("admin-token-0123456789".into()),
        ..AuthConfig::default()
    })
    .expect("loads");
    let ci = auth
        .authenticate(Some("Bearer ci-token"), None)
        .expect("ci");
    assert_eq!((ci.name.as_str(), ci.may(Need::Start)), ("ci", true));
    let admin = auth
        .authenticate(Some("bearer admin-token-0123456789"), None)
        .expect("admin");
    assert!(admin.may(Need::Operate));
    assert_eq!(auth.authenticate(None, None), Err(AuthError::Missing));
    let bad = auth
        .authenticate(Some("Bearer nope"), None)
        .expect_err("bad");
    assert_eq!(bad, AuthError::Invalid("unknown token".into()));
    assert!(matches!(
        auth.authenticate(Some("Basic Y2k6"), None),
        Err(AuthError::Invalid(_))
    ));
    let bank = auth
        .authenticate(None, Some("CN=bank-a, O=Example"))
        .expect("subject");
    assert_eq!(bank.name, "bank-a");
    assert_eq!(
        auth.authenticate(None, Some("CN=intruder")),
        Err(AuthError::Missing)
    );

    // A broken file on reload keeps the principals in force; a good one
    // replaces them.
    std::fs::write(&file, "principals: [{name: x}]").expect("write");
    assert!(auth.reload().is_err());
    assert!(auth.authenticate(Some("Bearer ci-token"), None).is_ok());
    std::fs::write(
        &file,
        format!(
            "principals:\n  - {{name: ci2, token_sha256: {}, roles: [viewer]}}\n",
            hex(sha256(b"ci2-token"))
        ),
    )
    .expect("write");
    auth.reload().expect("reloads");
    assert!(auth.authenticate(Some("Bearer ci-token"), None).is_err());
    assert_eq!(
        auth.authenticate(Some("Bearer ci2-token"), None)
            .expect("ci2")
            .name,
        "ci2"
    );
    std::fs::remove_dir_all(d).ok();
}

#[test]
fn nothing_configured_is_anonymous_with_every_role() {
    let auth = Authenticator::open();
    let who = auth.authenticate(None, None).expect("open");
    assert!(who.anonymous && who.may(Need::Operate));
    assert_eq!(who.audit_name(), None);
    assert_eq!(who.actor(Some("carol\n"), "grpc"), "carol");
    assert_eq!(who.actor(None, "grpc"), "grpc");
    let named = Principal::named("ops".into(), vec![Role::Operator]);
    assert_eq!(named.actor(Some("carol"), "grpc"), "ops (claimed: carol)");
    assert_eq!(named.actor(None, "grpc"), "ops");
}

#[test]
fn names_are_cleaned() {
    assert_eq!(clean_name(" \u{7}\n "), None);
    assert_eq!(clean_name("carol\r\n").as_deref(), Some("carol"));
    assert_eq!(
        clean_name(&"x".repeat(200)).map(|s| s.len()),
        Some(ACTOR_CHARS_MAX)
    );
}

#[test]
fn certificate_subjects_render_in_order() {
    let mut params = rcgen::CertificateParams::new(vec!["bank-a".into()]).expect("params");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "bank-a");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "Example");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("cert");
    assert_eq!(
        der::certificate_subject(cert.der()).expect("subject"),
        "CN=bank-a,O=Example"
    );
}

#[test]
fn the_admin_token_can_come_from_a_file() {
    let d = dir();
    let file = d.join("admin.token");
    std::fs::write(&file, "file-admin-token-0123456789\n").expect("write");
    let auth = Authenticator::new(AuthConfig {
        admin_token_file: Some(file.clone()),
        ..AuthConfig::default()
    })
    .expect("loads");
    assert!(auth.enabled());
    let who = auth
        .authenticate(Some("Bearer file-admin-token-0123456789"), None)
        .expect("admin");
    assert_eq!(who.name, "admin");
    std::fs::write(&file, "short").expect("write");
    let err = auth.reload().expect_err("too short");
    assert!(
        err.contains("at least 16") && !err.contains("short"),
        "{err}"
    );
    std::fs::remove_dir_all(d).ok();
}
