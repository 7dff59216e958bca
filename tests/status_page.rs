//! The status page in a real browser (Debian's chromium, headless, driven
//! over the DevTools protocol), the password it asks for off loopback, and
//! snapshots on MQTT against mosquitto, all against the real binary, the
//! demo model and the shipped photos.

mod common;

use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(60);

/// The browser test: x86-64 only, as its dev-dependency (Cargo.toml).
#[cfg(target_arch = "x86_64")]
mod browser {
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use headless_chrome::protocol::cdp::Input;
    use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
    use headless_chrome::protocol::cdp::types::Event;
    use headless_chrome::{Browser, LaunchOptions, Tab};

    use super::WAIT;
    use crate::common::*;

    /// Chromium, or a panic saying how to get it. LABELCAST_SKIP_BROWSER=1
    /// skips the browser test on a machine without one; LABELCAST_CHROMIUM
    /// names another binary.
    fn chromium() -> Option<PathBuf> {
        if std::env::var_os("LABELCAST_SKIP_BROWSER").is_some() {
            eprintln!("LABELCAST_SKIP_BROWSER is set: skipping a test that needs chromium");
            return None;
        }
        let path =
            std::env::var_os("LABELCAST_CHROMIUM").map(PathBuf::from).unwrap_or_else(|| "/usr/bin/chromium".into());
        assert!(
            path.exists(),
            "{} not found: install Debian's chromium (tests/run.sh does), set LABELCAST_CHROMIUM, or \
             LABELCAST_SKIP_BROWSER=1 to skip",
            path.display()
        );
        Some(path)
    }

