//! TLS and authentication against a real mosquitto: certificates made by
//! the test with openssl (a test CA, a server certificate for 127.0.0.1, a
//! client certificate, and a second CA that must be refused), a password
//! file made with mosquitto_passwd. A plain listener on the same broker
//! lets the test's subscriber watch what the daemon published.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(60);

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl is installed");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA (`<name>-ca.pem`) and, signed by it, a leaf certificate.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", &format!("/CN={name} test CA")]
            .iter()
            .copied()
            .chain(["-keyout", &format!("{name}-ca.key"), "-out", &format!("{name}-ca.pem")])
            .collect::<Vec<_>>(),
    );
}

fn make_leaf(dir: &Path, ca: &str, leaf: &str, extensions: &str) {
    std::fs::write(dir.join(format!("{leaf}.ext")), extensions).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={leaf}"),
            "-keyout",
            &format!("{leaf}.key"),
            "-out",
            &format!("{leaf}.csr"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{leaf}.csr"),
            "-CA",
            &format!("{ca}-ca.pem"),
            "-CAkey",
            &format!("{ca}-ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{leaf}.ext"),
            "-out",
            &format!("{leaf}.pem"),
        ],
    );
}

struct TlsBroker {
    dir: tempfile::TempDir,
    plain: u16,
    tls: u16,
    tls_password: u16,
    tls_client_cert: u16,
    child: Child,
}

