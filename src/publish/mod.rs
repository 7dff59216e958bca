//! Where label events go: an MQTT broker (external, or embedded when none is
//! configured) or stdout. The pipeline hands events over through a bounded
//! channel and never waits on a sink.

pub mod broker;
pub mod homeassistant;
pub mod mqtt;
pub mod payload;
pub mod stdout;