    /// Where the screenshot goes: `<target>/artifacts/` (CI keeps it).
    fn artifacts() -> PathBuf {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("artifacts");
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Evaluates a JavaScript expression; its value as JSON.
    fn eval(tab: &Tab, expression: &str) -> serde_json::Value {
        let result = tab.evaluate(expression, false).unwrap_or_else(|err| panic!("{expression}: {err}"));
        result.value.unwrap_or(serde_json::Value::Null)
    }

    fn wait_for_js(tab: &Tab, expression: &str, what: &str) {
        wait_until(WAIT, || eval(tab, expression) == serde_json::Value::Bool(true))
            .unwrap_or_else(|_| panic!("the page never showed {what} ({expression})"));
    }

    /// One mouse event at page coordinates (CSS pixels).
    fn mouse(tab: &Tab, kind: Input::DispatchMouseEventTypeOption, x: f64, y: f64, pressed: bool) {
        tab.call_method(Input::DispatchMouseEvent {
            Type: kind,
            x,
            y,
            modifiers: None,
            timestamp: None,
            button: Some(if pressed { Input::MouseButton::Left } else { Input::MouseButton::None }),
            buttons: Some(u32::from(pressed)),
            click_count: Some(1),
            force: None,
            tangential_pressure: None,
            tilt_x: None,
            tilt_y: None,
            twist: None,
            delta_x: None,
            delta_y: None,
            pointer_Type: None,
        })
        .unwrap();
    }

    #[test]
    fn the_status_page_shows_the_frame_and_changing_scores_and_the_region_editor_gives_toml_that_loads() {
        let Some(chromium) = chromium() else { return };
        let dir = tempfile::tempdir().unwrap();
        // Two photos of one size (512x512), as a camera's frames are: the
        // astronaut (person 0.82) and the cameraman (person below 0.1).
        let photos = photo_folder(&["astronaut.jpg", "camera.jpg"]);
        let config = dir.path().join("door.toml");
        let camera = format!(
            "[output]\nmode = \"stdout\"\n\n[[camera]]\nid = \"door\"\nsource = \"file://{}?fps=2&loop=true\"\n",
            photos.path().display()
        );
        std::fs::write(&config, format!("{camera}\n[[camera.region]]\nid = \"step\"\nrect = [0.5, 0.5, 0.5, 0.5]\n"))
            .unwrap();
        let daemon = Daemon::start(&["run", "--config", config.to_str().unwrap()]);
        let port = metrics_port(&daemon);

        let options = LaunchOptions::default_builder()
            .path(Some(chromium))
            .sandbox(false)
            .window_size(Some((1280, 1000)))
            .idle_browser_timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        let browser = Browser::new(options).unwrap();
        let tab = browser.new_tab().unwrap();
        // Everything the page would show in the console as an error: uncaught
        // exceptions, console.error, and the browser's own error entries
        // (failed loads, CSP, deprecations).
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = errors.clone();
        tab.enable_runtime().unwrap();
        tab.enable_log().unwrap();
        tab.add_event_listener(Arc::new(move |event: &Event| {
            let error = match event {
                Event::RuntimeExceptionThrown(e) => Some(format!("exception: {:?}", e.params.exception_details.text)),
                Event::RuntimeConsoleAPICalled(e)
                    if matches!(
                        e.params.Type,
                        headless_chrome::protocol::cdp::Runtime::ConsoleAPICalledEventTypeOption::Error
                    ) =>
                {
                    Some(format!("console.error: {:?}", e.params.args.iter().map(|a| &a.value).collect::<Vec<_>>()))
                }
                Event::LogEntryAdded(e)
                    if matches!(e.params.entry.level, headless_chrome::protocol::cdp::Log::LogEntryLevel::Error) =>
                {
                    Some(format!("log: {} ({:?})", e.params.entry.text, e.params.entry.url))
                }
                _ => None,
            };
            if let Some(error) = error {
                sink.lock().unwrap().push(error);
            }
        }))
        .unwrap();
        tab.navigate_to(&format!("http://127.0.0.1:{port}/")).unwrap().wait_until_navigated().unwrap();

        // The frame: a real picture from the camera, with the region drawn.
        let loaded = "(() => { const i = document.querySelector('.frame img'); return i && i.complete ? i.naturalWidth : 0; })()";
        let mut width = 0;
        wait_until(WAIT, || {
            width = eval(&tab, loaded).as_u64().unwrap_or(0);
            width > 0
        })
        .unwrap_or_else(|_| panic!("the page never showed a frame"));
        assert_eq!(width, 512, "the frame is the photo at full size");
        assert_eq!(
            eval(&tab, "document.querySelectorAll('.frame svg .region').length"),
            1,
            "the step region is outlined"
        );
        assert_eq!(eval(&tab, "getComputedStyle(document.querySelector('.frame .waiting')).display"), "none");

        // The scores: person's bar changes as the camera goes from one photo
        // to the other and back.
        let person_score = "(() => { const r = document.querySelector('.view[data-view=\"\"] tr[data-label=\"person\"] td.score'); return r ? r.textContent : null; })()";
        let mut seen = std::collections::BTreeSet::new();
        wait_until(WAIT, || {
            if let Some(score) = eval(&tab, person_score).as_str() {
                seen.insert(score.to_string());
            }
            std::thread::sleep(Duration::from_millis(200));
            seen.len() >= 2
        })
        .unwrap_or_else(|_| panic!("the person score never changed; saw {seen:?}"));
        let states: Vec<String> = seen.iter().cloned().collect();
        assert!(states.iter().all(|s| s.parse::<f64>().is_ok()), "scores are numbers: {states:?}");
        wait_for_js(&tab, "document.querySelectorAll('.view').length === 2", "the whole frame and the region");
        wait_for_js(
            &tab,
            "[...document.querySelectorAll('tr[data-label=\"person\"] .tick')].length === 4",
            "the person row's on and off thresholds in both views",
        );

        // The region editor: a scripted drag over the middle of the frame.
        // Typed as keystrokes into the focused field (the page re-renders
        // around it twice a second: a click at its position could miss).
        eval(
            &tab,
            "(() => { const i = document.querySelector('.editor input'); i.value = ''; i.focus(); return document.activeElement === i; })()",
        );
        tab.type_str("Front Step").unwrap();
        assert_eq!(eval(&tab, "document.querySelector('.editor input').value"), "Front Step");
        let rect = eval(
            &tab,
            "(() => { const r = document.querySelector('.frame svg').getBoundingClientRect(); return JSON.stringify([r.left, r.top, r.width, r.height]); })()",
        );
        let rect: Vec<f64> = serde_json::from_str(rect.as_str().unwrap()).unwrap();
        let at = |fx: f64, fy: f64| (rect[0] + fx * rect[2], rect[1] + fy * rect[3]);
        let (x0, y0) = at(0.25, 0.25);
        let (x1, y1) = at(0.75, 0.75);
        mouse(&tab, Input::DispatchMouseEventTypeOption::MouseMoved, x0, y0, false);
        mouse(&tab, Input::DispatchMouseEventTypeOption::MousePressed, x0, y0, true);
        for step in 1..=5 {
            let f = f64::from(step) / 5.0;
            mouse(&tab, Input::DispatchMouseEventTypeOption::MouseMoved, x0 + (x1 - x0) * f, y0 + (y1 - y0) * f, true);
        }
        mouse(&tab, Input::DispatchMouseEventTypeOption::MouseReleased, x1, y1, true);
        let toml = eval(&tab, "document.querySelector('.editor textarea').value");
        let toml = toml.as_str().unwrap().to_string();
        assert!(toml.starts_with("[[camera.region]]\nid = \"front-step\"\n"), "{toml}");
        // A half-pixel of layout rounding is within the third decimal's reach.
        let rect_line = toml.lines().find(|l| l.starts_with("rect = [")).unwrap_or_else(|| panic!("{toml}"));
        let numbers: Vec<f64> = rect_line["rect = [".len()..rect_line.find(']').unwrap()]
            .split(',')
            .map(|n| n.trim().parse().unwrap())
            .collect();
        for (got, want) in numbers.iter().zip([0.25, 0.25, 0.5, 0.5]) {
            assert!((got - want).abs() <= 0.002, "{rect_line}");
        }
        assert!(
            rect_line.contains('.') && rect_line.contains("px of"),
            "fractions as floats, pixels in a comment: {rect_line}"
        );

        // What the editor gave loads as the config it is for.
        let edited = dir.path().join("edited.toml");
        std::fs::write(&edited, format!("{camera}\n{toml}\n")).unwrap();
        let check = run_to_end(&mut labelcast(&["check-config", edited.to_str().unwrap()]));
        assert!(check.status.success(), "check-config refused the editor's TOML:\n{toml}\n{}", check.stderr);

        eval(&tab, "window.scrollTo(0, 0)");
        let png = tab.capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true).unwrap();
        let shot = artifacts().join("status-page.png");
        std::fs::write(&shot, &png).unwrap();
        eprintln!("screenshot: {}", shot.display());
        let errors = errors.lock().unwrap().clone();
        assert!(errors.is_empty(), "the page logged errors: {errors:#?}");
        drop(daemon);
    }
}

