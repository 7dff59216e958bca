//! GStreamer sources against real GStreamer: a `gst://` pipeline, and an
//! RTSP camera played by gst-rtsp-server inside this test on loopback, which
//! goes away and comes back. Built with `--features rtsp-test-server`
//! (Debian: libgstreamer1.0-dev, libgstreamer-plugins-base1.0-dev,
//! libgstrtspserver-1.0-dev, gstreamer1.0-plugins-base and -good); `.ci/run`
//! runs it.
#![cfg(feature = "rtsp-test-server")]

mod common;

use std::time::Duration;

use common::*;
use gstreamer as gst;
use gstreamer::glib;
use gstreamer_rtsp_server as rtsp;
use gstreamer_rtsp_server::prelude::*;

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn a_gst_pipeline_feeds_the_daemon_and_labels_come_out() {
    let source = "gst://videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=15/1 \
                  ! videoconvert ! appsink";
    let mut daemon =
        Daemon::start(&["run", "--output", "stdout", "--source", source, "--model", demo_model().to_str().unwrap()]);
    wait_until(WAIT, || daemon.stdout.lock().unwrap().lines().count() >= 3)
        .unwrap_or_else(|_| panic!("no labels from the pipeline:\n{}", daemon.log()));
    let stdout = daemon.stdout.lock().unwrap().clone();
    let first: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(scores_of(&first).len(), 12, "every label is scored: {first}");
    assert!(daemon.stop().success(), "{}", daemon.log());
    assert!(daemon.log().contains("GStreamer pipeline playing"), "{}", daemon.log());
}

/// An RTSP server on 127.0.0.1 serving a moving test picture as RTP/JPEG
/// (encoders from plugins-good only), run on its own GLib main loop.
struct RtspServer {
    port: u16,
    server: Option<(rtsp::RTSPServer, glib::SourceId)>,
    main_loop: glib::MainLoop,
    _thread: std::thread::JoinHandle<()>,
}

impl RtspServer {
    fn start(port: u16) -> RtspServer {
        gst::init().unwrap();
        let main_loop = glib::MainLoop::new(None, false);
        let running = main_loop.clone();
        let thread = std::thread::spawn(move || running.run());
        let mut server = RtspServer { port, server: None, main_loop, _thread: thread };
        server.serve();
        server
    }

    fn serve(&mut self) {
        let server = rtsp::RTSPServer::new();
        server.set_address("127.0.0.1");
        server.set_service(&self.port.to_string());
        let factory = rtsp::RTSPMediaFactory::new();
        factory.set_launch(
            "( videotestsrc is-live=true pattern=smpte ! video/x-raw,format=I420,width=320,height=240,framerate=15/1 \
             ! jpegenc ! rtpjpegpay name=pay0 pt=26 )",
        );
        factory.set_shared(true);
        server.mount_points().unwrap().add_factory("/camera", factory);
        let id = server.attach(None).expect("the RTSP server listens");
        let port = self.port;
        wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
            .expect("RTSP port open");
        self.server = Some((server, id));
    }

    /// Closes the listener and drops every client, as a camera that reboots.
    fn go_away(&mut self) {
        if let Some((server, id)) = self.server.take() {
            id.remove();
            server.client_filter(Some(&mut |_, _| rtsp::RTSPFilterResult::Remove));
        }
        let port = self.port;
        wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).is_err())
            .expect("RTSP port closed");
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        self.go_away();
        self.main_loop.quit();
    }
}

#[test]
fn an_rtsp_camera_that_goes_away_and_comes_back_is_reconnected_and_its_password_never_logged() {
    let Some(broker) = Mosquitto::start() else { return };
    let mut camera = RtspServer::start(free_port());
    let device = "rtsp-cam";
    let uri = format!("rtsp://viewer:s3cr3t-pw@127.0.0.1:{}/camera", camera.port);
    let topic = |rest: &str| format!("labelcast/{device}/{rest}");
    let sub = Subscriber::connect(broker.port, &topic("#"));
    let mut daemon = Daemon::start(&[
        "run",
        "--device-id",
        device,
        "--source",
        &uri,
        "--model",
        demo_model().to_str().unwrap(),
        "--mqtt",
        &broker.url(),
    ]);
    sub.wait_for(&topic("source"), "streaming", WAIT);
    wait_until(WAIT, || sub.payloads(&topic("labels")).len() >= 3)
        .unwrap_or_else(|_| panic!("labels from the RTSP camera:\n{}", daemon.log()));

    camera.go_away();
    sub.wait_for(&topic("source"), "reconnecting", WAIT);
    // Away for a few reopen attempts, then back on the same address.
    std::thread::sleep(Duration::from_secs(2));
    camera.serve();
    wait_until(WAIT, || {
        let states = sub.payloads(&topic("source"));
        states.windows(2).any(|w| w[0] == "reconnecting" && w[1] == "streaming")
    })
    .unwrap_or_else(|_| panic!("the camera is used again:\n{}", daemon.log()));
    let before = sub.payloads(&topic("labels")).len();
    wait_until(WAIT, || sub.payloads(&topic("labels")).len() >= before + 3).expect("labels resume");

    assert!(daemon.stop().success());
    let log = daemon.log();
    assert!(log.contains("source lost; reopening") && log.contains("source back"), "{log}");
    assert!(!log.contains("s3cr3t-pw") && !log.contains("viewer"), "credentials leaked into the log:\n{log}");
    let everything: String = sub.all().iter().map(|(t, p, _)| format!("{t} {p}\n")).collect();
    assert!(!everything.contains("s3cr3t-pw"), "credentials leaked onto MQTT");
}
