//! `vouch verify --graph dot|svg`: the verified closure as a Graphviz graph, drawn from what
//! `vouch verify` reports (the verdict's per-step results) and the derivation graph it checked.
//!
//! One box per step, dependencies above their dependents (an edge is "output used as input"):
//! the derivation's name, its resolved derivation when it was resolved (content-addressed
//! steps), and who vouched for it, coloured by the kind of evidence — SEV-SNP (green), SIMULATED
//! (orange: proves nothing about hardware), Nix key (blue), fixed output (grey). With a broken
//! link, that step and its edges to its dependents are red; the verdict says nothing about the
//! other steps, which are drawn dashed ("not reported"). SVG comes from Graphviz's `dot`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use build_trace::verify::{AcceptedStep, DrvSet, Outcome};
use nix_formats::StorePath;

/// The graph formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Graphviz source.
    Dot,
    /// SVG rendered by Graphviz's `dot` (must be installed).
    Svg,
}

/// Why the graph could not be written (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("cannot run Graphviz `dot` (install graphviz, or use --graph dot)")]
    NoDot(#[source] std::io::Error),
    #[error("Graphviz `dot` failed: {0}")]
    Dot(String),
    #[error("{path}: cannot write the graph")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the derivation graph")]
    Drvs(#[source] build_trace::verify::VerifyError),
}

/// The kind of evidence that accepted a step, and its colour.
fn kind(step: &AcceptedStep) -> (&'static str, &'static str) {
    let by = |p: &str| step.accepted_by.iter().any(|a| a.starts_with(p));
    if step.simulated {
        ("SIMULATED SEV-SNP", "#f5a623")
    } else if by("chip") {
        ("SEV-SNP", "#2e9e44")
    } else if by("key") {
        ("Nix key", "#3573c9")
    } else if by("fixed-output") {
        ("fixed output", "#7f7f7f")
    } else {
        ("accepted", "#2e9e44")
    }
}

/// A DOT string literal.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The first 8 characters of a long signer id (chips), the rest elided.
fn short(who: &str) -> String {
    who.split(' ')
        .map(|w| if w.len() > 24 { format!("{}…", &w[..12]) } else { w.to_owned() })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The DOT source for `outcome` over the closure of `target` in `drvs`.
pub fn dot(drvs: &DrvSet, target: &StorePath, outcome: &Outcome) -> Result<String, GraphError> {
    let order = drvs.post_order(target).map_err(GraphError::Drvs)?;
    let (accepted, broken): (BTreeMap<&str, &AcceptedStep>, Option<_>) = match outcome {
        Outcome::Verified(v) => (v.steps.iter().map(|s| (s.drv.as_str(), s)).collect(), None),
        Outcome::NotVerified(b) => (BTreeMap::new(), Some(b)),
    };
    let (title, colour) = match outcome {
        Outcome::Verified(v) if v.simulated() => {
            (format!("VERIFIED {} (SIMULATED evidence)", target.name()), "#f5a623")
        }
        Outcome::Verified(_) => (format!("VERIFIED {}", target.name()), "#2e9e44"),
        Outcome::NotVerified(b) => {
            (format!("NOT VERIFIED {}: {}", target.name(), b.check.name()), "#d0021b")
        }
    };
    let mut s = String::new();
    let _ = writeln!(s, "digraph vouch_closure {{");
    let _ = writeln!(
        s,
        "  graph [rankdir=TB, fontname=\"Helvetica\", labelloc=t, fontcolor={}, label={}];",
        quote(colour),
        quote(&title)
    );
    let _ = writeln!(s, "  node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\", fontsize=10, fillcolor=white];");
    let _ = writeln!(s, "  edge [color=\"#555555\", arrowsize=0.7];");
    for p in &order {
        let id = p.to_string();
        let mut label = p.name().to_owned();
        let attrs = if let Some(step) = accepted.get(id.as_str()) {
            let (k, c) = kind(step);
            if step.key != step.drv {
                let key = StorePath::parse(&step.key).map(|k| k.base_name().to_owned());
                let _ = write!(label, "\\nresolved: {}", key.unwrap_or_else(|_| step.key.clone()));
            }
            let who: Vec<String> = step.accepted_by.iter().map(|w| short(w)).collect();
            let _ = write!(label, "\\n{k}: {}", who.join(", "));
            format!("color={}, penwidth=2", quote(c))
        } else if let Some(b) = broken.filter(|b| b.step == id) {
            if let Some(key) = b.key.as_ref().filter(|k| **k != b.step) {
                let key = StorePath::parse(key).map(|k| k.base_name().to_owned());
                let _ = write!(label, "\\nresolved: {}", key.unwrap_or_default());
            }
            let _ = write!(label, "\\nBROKEN: {}\\n{}", b.check.name(), wrap(&b.explanation, 48));
            "color=\"#d0021b\", fontcolor=\"#d0021b\", penwidth=3".to_owned()
        } else {
            let _ = write!(label, "\\n(not reported)");
            "color=\"#9b9b9b\", fontcolor=\"#9b9b9b\", style=\"rounded,dashed\"".to_owned()
        };
        let _ = writeln!(s, "  {} [label={}, {attrs}];", quote(&id), quote_label(&label));
    }
    for p in &order {
        let Some(drv) = drvs.get(p) else { continue };
        for input in drv.input_drvs.keys() {
            let red = broken.is_some_and(|b| b.step == input.to_string());
            let attrs = if red { " [color=\"#d0021b\", penwidth=2]" } else { "" };
            let _ =
                writeln!(s, "  {} -> {}{attrs};", quote(&input.to_string()), quote(&p.to_string()));
        }
    }
    if let Outcome::Verified(v) = outcome {
        for (name, path) in &v.outputs {
            let node = format!("output {name}");
            let label = format!(
                "{name}: {}",
                StorePath::parse(path)
                    .map(|p| p.base_name().to_owned())
                    .unwrap_or_else(|_| path.clone())
            );
            let _ = writeln!(
                s,
                "  {} [shape=note, label={}, color={}];",
                quote(&node),
                quote(&label),
                quote(colour)
            );
            let _ = writeln!(s, "  {} -> {};", quote(&target.to_string()), quote(&node));
        }
    }
    s.push_str("}\n");
    Ok(s)
}

/// A DOT label: quoted, keeping the `\n` line breaks written above.
fn quote_label(label: &str) -> String {
    let parts: Vec<String> =
        label.split("\\n").map(|l| l.replace('\\', "\\\\").replace('"', "\\\"")).collect();
    format!("\"{}\"", parts.join("\\n"))
}

/// `text` broken into lines of about `width` characters (joined by DOT's `\n`).
fn wrap(text: &str, width: usize) -> String {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let last = lines.last_mut().expect("one line");
        if !last.is_empty() && last.len() + word.len() > width {
            lines.push(word.to_owned());
        } else {
            if !last.is_empty() {
                last.push(' ');
            }
            last.push_str(word);
        }
    }
    lines.join("\\n")
}

/// Render DOT source as `format` with Graphviz (`dot -Tsvg`), or return it as it is.
pub fn render(dot_source: &str, format: Format) -> Result<Vec<u8>, GraphError> {
    if format == Format::Dot {
        return Ok(dot_source.as_bytes().to_vec());
    }
    let mut child = Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(GraphError::NoDot)?;
    // `dot` reads all of its input before it writes: no deadlock writing first.
    let mut stdin = child.stdin.take().expect("piped");
    stdin.write_all(dot_source.as_bytes()).map_err(|e| GraphError::Dot(e.to_string()))?;
    drop(stdin);
    let out = child.wait_with_output().map_err(|e| GraphError::Dot(e.to_string()))?;
    if !out.status.success() {
        return Err(GraphError::Dot(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    Ok(out.stdout)
}

/// Write the graph to `out` (stdout when `None`).
pub fn write(
    format: Format,
    out: Option<&PathBuf>,
    drvs: &DrvSet,
    target: &StorePath,
    outcome: &Outcome,
) -> Result<(), GraphError> {
    let bytes = render(&dot(drvs, target, outcome)?, format)?;
    match out {
        Some(path) => std::fs::write(path, bytes)
            .map_err(|source| GraphError::Write { path: path.clone(), source }),
        None => match std::io::stdout().write_all(&bytes) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                std::process::exit(i32::from(super::exit::BROKEN_PIPE))
            }
            r => r.map_err(|source| GraphError::Write { path: "stdout".into(), source }),
        },
    }
}
