//! NAR, references, content addresses and CA output paths compared with the real Nix 2.8.
//!
//! `nar_ca.nix` is built once per run (random tag, so Nix really builds). Each builder copies its
//! outputs to a capture directory before exiting, i.e. exactly the trees Nix then hashes at their
//! scratch paths, and records the `$out` it was given. The CA test recomputes every output from
//! those captured scratch trees — scratch path, references, CA hash under Nix 2.8's self-reference
//! rule, final path, NAR hash and size, `ca`, and the final NAR bytes — and compares each with
//! what Nix registered. Nothing is derived from Nix's results except the comparison. The test
//! fails if `nix` or busybox is missing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::PathBuf;
use std::sync::OnceLock;

use common::{kept_dir, nix, output_maps, parse_resolved, parsed, run_nix};
use nix_formats::ca::{compute_ca_outputs, scratch_path, CaOutputSpec, SelfRefRule};
use nix_formats::content_address::{verify, ContentAddress, VerifyError};
use nix_formats::hash::{Hash, HashAlgo};
use nix_formats::nar::{dump_path, hash_path, unpack, NarDump, NarLimits, UnpackOptions};
use nix_formats::refs::{hash_and_scan, scan_references};
use nix_formats::store_path::FileIngestionMethod;
use nix_formats::StorePath;

const BUILT: &[&str] = &["tree", "dep", "multi", "top", "flat", "sha512", "user"];

struct Fixture {
    cap: PathBuf,
    drvs: BTreeMap<String, StorePath>,
    outputs: BTreeMap<String, BTreeMap<String, StorePath>>,
    resolved: BTreeMap<StorePath, StorePath>,
    bb: StorePath,
    note: StorePath,
    nix_version: String,
}

impl Fixture {
    fn all_paths(&self) -> BTreeSet<StorePath> {
        let mut s: BTreeSet<StorePath> =
            self.outputs.values().flat_map(|m| m.values().cloned()).collect();
        s.insert(self.bb.clone());
        s.insert(self.note.clone());
        s
    }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let nix_version = nix("nix", &["--version"]).trim().to_owned();
        let dir = kept_dir("nix-formats-nar-ca-");
        let file = dir.join("nar_ca.nix");
        std::fs::write(&file, include_str!("nar_ca.nix")).unwrap();
        let cap = dir.join("capture");
        std::fs::create_dir(&cap).unwrap();
        let tag = common::nix::nonce();
        let (file_s, cap_s) = (file.to_str().unwrap(), cap.to_str().unwrap());
        let import = format!("(import {file_s} {{ tag = \"{tag}\"; cap = \"{cap_s}\"; }})");
        let eval = |e: &str| -> serde_json::Value {
            serde_json::from_str(&nix(
                "nix-instantiate",
                &["--eval", "--strict", "--json", "--expr", e],
            ))
            .unwrap()
        };
        let drvs: BTreeMap<String, StorePath> = BUILT
            .iter()
            .map(|a| {
                (
                    a.to_string(),
                    eval(&format!("{import}.{a}.drvPath")).as_str().unwrap().parse().unwrap(),
                )
            })
            .collect();
        let note: StorePath = eval(&format!("{import}.note")).as_str().unwrap().parse().unwrap();
        let builder = eval(&format!("{import}.tree.builder"));
        let bb: StorePath = builder.as_str().unwrap().strip_suffix("/sh").unwrap().parse().unwrap();
        let mut args =
            vec![file_s, "--argstr", "tag", &tag, "--argstr", "cap", cap_s, "--no-out-link", "-v"];
        for a in BUILT {
            args.extend(["-A", a]);
        }
        let log = String::from_utf8_lossy(&run_nix("nix-build", &args).stderr).into_owned();
        let resolved = parse_resolved(&log);
        let by_drv = output_maps(drvs.values());
        let outputs = drvs.iter().map(|(a, d)| (a.clone(), by_drv[d].clone())).collect();
        Fixture { cap, drvs, outputs, resolved, bb, note, nix_version }
    })
}

fn dump_bytes(p: &StorePath) -> Vec<u8> {
    run_nix("nix-store", &["--dump", &p.to_string()]).stdout
}

