//! The JSON of `nix show-derivation` / `nix derivation show`: print in Nix 2.8's shape
//! (byte-exact), parse the shapes of Nix 2.8–2.29.
//!
//! Nix 2.8–2.14 (`nix show-derivation`):
//! ```text
//! { "/nix/store/…-x.drv": { "outputs": { "out": { "path": …, "hashAlgo": …, "hash": … } },
//!   "inputSrcs": [ … ], "inputDrvs": { "/nix/store/…-y.drv": [ "out" ] }, "system": …,
//!   "builder": …, "args": [ … ], "env": { … } } }
//! ```
//! Output objects carry only the fields that apply: `path` (input-addressed, fixed), `hashAlgo`
//! (fixed, floating, impure; with the method as a prefix: `r:sha256`, `text:sha256`), `hash`
//! (fixed, base16), `"impure": true`; deferred outputs are `{}`.
//! Printing follows Nix 2.8's own JSON writer: keys in the order above, two-space indentation,
//! `\"`, `\\`, `\n`, `\r`, `\t` escaped and other control characters as `\u00XX`.
//!
//! Later releases changed the shape in three steps (read in NixOS/nix at each tag, and checked
//! against the real Nix 2.26.3 in `tests/tests/nix_versions_vm.rs`):
//! * 2.15: a `"name"` key (the derivation's name; it must match the drv path's);
//! * 2.18: `inputDrvs` values are objects `{"outputs": [ … ], "dynamicOutputs": { … }}`
//!   (dynamic derivations, which vouch does not build: a non-empty `dynamicOutputs` is refused);
//! * 2.24: outputs say the method apart, `"method": "nar" | "flat" | "text" | "git"`, and
//!   `hashAlgo` is the bare algorithm (`sha256`).
//!
//! Parsing accepts these (each derivation object in either shape) and is strict otherwise:
//! unknown keys are errors naming the key, so JSON from a newer Nix is rejected rather than
//! misread. Nix 2.30 added `structuredAttrs` and 2.32 a `version` key and other changes; they are
//! refused by name. Not here: running Nix.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use serde_json::Value;

use super::{Derivation, DerivationError, DerivationOutput};
use crate::store_path::StorePath;

enum J<'a> {
    Str(&'a str),
    True,
    List(Vec<J<'a>>),
    Obj(Vec<(&'a str, J<'a>)>),
}

fn esc(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn indent(out: &mut String, depth: usize) {
    out.push('\n');
    out.extend(std::iter::repeat_n(' ', depth * 2));
}

fn write_j(out: &mut String, j: &J<'_>, depth: usize) {
    match j {
        J::Str(s) => esc(out, s),
        J::True => out.push_str("true"),
        J::List(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, depth + 1);
                write_j(out, v, depth + 1);
            }
            if !items.is_empty() {
                indent(out, depth);
            }
            out.push(']');
        }
        J::Obj(items) => {
            out.push('{');
            for (i, (k, v)) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, depth + 1);
                esc(out, k);
                out.push_str(": ");
                write_j(out, v, depth + 1);
            }
            if !items.is_empty() {
                indent(out, depth);
            }
            out.push('}');
        }
    }
}

/// Prints derivations exactly as `nix show-derivation` (Nix 2.8) prints them, without the final
/// newline. Keys are the drv paths, in sorted order.
pub fn to_show_derivation_json<'a>(
    drvs: impl IntoIterator<Item = (&'a StorePath, &'a Derivation)>,
) -> String {
    let mut sorted: Vec<_> = drvs.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let paths: Vec<String> = sorted.iter().map(|(p, _)| p.to_string()).collect();
    let prepared: Vec<Prepared> = sorted.iter().map(|(_, d)| Prepared::new(d)).collect();
    let items = paths.iter().zip(&prepared).map(|(p, d)| (p.as_str(), d.tree())).collect();
    let mut out = String::new();
    write_j(&mut out, &J::Obj(items), 0);
    out
}

