//! The ATerm text of `.drv` files: parse and print, byte-exact.
//!
//! `Derive([outputs],[inputDrvs],[inputSrcs],"platform","builder",[args],[env])`, where outputs
//! are `("name","path","hashAlgo","hash")`, input derivations `("path",["out",...])` and env
//! entries `("key","value")`. Builder, args and env strings escape `\\ \" \n \r \t`; every other
//! string is written without escapes, as Nix does.
//!
//! The parser is **canonical**: it accepts exactly what Nix 2.8 writes, so a successful parse
//! always prints back to the same bytes. It therefore rejects (each with its own error) escapes
//! other than the five above, escapes or quotes in unescaped fields, lists and maps that are not
//! sorted and unique, raw newlines/tabs/carriage returns where Nix escapes them, non-UTF-8
//! strings and trailing bytes. Nix itself parses some of those
//! leniently, but never writes them.
//!
//! Printing variants used for hashing (masked outputs, input derivations replaced by their hash
//! modulo) are here too; [`super::modulo`] decides when to use them. Not here: the meaning of
//! outputs and kinds (the parent module) or reading `.drv` files from a store.

use std::collections::{BTreeMap, BTreeSet};

use super::{Derivation, DerivationError, DerivationOutput};
use crate::store_path::StorePath;

/// How to print the input derivations and outputs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PrintMode<'a> {
    /// Blank output paths and output-named env vars (`maskOutputs`).
    pub mask_outputs: bool,
    /// Replace `inputDrvs` by this map (hash modulo hex → outputs).
    pub actual_inputs: Option<&'a BTreeMap<String, BTreeSet<String>>>,
}

impl Derivation {
    /// Parses a `.drv` file's bytes (canonical ATerm; see the module docs).
    pub fn from_aterm(bytes: &[u8]) -> Result<Self, DerivationError> {
        Parser { b: bytes, pos: 0 }.derivation()
    }

    /// Prints the ATerm exactly as Nix writes the `.drv` file.
    pub fn to_aterm(&self) -> Vec<u8> {
        self.to_aterm_with(PrintMode { mask_outputs: false, actual_inputs: None })
    }

    pub(crate) fn to_aterm_with(&self, mode: PrintMode<'_>) -> Vec<u8> {
        let mut o = Vec::with_capacity(1024);
        o.extend_from_slice(b"Derive([");
        for (i, (name, out)) in self.outputs.iter().enumerate() {
            comma(&mut o, i);
            let (path, algo, hash) = out.to_triple();
            let path = match out {
                DerivationOutput::InputAddressed(_) | DerivationOutput::Fixed { .. }
                    if mode.mask_outputs =>
                {
                    String::new()
                }
                _ => path,
            };
            o.push(b'(');
            unquoted(&mut o, name);
            for f in [&path, &algo, &hash] {
                o.push(b',');
                unquoted(&mut o, f);
            }
            o.push(b')');
        }
        o.extend_from_slice(b"],[");
        match mode.actual_inputs {
            Some(map) => {
                for (i, (h, outs)) in map.iter().enumerate() {
                    input_drv(&mut o, i, h, outs);
                }
            }
            None => {
                for (i, (p, outs)) in self.input_drvs.iter().enumerate() {
                    input_drv(&mut o, i, &p.to_string(), outs);
                }
            }
        }
        o.extend_from_slice(b"],[");
        for (i, p) in self.input_srcs.iter().enumerate() {
            comma(&mut o, i);
            unquoted(&mut o, &p.to_string());
        }
        o.extend_from_slice(b"],");
        unquoted(&mut o, &self.platform);
        o.push(b',');
        escaped(&mut o, &self.builder);
        o.extend_from_slice(b",[");
        for (i, a) in self.args.iter().enumerate() {
            comma(&mut o, i);
            escaped(&mut o, a);
        }
        o.extend_from_slice(b"],[");
        for (i, (k, v)) in self.env.iter().enumerate() {
            comma(&mut o, i);
            o.push(b'(');
            escaped(&mut o, k);
            o.push(b',');
            let masked = mode.mask_outputs && self.outputs.contains_key(k);
            escaped(&mut o, if masked { "" } else { v });
            o.push(b')');
        }
        o.extend_from_slice(b"])");
        o
    }
}

