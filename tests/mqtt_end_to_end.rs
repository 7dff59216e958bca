//! The daemon end to end: real photos, the shipped INT8 model, a real broker
//! (mosquitto, and the embedded one), a real MQTT subscriber.

mod common;

use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(60);

fn prefix(device: &str) -> String {
    format!("labelcast/{device}")
}

/// Runs the daemon on a folder with only the cat photo and checks what a
/// subscriber sees, against whichever broker `mqtt_args` selects.
fn daemon_publishes_the_cat_photo_and_goes_offline(broker_port: u16, mqtt_args: &[&str], device: &str) {
    let photos = photo_folder(&["chelsea.jpg"]);
    let source = format!("file://{}?fps=5&loop=true", photos.path().display());
    let model = demo_model();
    let mut args = vec!["run", "--device-id", device, "--source", &source, "--model", model.to_str().unwrap()];
    args.extend_from_slice(mqtt_args);
    let mut daemon = Daemon::start(&args);
    daemon.wait_for_log("MQTT sink starting", WAIT);
    let sub = Subscriber::connect(broker_port, &format!("{}/#", prefix(device)));

    let topic = |rest: &str| format!("{}/{rest}", prefix(device));
    sub.wait_for(&topic("available"), "online", WAIT);
    sub.wait_for(&topic("label/cat"), "ON", WAIT);
    wait_until(WAIT, || sub.payloads(&topic("labels")).len() >= 3).expect("labels messages arrive");

    // A late subscriber gets the retained state.
    let late = Subscriber::connect(broker_port, &format!("{}/#", prefix(device)));
    late.wait_for(&topic("available"), "online", WAIT);
    late.wait_for(&topic("label/cat"), "ON", WAIT);
    late.wait_for(&topic("label/dog"), "OFF", WAIT);
    late.wait_for(&topic("label/vehicle"), "OFF", WAIT);
    assert!(late.all().iter().filter(|(t, _, _)| t.contains("/label/")).all(|(_, _, retained)| *retained));

    // The labels JSON agrees with `labelcast classify` on the same photo.
    let expected = classify_scores(&photos.path().join("chelsea.jpg"));
    let payload: serde_json::Value = serde_json::from_str(sub.payloads(&topic("labels")).last().unwrap()).unwrap();
    let got = scores_of(&payload);
    assert_eq!(got.len(), expected.len());
    for (label, score) in &expected {
        assert!((got[label] - score).abs() < 1e-3, "{label}: daemon {} vs classify {score}", got[label]);
    }
    assert!(payload["timestamp"].as_str().unwrap().ends_with('Z'));
    assert!(payload["origin"].as_str().unwrap().ends_with("chelsea.jpg"));
    assert_eq!(payload["model"], "labelcast-demo");
    assert!(payload["sequence"].as_u64().is_some() && payload["inference_ms"].as_f64().unwrap() > 0.0);

    let status = daemon.stop();
    assert!(status.success(), "exit status {status:?}; log:\n{}", daemon.log());
    sub.wait_for(&topic("available"), "offline", Duration::from_secs(10));
    let log = daemon.log();
    assert!(log.contains("SIGTERM received") && log.contains("labelcast stopped"), "{log}");
}

#[test]
fn against_mosquitto_labels_arrive_retained_state_is_right_and_sigterm_leaves_offline() {
    let Some(broker) = Mosquitto::start() else { return };
    let url = broker.url();
    daemon_publishes_the_cat_photo_and_goes_offline(broker.port, &["--mqtt", &url], "e2e-mosquitto");
}

#[test]
fn with_no_broker_configured_the_embedded_broker_serves_the_same_flow() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("embedded.toml");
    std::fs::write(&config, format!("[mqtt]\nembedded_listen = \"127.0.0.1:{port}\"\n")).unwrap();
    let config = config.to_str().unwrap().to_string();
    daemon_publishes_the_cat_photo_and_goes_offline(port, &["--config", &config], "e2e-embedded");
}

#[test]
fn the_embedded_broker_on_a_busy_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("busy.toml");
    std::fs::write(&config, format!("[mqtt]\nembedded_listen = \"127.0.0.1:{port}\"\n")).unwrap();
    let out = run_to_end(&mut labelcast(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--source",
        "test://pattern?frames=1",
    ]));
    assert_eq!(out.status.code(), Some(78), "a configuration problem: systemd must not restart-loop on it");
    assert!(
        out.stderr
            .contains(&format!("mqtt.embedded_listen: cannot start the embedded MQTT broker on 127.0.0.1:{port}")),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("--mqtt"), "the error says how to use the other broker: {}", out.stderr);
    assert!(!out.stderr.contains("model loaded"), "found before the model is loaded: {}", out.stderr);
}