fn nix_refs(p: &StorePath) -> BTreeSet<StorePath> {
    nix("nix-store", &["-q", "--references", &p.to_string()])
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

fn nix_hash(p: &StorePath) -> Hash {
    Hash::parse_prefixed(nix("nix-store", &["-q", "--hash", &p.to_string()]).trim()).unwrap()
}

fn path_info(p: &StorePath) -> serde_json::Value {
    let s = p.to_string();
    let mut args = vec!["path-info", "--json", &s];
    if p.is_derivation() {
        args.insert(2, "--derivation");
    }
    serde_json::from_str::<serde_json::Value>(&nix("nix", &args)).unwrap()[0].clone()
}

#[test]
fn nar_bytes_hashes_sizes_and_references_match_nix() {
    let f = fixture();
    let candidates = f.all_paths();
    let tree = &f.outputs["tree"]["out"];
    // The tree really has every kind of node.
    let t = PathBuf::from(tree.to_string());
    assert!(std::fs::symlink_metadata(t.join("rel-link")).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::metadata(t.join("empty")).unwrap().len(), 0);
    assert_eq!(std::fs::read_dir(t.join("emptydir")).unwrap().count(), 0);
    assert_eq!(nix_refs(tree), [f.bb.clone()].into());

    for p in &candidates {
        let want = dump_bytes(p);
        let mut got = Vec::new();
        assert_eq!(dump_path(p.to_string(), &mut got).unwrap(), want.len() as u64);
        assert!(got == want, "NAR of {p} differs from nix-store --dump");
        let d = hash_path(p.to_string()).unwrap();
        assert_eq!(Hash::sha256(d.sha256), nix_hash(p), "NAR hash of {p}");
        assert_eq!(
            d.size.to_string(),
            nix("nix-store", &["-q", "--size", &p.to_string()]).trim(),
            "NAR size of {p}"
        );
        let refs =
            scan_references(NarDump::new(p.to_string()), candidates.iter().cloned()).unwrap();
        assert_eq!(refs, nix_refs(p), "references of {p}");
        let one_pass =
            hash_and_scan(NarDump::new(p.to_string()), candidates.iter().cloned()).unwrap();
        assert_eq!(one_pass, (d, refs), "one-pass hash and scan of {p}");

        // Unpacking Nix's NAR and dumping it again gives the same bytes, canonical or not.
        for canonical in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let dest = tmp.path().join("o");
            unpack(&want[..], &dest, &UnpackOptions { canonical, ..Default::default() }).unwrap();
            let mut again = Vec::new();
            dump_path(&dest, &mut again).unwrap();
            assert!(again == want, "unpack + dump of {p} (canonical {canonical})");
            make_writable(&dest);
        }
    }
}

fn make_writable(p: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::symlink_metadata(p).map(|m| m.is_dir()).unwrap_or(false) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        for e in std::fs::read_dir(p).unwrap() {
            make_writable(&e.unwrap().path());
        }
    }
}

#[test]
fn nix_hash_path_of_a_plain_tree() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("x");
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    std::fs::write(root.join("a/b/f"), vec![0xab; 4097]).unwrap();
    std::fs::write(root.join("Z"), b"").unwrap();
    std::os::unix::fs::symlink("a/b/f", root.join("l")).unwrap();
    let want = nix("nix", &["hash", "path", "--type", "sha256", root.to_str().unwrap()]);
    let got = Hash::sha256(hash_path(&root).unwrap().sha256);
    assert_eq!(got, Hash::parse_prefixed(want.trim()).unwrap());
}

fn specs_of(attr: &str, outs: &BTreeMap<String, StorePath>) -> Vec<CaOutputSpec> {
    let (method, algo) = match attr {
        "flat" => (FileIngestionMethod::Flat, HashAlgo::Sha256),
        "sha512" => (FileIngestionMethod::Recursive, HashAlgo::Sha512),
        _ => (FileIngestionMethod::Recursive, HashAlgo::Sha256),
    };
    outs.keys().map(|n| CaOutputSpec { name: n.clone(), method, algo }).collect()
}

