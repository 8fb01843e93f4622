//! `nix-formats` against the real Nix 2.8.0: derivations, store paths, resolution, realisations,
//! narinfo and signatures, on a corpus that Nix instantiates and builds in this run (see
//! `common/mod.rs`). Every comparison is byte-for-byte with what Nix wrote or printed.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{corpus, nix, parsed, read_store_file};
use nix_formats::derivation::json::{parse_show_derivation, to_show_derivation_json};
use nix_formats::derivation::{
    hash_placeholder, Derivation, DerivationKind, DerivationOutput, DrvGraph,
};
use nix_formats::hash::{sha256, Hash};
use nix_formats::narinfo::{fingerprint, NarInfo};
use nix_formats::realisation::LegacyRealisation;
use nix_formats::resolve::{needs_resolution, resolve};
use nix_formats::signing::{PublicKey, SecretKey, Signature};
use nix_formats::store_path::{make_fixed_output_path, make_text_path, FileIngestionMethod};
use nix_formats::StorePath;

/// Every `.drv` Nix wrote for the corpus: the attributes' closures and the resolved drvs.
fn all_drvs() -> BTreeMap<StorePath, Vec<u8>> {
    let c = corpus();
    let mut roots: Vec<String> = c.drvs.values().map(|p| p.to_string()).collect();
    roots.extend(c.resolved.values().map(|p| p.to_string()));
    let mut args = vec!["-qR"];
    args.extend(roots.iter().map(String::as_str));
    nix("nix-store", &args)
        .lines()
        .map(|l| l.parse::<StorePath>().unwrap())
        .filter(StorePath::is_derivation)
        .map(|p| {
            let bytes = read_store_file(&p);
            (p, bytes)
        })
        .collect()
}

fn graph() -> (DrvGraph, BTreeMap<StorePath, Derivation>) {
    let mut g = DrvGraph::new();
    let mut m = BTreeMap::new();
    for (p, bytes) in all_drvs() {
        let d = Derivation::from_aterm(&bytes).unwrap_or_else(|e| panic!("{p}: {e}"));
        g.insert(p.clone(), d.clone());
        m.insert(p, d);
    }
    (g, m)
}

fn name(p: &StorePath) -> &str {
    p.drv_name().unwrap()
}

