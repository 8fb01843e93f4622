//! The agent's configuration, read from the kernel command line by a pure function (the host
//! reads the channel port of an image's command line with it too).
//!
//! The command line is part of the launch measurement, so it is fixed per image and never
//! carries anything job-specific: only the channel port, a log level and, with the `bench`
//! feature (the bench image's agent only), a benchmark/test switch that the image's own command
//! line never has. Without the feature `vouch.bench` is an unknown key.
//! Parameters the agent does not know (`console=`, `quiet`, …) are the kernel's and are ignored;
//! an unknown or repeated `vouch.*` key is an error, so a typo cannot silently change behaviour.
//!
//! What is not here: the job (it arrives over the channel) or anything about the host.

/// Default vsock port of the host channel.
pub const DEFAULT_PORT: u32 = 1024;

/// How the agent's version (`vouch-agent <version>`, recorded in the image manifest and each
/// statement) ends when it was built with its `bench` feature, i.e. has the benchmark modes: the
/// bench image is labelled as such, and `vouch bench vm` refuses an image without them.
pub const BENCH_VERSION_SUFFIX: &str = "+bench";

/// Errors in the `vouch.*` command-line keys.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A `vouch.*` key we do not know.
    #[error("unknown kernel command-line key {0:?}")]
    UnknownKey(String),
    /// The same `vouch.*` key twice.
    #[error("kernel command-line key {0:?} given twice")]
    Repeated(String),
    /// A value that does not parse.
    #[error("bad value {value:?} for kernel command-line key {key:?}: {why}")]
    BadValue {
        /// The key.
        key: String,
        /// Its value.
        value: String,
        /// What is wrong.
        why: &'static str,
    },
}

/// How much the agent prints on the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogLevel {
    /// Progress lines only.
    #[default]
    Info,
    /// Everything.
    Debug,
}

/// Benchmark modes (never used by a real build; only with the `bench` feature).
#[cfg(feature = "bench")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bench {
    /// Power off right after mounting: the "bare VM" baseline.
    Poweroff,
    /// Connect, report readiness, then sink a stream of NAR chunks and power off: raw channel
    /// throughput.
    Sink,
    /// Panic right after mounting: proves that a panicking agent still powers the VM off.
    Panic,
}

/// The agent's boot-time configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// vsock port on the host (CID 2) to connect to.
    pub port: u32,
    /// Console verbosity.
    pub log: LogLevel,
    /// A benchmark mode, if any.
    #[cfg(feature = "bench")]
    pub bench: Option<Bench>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            port: DEFAULT_PORT,
            log: LogLevel::Info,
            #[cfg(feature = "bench")]
            bench: None,
        }
    }
}

/// Split a kernel command line into words, honouring double quotes as the kernel does.
fn words(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// Parse the `vouch.*` keys of a kernel command line (the contents of `/proc/cmdline`).
pub fn parse_cmdline(cmdline: &str) -> Result<Config, ConfigError> {
    let mut cfg = Config::default();
    let mut seen = std::collections::HashSet::new();
    for word in words(cmdline) {
        let Some(rest) = word.strip_prefix("vouch.") else { continue };
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        let full = format!("vouch.{key}");
        if !seen.insert(full.clone()) {
            return Err(ConfigError::Repeated(full));
        }
        let bad = |why| ConfigError::BadValue { key: full.clone(), value: value.to_owned(), why };
        match key {
            "port" => {
                cfg.port = value.parse().map_err(|_| bad("not a port number"))?;
                if cfg.port == 0 || cfg.port == u32::MAX {
                    return Err(bad("port out of range"));
                }
            }
            "log" => {
                cfg.log = match value {
                    "info" => LogLevel::Info,
                    "debug" => LogLevel::Debug,
                    _ => return Err(bad("expected info or debug")),
                }
            }
            #[cfg(feature = "bench")]
            "bench" => {
                cfg.bench = Some(match value {
                    "poweroff" => Bench::Poweroff,
                    "sink" => Bench::Sink,
                    "panic" => Bench::Panic,
                    _ => return Err(bad("expected poweroff, sink or panic")),
                })
            }
            _ => return Err(ConfigError::UnknownKey(full)),
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_command_line_parses() {
        let c = parse_cmdline("console=ttyS0 quiet panic=-1 vouch.port=1024\n").unwrap();
        assert_eq!(c, Config { port: 1024, ..Config::default() });
    }

    #[test]
    fn defaults_without_vouch_keys() {
        assert_eq!(parse_cmdline("").unwrap(), Config::default());
        assert_eq!(parse_cmdline("root=/dev/vda vouchport=9").unwrap(), Config::default());
    }

    #[test]
    fn port_and_log() {
        let c = parse_cmdline("vouch.port=5000 vouch.log=debug").unwrap();
        assert_eq!((c.port, c.log), (5000, LogLevel::Debug));
    }

    #[cfg(feature = "bench")]
    #[test]
    fn bench_keys() {
        let c = parse_cmdline("vouch.port=5000 vouch.log=debug vouch.bench=sink").unwrap();
        assert_eq!(c, Config { port: 5000, log: LogLevel::Debug, bench: Some(Bench::Sink) });
        let c = parse_cmdline("x=\"a b\" vouch.bench=poweroff").unwrap();
        assert_eq!(c.bench, Some(Bench::Poweroff));
    }

    #[test]
    fn quoted_words_stay_together() {
        assert_eq!(words(" a=\"b c\"  d "), ["a=b c", "d"]);
        assert_eq!(words("\"\""), [""]);
    }

    #[test]
    fn errors_name_the_key() {
        assert_eq!(
            parse_cmdline("vouch.prot=1"),
            Err(ConfigError::UnknownKey("vouch.prot".into()))
        );
        assert_eq!(
            parse_cmdline("vouch.port=1 vouch.port=2"),
            Err(ConfigError::Repeated("vouch.port".into()))
        );
        for bad in ["vouch.port=x", "vouch.port=0", "vouch.port=", "vouch.log=loud"] {
            assert!(matches!(parse_cmdline(bad), Err(ConfigError::BadValue { .. })), "{bad}");
        }
        #[cfg(feature = "bench")]
        assert!(matches!(parse_cmdline("vouch.bench=1"), Err(ConfigError::BadValue { .. })));
        // A quoted value hides nothing: the key is still checked.
        assert!(parse_cmdline("\"vouch.evil=1\"").is_err());
    }

    /// Without the feature (every real image) the benchmark switch does not exist.
    #[cfg(not(feature = "bench"))]
    #[test]
    fn no_bench_key_without_the_feature() {
        assert_eq!(
            parse_cmdline("vouch.bench=panic"),
            Err(ConfigError::UnknownKey("vouch.bench".into()))
        );
    }
}