/// Strings the JSON tree borrows from.
struct Prepared<'a> {
    d: &'a Derivation,
    outputs: Vec<(&'a str, (String, String, String), bool)>,
    srcs: Vec<String>,
    drvs: Vec<(String, &'a BTreeSet<String>)>,
}

impl<'a> Prepared<'a> {
    fn new(d: &'a Derivation) -> Self {
        Self {
            d,
            outputs: d
                .outputs
                .iter()
                .map(|(k, o)| {
                    let impure = matches!(o, DerivationOutput::Impure { .. });
                    (k.as_str(), o.to_triple(), impure)
                })
                .collect(),
            srcs: d.input_srcs.iter().map(|p| p.to_string()).collect(),
            drvs: d.input_drvs.iter().map(|(p, o)| (p.to_string(), o)).collect(),
        }
    }

    fn tree(&self) -> J<'_> {
        let outputs = self
            .outputs
            .iter()
            .map(|(name, (path, algo, hash), impure)| {
                let mut o = Vec::new();
                if !path.is_empty() {
                    o.push(("path", J::Str(path)));
                }
                if !algo.is_empty() {
                    o.push(("hashAlgo", J::Str(algo)));
                }
                if *impure {
                    o.push(("impure", J::True));
                } else if !hash.is_empty() {
                    o.push(("hash", J::Str(hash)));
                }
                (*name, J::Obj(o))
            })
            .collect();
        let strs = |v: &'a [String]| J::List(v.iter().map(|s| J::Str(s)).collect());
        J::Obj(vec![
            ("outputs", J::Obj(outputs)),
            ("inputSrcs", J::List(self.srcs.iter().map(|s| J::Str(s)).collect())),
            (
                "inputDrvs",
                J::Obj(
                    self.drvs
                        .iter()
                        .map(|(p, o)| (p.as_str(), J::List(o.iter().map(|s| J::Str(s)).collect())))
                        .collect(),
                ),
            ),
            ("system", J::Str(&self.d.platform)),
            ("builder", J::Str(&self.d.builder)),
            ("args", strs(&self.d.args)),
            ("env", J::Obj(self.d.env.iter().map(|(k, v)| (k.as_str(), J::Str(v))).collect())),
        ])
    }
}

impl Derivation {
    /// This derivation as `nix show-derivation` prints it under the key `drv_path`.
    pub fn to_show_derivation_json(&self, drv_path: &StorePath) -> String {
        to_show_derivation_json([(drv_path, self)])
    }

    /// Parses one derivation object (the value under a drv path in `nix show-derivation` or
    /// `nix derivation show`, Nix 2.8–2.29), and its `name` if it has one (Nix ≥ 2.15).
    pub fn from_json_value(v: &Value) -> Result<Self, DerivationError> {
        Ok(parse_object(v)?.0)
    }
}

/// A derivation object and its `name` key (Nix ≥ 2.15).
fn parse_object(v: &Value) -> Result<(Derivation, Option<&str>), DerivationError> {
    let obj = object(v, "derivation")?;
    for (k, since) in [("structuredAttrs", "2.30"), ("version", "2.32")] {
        if obj.contains_key(k) {
            return Err(bad(&format!(
                "key {k:?}: the derivation JSON of Nix {since} or later, which vouch does not read \
                 yet (give the .drv files instead: --drv-dir)"
            )));
        }
    }
    known_keys(
        obj,
        &["name", "outputs", "inputSrcs", "inputDrvs", "system", "builder", "args", "env"],
        "derivation",
    )?;
    let name = obj.get("name").map(|n| string(n, "name")).transpose()?;
    let mut d = Derivation::default();
    for (name, o) in object(field(obj, "outputs")?, "outputs")? {
        d.outputs.insert(name.clone(), parse_output(name, o)?);
    }
    for s in array(field(obj, "inputSrcs")?, "inputSrcs")? {
        d.input_srcs.insert(path(string(s, "inputSrcs")?, "input source")?);
    }
    for (p, outs) in object(field(obj, "inputDrvs")?, "inputDrvs")? {
        // Nix ≥ 2.18: {"outputs": [...], "dynamicOutputs": {...}}; before: the list.
        let list = match outs {
            Value::Object(o) => {
                known_keys(o, &["outputs", "dynamicOutputs"], "inputDrvs entry")?;
                if let Some(dy) = o.get("dynamicOutputs") {
                    if !object(dy, "dynamicOutputs")?.is_empty() {
                        return Err(bad(&format!(
                            "input derivation {p} has dynamicOutputs (dynamic derivations are \
                             not supported)"
                        )));
                    }
                }
                field(o, "outputs")?
            }
            other => other,
        };
        let outs = array(list, "inputDrvs outputs")?
            .iter()
            .map(|o| string(o, "inputDrvs output").map(str::to_owned))
            .collect::<Result<BTreeSet<_>, _>>()?;
        d.input_drvs.insert(path(p, "input derivation")?, outs);
    }
    d.platform = string(field(obj, "system")?, "system")?.to_owned();
    d.builder = string(field(obj, "builder")?, "builder")?.to_owned();
    d.args = array(field(obj, "args")?, "args")?
        .iter()
        .map(|a| string(a, "args").map(str::to_owned))
        .collect::<Result<_, _>>()?;
    for (k, v) in object(field(obj, "env")?, "env")? {
        d.env.insert(k.clone(), string(v, "env value")?.to_owned());
    }
    Ok((d, name))
}

