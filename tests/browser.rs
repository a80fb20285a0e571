//! The admin page in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, installed by `scripts/test`), driven over WebDriver: an
//! operator finds a suspended saga, logs in, retries it and sees it finish;
//! a saga whose input holds a `<script>` shows it as text.
//!
//! Screenshots of the list and the saga page land in
//! `$CARGO_TARGET_TMPDIR/screenshots` (and in `$SAGAD_SCREENSHOTS_DIR` when
//! set, which is how the README's pictures are made).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use saga_coordinator::proto;
use tonic::Code;

const TOKEN: &str = "browser-test-token-0123456789";

/// chromedriver, ended by PID when dropped.
struct Driver(std::process::Child, u16);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn chromedriver() -> Driver {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start chromedriver ({e}): install Debian's chromium and chromium-driver (scripts/test does)"));
    let driver = Driver(child, port);
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < until,
            "chromedriver did not listen on {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    driver
}

async fn browser(driver: &Driver, profile: &std::path::Path) -> Client {
    let caps = serde_json::json!({
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1000", format!("--user-data-dir={}", profile.display()),
            ]
        }
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!()
    };
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.1))
        .await
        .unwrap()
}

/// Waits (up to 20 s) for the element with this id: after a click that
/// navigates, the next page may not be there yet.
async fn appear(c: &Client, id: &str) -> fantoccini::elements::Element {
    c.wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Id(id))
        .await
        .unwrap_or_else(|e| panic!("#{id} did not appear: {e}"))
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    let mut dirs = vec![std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots")];
    if let Some(d) = std::env::var_os("SAGAD_SCREENSHOTS_DIR") {
        dirs.push(d.into());
    }
    for d in dirs {
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), &png).unwrap();
    }
}

