//! The CI service's web page: server-rendered HTML, no JavaScript build step (a few lines of
//! inline script follow the logs and cancel), and the server-sent events it reads.
//!
//! - `/`: the builds, newest first (derivation name, state, start, duration, evidence kind),
//!   filtered by state and paged by id. Simulated evidence is marked unmistakably, in every
//!   row and on every page that shows it.
//! - `/builds/<id>`: the build's steps as a tree, each with its live log; its statement in
//!   human terms and how its evidence was checked; the `nix copy --from …` and `vouch verify …`
//!   commands for its outputs; a cancel button for a caller who may (`build` scope).
//! - `/v1/builds/<id>/steps/<n>/events`: a step's log as server-sent events (`log`, with the
//!   byte offset after it as the event id, so a reconnecting browser resumes where it was;
//!   `state`; `end` once the step finished and everything was sent). `?offset=` or
//!   `Last-Event-ID` says where to start.
//!
//! What is not here: the JSON API ([`super::http`]), what the service knows ([`Service`]).

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};

use super::api::Route;
use super::auth::{Caller, Scope};
use super::builds::{Build, View};
use super::records::{BuildInfo, BuildState, StepInfo};
use super::{rfc3339, ApiError, Service};

/// Builds per page.
const PAGE: u32 = 50;

/// HTML-escape `s`.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(500, format!("the request's task: {e}")))?
}

