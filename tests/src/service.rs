//! Talking to a `vouch serve` in the VM tests: the derivations its tests upload, uploading
//! them with `nix copy`, the trusted callers' token, JSON bodies, waiting for a build's end, and
//! a self-signed certificate for serving HTTPS (made by openssl).

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use test_support::http_service::{HttpResponse, HttpService};
use test_support::vm::{image_dir, vouch_bin, Scratch, NIX_CONFIG};

/// The trusted callers' token of the service tests, as a header.
pub const TRUSTED: &str = "Authorization: Bearer trusted-0123456789abcdef";

/// `--trusted-token-file FILE` (holding [`TRUSTED`]'s token) for a service in `s`.
pub fn trusted_args(s: &Scratch) -> [String; 2] {
    let p = s.dir.path().join("trusted-token");
    std::fs::write(&p, "trusted-0123456789abcdef\n").unwrap();
    ["--trusted-token-file".into(), p.to_str().unwrap().into()]
}

/// `nix copy ARGS…` with the test configuration and its own narinfo disk cache (`xdg`).
pub fn nix_copy(xdg: &Path, args: &[&str]) -> Output {
    Command::new("nix")
        .arg("copy")
        .args(args)
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("XDG_CACHE_HOME", xdg)
        .output()
        .expect("running nix copy")
}

/// A `vouch serve` on the guest image with state `state`, log `log`, one build at a time and
/// the trusted callers' token in `token`.
pub fn start_trusted(state: &Path, log: &Path, token: &Path) -> HttpService {
    let image = image_dir();
    let args = ["--image", image.to_str().unwrap(), "--jobs", "1", "--trusted-token-file"];
    let mut args: Vec<&str> = args.to_vec();
    args.push(token.to_str().unwrap());
    HttpService::start(&vouch_bin(), state, log, &args)
}

/// A response's body as JSON (panics with the body if it is not).
pub fn json(r: &HttpResponse) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

/// Poll build `id` until it ends (5 minutes at most); its final status JSON.
pub fn wait(s: &HttpService, id: u64) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let v = json(&s.request("GET", &format!("/v1/builds/{id}"), b""));
        match v["state"].as_str() {
            Some("succeeded" | "failed" | "cancelled") => return v,
            Some("queued" | "running") => {}
            other => panic!("unknown state {other:?}: {v}"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "build {id} took too long:\n{}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The derivations the service tests build, new for every nonce `n`: `ia` (input-addressed),
/// `ca` (floating CA, with a self-reference), `slow` (sleeps), `ticker` (a line a second for 20
/// seconds, then done), `fod` (fixed-output: flat SHA-256 of `fixed-<n>`) and `usesfod`
/// (input-addressed, copies `fod`'s output).
pub fn closure_nix(n: &str) -> String {
    let fod_hash = test_support::nix::sha256_hex(format!("fixed-{n}").as_bytes());
    format!(
        r#"let bb = builtins.path {{ path = ./bb; name = "busybox"; }}; in rec {{
  ia = derivation {{ name = "serve-ia"; system = builtins.currentSystem; builder = "${{bb}}/sh";
                     args = [ "-c" "echo ia {n}; mkdir $out; echo {n} > $out/n" ]; }};
  ca = derivation {{ name = "serve-ca"; system = builtins.currentSystem; builder = "${{bb}}/sh";
                     args = [ "-c" "echo ca {n}; mkdir $out; echo $out > $out/self" ];
                     __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; }};
  slow = derivation {{ name = "serve-slow"; system = builtins.currentSystem; builder = "${{bb}}/sh";
                       args = [ "-c" "echo started {n}; ${{bb}}/busybox sleep 600" ]; }};
  fod = derivation {{ name = "serve-fod"; system = builtins.currentSystem; builder = "${{bb}}/sh";
                    args = [ "-c" "echo fetching {n}; printf fixed-{n} > $out" ];
                    outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "{fod_hash}"; }};
  usesfod = derivation {{ name = "serve-usesfod"; system = builtins.currentSystem; builder = "${{bb}}/sh";
                          args = [ "-c" "echo usesfod {n}; ${{bb}}/busybox mkdir $out; ${{bb}}/busybox cat ${{fod}} > $out/f" ]; }};
  ticker = derivation {{ name = "serve-ticker"; system = builtins.currentSystem; builder = "${{bb}}/sh";
                         args = [ "-c" "for i in $(${{bb}}/busybox seq 1 20); do echo tick $i {n}; ${{bb}}/busybox sleep 1; done; ${{bb}}/busybox mkdir $out" ]; }};
}}
"#
    )
}

/// A self-signed certificate (P-256) for `san` (e.g. `IP:127.0.0.1`) in `dir`: (cert, key).
pub fn self_signed(dir: &Path, name: &str, san: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"])
        .args(["-subj", &format!("/CN={name}"), "-addext", &format!("subjectAltName={san}")])
        // A CA certificate is refused as a server's own (webpki): a self-signed leaf.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-days", "1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("running openssl (scripts/setup-host.sh installs it)");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    (cert, key)
}