#[test]
fn a_broker_restart_is_survived_with_backoff_and_retained_state_is_resent() {
    let Some(mut broker) = Mosquitto::start() else { return };
    let device = "e2e-restart";
    let photos = photo_folder(&["chelsea.jpg"]);
    let source = format!("file://{}?fps=10&loop=true", photos.path().display());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("restart.toml");
    std::fs::write(&config, "[mqtt]\nreconnect_min = \"200ms\"\nreconnect_max = \"2s\"\nstats_interval = \"1h\"\n")
        .unwrap();
    let url = broker.url();
    let mut daemon = Daemon::start(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--device-id",
        device,
        "--source",
        &source,
        "--model",
        demo_model().to_str().unwrap(),
        "--mqtt",
        &url,
    ]);
    let topic = |rest: &str| format!("labelcast/{device}/{rest}");
    let sub = Subscriber::connect(broker.port, "labelcast/#");
    sub.wait_for(&topic("label/cat"), "ON", WAIT);

    broker.stop();
    // Away for four seconds while frames keep flowing.
    std::thread::sleep(Duration::from_secs(4));
    assert!(daemon.is_running(), "the daemon survives the broker going away:\n{}", daemon.log());
    broker.restart();

    // mosquitto runs without persistence, so retained state seen now was re-sent.
    let after = Subscriber::connect(broker.port, "labelcast/#");
    after.wait_for(&topic("available"), "online", WAIT);
    after.wait_for(&topic("label/cat"), "ON", WAIT);
    wait_until(WAIT, || !after.payloads(&topic("stats")).is_empty()).expect("stats re-sent on reconnect");
    let stats: serde_json::Value = serde_json::from_str(after.payloads(&topic("stats")).last().unwrap()).unwrap();
    let dropped = stats["labels_dropped"].as_u64().unwrap();
    // chelsea.jpg (451x300) is classified as two square tiles: `fps` counts
    // frames, `inferences` windows. The two counters are read one after the
    // other while frames go on, so each may be a frame or two ahead of the
    // other; counting windows as frames would give inferences == frames.
    let frames = stats["frames_classified"].as_u64().unwrap();
    let inferences = stats["inferences"].as_u64().unwrap();
    assert!(frames >= 5 && (2 * frames - 4..=2 * frames + 4).contains(&inferences), "two windows per frame: {stats}");
    // At 10 fps for 4 s that is up to 40; a loaded machine classifies fewer frames.
    assert!(dropped >= 1, "labels messages while the broker was away are dropped and counted: {stats}");
    // 4 s away with backoff from 200 ms doubling to 2 s allows ~6 attempts;
    // a busy loop would make thousands.
    let attempts = stats["mqtt_connect_attempts"].as_u64().unwrap();
    assert!((2..=12).contains(&attempts), "connection attempts {attempts}: {stats}");
    assert_eq!(stats["mqtt_connections"], 2, "{stats}");
    let log = daemon.log();
    assert!(log.contains("MQTT broker unreachable") && log.contains("retry_in_ms"), "{log}");
    assert!(log.contains("reconnected to MQTT broker"), "{log}");
    assert!(daemon.stop().success());
}