impl TlsBroker {
    fn start() -> Option<TlsBroker> {
        if std::env::var_os("LABELCAST_SKIP_MOSQUITTO").is_some() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        make_ca(d, "good");
        make_ca(d, "other");
        make_leaf(d, "good", "server", "subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth\n");
        make_leaf(d, "good", "client", "extendedKeyUsage = clientAuth\n");
        make_leaf(d, "other", "impostor", "subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth\n");
        let passwd = d.join("passwd");
        std::fs::write(&passwd, "").unwrap();
        let status = Command::new("mosquitto_passwd")
            .args(["-b", passwd.to_str().unwrap(), "camera", "s3cret"])
            .status()
            .unwrap();
        assert!(status.success());
        let (plain, tls, tls_password, tls_client_cert) = (free_port(), free_port(), free_port(), free_port());
        let p = |f: &str| d.join(f).display().to_string();
        let tls_files =
            format!("cafile {}\ncertfile {}\nkeyfile {}\n", p("good-ca.pem"), p("server.pem"), p("server.key"));
        let conf = format!(
            "per_listener_settings true\npersistence false\n\
             listener {plain} 127.0.0.1\nallow_anonymous true\n\
             listener {tls} 127.0.0.1\nallow_anonymous true\n{tls_files}\
             listener {tls_password} 127.0.0.1\nallow_anonymous false\npassword_file {}\n{tls_files}\
             listener {tls_client_cert} 127.0.0.1\nallow_anonymous true\nrequire_certificate true\n{tls_files}",
            passwd.display()
        );
        std::fs::write(d.join("mosquitto.conf"), conf).unwrap();
        // Started as root, mosquitto drops to its own user: let it read the
        // keys of this throwaway CA.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        for entry in std::fs::read_dir(d).unwrap() {
            std::fs::set_permissions(entry.unwrap().path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(d.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        for port in [plain, tls, tls_password, tls_client_cert] {
            wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
                .expect("mosquitto listens");
        }
        Some(TlsBroker { dir, plain, tls, tls_password, tls_client_cert, child })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs the daemon on the cat photo with this `[mqtt]` section.
    fn daemon(&self, device: &str, mqtt: &str) -> (Daemon, tempfile::TempDir) {
        let work = tempfile::tempdir().unwrap();
        std::fs::copy(photo("chelsea.jpg"), work.path().join("chelsea.jpg")).unwrap();
        let config = work.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "device_id = \"{device}\"\n[source]\nuri = \"file://{}?fps=4&loop=true\"\n[homeassistant]\ndiscovery = false\n[mqtt]\nreconnect_min = \"200ms\"\nreconnect_max = \"1s\"\n{mqtt}",
                work.path().display()
            ),
        )
        .unwrap();
        let model = demo_model();
        let daemon = Daemon::start(&["run", "--config", config.to_str().unwrap(), "--model", model.to_str().unwrap()]);
        (daemon, work)
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn tls_with_the_test_ca_publishes_and_a_certificate_from_another_ca_is_refused() {
    let Some(broker) = TlsBroker::start() else { return };
    let watch = Subscriber::connect(broker.plain, "labelcast/#");
    let ca = broker.file("good-ca.pem");
    let (mut good, _work) = broker.daemon(
        "tls-good",
        &format!("url = \"mqtts://127.0.0.1:{}\"\n[mqtt.tls]\nca_file = \"{}\"\n", broker.tls, ca.display()),
    );
    watch.wait_for("labelcast/tls-good/label/cat", "ON", WAIT);
    assert!(good.stop().success());

    // The broker presents a certificate the configured CA did not sign.
    let other_ca = broker.file("other-ca.pem");
    let (mut refused, _work) = broker.daemon(
        "tls-refused",
        &format!("url = \"mqtts://127.0.0.1:{}\"\n[mqtt.tls]\nca_file = \"{}\"\n", broker.tls, other_ca.display()),
    );
    refused.wait_for_log("MQTT broker unreachable", WAIT);
    std::thread::sleep(Duration::from_secs(2));
    let log = refused.log();
    assert!(log.to_lowercase().contains("certificate"), "the log says why: {log}");
    assert!(refused.is_running(), "a refused broker is retried, not fatal");
    assert!(watch.payloads("labelcast/tls-refused/available").is_empty(), "nothing got through");
    assert!(refused.stop().success());
}

#[test]
fn username_and_password_over_tls_are_accepted_and_a_wrong_password_is_not() {
    let Some(broker) = TlsBroker::start() else { return };
    let watch = Subscriber::connect(broker.plain, "labelcast/#");
    let ca = broker.file("good-ca.pem");
    let secrets = tempfile::tempdir().unwrap();
    let right = secrets.path().join("right");
    let wrong = secrets.path().join("wrong");
    std::fs::write(&right, "s3cret\n").unwrap();
    std::fs::write(&wrong, "guess\n").unwrap();
    let section = |file: &Path| {
        format!(
            "url = \"mqtts://127.0.0.1:{}\"\nusername = \"camera\"\npassword_file = \"{}\"\n[mqtt.tls]\nca_file = \"{}\"\n",
            broker.tls_password,
            file.display(),
            ca.display()
        )
    };
    let (mut daemon, _work) = broker.daemon("tls-password", &section(&right));
    watch.wait_for("labelcast/tls-password/label/cat", "ON", WAIT);
    assert!(!daemon.log().contains("s3cret"), "the password never reaches the log");
    assert!(daemon.stop().success());

    let (mut denied, _work) = broker.daemon("tls-denied", &section(&wrong));
    // The broker answered: a refusal, saying what to check, not "unreachable".
    denied.wait_for_log("MQTT broker refused the connection", WAIT);
    assert!(denied.log().contains("mqtt.password_file"), "{}", denied.log());
    assert!(denied.is_running());
    assert!(watch.payloads("labelcast/tls-denied/available").is_empty());
    assert!(!denied.log().contains("guess"), "the password never reaches the log");
    assert!(denied.stop().success());
}

#[test]
fn a_client_certificate_authenticates_where_the_broker_requires_one() {
    let Some(broker) = TlsBroker::start() else { return };
    let watch = Subscriber::connect(broker.plain, "labelcast/#");
    let ca = broker.file("good-ca.pem");
    let (mut daemon, _work) = broker.daemon(
        "tls-client-cert",
        &format!(
            "url = \"mqtts://127.0.0.1:{}\"\n[mqtt.tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            broker.tls_client_cert,
            ca.display(),
            broker.file("client.pem").display(),
            broker.file("client.key").display()
        ),
    );
    watch.wait_for("labelcast/tls-client-cert/label/cat", "ON", WAIT);
    assert!(daemon.stop().success());

    // Without the certificate the same listener turns the daemon away.
    let (mut anonymous, _work) = broker.daemon(
        "tls-no-cert",
        &format!(
            "url = \"mqtts://127.0.0.1:{}\"\n[mqtt.tls]\nca_file = \"{}\"\n",
            broker.tls_client_cert,
            ca.display()
        ),
    );
    anonymous.wait_for_log("MQTT broker unreachable", WAIT);
    assert!(watch.payloads("labelcast/tls-no-cert/available").is_empty());
    assert!(anonymous.stop().success());
}
