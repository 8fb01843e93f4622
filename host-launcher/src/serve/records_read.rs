//! Reading the record back ([`Records::load`], [`Records::list`] …): rows into
//! [`BuildInfo`]s, [`StepInfo`]s and [`BuildState`]s, never trusting a row to claim more than it
//! says (an unknown evidence label reads as simulated).

use nix_formats::StorePath;
use rusqlite::{params, OptionalExtension};

use channel::messages::AttesterKind;

use super::{BuildInfo, BuildState, RecordError, Records, StepInfo};

type Row = (String, String, Option<String>, Option<String>, Option<String>, Option<String>);

/// A state from its record columns (name, status, error, outputs, evidence).
fn state_of(
    id: u64,
    (state, status, error, outputs, evidence): Row4,
) -> Result<BuildState, RecordError> {
    Ok(match state.as_str() {
        "queued" => BuildState::Queued,
        "running" => BuildState::Running,
        "cancelled" => BuildState::Cancelled,
        "succeeded" => BuildState::Succeeded {
            outputs: serde_json::from_str(outputs.as_deref().unwrap_or("{}"))
                .map_err(|e| RecordError::Corrupt(id, format!("outputs: {e}")))?,
            // Anything but the hardware label reads as simulated: never upgrade a claim.
            attester: if evidence.as_deref() == Some("sev-snp") {
                AttesterKind::SevSnp
            } else {
                AttesterKind::Simulated
            },
        },
        _ => BuildState::Failed {
            status: status.unwrap_or_else(|| "MiscFailure".into()),
            error: error.unwrap_or_default(),
        },
    })
}
type Row4 = (String, Option<String>, Option<String>, Option<String>, Option<String>);

fn parse_path(id: u64, what: &str, p: &str) -> Result<StorePath, RecordError> {
    StorePath::parse(p).map_err(|e| RecordError::Corrupt(id, format!("{what} {p:?}: {e}")))
}

const BUILD_COLUMNS: &str =
    "id, drv, state, status, error, outputs, evidence, submitted, started, finished";

type Row4Tail = (u64, i64, Option<i64>, Option<i64>);

impl Records {
    fn build_row(id: u64, r: &rusqlite::Row<'_>) -> rusqlite::Result<(Row, Row4Tail)> {
        Ok((
            (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?),
            (id, r.get(7)?, r.get(8)?, r.get(9)?),
        ))
    }

    fn build_info(row: (Row, Row4Tail)) -> Result<BuildInfo, RecordError> {
        let ((drv, state, status, error, outputs, evidence), (id, submitted, started, finished)) =
            row;
        Ok(BuildInfo {
            id,
            drv: parse_path(id, "drv", &drv)?,
            state: state_of(id, (state, status, error, outputs, evidence))?,
            submitted,
            started,
            finished,
        })
    }

    /// A build as recorded, with its steps, if it is.
    pub fn load(&self, id: u64) -> Result<Option<(BuildInfo, Vec<StepInfo>)>, RecordError> {
        let db = self.db();
        let row = db
            .query_row(
                &format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = ?1"),
                [id as i64],
                |r| Self::build_row(id, r),
            )
            .optional()
            .map_err(self.err())?;
        let Some(row) = row else { return Ok(None) };
        let info = Self::build_info(row)?;
        type StepRow =
            (u32, String, Option<String>, Row4, Option<i64>, Option<i64>, Option<String>);
        let rows: Vec<StepRow> = db
            .prepare(
                "SELECT idx, drv, resolved, state, status, error, evidence, started, finished,
                        detail, outputs
                 FROM steps WHERE build = ?1 ORDER BY idx",
            )
            .and_then(|mut s| {
                s.query_map([id as i64], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        (r.get(3)?, r.get(4)?, r.get(5)?, r.get(10)?, r.get(6)?),
                        r.get(7)?,
                        r.get(8)?,
                        r.get(9)?,
                    ))
                })?
                .collect()
            })
            .map_err(self.err())?;
        let steps = rows
            .into_iter()
            .map(|(index, drv, resolved, st, started, finished, detail)| {
                Ok(StepInfo {
                    index,
                    drv: parse_path(id, "step drv", &drv)?,
                    resolved: resolved.map(|r| parse_path(id, "resolved drv", &r)).transpose()?,
                    state: state_of(id, st)?,
                    started,
                    finished,
                    detail: detail.and_then(|d| serde_json::from_str(&d).ok()),
                })
            })
            .collect::<Result<_, RecordError>>()?;
        Ok(Some((info, steps)))
    }

    /// A finished step's log as recorded (empty if there is none).
    pub fn log(&self, id: u64, step: u32) -> Result<String, RecordError> {
        let path = self.log_path(id, step);
        match std::fs::read(&path) {
            Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(RecordError::Log(path, e)),
        }
    }

    /// Builds newest first, in `state` if given, with ids below `before` if given; at most
    /// `limit`.
    pub fn list(
        &self,
        state: Option<&str>,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<BuildInfo>, RecordError> {
        let before = before.map_or(i64::MAX, |b| b as i64);
        let db = self.db();
        let rows: Vec<(Row, Row4Tail)> = db
            .prepare(&format!(
                "SELECT {BUILD_COLUMNS} FROM builds WHERE (?1 IS NULL OR state = ?1) AND id < ?2
                 ORDER BY id DESC LIMIT ?3"
            ))
            .and_then(|mut s| {
                s.query_map(params![state, before, limit], |r| {
                    let id = r.get::<_, i64>(0)? as u64;
                    Self::build_row(id, r)
                })?
                .collect()
            })
            .map_err(self.err())?;
        rows.into_iter().map(Self::build_info).collect()
    }

    /// How many builds are recorded in each state.
    pub fn counts(&self) -> Result<Vec<(String, u64)>, RecordError> {
        self.db()
            .prepare("SELECT state, COUNT(*) FROM builds GROUP BY state")
            .and_then(|mut s| {
                s.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?.collect()
            })
            .map_err(self.err())
    }

    /// The newest step that built `drv` (as submitted or resolved): build id and step index.
    pub fn step_of(&self, drv: &StorePath) -> Result<Option<(u64, u32)>, RecordError> {
        let d = drv.to_string();
        self.db()
            .query_row(
                "SELECT build, idx FROM steps WHERE drv = ?1 OR resolved = ?1
                 ORDER BY build DESC, idx DESC LIMIT 1",
                [&d],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()
            .map_err(self.err())
    }
}