/// `/` or `/builds/<id>`.
pub async fn page(
    service: Arc<Service>,
    route: Route,
    query: &str,
    headers: &HeaderMap,
    caller: Caller,
    tls: bool,
) -> Result<Response, ApiError> {
    let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("HOST:PORT");
    let base = format!("{}://{host}", if tls { "https" } else { "http" });
    let html = match route {
        Route::BuildPage(id) => {
            let svc = service.clone();
            let view = blocking(move || svc.view(id)).await?;
            build_page(&view, &base, service.public_key(), caller.can(Scope::Build))
        }
        _ => {
            let state = query_value(query, "state").filter(|s| !s.is_empty()).map(str::to_owned);
            if let Some(s) = state.as_deref().filter(|s| !BuildState::NAMES.contains(s)) {
                return Err(ApiError::new(400, format!("state={s:?} is not a build state")));
            }
            let before = query_value(query, "before").and_then(|b| b.parse().ok());
            let svc = service.clone();
            let st = state.clone();
            let rows = blocking(move || {
                svc.builds().records().list(st.as_deref(), before, PAGE).map_err(super::internal)
            })
            .await?;
            index_page(&rows, state.as_deref())
        }
    };
    Ok(Html(html).into_response())
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;color:#222}
table{border-collapse:collapse;width:100%}td,th{padding:.3em .6em;border-bottom:1px solid #ddd;text-align:left}
.state{font-weight:bold;padding:.1em .4em;border-radius:.3em}
.queued{background:#eee}.running{background:#cde4ff}.succeeded{background:#cfc}
.failed{background:#fcc}.cancelled{background:#fe9}
.simulated{background:#b00;color:#fff;font-weight:bold;padding:.1em .4em;border-radius:.3em}
.banner{background:#b00;color:#fff;padding:.6em 1em;font-weight:bold;margin:1em 0}
.banner code{background:#700;color:#fff;word-break:break-all}
pre{background:#111;color:#ddd;padding:.6em;max-height:30em;overflow:auto;white-space:pre-wrap}
code{background:#f3f3f3;padding:.1em .3em}.tree li{margin:.4em 0}nav a{margin-right:1em}";

fn head(title: &str) -> String {
    format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>{}</title>\
         <style>{STYLE}</style></head><body>",
        esc(title)
    )
}

/// A derivation's name (`hello-2.12`) from its path.
fn drv_name(p: &nix_formats::StorePath) -> String {
    p.name().trim_end_matches(".drv").to_owned()
}

fn state_badge(s: &BuildState) -> String {
    format!("<span class=\"state {0}\" data-state=\"{0}\">{0}</span>", s.name())
}

/// The evidence kind, unmistakable when simulated.
fn evidence_badge(s: &BuildState) -> String {
    match s {
        BuildState::Succeeded { attester, .. } if attester.to_string() == "sev-snp" => {
            "AMD SEV-SNP".into()
        }
        BuildState::Succeeded { .. } => {
            "<span class=simulated title=\"not hardware evidence: a key on this host signed it\">\
             SIMULATED</span>"
                .into()
        }
        _ => "—".into(),
    }
}

fn duration(started: Option<i64>, finished: Option<i64>) -> String {
    let Some(s) = started else { return "—".into() };
    let end = finished.unwrap_or_else(crate::store::db::now);
    let d = (end - s).max(0);
    let text = if d >= 3600 {
        format!("{}h {:02}m", d / 3600, d / 60 % 60)
    } else {
        format!("{}m {:02}s", d / 60, d % 60)
    };
    if finished.is_none() {
        format!("{text} so far")
    } else {
        text
    }
}

fn index_page(rows: &[BuildInfo], state: Option<&str>) -> String {
    let mut h = head("vouch builds");
    h.push_str("<h1>Builds</h1><nav><a href=\"/\">all</a>");
    for s in BuildState::NAMES {
        let _ = write!(h, "<a href=\"/?state={s}\">{s}</a>");
    }
    h.push_str(
        "</nav><table id=builds><tr><th>#</th><th>derivation</th><th>state</th>\
                <th>started</th><th>duration</th><th>evidence</th></tr>",
    );
    for b in rows {
        let _ = write!(
            h,
            "<tr data-id={id}><td><a href=\"/builds/{id}\">{id}</a></td><td><a href=\"/builds/{id}\">{name}</a></td>\
             <td>{state}</td><td>{start}</td><td>{dur}</td><td>{ev}</td></tr>",
            id = b.id,
            name = esc(&drv_name(&b.drv)),
            state = state_badge(&b.state),
            start = b.started.map_or("—".into(), rfc3339),
            dur = duration(b.started, b.finished),
            ev = evidence_badge(&b.state),
        );
    }
    h.push_str("</table>");
    if rows.len() == PAGE as usize {
        if let Some(last) = rows.last() {
            let filter = state.map(|s| format!("&state={s}")).unwrap_or_default();
            let _ = write!(h, "<p><a href=\"/?before={}{filter}\">older builds →</a></p>", last.id);
        }
    }
    if rows.is_empty() {
        h.push_str("<p>No builds yet.</p>");
    }
    h.push_str("</body></html>");
    h
}

/// What a succeeded step's statement says, in words.
fn statement(step: &StepInfo) -> String {
    let BuildState::Succeeded { outputs, attester } = &step.state else { return String::new() };
    let mut h = String::new();
    let drv = step.resolved.as_ref().unwrap_or(&step.drv);
    let _ = write!(
        h,
        "<p>vouch built <code>{}</code> offline in a fresh VM and states that it produced:</p><ul>",
        esc(&drv.to_string())
    );
    if let Some(map) = outputs.as_object() {
        for (name, o) in map {
            let _ = write!(
                h,
                "<li>output <b>{}</b>: <code>{}</code>, NAR {} ({} bytes)</li>",
                esc(name),
                esc(o["path"].as_str().unwrap_or("?")),
                esc(o["nar_hash"].as_str().unwrap_or("?")),
                o["nar_size"]
            );
        }
    }
    h.push_str("</ul>");
    let d = step.detail.clone().unwrap_or_default();
    if let Some(trace) = d["trace"].as_str() {
        let on =
            d["machine"].as_str().map_or(String::new(), |m| format!(" on <code>{}</code>", esc(m)));
        let _ = write!(h, "<p>Scheduled by Nix{on}; its trace: {}.</p>", esc(trace));
    }
    let root = esc(d["evidence_root"].as_str().unwrap_or("?"));
    let measurement = esc(d["measurement"].as_str().unwrap_or("?"));
    if attester.to_string() == "sev-snp" {
        let _ = write!(
            h,
            "<p>Evidence: an AMD SEV-SNP attestation report binding this statement, checked by the \
             service against {root}; launch measurement <code>{measurement}</code>.</p>"
        );
    } else {
        let _ = write!(
            h,
            "<p class=banner>Evidence: SIMULATED. No AMD secure processor signed this statement; \
             this host's simulated root did ({root}). A verifier rejects it unless its policy \
             names that root. Measurement <code>{measurement}</code>.</p>"
        );
    }
    h
}

fn commands(view: &View, base: &str, key: &str) -> String {
    let outs: Vec<String> = view
        .steps
        .iter()
        .filter_map(|s| match &s.state {
            BuildState::Succeeded { outputs, .. } => outputs.as_object().cloned(),
            _ => None,
        })
        .flat_map(|m| m.into_values())
        .filter_map(|o| o["path"].as_str().map(str::to_owned))
        .collect();
    if outs.is_empty() {
        return String::new();
    }
    let drv = view.info.drv.to_string();
    format!(
        "<h2>Use the outputs</h2><pre id=commands>nix copy --from '{base}' \\\n  --option extra-trusted-public-keys '{key}' \\\n  {outs}\n\n\
         # verify the closure's traces under your policy (a copy of this service's trace store):\n\
         vouch verify --policy policy.toml --traces TRACE_STORE_COPY {drv}</pre>",
        base = esc(base),
        key = esc(key),
        outs = esc(&outs.join(" ")),
        drv = esc(&drv),
    )
}

fn build_page(view: &View, base: &str, key: &str, may_cancel: bool) -> String {
    let b = &view.info;
    let mut h = head(&format!("vouch build {} {}", b.id, drv_name(&b.drv)));
    let simulated = view
        .steps
        .iter()
        .any(|s| matches!(&s.state, BuildState::Succeeded { attester, .. } if attester.to_string() != "sev-snp"));
    let _ = write!(
        h,
        "<p><a href=\"/\">← builds</a></p><h1>Build {id}: {name} <span id=state>{state}</span></h1>",
        id = b.id,
        name = esc(&drv_name(&b.drv)),
        state = state_badge(&b.state)
    );
    if simulated {
        h.push_str(
            "<p class=banner id=simulated>SIMULATED EVIDENCE — not attested by AMD \
                    hardware</p>",
        );
    }
    let _ = write!(
        h,
        "<table><tr><th>derivation</th><td><code>{}</code></td></tr>\
         <tr><th>submitted</th><td>{}</td></tr><tr><th>started</th><td>{}</td></tr>\
         <tr><th>finished</th><td>{}</td></tr><tr><th>duration</th><td>{}</td></tr>\
         <tr><th>evidence</th><td>{}</td></tr></table>",
        esc(&b.drv.to_string()),
        rfc3339(b.submitted),
        b.started.map_or("—".into(), rfc3339),
        b.finished.map_or("—".into(), rfc3339),
        duration(b.started, b.finished),
        evidence_badge(&b.state),
    );
    if let BuildState::Failed { status, error } = &b.state {
        let _ = write!(h, "<p class=banner id=error>{}: {}</p>", esc(status), esc(error));
    }
    if may_cancel && !b.state.is_finished() {
        h.push_str("<p><button id=cancel>Cancel this build</button></p>");
    }
    h.push_str("<h2>Steps</h2><ol class=tree id=steps>");
    for s in &view.steps {
        let _ = write!(
            h,
            "<li id=\"step-{n}\"><code>{drv}</code> {state} {ev} <small>{dur}</small>\
             {stmt}<details open><summary>log</summary><pre class=log data-step={n}></pre>\
             </details></li>",
            n = s.index,
            drv = esc(&drv_name(&s.drv)),
            state = state_badge(&s.state),
            ev = evidence_badge(&s.state),
            dur = duration(s.started, s.finished),
            stmt = statement(s),
        );
    }
    h.push_str("</ol>");
    h.push_str(&commands(view, base, key));
    let _ = write!(
        h,
        "<script>
const id = {id};
for (const pre of document.querySelectorAll('pre.log')) {{
  const es = new EventSource(`/v1/builds/${{id}}/steps/${{pre.dataset.step}}/events`);
  es.addEventListener('log', e => {{ pre.textContent += e.data + '\\n'; pre.scrollTop = pre.scrollHeight; }});
  es.addEventListener('state', e => {{
    const s = JSON.parse(e.data).state;
    for (const b of document.querySelectorAll('#state .state, #step-' + pre.dataset.step + ' .state')) {{
      b.className = 'state ' + s; b.dataset.state = s; b.textContent = s; }}
  }});
  es.addEventListener('end', () => {{ es.close(); if (!document.body.dataset.reloaded) {{
    document.body.dataset.reloaded = 1; setTimeout(() => location.reload(), 500); }} }});
}}
const c = document.getElementById('cancel');
if (c) c.onclick = async () => {{
  c.disabled = true;
  const r = await fetch(`/v1/builds/${{id}}`, {{ method: 'DELETE' }});
  if (!r.ok) alert((await r.json()).error);
  setTimeout(() => location.reload(), 300);
}};
</script></body></html>",
        id = b.id
    );
    h
}

/// A step's log as server-sent events (see the module docs).
pub async fn events(
    service: Arc<Service>,
    id: u64,
    step: u32,
    query: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let offset = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or_else(|| query_value(query, "offset"))
        .map(|v| v.parse::<u64>().map_err(|_| ApiError::new(400, format!("offset {v:?}"))))
        .transpose()?
        .unwrap_or(0);
    let svc = service.clone();
    let build = blocking(move || svc.build(id)).await?;
    if build.view().steps.len() <= step as usize {
        return Err(ApiError::new(404, format!("build {id} has no step {step}")));
    }
    let rx = build.subscribe();
    let state = Follow { build, step, offset, rx, sent_state: None, done: false };
    let stream = futures_util::stream::unfold(state, |mut f| async move {
        let ev = f.next().await?;
        Some((Ok::<_, std::convert::Infallible>(ev), f))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// Where a follower of a step's log is.
struct Follow {
    build: Arc<Build>,
    step: u32,
    offset: u64,
    rx: tokio::sync::watch::Receiver<u64>,
    sent_state: Option<&'static str>,
    done: bool,
}

impl Follow {
    /// The next event, waiting for one; `None` after `end`.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if self.done {
                return None;
            }
            self.rx.mark_unchanged();
            let (bytes, len) = self.build.log_from(self.step, self.offset)?;
            if !bytes.is_empty() {
                self.offset = self.offset.min(len) + bytes.len() as u64;
                let text = String::from_utf8_lossy(&bytes);
                let text = text.strip_suffix('\n').unwrap_or(&text);
                return Some(Event::default().event("log").id(self.offset.to_string()).data(text));
            }
            let state = self.build.view().steps[self.step as usize].state.clone();
            if self.sent_state != Some(state.name()) {
                self.sent_state = Some(state.name());
                let data = serde_json::json!({"state": state.name()}).to_string();
                return Some(Event::default().event("state").data(data));
            }
            if state.is_finished() {
                self.done = true;
                return Some(Event::default().event("end").data(state.name()));
            }
            if self.rx.changed().await.is_err() {
                // The build left memory: it finished; its record says the rest.
                self.done = true;
                return Some(Event::default().event("end").data("finished"));
            }
        }
    }
}
