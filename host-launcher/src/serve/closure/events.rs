//! Nix's `--log-format internal-json` stream, read into per-step facts.
//!
//! Every line Nix writes to stderr is `@nix {json}` (other lines are kept as they are). What
//! the driver needs from it (Nix 2.8's `src/libutil/logging.cc`, `ActivityType`/`ResultType`):
//! - `start` of type 105 (`actBuild`), fields `[drvPath, machineName, round, nrRounds]`: a
//!   step starts on a machine (the machine as named in the machines file). The builder's own
//!   build activity is relayed by the build hook as another 105 whose machine is empty; both
//!   name the derivation, so both ids belong to the step;
//! - `start` of type 111 (`actBuildWaiting`), fields `[drvPath, resolvedPath]`: Nix resolved a
//!   content-addressed (or deferred) derivation; the build that follows names the resolved one;
//! - `start` of type 108 (`actSubstitute`), fields `[storePath, substituter]`: a path comes
//!   from the cache instead of a build;
//! - `result` of type 101 (`resBuildLogLine`), fields `[line]`: a log line of the activity;
//! - `stop`: the activity ended (success or failure is not said);
//! - `msg` at level 0 (errors): `builder for 'D' failed …`, `build of 'D' on 'M' failed: …`,
//!   `N dependencies of derivation 'D' failed to build`, `cannot build derivation 'D': …`, and
//!   errors that name no step (`unable to start any build; remote machines may not have all
//!   required system features`); at level 1, `Failed to find a machine for remote build!`
//!   with the step's required system and features and the machines there are.
//!
//! [`Tracker`] folds the events into, per derivation path: the machine it was built on, its
//! log lines, whether it failed; plus which derivations were resolved to which.
//!
//! What is not here: running Nix (`super::nix`), what a build's steps are (`super`).

use std::collections::{BTreeMap, BTreeSet};

/// `actBuild`.
pub const ACT_BUILD: u64 = 105;
/// `actSubstitute`.
pub const ACT_SUBSTITUTE: u64 = 108;
/// `actBuildWaiting` (Nix 2.8 uses it for "resolved derivation").
pub const ACT_BUILD_WAITING: u64 = 111;
/// `resBuildLogLine`.
pub const RES_BUILD_LOG_LINE: u64 = 101;

/// One event of the stream that matters here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A build activity: `drv` on `machine` (empty: the builder's own, relayed).
    Build {
        /// Activity id.
        id: u64,
        /// The derivation.
        drv: String,
        /// The machine (as in the machines file), empty for a relayed activity.
        machine: String,
    },
    /// `drv` was resolved to `resolved`.
    Resolved {
        /// The derivation as submitted.
        drv: String,
        /// The resolved derivation.
        resolved: String,
    },
    /// `path` is substituted from `from`.
    Substitute {
        /// The store path.
        path: String,
        /// The substituter.
        from: String,
    },
    /// A log line of activity `id`.
    Line {
        /// Activity id.
        id: u64,
        /// The line.
        line: String,
    },
    /// Activity `id` stopped.
    Stop {
        /// Activity id.
        id: u64,
    },
    /// A message (`level` 0: an error), without terminal colours.
    Msg {
        /// Nix's verbosity.
        level: u64,
        /// The text.
        text: String,
    },
}

/// Remove ANSI escape sequences (Nix colours its messages even in JSON).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Parse one line of stderr; `None` for lines that are not events or not of interest.
pub fn parse_line(line: &str) -> Option<Event> {
    let v: serde_json::Value = serde_json::from_str(line.strip_prefix("@nix ")?).ok()?;
    let id = v["id"].as_u64();
    let ty = v["type"].as_u64();
    let field = |i: usize| v["fields"].get(i).and_then(|f| f.as_str()).map(str::to_owned);
    match v["action"].as_str()? {
        "start" => match ty? {
            ACT_BUILD => Some(Event::Build { id: id?, drv: field(0)?, machine: field(1)? }),
            ACT_BUILD_WAITING => Some(Event::Resolved { drv: field(0)?, resolved: field(1)? }),
            ACT_SUBSTITUTE => Some(Event::Substitute { path: field(0)?, from: field(1)? }),
            _ => None,
        },
        "result" if ty == Some(RES_BUILD_LOG_LINE) => {
            Some(Event::Line { id: id?, line: strip_ansi(&field(0)?) })
        }
        "stop" => Some(Event::Stop { id: id? }),
        "msg" => Some(Event::Msg {
            level: v["level"].as_u64().unwrap_or(0),
            text: strip_ansi(v["msg"].as_str()?),
        }),
        _ => None,
    }
}

