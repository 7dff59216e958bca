//! The HTTP endpoint, on axum (hyper, on the tokio runtime the daemon
//! already runs): the status page at `/` with its JSON (`/api/status`) and
//! each camera's latest frame (`/camera/<n>/frame.jpg`), `/metrics`
//! (Prometheus) and `/healthz` (200 or 503 with the reason).
//!
//! axum 0.7 because the embedded broker (rumqttd) already links it, with
//! hyper and tower: the endpoint adds next to no code to the binary, and no
//! hand-written HTTP parsing is left to get wrong.
//!
//! Loopback by default. The page shows the inside of someone's house, so
//! config validation refuses any other address unless
//! `service.http_password_file` is set; then every path but `/healthz` asks
//! for it (HTTP basic auth, any user name; or `Authorization: Bearer`).
//! Basic auth sends the password in the clear: on an untrusted network, put
//! a TLS reverse proxy in front (README, "Status page").

mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

pub use metrics::Exporter;

use crate::config::Secret;
use crate::service::Verdict;
use crate::status::Board;

/// The status page: HTML, CSS and JavaScript in one file, no build step, no
/// CDN (a camera network is often offline).
const PAGE: &str = include_str!("page.html");

/// Connections served at once; more are closed at once (a client holding
/// many idle ones cannot take the process's file descriptors, which the
/// cameras and the broker connection need).
const MAX_CONNECTIONS: usize = 64;

/// A client has this long to send a request's headers (slow senders are
/// cut off).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A kept-alive connection is closed, after the request in flight, once it
/// is this old: the page's browser opens a new one without noticing.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Everything the endpoint serves.
pub struct Server {
    pub exporter: Exporter,
    pub board: Board,
    /// Asked of every client but `/healthz`'s when set.
    pub password: Option<Secret>,
}

type Shared = Arc<Server>;

/// The routes, with the password check in front when one is set.
pub fn router(server: Server) -> Router {
    let shared: Shared = Arc::new(server);
    let mut app = Router::new()
        .route("/", get(page))
        .route("/api/status", get(status))
        .route("/camera/:index/frame.jpg", get(frame))
        .route("/metrics", get(metrics));
    if shared.password.is_some() {
        app = app.layer(middleware::from_fn_with_state(shared.clone(), require_password));
    }
    // Outside the password check: a load balancer or systemd probe needs
    // no secret to learn "ok" or why not.
    app.route("/healthz", get(healthz)).fallback(not_found).with_state(shared)
}

/// Binds and serves in the background. A port already taken is logged as
/// an error and the daemon goes on without the endpoint: labels matter more.
/// Serves until `shutdown` turns true (the pipeline stopped), then closes
/// the listener, so a second `pipeline::run` in the process can bind again.
pub async fn start(listen: SocketAddr, server: Server, shutdown: tokio::sync::watch::Receiver<bool>) {
    let listener = match TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(listen = %listen, error = %err, "cannot serve the status page, /metrics and /healthz (set service.http_listen to another address, or \"off\")");
            return;
        }
    };
    let address = listener.local_addr().unwrap_or(listen);
    tracing::info!(password = server.password.is_some(), listen = %address, "serving /metrics, /healthz and the status page");
    spawn_server(listener, server, shutdown);
}

/// Accepts connections on `listener` until `shutdown` turns true, each
/// served by hyper with a header-read timeout and a bounded lifetime, at
/// most [`MAX_CONNECTIONS`] at once.
fn spawn_server(listener: TcpListener, server: Server, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let app = router(server);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let full = Arc::new(crate::telemetry::RateLimit::new(Duration::from_secs(60)));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.wait_for(|stopped| *stopped) => return,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors, usually: give it a moment.
                    tracing::debug!(error = %err, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                if let Some(suppressed) = full.check(Instant::now()) {
                    tracing::warn!(limit = MAX_CONNECTIONS, suppressed, "too many HTTP connections; closing new ones");
                }
                continue;
            };
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                tokio::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => {}
                    _ = tokio::time::sleep(CONNECTION_LIFETIME) => {
                        connection.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(HEADER_READ_TIMEOUT, connection).await;
                    }
                }
                drop(slot);
            });
        }
    });
}