#[test]
fn off_loopback_the_page_needs_a_password_and_refuses_a_request_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("0.0.0.0:{port}");
    let open = dir.path().join("open.toml");
    std::fs::write(&open, format!("[output]\nmode = \"stdout\"\n[service]\nhttp_listen = \"{listen}\"\n")).unwrap();
    let refused = run_to_end(&mut labelcast(&["check-config", open.to_str().unwrap()]));
    assert_eq!(refused.status.code(), Some(78), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("service.http_listen") && refused.stderr.contains("http_password_file"),
        "the error names the field and what to set: {}",
        refused.stderr
    );

    let password = dir.path().join("http-password");
    std::fs::write(&password, "s3cret-enough\n").unwrap();
    let guarded = dir.path().join("guarded.toml");
    std::fs::write(
        &guarded,
        format!("[output]\nmode = \"stdout\"\n[service]\nhttp_password_file = \"{}\"\n", password.display()),
    )
    .unwrap();
    // The address on the command line, as a unit file's override would give it.
    let daemon = Daemon::start(&["run", "--config", guarded.to_str().unwrap(), "--http-listen", &listen]);
    daemon.wait_for_log("serving /metrics, /healthz and the status page", WAIT);
    for path in ["/", "/api/status", "/metrics", "/camera/0/frame.jpg"] {
        assert_eq!(http_get(port, path).0, 401, "{path} without the password");
    }
    let get_with =
        |credentials: &str| http_get_with(port, "/api/status", &[&format!("Authorization: Basic {credentials}")]).0;
    // "admin:s3cret-enough" and "admin:wrong" in base64.
    assert_eq!(get_with("YWRtaW46czNjcmV0LWVub3VnaA=="), 200);
    assert_eq!(get_with("YWRtaW46d3Jvbmc="), 401);
    assert_ne!(http_get(port, "/healthz").0, 401, "/healthz asks for nothing");
    drop(daemon);
}