/// The quoted `.drv` paths in an error message.
fn quoted_drvs(text: &str) -> Vec<String> {
    text.split('\'')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("/nix/store/") && s.ends_with(".drv"))
        .map(str::to_owned)
        .collect()
}

/// What one Nix run said about each derivation.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tracker {
    /// Activity id → derivation.
    activities: BTreeMap<u64, String>,
    /// Derivation → the machine that builds it.
    pub machines: BTreeMap<String, String>,
    /// Derivation (as submitted) → resolved derivation.
    pub resolved: BTreeMap<String, String>,
    /// Derivations whose build failed, with Nix's message.
    pub failed: BTreeMap<String, String>,
    /// Derivations that depend on a failure (Nix's "dependencies … failed to build").
    pub dependents_failed: BTreeSet<String>,
    /// Store paths substituted from the cache.
    pub substituted: BTreeSet<String>,
    /// Error messages, in order (with Nix's "Failed to find a machine" warnings, which say why
    /// a step could not start).
    pub errors: Vec<String>,
}

/// What an event means for the steps, as [`Tracker::apply`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Nothing step-specific.
    None,
    /// `drv` started on `machine`.
    Started {
        /// The derivation (resolved where Nix resolved it).
        drv: String,
        /// The machine.
        machine: String,
    },
    /// A log line of `drv`.
    Line {
        /// The derivation (resolved where Nix resolved it).
        drv: String,
        /// The line.
        line: String,
    },
    /// `drv` failed.
    Failed {
        /// The derivation (resolved where Nix resolved it).
        drv: String,
    },
    /// `drv` was resolved to `resolved`.
    Resolved {
        /// As submitted.
        drv: String,
        /// Resolved.
        resolved: String,
    },
}

impl Tracker {
    /// Fold `event` in; what it changed.
    pub fn apply(&mut self, event: Event) -> Change {
        match event {
            Event::Build { id, drv, machine } => {
                self.activities.insert(id, drv.clone());
                if machine.is_empty() {
                    return Change::None;
                }
                self.machines.insert(drv.clone(), machine.clone());
                Change::Started { drv, machine }
            }
            Event::Resolved { drv, resolved } => {
                self.resolved.insert(drv.clone(), resolved.clone());
                Change::Resolved { drv, resolved }
            }
            Event::Substitute { path, .. } => {
                self.substituted.insert(path);
                Change::None
            }
            Event::Line { id, line } => match self.activities.get(&id) {
                Some(drv) => Change::Line { drv: drv.clone(), line },
                None => Change::None,
            },
            Event::Stop { id } => {
                self.activities.remove(&id);
                Change::None
            }
            Event::Msg { level: 0, text } => self.error(text),
            Event::Msg { level: 1, text } if text.starts_with("Failed to find a machine") => {
                self.errors.push(text);
                Change::None
            }
            Event::Msg { .. } => Change::None,
        }
    }

    fn error(&mut self, text: String) -> Change {
        let drvs = quoted_drvs(&text);
        self.errors.push(text.clone());
        let Some(first) = drvs.first() else { return Change::None };
        if text.contains("dependencies of derivation") || text.contains("dependencies couldn't") {
            self.dependents_failed.insert(first.clone());
            return Change::None;
        }
        if text.contains("failed") || text.contains("cannot build") {
            let fresh = !self.failed.contains_key(first);
            let entry = self.failed.entry(first.clone()).or_default();
            if !entry.is_empty() {
                entry.push('\n');
            }
            entry.push_str(text.trim_start_matches("error: ").trim());
            if fresh {
                return Change::Failed { drv: first.clone() };
            }
        }
        Change::None
    }
}

impl Tracker {
    /// Nix's errors that name no step (why nothing could start, …), newest last.
    pub fn general_errors(&self) -> Vec<&str> {
        let named =
            |e: &String| !e.starts_with("Failed to find a machine") && !quoted_drvs(e).is_empty();
        self.errors.iter().filter(|e| !named(e)).map(String::as_str).collect()
    }
}

#[cfg(test)]
#[path = "events_tests.rs"]
mod tests;