#[test]
fn ca_output_paths_match_nix_2_8() {
    let f = fixture();
    let (major, minor) = version(&f.nix_version);
    let rule = SelfRefRule::for_nix_version(major, minor);
    assert_eq!(
        (major, minor, rule),
        (2, 8, SelfRefRule::ZeroAndPositions),
        "these vectors are for Nix 2.8"
    );
    let candidates = f.all_paths();
    let mut self_referencing = 0;
    for attr in ["dep", "multi", "top", "flat", "sha512"] {
        let outs = &f.outputs[attr];
        let drv = &f.drvs[attr];
        // Floating CA derivations with input derivations are built resolved.
        let built_drv = f.resolved.get(drv).unwrap_or(drv);
        assert_eq!(
            f.resolved.contains_key(drv),
            attr == "multi" || attr == "top",
            "{attr} resolution"
        );
        let capdir = f.cap.join(drv.drv_name().unwrap());
        for o in outs.keys() {
            let captured = std::fs::read_to_string(capdir.join(format!("{o}.path"))).unwrap();
            assert_eq!(
                scratch_path(built_drv, o).unwrap().to_string(),
                captured,
                "scratch path of {attr}.{o}"
            );
        }
        let open = |o: &str| Ok(NarDump::new(capdir.join(o)));
        let specs = specs_of(attr, outs);
        let res =
            compute_ca_outputs(built_drv, &specs, &candidates, rule, &NarLimits::default(), open)
                .unwrap();
        for (o, want_path) in outs {
            let r = &res[o];
            assert_eq!(&r.path, want_path, "path of {attr}.{o}");
            assert_eq!(r.nar_hash, nix_hash(want_path), "NAR hash of {attr}.{o}");
            let info = path_info(want_path);
            assert_eq!(r.nar_size, info["narSize"].as_u64().unwrap(), "NAR size of {attr}.{o}");
            assert_eq!(r.ca.to_string(), info["ca"].as_str().unwrap(), "ca of {attr}.{o}");
            assert_eq!(r.references, nix_refs(want_path), "references of {attr}.{o}");
            let mut fin = Vec::new();
            r.final_nar(NarDump::new(capdir.join(o))).read_to_end(&mut fin).unwrap();
            assert!(
                fin == dump_bytes(want_path),
                "final NAR of {attr}.{o} differs from nix-store --dump"
            );
            if r.references.contains(&r.path) {
                self_referencing += 1;
                // The test can tell the rules apart: 2.17–2.34 would give another path.
                let other = compute_ca_outputs(
                    built_drv,
                    &specs,
                    &candidates,
                    SelfRefRule::ZeroOnly,
                    &NarLimits::default(),
                    open,
                )
                .unwrap();
                assert_ne!(other[o].path, r.path, "{attr}.{o} under the 2.17 rule");
            }
        }
    }
    assert!(self_referencing >= 3, "the corpus must exercise self-references");
}

fn version(v: &str) -> (u32, u32) {
    let num = v.rsplit(' ').next().unwrap();
    let mut it = num.split('.').map(|x| x.parse::<u32>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

#[test]
fn content_addresses_check_out_against_nix() {
    let f = fixture();
    let rule = SelfRefRule::for_nix_version(2, 8);
    let lim = NarLimits::default();
    let mut checked = BTreeMap::new();
    let mut paths: Vec<StorePath> = ["dep", "multi", "top", "flat", "sha512"]
        .iter()
        .flat_map(|a| f.outputs[*a].values().cloned())
        .collect();
    paths.extend([f.bb.clone(), f.note.clone()]);
    paths.extend(f.drvs.values().cloned());
    for p in &paths {
        let info = path_info(p);
        let ca_s = info["ca"].as_str().unwrap_or_else(|| panic!("{p} has no ca"));
        let ca = ContentAddress::parse(ca_s).unwrap();
        assert_eq!(ca.to_string(), ca_s);
        let refs: BTreeSet<StorePath> = parsed(&info["references"]);
        let nar = dump_bytes(p);
        verify(p, &ca, &refs, &nar[..], rule, &lim).unwrap_or_else(|e| panic!("{p}: {e}"));
        *checked.entry(ca_s.split(':').take(2).collect::<Vec<_>>().join(":")).or_insert(0) += 1;

        // One changed content byte: the claim no longer holds.
        let mut bad = nar.clone();
        let at = bad.len() - 17;
        bad[at] ^= 1;
        match verify(p, &ca, &refs, &bad[..], rule, &lim) {
            Err(VerifyError::HashMismatch { .. } | VerifyError::Nar(_)) => {}
            other => panic!("{p}: tampered NAR gave {other:?}"),
        }
    }
    for kind in ["fixed:r", "fixed:sha256", "text:sha256"] {
        assert!(checked.contains_key(kind), "no {kind} path checked: {checked:?}");
    }
}