#[test]
fn a_label_turning_on_publishes_its_snapshot_retained_with_the_region_outlined_and_an_image_entity() {
    let Some(broker) = Mosquitto::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let photos = photo_folder(&["grace_hopper.jpg"]);
    let config = dir.path().join("snapshots.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[mqtt]
url = "{url}"
stats_interval = "2s"

[homeassistant]
discovery = true

[snapshots]
enabled = true
max_size = 300
frame_interval = "1s"

[[camera]]
id = "hall"
source = "file://{photos}?fps=2&loop=true"

[[camera.region]]
id = "face"
rect = [0.25, 0.0, 0.5, 0.5]
"#,
            url = broker.url(),
            photos = photos.path().display()
        ),
    )
    .unwrap();
    let subscriber = Subscriber::connect(broker.port, "#");
    let daemon = Daemon::start(&["run", "--config", config.to_str().unwrap()]);
    let topic_of = |suffix: &str| {
        wait_until(WAIT, || subscriber.all().iter().any(|(t, _, _)| t.ends_with(suffix)))
            .unwrap_or_else(|_| panic!("nothing on *{suffix} within {WAIT:?}; log:\n{}", daemon.log()));
        subscriber.all().into_iter().find(|(t, _, _)| t.ends_with(suffix)).unwrap()
    };
    let (whole_topic, _, _) = topic_of("/hall/snapshot/person");
    // Retained: a client that subscribes later gets it from the broker.
    let later = Subscriber::connect(broker.port, &whole_topic);
    wait_until(WAIT, || later.all().iter().any(|(t, _, retained)| *t == whole_topic && *retained))
        .unwrap_or_else(|_| panic!("{whole_topic} is not retained"));
    let jpeg = |topic: &str| {
        let bytes = subscriber.latest_bytes(topic).unwrap();
        image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg)
            .unwrap_or_else(|err| panic!("{topic} is not a JPEG: {err}"))
            .to_rgb8()
    };
    let whole = jpeg(&whole_topic);
    // grace_hopper.jpg is 512x600: its longer side down to max_size.
    assert_eq!((whole.width(), whole.height()), (256, 300));
    let (region_topic, _, _) = topic_of("/hall/face/snapshot/person");
    let region = jpeg(&region_topic);
    // The region's top edge (y = 0) from x = 25% to 75% is outlined in
    // amber; the same row outside it is the photo.
    let amber = |p: &image::Rgb<u8>| p[0] > 200 && p[1] > 150 && p[2] < 90;
    let outlined = (70..186).filter(|&x| amber(region.get_pixel(x, 0))).count();
    assert!(outlined > 100, "the region's top edge is outlined ({outlined} of 116 pixels amber)");
    assert!(!amber(whole.get_pixel(128, 0)) || !amber(whole.get_pixel(128, 1)), "the whole frame has no outline");
    // The latest frame, every second.
    let (frame_topic, _, _) = topic_of("/hall/frame");
    assert_eq!(jpeg(&frame_topic).height(), 300);
    // Home Assistant: an image entity for each label's snapshot.
    let (config_topic, body, _) = topic_of("_hall_person_snapshot/config");
    assert!(config_topic.starts_with("homeassistant/image/"), "{config_topic}");
    let entity: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(entity["image_topic"], whole_topic.as_str());
    assert_eq!(entity["content_type"], "image/jpeg");
    // Counted once the broker acknowledged them.
    wait_until(WAIT, || {
        subscriber.latest().iter().any(|(t, p)| {
            t.ends_with("/stats")
                && serde_json::from_str::<serde_json::Value>(p)
                    .is_ok_and(|s| s["snapshots_published"].as_u64().unwrap_or(0) >= 3)
        })
    })
    .unwrap_or_else(|_| panic!("stats never counted the snapshots: {:?}", subscriber.latest()));
    let mut daemon = daemon;
    assert!(daemon.stop().success());

    // Snapshots switched off: the image entities go, and with them the
    // retained pictures they showed.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("enabled = true\nmax_size = 300\nframe_interval = \"1s\"", "enabled = false");
    std::fs::write(&config, text).unwrap();
    let daemon = Daemon::start(&["run", "--config", config.to_str().unwrap()]);
    subscriber.wait_for(&config_topic, "", WAIT);
    subscriber.wait_for(&whole_topic, "", WAIT);
    subscriber.wait_for(&frame_topic, "", WAIT);
    drop(daemon);
}
