//! The stdout sink (`--output stdout`): one `labels` JSON object per line,
//! the same payload MQTT would carry, for debugging without a broker and
//! for piping into `jq`.

use std::io::Write;

use tokio::sync::mpsc;

use super::payload;
use crate::labels::LabelEvent;

/// Prints every event's `labels` JSON on a line of its own.
pub struct StdoutSink;

impl super::Sink for StdoutSink {
    fn run(self: Box<Self>, events: mpsc::Receiver<LabelEvent>) -> super::SinkTask {
        Box::pin(run(events))
    }
}

async fn run(mut events: mpsc::Receiver<LabelEvent>) -> anyhow::Result<()> {
    while let Some(event) = events.recv().await {
        let line = payload::labels_json(&event).to_string();
        let mut out = std::io::stdout().lock();
        // A closed pipe (`labelcast run --output stdout | head`) ends the sink quietly.
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            break;
        }
    }
    Ok(())
}
