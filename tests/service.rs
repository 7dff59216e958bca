//! Service grade, against the real binary: systemd's notify protocol on a
//! test socket (READY once the first frame is classified, WATCHDOG while the
//! pipeline answers, silence once it hangs), `/healthz` and `/metrics`, and
//! Home Assistant discovery with the birth-message flow against mosquitto.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;

/// Everything systemd would have received, with when; read continuously,
/// as systemd does (a full socket would block the sender).
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    received: std::sync::Arc<std::sync::Mutex<Vec<(Instant, String)>>>,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = received.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                sink.lock().unwrap().push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned()));
            }
        });
        NotifySocket { _dir: dir, path, received }
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.received.lock().unwrap().clone()
    }

    fn wait_for(&self, needle: &str, timeout: Duration) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((at, _)) = self.all().iter().find(|(_, m)| m.contains(needle)) {
                return *at;
            }
            assert!(Instant::now() < deadline, "no {needle:?} within {timeout:?}; got {:?}", self.all());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn count_since(&self, needle: &str, since: Instant) -> usize {
        self.all().iter().filter(|(at, m)| *at >= since && m.contains(needle)).count()
    }
}

#[test]
fn systemd_hears_ready_then_watchdog_and_the_watchdog_stops_when_the_source_hangs() {
    let notify = NotifySocket::bind();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[source]\nuri = \"test://pattern?width=64&height=64&fps=10&hang_after=40\"\n\
         [output]\nmode = \"stdout\"\n[service]\nstall_timeout = \"2s\"\nhttp_listen = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let model = demo_model();
    let cmd_args = ["run", "--config", config.to_str().unwrap(), "--model", model.to_str().unwrap()];
    let mut daemon = Daemon::start_with_env(
        &cmd_args,
        &[("NOTIFY_SOCKET", notify.path.to_str().unwrap()), ("WATCHDOG_USEC", "400000")],
    );
    let port = metrics_port(&daemon);

    let ready = notify.wait_for("READY=1", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(1200));
    assert!(notify.count_since("WATCHDOG=1", ready) >= 3, "watchdog pings every 0.2 s: {:?}", notify.all());
    let (status, body) = http_get(port, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"), "healthy while frames flow");
    let (status, metrics) = http_get(port, "/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("labelcast_ready 1"), "{metrics}");
    assert!(metrics.contains("labelcast_inference_seconds_count{engine=\"tract\"}"), "{metrics}");

    // 40 frames at 10 fps, then the source hangs; 2 s later it counts as hung.
    daemon.wait_for_log("pipeline hung", Duration::from_secs(30));
    let hung_at = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(notify.count_since("WATCHDOG=1", hung_at), 0, "no watchdog ping once hung: {:?}", notify.all());
    assert!(notify.all().iter().any(|(_, m)| m.contains("STATUS=hung")), "{:?}", notify.all());
    let (status, body) = http_get(port, "/healthz");
    assert_eq!(status, 503);
    assert!(body.contains("hung") && body.contains("frame source"), "{body}");

    // SIGTERM still ends it, leaving the stuck capture thread behind.
    let exit = daemon.stop();
    assert!(exit.success(), "{exit:?}\n{}", daemon.log());
    assert!(daemon.log().contains("capture thread is stuck"), "{}", daemon.log());
}

#[test]
fn home_assistant_finds_every_label_gets_it_again_after_its_birth_message_and_loses_removed_ones() {
    let Some(broker) = Mosquitto::start() else { return };
    let device = "hatest";
    // What an earlier run with another label list left behind, and another
    // labelcast whose device id starts the same way.
    let stale_topic = "homeassistant/binary_sensor/hatest_unicorn/config";
    publish_retained(
        broker.port,
        stale_topic,
        r#"{"name":"unicorn","unique_id":"labelcast_hatest_unicorn","device":{"identifiers":["labelcast_hatest"]}}"#,
    );
    let neighbour_topic = "homeassistant/binary_sensor/hatest_2_dog/config";
    let neighbour =
        r#"{"name":"dog","unique_id":"labelcast_hatest_2_dog","device":{"identifiers":["labelcast_hatest_2"]}}"#;
    publish_retained(broker.port, neighbour_topic, neighbour);

    let ha = Subscriber::connect(broker.port, "homeassistant/#");
    let photos = photo_folder(&["chelsea.jpg"]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"{device}\"\n[source]\nuri = \"file://{}?fps=4&loop=true\"\n[mqtt]\nurl = \"{}\"\n\
             [homeassistant]\nbirth_delay = \"200ms\"\n",
            photos.path().display(),
            broker.url()
        ),
    )
    .unwrap();
    let model = demo_model();
    let mut daemon = Daemon::start(&["run", "--config", config.to_str().unwrap(), "--model", model.to_str().unwrap()]);

    let cat_topic = "homeassistant/binary_sensor/hatest_cat/config";
    wait_until(Duration::from_secs(60), || !ha.payloads(cat_topic).is_empty())
        .unwrap_or_else(|_| panic!("no discovery config; log:\n{}", daemon.log()));
    let cat: serde_json::Value = serde_json::from_str(&ha.payloads(cat_topic)[0]).unwrap();
    assert_eq!(cat["state_topic"], "labelcast/hatest/label/cat");
    assert_eq!(cat["availability_topic"], "labelcast/hatest/available");
    assert_eq!(cat["unique_id"], "labelcast_hatest_cat");
    assert_eq!(cat["device"]["identifiers"][0], "labelcast_hatest");
    assert!(cat["device"]["model"].as_str().unwrap().starts_with("labelcast-demo"), "{cat}");
    assert_eq!(cat["expire_after"], 90, "three 30 s stats intervals");
    let label_configs = || -> Vec<String> {
        ha.all()
            .into_iter()
            .filter(|(t, p, _)| {
                t.starts_with("homeassistant/binary_sensor/hatest_")
                    && t != stale_topic
                    && t != neighbour_topic
                    && !p.is_empty()
            })
            .map(|(t, _, _)| t)
            .collect()
    };
    wait_until(Duration::from_secs(10), || label_configs().len() >= 12)
        .unwrap_or_else(|_| panic!("one binary_sensor per label expected, saw {:?}", label_configs()));
    wait_until(Duration::from_secs(10), || !ha.payloads("homeassistant/sensor/hatest_fps/config").is_empty())
        .expect("the fps sensor is announced");
    wait_until(Duration::from_secs(10), || !ha.payloads("homeassistant/sensor/hatest_inference_ms/config").is_empty())
        .expect("the inference time sensor is announced");

    // The removed label is cleared; the neighbour's entity is not touched.
    ha.wait_for(stale_topic, "", Duration::from_secs(10));
    assert_eq!(ha.payloads(neighbour_topic), [neighbour], "another device's entity is left alone");
    daemon.wait_for_log("removing the Home Assistant entity", Duration::from_secs(5));

    // Home Assistant restarts: its birth message brings everything again.
    let state = Subscriber::connect(broker.port, "labelcast/hatest/label/cat");
    state.wait_for("labelcast/hatest/label/cat", "ON", Duration::from_secs(60));
    let configs_before = ha.payloads(cat_topic).len();
    let states_before = state.payloads("labelcast/hatest/label/cat").len();
    publish_retained(broker.port, "homeassistant/status", "online");
    wait_until(Duration::from_secs(10), || ha.payloads(cat_topic).len() > configs_before)
        .unwrap_or_else(|_| panic!("discovery not re-sent after the birth message; log:\n{}", daemon.log()));
    wait_until(Duration::from_secs(10), || state.payloads("labelcast/hatest/label/cat").len() > states_before)
        .expect("label state re-sent after the birth message");
    assert!(daemon.stop().success());
}

#[test]
fn home_assistant_discovery_can_be_switched_off() {
    let Some(broker) = Mosquitto::start() else { return };
    let ha = Subscriber::connect(broker.port, "homeassistant/#");
    let labels = Subscriber::connect(broker.port, "labelcast/hanone/label/cat");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let photos = photo_folder(&["chelsea.jpg"]);
    std::fs::write(
        &config,
        format!(
            "device_id = \"hanone\"\n[source]\nuri = \"file://{}?fps=4&loop=true\"\n[mqtt]\nurl = \"{}\"\n[homeassistant]\ndiscovery = false\n",
            photos.path().display(),
            broker.url()
        ),
    )
    .unwrap();
    let model = demo_model();
    let mut daemon = Daemon::start(&["run", "--config", config.to_str().unwrap(), "--model", model.to_str().unwrap()]);
    labels.wait_for("labelcast/hanone/label/cat", "ON", Duration::from_secs(60));
    assert!(ha.all().is_empty(), "no discovery messages: {:?}", ha.all());
    assert!(daemon.stop().success());
}

#[test]
fn sighup_is_logged_as_not_supported_and_the_daemon_keeps_running() {
    let source = "test://pattern?width=64&height=64&fps=5";
    let model = demo_model();
    let mut daemon =
        Daemon::start(&["run", "--output", "stdout", "--source", source, "--model", model.to_str().unwrap()]);
    daemon.wait_for_log("first frame classified", Duration::from_secs(60));
    daemon.signal("HUP");
    daemon.wait_for_log("reloading the config is not supported", Duration::from_secs(10));
    let lines_before = daemon.stdout_lines().len();
    wait_until(Duration::from_secs(60), || daemon.stdout_lines().len() > lines_before)
        .expect("labels keep coming after SIGHUP");
    assert!(daemon.is_running());
    assert!(daemon.stop().success());
}