#[test]
fn aterm_round_trip_and_drv_paths() {
    let drvs = all_drvs();
    assert!(drvs.len() >= 16, "corpus too small: {}", drvs.len());
    for (p, bytes) in &drvs {
        let d = Derivation::from_aterm(bytes).unwrap_or_else(|e| panic!("{p}: {e}"));
        assert_eq!(d.to_aterm(), *bytes, "ATerm round trip of {p}");
        assert_eq!(&d.drv_path(name(p)).unwrap(), p, "drv path of {p}");
        d.check_output_paths(name(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    }
    // The corpus has every output kind Nix 2.8 can write.
    let kinds: BTreeSet<String> = drvs
        .iter()
        .map(|(p, b)| format!("{:?}", Derivation::from_aterm(b).unwrap().kind(name(p)).unwrap()))
        .collect();
    for k in ["InputAddressed", "Deferred", "Fixed", "Floating", "Impure"] {
        assert!(kinds.contains(k), "corpus lacks {k}: {kinds:?}");
    }
}

#[test]
fn show_derivation_json_matches_nix() {
    let drvs = all_drvs();
    let parsed: BTreeMap<StorePath, Derivation> =
        drvs.iter().map(|(p, b)| (p.clone(), Derivation::from_aterm(b).unwrap())).collect();
    let mut args = vec!["show-derivation".to_string()];
    args.extend(parsed.keys().map(|p| p.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let theirs = nix("nix", &args);
    let ours = to_show_derivation_json(parsed.iter());
    assert_eq!(ours, theirs.trim_end_matches('\n'), "nix show-derivation JSON");
    assert_eq!(parse_show_derivation(&theirs).unwrap(), parsed);
}

#[test]
fn input_addressed_output_paths_and_placeholders() {
    let (mut g, drvs) = graph();
    let mut checked = 0;
    for (p, d) in &drvs {
        let kind = d.kind(name(p)).unwrap();
        let computed = g.input_addressed_paths(d, name(p)).unwrap();
        match kind {
            DerivationKind::InputAddressed => {
                let want: BTreeMap<String, StorePath> = d
                    .outputs
                    .iter()
                    .map(|(o, out)| (o.clone(), out.path().unwrap().clone()))
                    .collect();
                assert_eq!(computed.as_ref(), Some(&want), "IA output paths of {p}");
                for (o, path) in &want {
                    assert_eq!(d.env[o], path.to_string(), "env {o} of {p}");
                }
                checked += 1;
            }
            DerivationKind::Deferred | DerivationKind::Floating | DerivationKind::Impure => {
                assert_eq!(computed, None, "{p} must be deferred")
            }
            DerivationKind::Fixed => {}
        }
        if matches!(kind, DerivationKind::Floating | DerivationKind::Impure) {
            for o in d.outputs.keys() {
                assert_eq!(d.env[o], hash_placeholder(o), "placeholder of {o} in {p}");
            }
        }
    }
    assert!(checked >= 3, "too few input-addressed derivations: {checked}");
}

/// `nix realisation info --json` of a derivation: output → (id, realisation).
fn realisations(drv: &StorePath) -> BTreeMap<String, LegacyRealisation> {
    let json = nix("nix", &["realisation", "info", "--json", &drv.to_string()]);
    let v: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    v.iter()
        .map(|r| {
            let r = LegacyRealisation::from_json(&r.to_string()).unwrap();
            (r.id.output.clone(), r)
        })
        .collect()
}

#[test]
fn realisation_ids_resolution_and_signatures() {
    let c = corpus();
    let (mut g, drvs) = graph();
    let key = SecretKey::parse(&std::fs::read_to_string(&c.secret_key).unwrap()).unwrap();
    let pk = PublicKey::parse(&std::fs::read_to_string(&c.public_key).unwrap()).unwrap();
    assert_eq!(key.public_key(), pk);
    // Output paths of every built derivation, unresolved ones by drv path.
    let mut chosen: BTreeMap<(StorePath, String), StorePath> = BTreeMap::new();
    for (attr, outs) in &c.outputs {
        for (o, p) in outs {
            chosen.insert((c.drv(attr).clone(), o.clone()), p.clone());
        }
    }
    let mut built: Vec<StorePath> = c.outputs.keys().map(|a| c.drv(a).clone()).collect();
    built.extend(c.resolved.values().cloned());
    let mut n_real = 0;
    for drv_path in &built {
        let d = &drvs[drv_path];
        let ids = g.realisation_ids(d, name(drv_path)).unwrap();
        let theirs = realisations(drv_path);
        assert!(!theirs.is_empty(), "Nix has no realisation for {drv_path}");
        for (o, r) in &theirs {
            assert_eq!(ids[o], r.id.to_string(), "realisation id of {drv_path}!{o}");
            // Nix signed it with our key; our own signature is byte-identical (ed25519 is deterministic).
            assert_eq!(r.count_valid_signatures(std::slice::from_ref(&pk)), 1, "{drv_path}!{o}");
            let mut ours = r.clone();
            ours.signatures.clear();
            ours.sign(&key);
            assert_eq!(ours.signatures, r.signatures, "signature of {drv_path}!{o}");
            n_real += 1;
        }
    }
    assert!(n_real >= 10, "too few realisations checked: {n_real}");

    // Resolution: what Nix printed ("resolved derivation: 'A' -> 'B'") and wrote.
    assert!(c.resolved.len() >= 4, "Nix resolved too few derivations: {:?}", c.resolved);
    for (unresolved, resolved_path) in &c.resolved {
        let d = &drvs[unresolved];
        assert!(needs_resolution(d, name(unresolved)).unwrap());
        let r = resolve(d, name(unresolved), &mut |i, o| {
            chosen.get(&(i.clone(), o.to_owned())).cloned()
        })
        .unwrap_or_else(|e| panic!("{unresolved}: {e}"));
        assert_eq!(&r.drv_path, resolved_path, "resolved drv path of {unresolved}");
        assert_eq!(
            r.drv.to_aterm(),
            read_store_file(resolved_path),
            "resolved ATerm of {unresolved}"
        );
        for (o, real) in realisations(resolved_path) {
            assert_eq!(r.legacy_id(&o).unwrap(), real.id, "resolved id of {unresolved}!{o}");
            assert_eq!(r.key(&o).unwrap().drv_path, *resolved_path);
        }
    }
}

#[test]
fn binary_cache_narinfo_and_realisation_files() {
    let c = corpus();
    let pk = PublicKey::parse(&std::fs::read_to_string(&c.public_key).unwrap()).unwrap();
    let cache = c.dir.join("cache");
    let url = format!("file://{}?compression=none", cache.display());
    let corpus_file = c.dir.join("corpus.nix");
    let mut args = vec!["copy", "--to", &url, "-f", corpus_file.to_str().unwrap()];
    args.extend(c.args.iter().map(String::as_str));
    args.extend(["caChain", "iaDeferred"]);
    nix("nix", &args);
    let mut narinfos = 0;
    for entry in std::fs::read_dir(&cache).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "narinfo") {
            let text = std::fs::read_to_string(&path).unwrap();
            let n = NarInfo::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(n.to_text(), text, "narinfo round trip of {}", path.display());
            if !n.sigs.is_empty() {
                assert_eq!(
                    n.count_valid_signatures(std::slice::from_ref(&pk)).unwrap(),
                    1,
                    "{}",
                    path.display()
                );
            }
            narinfos += 1;
        }
    }
    assert!(narinfos >= 8, "too few narinfos: {narinfos}");
    let mut dois = 0;
    for entry in std::fs::read_dir(cache.join("realisations")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let r = LegacyRealisation::from_json(&text).unwrap();
        assert_eq!(r.to_json(), text, "realisation file {}", path.display());
        assert_eq!(r.count_valid_signatures(std::slice::from_ref(&pk)), 1);
        dois += 1;
    }
    assert!(dois >= 5, "too few realisation files: {dois}");
}

#[test]
fn path_info_fingerprints_signatures_and_content_addresses() {
    let c = corpus();
    let key = SecretKey::parse(&std::fs::read_to_string(&c.secret_key).unwrap()).unwrap();
    let pk = key.public_key();
    let mut paths: Vec<String> =
        c.outputs.values().flat_map(|o| o.values()).map(|p| p.to_string()).collect();
    paths.sort();
    let mut args = vec!["path-info", "--json", "--sigs"];
    args.extend(paths.iter().map(String::as_str));
    let v: Vec<serde_json::Value> = serde_json::from_str(&nix("nix", &args)).unwrap();
    let mut ca_checked = 0;
    for info in &v {
        let path: StorePath = info["path"].as_str().unwrap().parse().unwrap();
        let nar_hash: Hash = info["narHash"].as_str().unwrap().parse().unwrap();
        let refs: BTreeSet<StorePath> = parsed(&info["references"]);
        let fp = fingerprint(&path, &nar_hash, info["narSize"].as_u64().unwrap(), &refs);
        let sigs: Vec<Signature> = parsed(&info["signatures"]);
        assert!(sigs.iter().any(|s| pk.verify(fp.as_bytes(), s)), "Nix's signature on {path}");
        assert!(sigs.contains(&key.sign(fp.as_bytes())), "our signature of {path} equals Nix's");
        // Content-addressed outputs: the `ca` field reproduces the path.
        if let Some(ca) = info["ca"].as_str() {
            let (method, h) = match ca.strip_prefix("fixed:r:") {
                Some(h) => (FileIngestionMethod::Recursive, h),
                None => (FileIngestionMethod::Flat, ca.strip_prefix("fixed:").unwrap()),
            };
            let h: Hash = h.parse().unwrap();
            let self_ref = refs.contains(&path);
            let others: BTreeSet<StorePath> =
                refs.iter().filter(|r| **r != path).cloned().collect();
            let p = make_fixed_output_path(path.name(), method, &h, &others, self_ref).unwrap();
            assert_eq!(p, path, "CA path from {ca}");
            ca_checked += 1;
        }
    }
    assert!(ca_checked >= 6, "too few content-addressed outputs: {ca_checked}");
}

#[test]
fn text_and_source_input_paths() {
    let c = corpus();
    let (_, drvs) = graph();
    let top = &drvs[c.drv("caTop")];
    let mut text = 0;
    let mut source = 0;
    for src in &top.input_srcs {
        if src.name().starts_with("note-") {
            let bytes = read_store_file(src);
            let p = make_text_path(src.name(), &Hash::sha256(sha256(&bytes)), &BTreeSet::new())
                .unwrap();
            assert_eq!(&p, src, "builtins.toFile path");
            text += 1;
        }
    }
    for src in &top.input_srcs {
        if src.name() == "busybox" {
            let h: Hash =
                nix("nix-store", &["-q", "--hash", &src.to_string()]).trim().parse().unwrap();
            let p = make_fixed_output_path(
                "busybox",
                FileIngestionMethod::Recursive,
                &h,
                &BTreeSet::new(),
                false,
            );
            assert_eq!(&p.unwrap(), src, "builtins.path source path");
            source += 1;
        }
    }
    assert_eq!((text, source), (1, 1));
    // Fixed outputs come out where the drv says (flat sha256, recursive sha256, recursive sha1).
    for attr in ["fodFlat", "fodRec", "fodRecSha1"] {
        let d = &drvs[c.drv(attr)];
        let DerivationOutput::Fixed { path, .. } = &d.outputs["out"] else {
            panic!("{attr} not fixed")
        };
        assert_eq!(path, &c.outputs[attr]["out"]);
    }
}

#[test]
fn generated_keys_work_with_nix() {
    let c = corpus();
    let key = SecretKey::generate(&format!("vouch-gen-{}", c.tag));
    let sk_file = c.dir.join("generated.key");
    std::fs::write(&sk_file, key.to_file_string()).unwrap();
    let path = c.outputs["iaPlain"]["out"].to_string();
    nix("nix", &["store", "sign", "--key-file", sk_file.to_str().unwrap(), &path]);
    let v: Vec<serde_json::Value> =
        serde_json::from_str(&nix("nix", &["path-info", "--json", "--sigs", &path])).unwrap();
    let info = &v[0];
    let refs: BTreeSet<StorePath> = parsed(&info["references"]);
    let fp = fingerprint(
        &path.parse().unwrap(),
        &info["narHash"].as_str().unwrap().parse().unwrap(),
        info["narSize"].as_u64().unwrap(),
        &refs,
    );
    let ours = key.sign(fp.as_bytes()).to_string();
    let sigs: Vec<&str> =
        info["signatures"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert!(sigs.contains(&ours.as_str()), "Nix's signature with our key: {sigs:?}");
    // Nix accepts our public key text as a trusted key and finds the signature valid.
    let trusted = format!("trusted-public-keys = {}", key.public_key());
    let out = common::nix::command("nix")
        .env("NIX_CONFIG", format!("{}{trusted}\n", common::nix::NIX_CONFIG))
        .args(["store", "verify", "--no-contents", "--sigs-needed", "1", &path])
        .output()
        .unwrap();
    assert!(out.status.success(), "nix store verify: {}", String::from_utf8_lossy(&out.stderr));
    // And with an unrelated trusted key, the same check fails (the test can fail).
    let other = SecretKey::generate("other").public_key();
    let out = common::nix::command("nix")
        .env("NIX_CONFIG", format!("{}trusted-public-keys = {other}\n", common::nix::NIX_CONFIG))
        .args(["store", "verify", "--no-contents", "--sigs-needed", "1", &path])
        .output()
        .unwrap();
    assert!(!out.status.success(), "nix store verify must reject an untrusted signer");
}
