//! Tests that need a real V4L2 camera, so they are `#[ignore]`d: CI has
//! none. On a device with a camera:
//!
//! ```sh
//! LABELCAST_TEST_CAMERA=/dev/video0 cargo test --release --test camera -- --ignored --test-threads 1
//! ```

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use labelcast::source::{FrameSource, negotiate::Request, v4l2::V4l2Source};

fn camera() -> PathBuf {
    std::env::var_os("LABELCAST_TEST_CAMERA").map_or_else(|| "/dev/video0".into(), PathBuf::from)
}

#[test]
#[ignore = "needs a V4L2 camera (LABELCAST_TEST_CAMERA, default /dev/video0)"]
fn probe_lists_the_camera_with_formats_and_sizes() {
    let out = run_to_end(&mut labelcast(&["probe"]));
    assert!(out.status.success(), "{}", out.stderr);
    let node = std::fs::canonicalize(camera()).unwrap();
    assert!(out.stdout.contains(node.to_str().unwrap()), "{}", out.stdout);
    assert!(out.stdout.contains(" fps") || out.stdout.contains("steps of"), "{}", out.stdout);
}

#[test]
#[ignore = "needs a V4L2 camera (LABELCAST_TEST_CAMERA, default /dev/video0)"]
fn the_camera_delivers_frames_that_decode_at_a_measured_rate() {
    let uri = format!("v4l2://{}", camera().display());
    let out = run_to_end(&mut labelcast(&["probe", "--source", &uri, "--frames", "30"]));
    assert!(out.status.success(), "{}", out.stderr);
    println!("{}", out.stdout);
    assert!(out.stdout.contains("frames:   30"), "{}", out.stdout);
}

#[test]
#[ignore = "needs a V4L2 camera (LABELCAST_TEST_CAMERA, default /dev/video0)"]
fn a_hundred_reopens_of_the_camera_leave_descriptors_and_memory_flat() {
    let count_fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let rss = || rss_kib(std::process::id());
    let open_and_read = || {
        let mut source = V4l2Source::open(&camera(), &Request::default(), Duration::from_secs(2)).unwrap();
        assert!(source.next_frame().unwrap().is_some());
    };
    for _ in 0..5 {
        open_and_read();
    }
    let (fds, rss_before) = (count_fds(), rss());
    for _ in 0..100 {
        open_and_read();
    }
    println!("100 reopens: fds {fds} -> {}, RSS {rss_before} -> {} KiB", count_fds(), rss());
    assert_eq!(count_fds(), fds);
    assert!(rss() < rss_before + 4 * 1024);
}

#[test]
#[ignore = "needs a V4L2 camera and a person to unplug and replug it within a minute"]
fn the_daemon_survives_an_unplug_and_uses_the_camera_again() {
    let uri = format!("v4l2://{}", camera().display());
    let mut daemon =
        Daemon::start(&["run", "--output", "stdout", "--source", &uri, "--model", demo_model().to_str().unwrap()]);
    daemon.wait_for_log("first frame classified", Duration::from_secs(60));
    eprintln!("unplug the camera now, then plug it back in");
    daemon.wait_for_log("source lost; reopening", Duration::from_secs(60));
    daemon.wait_for_log("source back", Duration::from_secs(120));
    assert!(daemon.is_running());
    assert!(daemon.stop().success());
}
