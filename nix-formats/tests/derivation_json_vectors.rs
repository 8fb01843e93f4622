//! The derivation JSON of two real Nix releases (`tests/data/derivation-json/`, with its
//! provenance): Nix 2.8.0's `nix show-derivation` and Nix 2.26.3's `nix derivation show`, of the
//! same nine derivations, both parse to exactly the derivations of the `.drv` files, and Nix 2.8's
//! is printed back byte for byte.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nix_formats::derivation::json::{parse_show_derivation, to_show_derivation_json};
use nix_formats::derivation::Derivation;
use nix_formats::StorePath;

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/derivation-json")
}

fn read(name: &str) -> String {
    let p = data().join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The `.drv` files, parsed from ATerm.
fn aterms() -> BTreeMap<StorePath, Derivation> {
    let dir = data().join("drv");
    std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_str().unwrap();
            let path = StorePath::parse(&format!("/nix/store/{name}")).unwrap();
            let d = Derivation::from_aterm(&std::fs::read(&p).unwrap()).unwrap();
            (path, d)
        })
        .collect()
}

#[test]
fn nix_2_8_and_2_26_json_both_parse_to_the_drv_files() {
    let want = aterms();
    assert_eq!(want.len(), 9);
    for file in ["nix-2.8.0-show-derivation.json", "nix-2.26.3-derivation-show.json"] {
        let got = parse_show_derivation(&read(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(got, want, "{file}");
    }
}

#[test]
fn nix_2_8_json_is_printed_back_byte_for_byte() {
    let text = read("nix-2.8.0-show-derivation.json");
    let drvs = aterms();
    assert_eq!(to_show_derivation_json(&drvs), text.trim_end());
}

#[test]
fn nix_2_26_shape_errors_name_the_problem() {
    let text = read("nix-2.26.3-derivation-show.json");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let c2 = "/nix/store/rgwk3dk5r2g9w3lbygi4h19hdkc4wk69-nb-c2.drv";
    let c1 = "/nix/store/4y80rkdbzbhl9gqvd7169yc59zn035di-nb-c1.drv";
    let fod = "/nix/store/nxa7wds70ir9575v3xk90rzlpa4502vg-nb-fod.drv";
    let err = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = v.clone();
        edit(&mut v);
        parse_show_derivation(&v.to_string()).unwrap_err().to_string()
    };
    let e = err(&|v| v[c2]["name"] = "other".into());
    assert!(e.contains("\"name\": \"other\", not \"nb-c2\""), "{e}");
    let e = err(&|v| v[c2]["inputDrvs"][c1]["dynamicOutputs"]["out"] = serde_json::json!({}));
    assert!(e.contains("dynamicOutputs") && e.contains("not supported"), "{e}");
    let e = err(&|v| v[fod]["outputs"]["out"]["method"] = "zip".into());
    assert!(e.contains("unknown method \"zip\""), "{e}");
    let e = err(&|v| v[fod]["outputs"]["out"]["hashAlgo"] = "r:sha256".into());
    assert!(e.contains("bare algorithm"), "{e}");
    let e = err(&|v| v[c2]["structuredAttrs"] = serde_json::json!({}));
    assert!(e.contains("Nix 2.30 or later"), "{e}");
    let e = err(&|v| v[c2]["version"] = 3.into());
    assert!(e.contains("Nix 2.32 or later"), "{e}");
    // The method decides, not a guess: a fixed output's method is part of its path.
    let mut v2 = v.clone();
    v2[fod]["outputs"]["out"]["method"] = "nar".into();
    let d = parse_show_derivation(&v2.to_string()).unwrap();
    assert_ne!(d[&StorePath::parse(fod).unwrap()], aterms()[&StorePath::parse(fod).unwrap()]);
}