async fn page() -> Response {
    ([(header::CACHE_CONTROL, "no-store")], Html(PAGE)).into_response()
}

/// The board as JSON. Asking counts as looking: each camera starts keeping
/// frames for the page, which asks for the first once one is there.
async fn status(State(server): State<Shared>) -> Response {
    for camera in &server.board.cameras {
        camera.tap.watch();
    }
    let body = server.board.to_json().to_string();
    ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body).into_response()
}

/// The camera's newest kept frame as a JPEG; asking keeps frames coming
/// for a few seconds (the page asks a few times a second).
async fn frame(State(server): State<Shared>, Path(index): Path<String>) -> Response {
    let Some(camera) = index.parse::<usize>().ok().and_then(|i| server.board.cameras.get(i)).cloned() else {
        return (StatusCode::NOT_FOUND, format!("no camera {index:?}; /api/status lists them\n")).into_response();
    };
    let tap = camera.tap.clone();
    // Encoding takes milliseconds: off the async workers.
    match tokio::task::spawn_blocking(move || tap.preview_jpeg()).await {
        Ok(Some(jpeg)) => {
            ([(header::CONTENT_TYPE, "image/jpeg"), (header::CACHE_CONTROL, "no-store")], jpeg).into_response()
        }
        Ok(None) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "no frame kept yet: the camera has not delivered one since the page opened\n",
        )
            .into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding the frame failed: {err}\n")).into_response(),
    }
}

async fn metrics(State(server): State<Shared>) -> Response {
    let text = server.exporter.encode();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn healthz(State(server): State<Shared>) -> Response {
    match server.exporter.health.verdict(Instant::now()) {
        Verdict::Healthy(reason) => (StatusCode::OK, format!("{reason}\n")).into_response(),
        Verdict::Unhealthy(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response(),
    }
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "try / (the status page), /metrics or /healthz\n").into_response()
}

/// Lets a request through when it carries the password: basic auth with
/// any user name, or a bearer token. Compared as SHA-256 digests, so the
/// time taken says nothing about how much of a guess was right.
async fn require_password(State(server): State<Shared>, request: Request, next: Next) -> Response {
    let expected = server.password.as_ref().map(|p| Sha256::digest(p.expose().as_bytes()));
    let given = presented_password(request.headers()).map(|p| Sha256::digest(p.as_bytes()));
    match (expected, given) {
        (None, _) => next.run(request).await,
        (Some(expected), Some(given)) if expected.iter().zip(given.iter()).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0 => {
            next.run(request).await
        }
        (Some(_), given) => {
            static WRONG: crate::telemetry::RateLimit = crate::telemetry::RateLimit::new(Duration::from_secs(60));
            if given.is_some()
                && let Some(suppressed) = WRONG.check(Instant::now())
            {
                tracing::warn!(path = %request.uri().path(), suppressed, "HTTP request with a wrong password refused");
            }
            let mut response =
                (StatusCode::UNAUTHORIZED, "this labelcast asks for a password (service.http_password_file)\n")
                    .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"labelcast\", charset=\"UTF-8\""),
            );
            response
        }
    }
}

