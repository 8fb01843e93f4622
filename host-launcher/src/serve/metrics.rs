//! The CI service's Prometheus metrics (`GET /metrics`, text exposition format), through the
//! `prometheus-client` crate:
//!
//! | metric | kind | what |
//! |---|---|---|
//! | `vouch_build_queue_length` | gauge | builds waiting for a worker |
//! | `vouch_builds_running` | gauge | builds running now |
//! | `vouch_builds{state}` | gauge | recorded builds in each state |
//! | `vouch_step_duration_seconds` | histogram | how long steps took (boot to published or failed) |
//! | `vouch_vm_boots_total` | counter | VMs started for steps |
//! | `vouch_vm_slots_busy` | gauge | steps holding one of the `--jobs` VM slots (`crate::build::slots`) |
//! | `vouch_vm_slots_waiting` | gauge | steps waiting for a VM slot |
//! | `vouch_http_bytes_served_total` | counter | body bytes of binary-cache files served |
//! | `vouch_http_responses_total{class}` | counter | responses by status class (`2xx` …) |
//!
//! Gauges are read when scraped ([`Metrics::render`]); counters and the histogram are updated
//! where things happen. What is not here: the route (`super::http`).

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A `state` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// The build state.
    pub state: String,
}

/// A `class` label (`2xx`, `4xx` …).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    /// The status class.
    pub class: String,
}

/// The service's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Builds waiting.
    pub queue_length: Gauge,
    /// Builds running.
    pub running: Gauge,
    /// Recorded builds by state.
    pub builds: Family<StateLabel, Gauge>,
    /// Step durations.
    pub step_seconds: Histogram,
    /// VMs started.
    pub vm_boots: Counter,
    /// VM slots taken (set by [`Metrics::slots`] before [`Metrics::render`]).
    pub vm_slots_busy: Gauge,
    /// Steps waiting for a VM slot (likewise).
    pub vm_slots_waiting: Gauge,
    /// Binary-cache body bytes served.
    pub bytes_served: Counter,
    /// Responses by status class.
    pub responses: Family<ClassLabel, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            queue_length: Gauge::default(),
            running: Gauge::default(),
            builds: Family::default(),
            // 1 s … ~4.5 h.
            step_seconds: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
            vm_boots: Counter::default(),
            vm_slots_busy: Gauge::default(),
            vm_slots_waiting: Gauge::default(),
            bytes_served: Counter::default(),
            responses: Family::default(),
        };
        {
            let mut r = m.registry.lock().unwrap_or_else(|e| e.into_inner());
            let v = r.sub_registry_with_prefix("vouch");
            v.register("build_queue_length", "Builds waiting for a worker", m.queue_length.clone());
            v.register("builds_running", "Builds running now", m.running.clone());
            v.register("builds", "Recorded builds by state", m.builds.clone());
            v.register(
                "step_duration_seconds",
                "How long build steps took, VM boot to published or failed",
                m.step_seconds.clone(),
            );
            v.register("vm_boots", "VMs started for build steps", m.vm_boots.clone());
            v.register(
                "vm_slots_busy",
                "Build steps holding one of the --jobs VM slots",
                m.vm_slots_busy.clone(),
            );
            v.register(
                "vm_slots_waiting",
                "Build steps waiting for a VM slot",
                m.vm_slots_waiting.clone(),
            );
            v.register(
                "http_bytes_served",
                "Body bytes of binary cache files served",
                m.bytes_served.clone(),
            );
            v.register("http_responses", "HTTP responses by status class", m.responses.clone());
        }
        m
    }
}

impl Metrics {
    /// Count a response with `status`.
    pub fn response(&self, status: u16) {
        let class = format!("{}xx", status / 100);
        self.responses.get_or_create(&ClassLabel { class }).inc();
    }

    /// Set the VM slot gauges from `slots`.
    pub fn slots(&self, slots: Option<&crate::build::slots::Slots>) {
        let (busy, waiting) = slots.map_or((0, 0), |s| (s.busy(), s.waiting()));
        self.vm_slots_busy.set(busy as i64);
        self.vm_slots_waiting.set(waiting as i64);
    }

    /// The text exposition, with the gauges set from `queued`, `running` and `counts` (state,
    /// number).
    pub fn render(&self, queued: usize, running: usize, counts: &[(String, u64)]) -> String {
        self.queue_length.set(queued as i64);
        self.running.set(running as i64);
        for name in super::records::BuildState::NAMES {
            let n = counts.iter().find(|(s, _)| s == name).map_or(0, |(_, n)| *n);
            self.builds.get_or_create(&StateLabel { state: name.into() }).set(n as i64);
        }
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric() {
        let m = Metrics::default();
        m.vm_boots.inc();
        m.step_seconds.observe(3.0);
        m.bytes_served.inc_by(1234);
        m.response(404);
        m.vm_slots_waiting.set(3);
        let text = m.render(2, 1, &[("failed".into(), 5)]);
        for want in [
            "vouch_build_queue_length 2",
            "vouch_builds_running 1",
            "vouch_builds{state=\"failed\"} 5",
            "vouch_builds{state=\"succeeded\"} 0",
            "vouch_vm_boots_total 1",
            "vouch_vm_slots_busy 0",
            "vouch_vm_slots_waiting 3",
            "vouch_step_duration_seconds_count 1",
            "vouch_http_bytes_served_total 1234",
            "vouch_http_responses_total{class=\"4xx\"} 1",
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
    }
}
