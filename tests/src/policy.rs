//! Trust policies for the remote-builder VM tests: a builder's simulated root and Nix key, read
//! from its state directory, written as a policy file.

use std::path::{Path, PathBuf};

use build_trace::evidence::SimulatedRoot;
use test_support::vm::{nonce, public_key_of};

/// The name and public key (`name:base64`) of the one Nix key in a builder's state directory
/// (a simulated builder's: its name ends in `-simulated-1`).
pub fn builder_key(state: &Path) -> (String, String) {
    let public = public_key_of(state);
    let name = public.split(':').next().unwrap().to_owned();
    assert!(name.ends_with("-simulated-1"), "a simulated builder's key: {name}");
    (name, public)
}

/// A policy file in `dir` accepting the simulated roots of the builders `states` with the guest
/// image of `manifest`, and requiring besides that a signature by the Nix key of one of
/// `keys_of` (none: evidence alone).
pub fn simulated(dir: &Path, states: &[&Path], keys_of: &[&Path], manifest: &Path) -> PathBuf {
    let roots: Vec<String> = states
        .iter()
        .map(|st| {
            let root = SimulatedRoot::load(&st.join("simulated-snp"))
                .expect("the builder's simulated root");
            format!("\"{}\"", root.key_id())
        })
        .collect();
    let keys: Vec<(String, String)> = keys_of.iter().map(|st| builder_key(st)).collect();
    let key_terms: Vec<String> = keys.iter().map(|(n, _)| format!("\"key:{n}\"")).collect();
    let mut text = match key_terms.len() {
        0 => "require = \"builder:dev\"\n".to_owned(),
        1 => format!("require = {{ threshold = 2, of = [\"builder:dev\", {}] }}\n", key_terms[0]),
        _ => format!(
            "require = {{ threshold = 2, of = [\"builder:dev\", {{ threshold = 1, of = [{}] }}] }}\n",
            key_terms.join(", ")
        ),
    };
    if !keys.is_empty() {
        text.push_str("[keys]\n");
        for (name, public) in &keys {
            text.push_str(&format!("\"{name}\" = \"{public}\"\n"));
        }
    }
    text.push_str(&format!(
        "[builders.dev]\nimage_manifests = [\"{}\"]\n[builders.dev.evidence]\nsimulated_roots = [{}]\n",
        manifest.display(),
        roots.join(", ")
    ));
    let p = dir.join(format!("policy-{}.toml", nonce()));
    std::fs::write(&p, text).unwrap();
    p
}