fn comma(o: &mut Vec<u8>, i: usize) {
    if i > 0 {
        o.push(b',');
    }
}

fn input_drv(o: &mut Vec<u8>, i: usize, key: &str, outs: &BTreeSet<String>) {
    comma(o, i);
    o.push(b'(');
    unquoted(o, key);
    o.extend_from_slice(b",[");
    for (j, out) in outs.iter().enumerate() {
        comma(o, j);
        unquoted(o, out);
    }
    o.extend_from_slice(b"])");
}

fn unquoted(o: &mut Vec<u8>, s: &str) {
    o.push(b'"');
    o.extend_from_slice(s.as_bytes());
    o.push(b'"');
}

fn escaped(o: &mut Vec<u8>, s: &str) {
    o.push(b'"');
    for &c in s.as_bytes() {
        match c {
            b'"' | b'\\' => o.extend_from_slice(&[b'\\', c]),
            b'\n' => o.extend_from_slice(b"\\n"),
            b'\r' => o.extend_from_slice(b"\\r"),
            b'\t' => o.extend_from_slice(b"\\t"),
            _ => o.push(c),
        }
    }
    o.push(b'"');
}

struct Parser<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn err(&self, msg: impl Into<String>) -> DerivationError {
        DerivationError::Syntax { pos: self.pos, msg: msg.into() }
    }

    fn expect(&mut self, lit: &str) -> Result<(), DerivationError> {
        if self.b[self.pos..].starts_with(lit.as_bytes()) {
            self.pos += lit.len();
            Ok(())
        } else {
            Err(self.err(format!("expected {lit:?}")))
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    /// `]` ends the list; otherwise `,` separates items after the first.
    fn list_next(&mut self, first: bool) -> Result<bool, DerivationError> {
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(false);
        }
        if !first {
            self.expect(",")?;
        }
        Ok(true)
    }

    /// A quoted string. With `escapes`, the five Nix escapes are decoded; without, any `\` or
    /// escape is an error (Nix writes those fields without escaping).
    fn string(&mut self, escapes: bool) -> Result<String, DerivationError> {
        let start = self.pos;
        self.expect("\"")?;
        let mut out = Vec::new();
        loop {
            let c = self.peek().ok_or_else(|| self.err("unterminated string"))?;
            self.pos += 1;
            match c {
                b'"' => break,
                b'\\' if !escapes => {
                    self.pos -= 1;
                    return Err(self.err("escape in a field Nix writes without escapes"));
                }
                b'\n' | b'\r' | b'\t' if escapes => {
                    self.pos -= 1;
                    return Err(self.err("raw newline, carriage return or tab (Nix escapes them)"));
                }
                b'\\' => {
                    let e = self.peek().ok_or_else(|| self.err("unterminated string"))?;
                    out.push(match e {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'"' | b'\\' => e,
                        _ => return Err(self.err(format!("non-canonical escape \\{}", e as char))),
                    });
                    self.pos += 1;
                }
                _ => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| DerivationError::NotUtf8 { pos: start })
    }

    fn path(&mut self, what: &str) -> Result<StorePath, DerivationError> {
        let s = self.string(false)?;
        StorePath::parse(&s)
            .map_err(|source| DerivationError::StorePath { what: what.to_owned(), source })
    }

    fn string_list(&mut self, escapes: bool) -> Result<Vec<String>, DerivationError> {
        self.expect("[")?;
        let mut v = Vec::new();
        while self.list_next(v.is_empty())? {
            v.push(self.string(escapes)?);
        }
        Ok(v)
    }

    fn sorted<T: Ord>(
        &self,
        prev: Option<&T>,
        next: &T,
        what: &'static str,
    ) -> Result<(), DerivationError> {
        match prev {
            Some(p) if p >= next => Err(DerivationError::NotCanonical { what, pos: self.pos }),
            _ => Ok(()),
        }
    }

    fn derivation(mut self) -> Result<Derivation, DerivationError> {
        let mut d = Derivation::default();
        self.expect("Derive([")?;
        let mut first = true;
        while self.list_next(first)? {
            first = false;
            self.expect("(")?;
            let name = self.string(false)?;
            self.expect(",")?;
            let path = self.string(false)?;
            self.expect(",")?;
            let algo = self.string(false)?;
            self.expect(",")?;
            let hash = self.string(false)?;
            self.expect(")")?;
            self.sorted(d.outputs.keys().next_back(), &name, "outputs")?;
            let out = DerivationOutput::from_triple(&name, &path, &algo, &hash)?;
            d.outputs.insert(name, out);
        }
        self.expect(",[")?;
        let mut first = true;
        while self.list_next(first)? {
            first = false;
            self.expect("(")?;
            let p = self.path("input derivation")?;
            self.expect(",")?;
            let list = self.string_list(false)?;
            self.expect(")")?;
            self.sorted(d.input_drvs.keys().next_back(), &p, "input derivations")?;
            let mut outs = BTreeSet::new();
            for o in list {
                self.sorted(outs.iter().next_back(), &o, "input derivation outputs")?;
                outs.insert(o);
            }
            d.input_drvs.insert(p, outs);
        }
        self.expect(",[")?;
        let mut first = true;
        while self.list_next(first)? {
            first = false;
            let p = self.path("input source")?;
            self.sorted(d.input_srcs.iter().next_back(), &p, "input sources")?;
            d.input_srcs.insert(p);
        }
        self.expect(",")?;
        d.platform = self.string(false)?;
        self.expect(",")?;
        d.builder = self.string(true)?;
        self.expect(",")?;
        d.args = self.string_list(true)?;
        self.expect(",[")?;
        let mut first = true;
        while self.list_next(first)? {
            first = false;
            self.expect("(")?;
            let k = self.string(true)?;
            self.expect(",")?;
            let v = self.string(true)?;
            self.expect(")")?;
            self.sorted(d.env.keys().next_back(), &k, "environment variables")?;
            d.env.insert(k, v);
        }
        self.expect(")")?;
        if self.pos != self.b.len() {
            return Err(self.err("trailing bytes after the derivation"));
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRV: &str = r#"Derive([("out","","r:sha256","")],[("/nix/store/3xm0vgv7smlx4jlpmc85a7dh9055avas-ca-dep.drv",["out"]),("/nix/store/w6c2ijg5bgwgz1bgbmsq6jrgdy2pfx1s-ca-multi.drv",["dev"])],["/nix/store/zpya58m9bxib49ddjq6jdk22xiy6219w-busybox"],"x86_64-linux","/nix/store/zpya58m9bxib49ddjq6jdk22xiy6219w-busybox/sh",["-c","echo /1ax9nn8p9wcfcvs5lc1xj34r6arv864j4ap7lpa05jjxzq2jkhar > $out/ref"],[("name","ca-top"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),("weird","quote\" backslash\\ newline\n tab\t cr\r")])"#;

    #[test]
    fn round_trip_real_shape() {
        let d = Derivation::from_aterm(DRV.as_bytes()).unwrap();
        assert_eq!(d.env["weird"], "quote\" backslash\\ newline\n tab\t cr\r");
        assert_eq!(d.input_drvs.len(), 2);
        assert_eq!(String::from_utf8(d.to_aterm()).unwrap(), DRV);
    }

    #[test]
    fn rejects_non_canonical() {
        let cases = [
            (DRV.replace("\\t", "\\a"), "escape"),
            (DRV.replace("x86_64-linux", "x86\\_64"), "escape in a field"),
            (format!("{DRV} "), "trailing"),
            (DRV.replace("(\"name\",\"ca-top\")", "(\"zzz\",\"ca-top\")"), "sorted"),
            (DRV.replace("ca-top", "ca-\u{fc}"), ""),
            (DRV[..100].to_string(), "expected"),
        ];
        for (s, want) in cases {
            let e = Derivation::from_aterm(s.as_bytes());
            if want.is_empty() {
                assert!(e.is_ok(), "UTF-8 must be accepted: {e:?}");
                continue;
            }
            let e = e.unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let mut bad = DRV.as_bytes().to_vec();
        let i = DRV.find("ca-top").unwrap();
        bad[i] = 0xff;
        assert!(matches!(Derivation::from_aterm(&bad), Err(DerivationError::NotUtf8 { .. })));
    }
}
