//! Who holds pins and temporary files: a process, named so that its death is recognisable.
//!
//! An owner is `(boot id, pid, start time in clock ticks since boot)`. It is alive while this
//! boot's `/proc/<pid>/stat` shows the same start time, so a recycled pid is not mistaken for
//! the old process and a reboot releases every pin. Pins therefore die with their process
//! without any cleanup having to run.
//!
//! What is not here: the pin table itself (`super::db`).

use std::fs;

/// A process identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessId {
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
    /// The pid.
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat`: start time in clock ticks after boot.
    pub start_ticks: u64,
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The start time of `pid`, if it exists.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces or parentheses.
    let after = &stat[stat.rfind(')')? + 1..];
    // Fields from 3 on; start time is field 22, the 20th after the name.
    after.split_whitespace().nth(19)?.parse().ok()
}

impl ProcessId {
    /// This process.
    pub fn current() -> ProcessId {
        let pid = std::process::id();
        ProcessId { boot_id: boot_id(), pid, start_ticks: start_ticks(pid).unwrap_or(0) }
    }

    /// Whether the process is still running (same boot, same pid, same start time).
    pub fn is_alive(&self) -> bool {
        self.boot_id == boot_id() && start_ticks(self.pid) == Some(self.start_ticks)
    }

    /// A file-name tag: `<pid>-<start ticks>`.
    pub fn tag(&self) -> String {
        format!("{}-{}", self.pid, self.start_ticks)
    }

    /// Parse a tag made by [`ProcessId::tag`] (the boot id is the current one).
    pub fn from_tag(tag: &str) -> Option<ProcessId> {
        let (pid, ticks) = tag.split_once('-')?;
        Some(ProcessId {
            boot_id: boot_id(),
            pid: pid.parse().ok()?,
            start_ticks: ticks.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_process_is_alive_and_a_dead_child_is_not() {
        let me = ProcessId::current();
        assert!(me.start_ticks > 0);
        assert!(me.is_alive());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let ticks = start_ticks(pid);
        child.wait().unwrap();
        let gone = ProcessId { boot_id: me.boot_id.clone(), pid, start_ticks: ticks.unwrap_or(1) };
        assert!(!gone.is_alive());
        let recycled = ProcessId { start_ticks: me.start_ticks + 1, ..me.clone() };
        assert!(!recycled.is_alive(), "another start time is another process");
        assert_eq!(ProcessId::from_tag(&me.tag()).unwrap(), me);
    }
}
