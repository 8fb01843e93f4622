//! Output ownership against the real Nix 2.8 (no VM): Nix instantiates and builds, in a chroot
//! store, a floating-CA derivation, a deferred input-addressed one on top of it (an input is
//! floating CA, so Nix leaves its output path empty and fixes it only after resolution, in
//! `rewriteDerivation`), an input-addressed one on top of that (deferred too), and an ordinary
//! input-addressed pair. From the `.drv` files alone and the CA output Nix accepted,
//! `build_trace::ownership::establish` must give every output path Nix gave, and the resolved
//! derivations Nix built; a derivation that declares another path is refused naming Nix's.

use std::collections::BTreeMap;
use std::process::Command;

use build_trace::ownership::{check_step, establish, load_graph, OwnershipError};
use nix_formats::derivation::{Derivation, DerivationOutput};
use nix_formats::StorePath;
use test_support::nix;

const EXPR: &str = r#"
let
  bb = builtins.path { path = ./bb; name = "busybox"; };
  sys = builtins.currentSystem;
  ia = name: script: derivation { inherit name; system = sys; builder = "${bb}/sh"; args = [ "-c" script ]; };
in rec {
  c = derivation {
    name = "own-c"; system = sys; builder = "${bb}/sh"; args = [ "-c" "echo c > $out" ];
    __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
  };
  d = ia "own-d" "cat ${c} > $out; echo d >> $out";
  e = ia "own-e" "cat ${d} > $out; echo e >> $out";
  i1 = ia "own-i1" "echo i1 > $out";
  i2 = ia "own-i2" "cat ${i1} > $out";
}
"#;

#[test]
fn output_paths_are_the_ones_nix_gives_deferred_ones_after_resolution() {
    nix::require_nix();
    let t = tempfile::tempdir().unwrap();
    nix::busybox_dir(&t.path().join("bb"));
    let file = t.path().join("own.nix");
    std::fs::write(&file, EXPR).unwrap();
    let chroot = t.path().join("store");
    let attrs = ["c", "d", "e", "i1", "i2"];
    let mut drvs = BTreeMap::new();
    for a in attrs {
        let p = nix::stdout(
            Command::new("nix-instantiate").arg("--store").arg(&chroot).arg(&file).args(["-A", a]),
        );
        drvs.insert(a, StorePath::parse(p.trim()).unwrap());
    }
    let built: BTreeMap<&str, StorePath> = attrs
        .iter()
        .zip(nix::local_build(&file, &attrs, &chroot))
        .map(|(a, p)| (*a, StorePath::parse(&p).unwrap()))
        .collect();
    let store_dir = chroot.join("nix/store");
    let read = |p: &StorePath| {
        Derivation::from_aterm(&std::fs::read(store_dir.join(p.base_name())).ok()?).ok()
    };
    // The deferred derivation's output is empty in its .drv, as Nix writes it.
    let d = read(&drvs["d"]).unwrap();
    assert_eq!(d.outputs["out"], DerivationOutput::Deferred, "d is deferred");
    // What Nix accepted for the floating-CA input: the output it built.
    let (c_drv, c_out) = (drvs["c"].clone(), built["c"].clone());
    let mut accepted =
        |drv: &StorePath, out: &str| (*drv == c_drv && out == "out").then(|| c_out.clone());

    for a in ["d", "e", "i1", "i2"] {
        let mut graph = load_graph(&drvs[a], &mut |p| read(p)).unwrap();
        let step = establish(&drvs[a], &mut graph, &mut accepted).unwrap();
        assert_eq!(step.input_addressed_paths()["out"], built[a], "{a}");
        // A deferred derivation builds as the resolved derivation Nix wrote before building
        // it; any other as itself, its input derivations' outputs among its input sources.
        let mut wrote = read(&step.drv_path).unwrap_or_else(|| panic!("{a}: {}", step.drv_path));
        if a == "d" || a == "e" {
            assert_ne!(step.drv_path, drvs[a], "{a} builds resolved");
        } else {
            assert_eq!(step.drv_path, drvs[a]);
            wrote.input_drvs.clear();
            if a == "i2" {
                wrote.input_srcs.insert(built["i1"].clone());
            }
        }
        assert_eq!(wrote, step.drv, "{a}");
        // Asked to build the step with another output path: refused, naming Nix's.
        let mut forged = step.drv.clone();
        let victim = StorePath::from_parts([3; 20], built[a].name()).unwrap();
        forged.outputs.insert("out".into(), DerivationOutput::InputAddressed(victim.clone()));
        forged.env.insert("out".into(), victim.to_string());
        match check_step(&forged, &step) {
            Err(OwnershipError::NotOwned { expected, claimed, .. }) => {
                assert_eq!((expected, claimed), (built[a].clone(), victim), "{a}");
            }
            other => panic!("{a}: {other:?}"),
        }
        check_step(&step.drv, &step).unwrap();
    }

    // A .drv declaring an input-addressed path where Nix leaves it empty (its input is
    // floating CA) is refused: its path exists only after resolution.
    let mut forged = d.clone();
    let victim = built["d"].clone();
    forged.outputs.insert("out".into(), DerivationOutput::InputAddressed(victim.clone()));
    forged.env.insert("out".into(), victim.to_string());
    let forged_path = forged.drv_path("own-d").unwrap();
    let mut get = |p: &StorePath| if *p == forged_path { Some(forged.clone()) } else { read(p) };
    let mut graph = load_graph(&forged_path, &mut get).unwrap();
    let e = establish(&forged_path, &mut graph, &mut accepted).unwrap_err();
    assert!(matches!(e, OwnershipError::Deferred { .. }), "{e}");
    // Nor does an unresolved derivation whose floating-CA input nobody accepted build.
    let mut graph = load_graph(&drvs["d"], &mut |p| read(p)).unwrap();
    let e = establish(&drvs["d"], &mut graph, &mut |_, _| None).unwrap_err();
    assert!(matches!(e, OwnershipError::NotAccepted { .. }), "{e}");
}
