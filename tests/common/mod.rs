//! Shared parts of the integration tests: the real binary, the shipped demo
//! model and photos, a real mosquitto on a free loopback port, and an MQTT
//! subscriber that records what it sees.

#![allow(dead_code)]

pub mod onnx;

use std::collections::HashMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_labelcast"))
}

pub fn demo_model() -> PathBuf {
    repo().join("models/demo/labelcast-demo-int8.onnx")
}

pub fn demo_fp32_model() -> PathBuf {
    repo().join("models/demo/labelcast-demo-fp32.onnx")
}

pub fn photo(name: &str) -> PathBuf {
    repo().join("calibration/images").join(name)
}

/// A folder holding copies of the named shipped photos.
pub fn photo_folder(names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in names {
        std::fs::copy(photo(name), dir.path().join(name)).unwrap();
    }
    dir
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn labelcast(args: &[&str]) -> Command {
    let mut cmd = Command::new(binary());
    // The INT8 self-check's verdicts are cached under the build's temporary
    // folder, not the developer's ~/.cache; CACHE_DIRECTORY (systemd's) would win.
    cmd.args(args)
        .env("RUST_LOG", "info")
        .env_remove("CACHE_DIRECTORY")
        .env("XDG_CACHE_HOME", Path::new(env!("CARGO_TARGET_TMPDIR")).join("xdg-cache"));
    cmd
}

/// Output of a finished command, as text.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

pub fn run_to_end(cmd: &mut Command) -> Finished {
    let out = cmd.output().expect("the labelcast binary runs");
    Finished {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The daemon running in the background; stderr goes to a file the test can read.
pub struct Daemon {
    child: Option<Child>,
    log: tempfile::NamedTempFile,
    pub stdout: Arc<Mutex<String>>,
}

impl Daemon {
    pub fn start(args: &[&str]) -> Daemon {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut args = args.to_vec();
        // Tests run daemons side by side: each serves /metrics on a port of its own.
        if args.first() == Some(&"run") && !args.contains(&"--http-listen") {
            args.extend(["--http-listen", "127.0.0.1:0"]);
        }
        let mut child = labelcast(&args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("the labelcast binary starts");
        let stdout = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stdout.take().unwrap();
        let sink = stdout.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Daemon { child: Some(child), log, stdout }
    }

    /// The lines written to stdout so far, without a line still being
    /// written (stdout reaches the pipe in pieces for long lines).
    pub fn stdout_lines(&self) -> Vec<String> {
        let out = self.stdout.lock().unwrap();
        let complete = out.rfind('\n').map_or("", |end| &out[..end]);
        complete.lines().map(str::to_owned).collect()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        let status = Command::new("kill").args([&format!("-{signal}"), &pid]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit by itself.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                panic!("labelcast did not exit within {timeout:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait(Duration::from_secs(20))
    }

    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        wait_until(timeout, || self.log().contains(needle))
            .unwrap_or_else(|_| panic!("no {needle:?} in the log within {timeout:?}:\n{}", self.log()));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> Result<(), ()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if check() { Ok(()) } else { Err(()) }
}

/// A real mosquitto on a loopback port, stopped on drop.
pub struct Mosquitto {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// More configuration lines (authentication, client id rules...).
    extra: String,
}

impl Mosquitto {
    /// Starts mosquitto, or panics saying how to install it. Set
    /// LABELCAST_SKIP_MOSQUITTO=1 to skip these tests on a machine without it.
    pub fn start() -> Option<Mosquitto> {
        if std::env::var_os("LABELCAST_SKIP_MOSQUITTO").is_some() {
            eprintln!("LABELCAST_SKIP_MOSQUITTO is set: skipping a test that needs mosquitto");
            return None;
        }
        Self::start_with("")
    }

    /// [`Mosquitto::start`] with more lines in its configuration; `{dir}` in
    /// them is replaced with a folder the test may write files to.
    pub fn start_with(extra: &str) -> Option<Mosquitto> {
        if std::env::var_os("LABELCAST_SKIP_MOSQUITTO").is_some() {
            eprintln!("LABELCAST_SKIP_MOSQUITTO is set: skipping a test that needs mosquitto");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        // Run as root, mosquitto drops to its own user: it must still reach
        // its log and the files the test writes here.
        std::os::unix::fs::PermissionsExt::set_mode(&mut std::fs::metadata(dir.path()).unwrap().permissions(), 0o777);
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let extra = extra.replace("{dir}", &dir.path().display().to_string());
        let mut m = Mosquitto { port: free_port(), child: None, dir, extra };
        m.spawn();
        Some(m)
    }

    /// The folder `{dir}` stood for.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("mosquitto runs").id()
    }

    /// What mosquitto logged (connections, disconnections and why).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    fn binary() -> PathBuf {
        for candidate in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"] {
            if Path::new(candidate).exists() {
                return candidate.into();
            }
        }
        panic!(
            "mosquitto is not installed: run `sudo apt-get install mosquitto` (tests/run.sh does it), or set LABELCAST_SKIP_MOSQUITTO=1"
        );
    }

    fn spawn(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        let log = self.dir.path().join("mosquitto.log");
        let anonymous = if self.extra.contains("allow_anonymous") { "" } else { "allow_anonymous true\n" };
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\n{anonymous}persistence false\nlog_dest file {}\nlog_type all\n{}\n",
                self.port,
                log.display(),
                self.extra
            ),
        )
        .unwrap();
        let child = Command::new(Self::binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        self.child = Some(child);
        let port = self.port;
        wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
            .expect("mosquitto listens within 10 s");
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (retained messages are gone: no persistence).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A subscriber on `filter` that keeps every message (topic, payload, retained).
pub struct Subscriber {
    messages: Arc<Mutex<Vec<(String, String, bool)>>>,
    /// Each topic's last payload as bytes (pictures are not text).
    bytes: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    _thread: std::thread::JoinHandle<()>,
}

impl Subscriber {
    pub fn connect(port: u16, filter: &str) -> Subscriber {
        let id = format!("test-{}", fastrand::u64(..));
        let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(5));
        // Snapshots are whole JPEGs.
        options.set_max_packet_size(8 << 20, 8 << 20);
        let (client, mut connection) = rumqttc::Client::new(options, 64);
        client.subscribe(filter, rumqttc::QoS::AtLeastOnce).unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let bytes = Arc::new(Mutex::new(HashMap::new()));
        let sink = messages.clone();
        let bytes_sink = bytes.clone();
        let thread = std::thread::spawn(move || {
            let _client = client;
            for event in connection.iter() {
                match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let payload = String::from_utf8_lossy(&p.payload).into_owned();
                        bytes_sink.lock().unwrap().insert(p.topic.clone(), p.payload.to_vec());
                        sink.lock().unwrap().push((p.topic.clone(), payload, p.retain));
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        Subscriber { messages, bytes, _thread: thread }
    }

    /// The last payload seen on a topic, as bytes.
    pub fn latest_bytes(&self, topic: &str) -> Option<Vec<u8>> {
        self.bytes.lock().unwrap().get(topic).cloned()
    }

    pub fn all(&self) -> Vec<(String, String, bool)> {
        self.messages.lock().unwrap().clone()
    }

    /// The last payload seen on each topic.
    pub fn latest(&self) -> HashMap<String, String> {
        self.all().into_iter().map(|(t, p, _)| (t, p)).collect()
    }

    pub fn wait_for(&self, topic: &str, payload: &str, timeout: Duration) {
        wait_until(timeout, || self.all().iter().any(|(t, p, _)| t == topic && p == payload))
            .unwrap_or_else(|_| panic!("no {payload:?} on {topic} within {timeout:?}; saw: {:?}", self.latest()));
    }

    pub fn payloads(&self, topic: &str) -> Vec<String> {
        self.all().into_iter().filter(|(t, _, _)| t == topic).map(|(_, p, _)| p).collect()
    }

    /// Waits for a stats message on `topic` that `check` accepts and
    /// returns it. Counters that depend on which frames a slow machine
    /// drops (a corrupt frame replaced in its slot before it is decoded)
    /// are waited for, not read once.
    pub fn wait_for_stats(
        &self,
        topic: &str,
        timeout: Duration,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let parse = |s: &String| serde_json::from_str::<serde_json::Value>(s).expect("stats are JSON");
        let mut found = None;
        let _ = wait_until(timeout, || {
            found = self.payloads(topic).iter().map(parse).find(&check);
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!("no stats on {topic} as expected within {timeout:?}; last: {:?}", self.payloads(topic).last())
        })
    }
}

/// `labelcast classify --json` for one photo: label -> score.
pub fn classify_scores(image: &Path) -> HashMap<String, f64> {
    let out = run_to_end(
        labelcast(&["classify", "--json", "--model", demo_model().to_str().unwrap(), image.to_str().unwrap()])
            .env_remove("RUST_LOG"),
    );
    assert!(out.status.success(), "classify failed: {}", out.stderr);
    let value: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    scores_of(&value)
}

pub fn scores_of(labels_payload: &serde_json::Value) -> HashMap<String, f64> {
    labels_payload["labels"]
        .as_object()
        .expect("a labels object")
        .iter()
        .map(|(k, v)| (k.clone(), v["score"].as_f64().unwrap()))
        .collect()
}

/// A plain HTTP GET on loopback: (status code, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    http_get_with(port, path, &[])
}

/// [`http_get`] with more header lines (`"Authorization: Basic ..."`).
pub fn http_get_with(port: u16, path: &str, headers: &[&str]) -> (u16, String) {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("the HTTP endpoint accepts");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// Publishes one retained message and waits until the broker has it.
pub fn publish_retained(port: u16, topic: &str, payload: &str) {
    let id = format!("test-pub-{}", fastrand::u64(..));
    let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut connection) = rumqttc::Client::new(options, 16);
    client.publish(topic, rumqttc::QoS::AtLeastOnce, true, payload.as_bytes().to_vec()).unwrap();
    for event in connection.iter() {
        match event {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => break,
            Ok(_) => {}
            Err(err) => panic!("publishing {topic}: {err}"),
        }
    }
    let _ = client.disconnect();
}

/// The port the daemon serves /metrics and the status page on (tests ask for port 0).
pub fn metrics_port(daemon: &Daemon) -> u16 {
    daemon.wait_for_log("serving /metrics, /healthz and the status page", Duration::from_secs(60));
    let log = daemon.log();
    let line = log.lines().find(|l| l.contains("serving /metrics")).unwrap();
    line.rsplit(':')
        .next()
        .and_then(|p| p.trim().trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
        .unwrap_or_else(|| panic!("no port in {line}"))
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches("kB").trim().parse().unwrap()
}