#[test]
fn an_unreachable_broker_at_start_does_not_stop_the_daemon() {
    let port = free_port();
    let mut daemon = Daemon::start(&[
        "run",
        "--device-id",
        "e2e-unreachable",
        "--source",
        "test://pattern?fps=5",
        "--model",
        demo_model().to_str().unwrap(),
        "--mqtt",
        &format!("mqtt://127.0.0.1:{port}"),
    ]);
    daemon.wait_for_log("MQTT broker unreachable", WAIT);
    // Said when the first labels have nowhere to go (after the first frame).
    daemon.wait_for_log("broker away: dropping labels messages", WAIT);
    std::thread::sleep(Duration::from_secs(3));
    assert!(daemon.is_running(), "{}", daemon.log());
    let log = daemon.log();
    let (_, metrics) = http_get(metrics_port(&daemon), "/metrics");
    let attempts: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("labelcast_mqtt_connect_attempts_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!((2..=12).contains(&attempts), "backoff keeps attempts few ({attempts}):\n{log}");
    assert!(log.matches("MQTT broker unreachable").count() <= 2, "and the same failure is one line per 30 s:\n{log}");
    assert!(log.contains("broker away: dropping labels messages"), "{log}");
    let warning = log.lines().find(|l| l.contains("MQTT broker unreachable")).unwrap_or_default();
    assert!(
        warning.contains(&format!("127.0.0.1:{port}")) && warning.contains("check mqtt.url"),
        "the warning names the broker and what to check: {warning}"
    );
    assert!(daemon.stop().success(), "{}", daemon.log());
}

#[test]
fn an_unreadable_photo_in_the_folder_is_skipped_with_a_warning_and_the_rest_are_classified() {
    let photos = photo_folder(&["chelsea.jpg", "coffee.jpg"]);
    std::fs::write(photos.path().join("broken.jpg"), b"\xff\xd8\xff\xe0 truncated").unwrap();
    std::fs::write(photos.path().join("empty.png"), b"").unwrap();
    let source = format!("file://{}?fps=0", photos.path().display());
    let mut daemon =
        Daemon::start(&["run", "--output", "stdout", "--source", &source, "--model", demo_model().to_str().unwrap()]);
    let status = daemon.wait(WAIT);
    assert!(status.success(), "a finite source ends the run cleanly:\n{}", daemon.log());
    let stdout = daemon.stdout.lock().unwrap().clone();
    let origins: Vec<String> = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["origin"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(origins.len(), 2, "{stdout}");
    assert!(origins[0].ends_with("chelsea.jpg") && origins[1].ends_with("coffee.jpg"), "{origins:?}");
    let log = daemon.log();
    assert!(log.contains("broken.jpg") && log.contains("frame skipped"), "{log}");
    assert!(log.contains("\"frames_failed\":2"), "both bad files are counted: {log}");
}

#[test]
fn fifty_broker_restarts_in_a_row_leave_the_daemon_running_with_state_right_and_memory_flat() {
    let Some(mut broker) = Mosquitto::start() else { return };
    let device = "e2e-fifty";
    let photos = photo_folder(&["chelsea.jpg"]);
    let source = format!("file://{}?fps=10&loop=true", photos.path().display());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fifty.toml");
    std::fs::write(&config, "[mqtt]\nreconnect_min = \"100ms\"\nreconnect_max = \"400ms\"\nstats_interval = \"1h\"\n")
        .unwrap();
    let url = broker.url();
    let model = demo_model();
    let mut daemon = Daemon::start(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--device-id",
        device,
        "--source",
        &source,
        "--model",
        model.to_str().unwrap(),
        "--mqtt",
        &url,
    ]);
    let topic = |rest: &str| format!("labelcast/{device}/{rest}");
    let restart_and_check = |broker: &mut Mosquitto| {
        broker.restart();
        // No persistence: whatever retained state is there now was re-sent.
        let sub = Subscriber::connect(broker.port, &topic("#"));
        sub.wait_for(&topic("available"), "online", WAIT);
        sub.wait_for(&topic("label/cat"), "ON", WAIT);
        sub.wait_for(&topic("label/dog"), "OFF", WAIT);
    };
    let first = Subscriber::connect(broker.port, &topic("#"));
    first.wait_for(&topic("label/cat"), "ON", WAIT);
    // Warm up the allocator and the reconnect path before measuring.
    for _ in 0..5 {
        restart_and_check(&mut broker);
    }
    let pid = daemon.pid();
    let rss_before = rss_kib(pid);
    let started = std::time::Instant::now();
    for cycle in 0..50 {
        restart_and_check(&mut broker);
        assert!(daemon.is_running(), "cycle {cycle}: daemon died:\n{}", daemon.log());
    }
    let rss_after = rss_kib(pid);
    let elapsed = started.elapsed().as_secs_f64();
    let sub = Subscriber::connect(broker.port, &topic("stats"));
    wait_until(WAIT, || !sub.payloads(&topic("stats")).is_empty()).expect("stats retained");
    let stats: serde_json::Value = serde_json::from_str(sub.payloads(&topic("stats")).last().unwrap()).unwrap();
    let attempts = stats["mqtt_connect_attempts"].as_u64().unwrap();
    println!(
        "50 restarts in {elapsed:.0} s: RSS {rss_before} -> {rss_after} KiB, {attempts} connection attempts, {} connections",
        stats["mqtt_connections"]
    );
    assert!(stats["mqtt_connections"].as_u64().unwrap() >= 54, "{stats}");
    // Backoff from 100 ms: a busy loop would make thousands of attempts a second.
    assert!((attempts as f64) < 20.0 * elapsed, "{attempts} attempts in {elapsed:.0} s: {stats}");
    // A leak per reconnect would grow with the cycles; allocator noise does not.
    assert!(rss_after < rss_before + 10 * 1024, "RSS grew from {rss_before} to {rss_after} KiB over 50 restarts");
    assert!(daemon.stop().success());
}
