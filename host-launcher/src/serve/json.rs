//! The build API's JSON views of builds and steps (`docs/openapi.json`), and its timestamps.
//!
//! What is not here: what the service knows ([`super::Service`]), the routes ([`super::api`]).

use super::builds::View;
use super::records::{BuildState, StepInfo};

/// Unix seconds as RFC 3339 UTC (`2026-12-06T21:17:00Z`).
pub fn rfc3339(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

fn time_json(t: Option<i64>) -> serde_json::Value {
    t.map_or(serde_json::Value::Null, |t| rfc3339(t).into())
}

/// A state's fields in the API: `state`, and `evidence` and `outputs` or `status` and `error`.
fn state_json(v: &mut serde_json::Value, state: &BuildState, with_outputs: bool) {
    v["state"] = state.name().into();
    match state {
        BuildState::Succeeded { outputs, attester } => {
            v["evidence"] = attester.to_string().into();
            if with_outputs {
                v["outputs"] = outputs.clone();
            }
        }
        BuildState::Failed { status, error } => {
            v["status"] = status.clone().into();
            v["error"] = error.clone().into();
        }
        _ => {}
    }
}

/// A step as the API shows it.
pub fn step_json(id: u64, s: &StepInfo) -> serde_json::Value {
    let mut v = serde_json::json!({
        "index": s.index,
        "drv": s.drv.to_string(),
        "resolved": s.resolved.as_ref().map(|r| r.to_string()),
        "started": time_json(s.started),
        "finished": time_json(s.finished),
        "log": format!("/v1/builds/{id}/steps/{}/log", s.index),
    });
    state_json(&mut v, &s.state, false);
    if let Some(d) = &s.detail {
        v["evidence_check"] = d.clone();
    }
    v
}

/// A build as the API shows it (`steps` only where asked: listings leave them out).
pub fn build_json(view: &View, with_steps: bool) -> serde_json::Value {
    let b = &view.info;
    let mut v = serde_json::json!({
        "id": b.id,
        "drv": b.drv.to_string(),
        "submitted": rfc3339(b.submitted),
        "started": time_json(b.started),
        "finished": time_json(b.finished),
    });
    state_json(&mut v, &b.state, with_steps);
    if with_steps {
        v["steps"] = view.steps.iter().map(|s| step_json(b.id, s)).collect();
    }
    v
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_796_591_820), "2026-12-06T21:17:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