/// The password in an `Authorization` header: basic auth's (after the
/// first `:`), or a bearer token.
fn presented_password(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.to_string());
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':').map(|(_, password)| password.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::service::Health;
    use crate::telemetry::Counters;

    fn server(password: Option<&str>) -> Server {
        let health = Arc::new(Health::new(Duration::from_secs(30)));
        let counters = Arc::new(Counters::default());
        let exporter = Exporter {
            health: health.clone(),
            counters,
            source: "test://pattern".into(),
            engine: "tract".into(),
            selfcheck: None,
        };
        let board = Board { device_id: "test".into(), cameras: Vec::new(), health, started: Instant::now() };
        Server { exporter, board, password: password.map(|p| Secret(p.into())) }
    }

    /// Serves on a free loopback port; returns it.
    async fn serve(server: Server) -> (u16, tokio::sync::watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        spawn_server(listener, server, stopped);
        (port, stop)
    }

    /// One request over a real socket; returns the status code, the headers
    /// and the body as text.
    async fn request(port: u16, head: &str) -> (u16, String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream.write_all(format!("{head}\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        let text = String::from_utf8_lossy(&response).into_owned();
        let (headers, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let code = headers.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (code, headers.to_string(), body.to_string())
    }

    #[tokio::test]
    async fn healthz_is_503_with_the_reason_until_a_frame_is_classified() {
        let server = server(None);
        let health = server.exporter.health.clone();
        let (port, _stop) = serve(server).await;
        let (code, _, body) = request(port, "GET /healthz HTTP/1.1").await;
        assert_eq!(code, 503);
        assert!(body.contains("no frame classified yet"), "{body}");
        health.inference_started();
        health.inference_finished(true);
        health.mark_ready();
        let (code, _, body) = request(port, "GET /healthz HTTP/1.1").await;
        assert_eq!((code, body.as_str()), (200, "ok\n"));
    }

    #[tokio::test]
    async fn the_page_status_and_metrics_are_served_and_other_paths_and_methods_refused() {
        let (port, _stop) = serve(server(None)).await;
        let (code, headers, body) = request(port, "GET / HTTP/1.1").await;
        assert_eq!(code, 200);
        assert!(headers.to_ascii_lowercase().contains("content-type: text/html"), "{headers}");
        assert!(body.contains("<title>labelcast</title>"), "{body}");
        let (code, _, body) = request(port, "GET /api/status HTTP/1.1").await;
        assert_eq!(code, 200);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["device_id"], "test");
        let (code, _, body) = request(port, "GET /metrics HTTP/1.1").await;
        assert_eq!(code, 200);
        assert!(body.contains("labelcast_frames_captured_total"), "{body}");
        assert_eq!(request(port, "GET /camera/0/frame.jpg HTTP/1.1").await.0, 404, "no such camera");
        assert_eq!(request(port, "GET /nothing HTTP/1.1").await.0, 404);
        assert_eq!(request(port, "POST /metrics HTTP/1.1\r\nContent-Length: 0").await.0, 405);
        assert_eq!(request(port, "\u{1}garbage").await.0, 400);
    }

    #[tokio::test]
    async fn with_a_password_a_request_without_it_is_refused_and_one_with_it_served() {
        let (port, _stop) = serve(server(Some("correct horse"))).await;
        let (code, headers, _) = request(port, "GET / HTTP/1.1").await;
        assert_eq!(code, 401);
        assert!(headers.contains("Basic realm=\"labelcast\""), "{headers}");
        assert_eq!(request(port, "GET /metrics HTTP/1.1").await.0, 401);
        assert_eq!(request(port, "GET /api/status HTTP/1.1").await.0, 401);
        assert_eq!(request(port, "GET /camera/0/frame.jpg HTTP/1.1").await.0, 401);
        let wrong = base64::engine::general_purpose::STANDARD.encode("admin:correct horsf");
        assert_eq!(request(port, &format!("GET / HTTP/1.1\r\nAuthorization: Basic {wrong}")).await.0, 401);
        let right = base64::engine::general_purpose::STANDARD.encode("anyone:correct horse");
        assert_eq!(request(port, &format!("GET / HTTP/1.1\r\nAuthorization: Basic {right}")).await.0, 200);
        assert_eq!(request(port, "GET /metrics HTTP/1.1\r\nAuthorization: Bearer correct horse").await.0, 200);
        assert_eq!(request(port, "GET /healthz HTTP/1.1").await.0, 503, "/healthz asks for nothing");
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_cut_off() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (port, _stop) = serve(server(None)).await;
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(HEADER_READ_TIMEOUT * 3, stream.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the connection is still open after {:?}", HEADER_READ_TIMEOUT * 3);
    }
}