#[tokio::test]
async fn an_operator_finds_a_suspended_saga_logs_in_and_retries_it() {
    let db = TestDb::new().await;
    let svc = Scripted::default();
    let url = svc.clone().serve().await;
    let mut cfg = test_config(&db);
    cfg.participants = vec![("svc".into(), url)];
    cfg.admin_token = Some(TOKEN.into());
    let coord = TestCoordinator::start(cfg).await;
    let mut grpc = coord.client().await;
    register(
        &mut grpc,
        definition(
            "order",
            vec![
                step("reserve", "svc", true, true),
                step("charge", "svc", true, true),
            ],
        ),
    )
    .await;
    for i in 0..3 {
        let s = start(&mut grpc, "order", &format!(r#"{{"order": {i}}}"#)).await;
        wait(&mut grpc, &s.saga_id).await;
    }
    svc.script("charge.do", vec![Reply::Status(Code::Unimplemented)]);
    let stuck = start(&mut grpc, "order", r#"{"order": 42, "customer": "Ada"}"#).await;
    wait(&mut grpc, &stuck.saga_id).await;
    let xss = start(
        &mut grpc,
        "order",
        r#"{"note": "<script>window.__xss = 1</script>"}"#,
    )
    .await;
    wait(&mut grpc, &xss.saga_id).await;

    let driver = chromedriver().await;
    let profile = std::env::temp_dir().join(format!("sagad-chromium-{}", uuid::Uuid::new_v4()));
    let c = browser(&driver, &profile).await;
    let base = format!("http://{}", coord.admin);

    // Nothing is shown before logging in: the login form comes first.
    c.goto(&format!("{base}/")).await.unwrap();
    appear(&c, "token").await.send_keys(TOKEN).await.unwrap();
    c.find(Locator::Id("name"))
        .await
        .unwrap()
        .send_keys("dana")
        .await
        .unwrap();
    c.find(Locator::Id("login-button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

    // The list: counts at the top, the suspended saga in the stuck table.
    let stuck_count = appear(&c, "count-stuck")
        .await
        .find(Locator::Css("b"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(stuck_count, "1");
    // The last hour as a chart: five started, four completed (three
    // orders and the one with a script in its input), one suspended.
    let chart = appear(&c, "activity-chart").await;
    let (_, _, width, height) = chart.rectangle().await.unwrap();
    assert!(width > 300.0 && height > 50.0, "chart {width}x{height}");
    for (series, n) in [
        ("started", "5"),
        ("completed", "4"),
        ("compensated", "0"),
        ("suspended", "1"),
    ] {
        let total = c
            .find(Locator::Css(&format!("#activity-{series} b")))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(total, n, "{series}");
    }
    let points = c
        .find(Locator::Id("activity-line-started"))
        .await
        .unwrap()
        .attr("points")
        .await
        .unwrap()
        .unwrap();
    let ys: Vec<f64> = points
        .split_whitespace()
        .map(|p| p.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(ys.len(), 60);
    assert!(
        ys.iter().any(|y| *y < ys[0]),
        "the started line rises somewhere: {points}"
    );
    screenshot(&c, "admin-list.png").await;
    let link = c.find(Locator::Css("#stuck a")).await.unwrap();
    assert_eq!(link.text().await.unwrap(), stuck.saga_id);
    link.click().await.unwrap();
    assert_eq!(
        appear(&c, "saga-state").await.text().await.unwrap(),
        "SUSPENDED"
    );
    assert_eq!(
        c.find(Locator::Id("started-by"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "admin",
        "who started it"
    );
    // Its calls on a timeline: reserve, then the charge that suspended it,
    // each with how long it took and how long it waited.
    let bars = c
        .find_all(Locator::Css("#timeline-chart rect"))
        .await
        .unwrap();
    assert_eq!(bars.len(), 2);
    for bar in &bars {
        let (_, _, w, h) = bar.rectangle().await.unwrap();
        assert!(w >= 1.0 && h > 5.0, "bar {w}x{h}");
    }
    let rows = appear(&c, "timeline").await.text().await.unwrap();
    assert!(
        rows.contains("action reserve #1") && rows.contains("action charge #1"),
        "{rows}"
    );
    assert!(rows.contains("ms") || rows.contains("µs"), "{rows}");
    // (For the picture only: the timeline is below the fold.)
    let _ = c
        .execute(
            "document.getElementById('timeline-chart').scrollIntoView()",
            vec![],
        )
        .await;
    screenshot(&c, "admin-timeline.png").await;

    // Back on the saga's page: retry, confirmed; the result is shown.
    let form = appear(&c, "retry-form").await;
    assert!(c
        .current_url()
        .await
        .unwrap()
        .path()
        .ends_with(&stuck.saga_id));
    form.find(Locator::Css("input[name=note]"))
        .await
        .unwrap()
        .send_keys("charge handler redeployed")
        .await
        .unwrap();
    form.find(Locator::Css("input[name=confirm]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    screenshot(&c, "admin-saga.png").await;
    c.find(Locator::Id("retry-button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let flash = appear(&c, "flash").await.text().await.unwrap();
    assert!(flash.starts_with("retry done"), "{flash}");

    // The saga finishes; the page says so.
    let done = wait(&mut grpc, &stuck.saga_id).await;
    assert_eq!(state(&done), proto::SagaState::Completed);
    c.refresh().await.unwrap();
    assert_eq!(
        appear(&c, "saga-state").await.text().await.unwrap(),
        "COMPLETED"
    );
    let history = appear(&c, "history").await.text().await.unwrap();
    assert!(
        history.contains("operator_retry by admin (claimed: dana): charge handler redeployed"),
        "{history}"
    );

    // A script in the input is text, not code.
    c.goto(&format!("{base}/sagas/{}", xss.saga_id))
        .await
        .unwrap();
    let input = appear(&c, "saga-input").await.text().await.unwrap();
    assert!(
        input.contains("<script>window.__xss = 1</script>"),
        "{input}"
    );
    let ran = c
        .execute("return window.__xss === undefined;", vec![])
        .await
        .unwrap();
    assert_eq!(
        ran,
        serde_json::Value::Bool(true),
        "the script must not run"
    );

    c.close().await.unwrap();
    drop(driver);
    let _ = std::fs::remove_dir_all(&profile);
}