/// One output object: `hashAlgo` with the method as a prefix (Nix < 2.24), or `method` and the
/// bare `hashAlgo` (Nix ≥ 2.24).
fn parse_output(name: &str, o: &Value) -> Result<DerivationOutput, DerivationError> {
    let oo = object(o, "output")?;
    known_keys(oo, &["path", "method", "hashAlgo", "hash", "impure"], "output")?;
    let get =
        |k: &str| -> Result<&str, DerivationError> { oo.get(k).map_or(Ok(""), |v| string(v, k)) };
    let impure = match oo.get("impure") {
        None => false,
        Some(Value::Bool(true)) => true,
        Some(_) => return Err(bad("\"impure\" must be true when present")),
    };
    if impure && oo.contains_key("hash") {
        return Err(bad("an impure output must not have \"hash\""));
    }
    let hash = if impure { "impure" } else { get("hash")? };
    let algo = match oo.get("method") {
        None => get("hashAlgo")?.to_owned(),
        Some(m) => {
            let prefix = match string(m, "method")? {
                "nar" => "r:",
                "flat" => "",
                "text" => "text:",
                "git" => "git:",
                other => return Err(bad(&format!("output {name:?}: unknown method {other:?}"))),
            };
            let algo = get("hashAlgo")?;
            if algo.is_empty() || algo.contains(':') {
                return Err(bad(&format!(
                    "output {name:?}: with \"method\", \"hashAlgo\" must be a bare algorithm"
                )));
            }
            format!("{prefix}{algo}")
        }
    };
    DerivationOutput::from_triple(name, get("path")?, &algo, hash)
}

/// Parses the whole output of `nix show-derivation` (Nix 2.8–2.14) or `nix derivation show`
/// (2.15–2.29): drv path → derivation.
pub fn parse_show_derivation(
    json: &str,
) -> Result<BTreeMap<StorePath, Derivation>, DerivationError> {
    let v: Value = serde_json::from_str(json).map_err(|e| DerivationError::Json(e.to_string()))?;
    let mut all = BTreeMap::new();
    for (p, v) in object(&v, "top level")? {
        let drv_path = path(p, "derivation key")?;
        let (d, name) = parse_object(v)?;
        if let Some(name) = name {
            let want = drv_path.drv_name().map_err(|source| DerivationError::StorePath {
                what: "derivation key".to_owned(),
                source,
            })?;
            if name != want {
                return Err(bad(&format!("{p} has \"name\": {name:?}, not {want:?}")));
            }
        }
        all.insert(drv_path, d);
    }
    Ok(all)
}

fn bad(msg: &str) -> DerivationError {
    DerivationError::Json(msg.to_owned())
}

fn field<'a>(o: &'a serde_json::Map<String, Value>, k: &str) -> Result<&'a Value, DerivationError> {
    o.get(k).ok_or_else(|| bad(&format!("missing key {k:?}")))
}

fn known_keys(
    o: &serde_json::Map<String, Value>,
    keys: &[&str],
    what: &str,
) -> Result<(), DerivationError> {
    match o.keys().find(|k| !keys.contains(&k.as_str())) {
        Some(k) => {
            Err(bad(&format!("unknown key {k:?} in {what} (not the shape of Nix 2.8–2.29)")))
        }
        None => Ok(()),
    }
}

fn object<'a>(
    v: &'a Value,
    what: &str,
) -> Result<&'a serde_json::Map<String, Value>, DerivationError> {
    v.as_object().ok_or_else(|| bad(&format!("{what} must be an object")))
}

fn array<'a>(v: &'a Value, what: &str) -> Result<&'a Vec<Value>, DerivationError> {
    v.as_array().ok_or_else(|| bad(&format!("{what} must be a list")))
}

fn string<'a>(v: &'a Value, what: &str) -> Result<&'a str, DerivationError> {
    v.as_str().ok_or_else(|| bad(&format!("{what} must be a string")))
}

fn path(s: &str, what: &str) -> Result<StorePath, DerivationError> {
    StorePath::parse(s)
        .map_err(|source| DerivationError::StorePath { what: what.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_nix_shape() {
        let aterm = r#"Derive([("out","","r:sha256","impure")],[],[],"x86_64-linux","/bin/sh",[],[("ctrl","a\u{1}b\tc"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9")])"#;
        let d = Derivation::from_aterm(aterm.replace("\\u{1}", "\u{1}").as_bytes()).unwrap();
        let p: StorePath = "/nix/store/zl1pm2zkl0gp86khvga02i33h03fqn4m-imp.drv".parse().unwrap();
        let want = r#"{
  "/nix/store/zl1pm2zkl0gp86khvga02i33h03fqn4m-imp.drv": {
    "outputs": {
      "out": {
        "hashAlgo": "r:sha256",
        "impure": true
      }
    },
    "inputSrcs": [],
    "inputDrvs": {},
    "system": "x86_64-linux",
    "builder": "/bin/sh",
    "args": [],
    "env": {
      "ctrl": "a\u0001b\tc",
      "out": "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"
    }
  }
}"#;
        let got = d.to_show_derivation_json(&p);
        assert_eq!(got, want);
        let back = parse_show_derivation(&got).unwrap();
        assert_eq!(back[&p], d);
    }

    #[test]
    fn rejects_other_shapes() {
        let e = parse_show_derivation(
            r#"{"/nix/store/zl1pm2zkl0gp86khvga02i33h03fqn4m-imp.drv": {"nom": "x"}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown key \"nom\""), "{e}");
        assert!(parse_show_derivation("[]").is_err());
    }
}
