//! Benchmark: NAR serialisation + SHA-256 of a directory tree, with and without reference
//! scanning, against Nix's own `nix hash path` on the same tree in the same run.
//!
//! `cargo bench -p nix-formats --bench nar_hash` generates (once, deterministically) a tree of
//! `VOUCH_BENCH_TREE_MIB` MiB (default 512) of many files of mixed sizes and contents in
//! `VOUCH_BENCH_DIR` (default: the system temp dir, outside the checkout), warms the page cache,
//! then runs each contender `VOUCH_BENCH_ITERS` times (default 5), interleaved, each in its own
//! child process, and reports the best wall time, the ratios and each child's max RSS
//! (`getrusage`). Our runs are also done on a tree an eighth of the size, to show memory is flat.
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it does a quick check instead: a 4 MiB
//! tree, one run each, and it fails unless our hash equals Nix's.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::resource::{getrusage, UsageWho};
use nix_formats::hash::Hash;
use nix_formats::nar::{NarDump, NarHasher};
use nix_formats::refs::{hash_and_scan, RefScanner};
use nix_formats::StorePath;

const GENERATOR_VERSION: u32 = 1;
const CANDIDATES: usize = 100;

/// xorshift64*: deterministic and fast.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// The candidate store paths: the first ten are referenced from the tree.
fn candidates() -> Vec<StorePath> {
    let mut rng = Rng(0x5eed_cafe);
    (0..CANDIDATES)
        .map(|i| {
            let digest: [u8; 20] = std::array::from_fn(|_| rng.next() as u8);
            StorePath::from_parts(digest, &format!("input-{i}")).unwrap()
        })
        .collect()
}

const WORDS: &[&str] = &[
    "the",
    "store",
    "path",
    "derivation",
    "build",
    "output",
    "static",
    "int",
    "return",
    "if",
    "else",
    "for",
    "while",
    "{",
    "}",
    "(",
    ");",
    "#include",
    "<stdio.h>",
    "=",
    "==",
    "0",
    "1",
    "/usr/lib",
    "libfoo.so.1",
    "main",
    "printf",
    "\"%s\\n\"",
    "const",
    "char",
    "*",
    "void",
];

fn text_file(rng: &mut Rng, size: usize, cands: &[StorePath]) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 64);
    while out.len() < size {
        if rng.below(400) == 0 {
            out.extend_from_slice(cands[rng.below(10) as usize].to_string().as_bytes());
        } else {
            out.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes());
        }
        out.push(if rng.below(12) == 0 { b'\n' } else { b' ' });
    }
    out.truncate(size);
    out
}

fn binary_file(rng: &mut Rng, size: usize, cands: &[StorePath]) -> Vec<u8> {
    let mut out = vec![0u8; size];
    rng.fill(&mut out);
    // Executables carry an RPATH-like store path now and then.
    if size > 4096 && rng.below(4) == 0 {
        let p = cands[rng.below(10) as usize].to_string();
        let at = rng.below((size - p.len()) as u64) as usize;
        out[at..at + p.len()].copy_from_slice(p.as_bytes());
    }
    out
}

/// Writes the tree (or reuses it when its stamp matches); returns the number of files.
fn generate(root: &Path, mib: u64) -> u64 {
    let stamp = format!("v{GENERATOR_VERSION} {mib} MiB\n");
    let stamp_file = root.with_extension("stamp");
    if std::fs::read_to_string(&stamp_file).ok().as_deref() == Some(&stamp) && root.exists() {
        return count_files(root);
    }
    if root.exists() {
        std::fs::remove_dir_all(root).unwrap();
    }
    let cands = candidates();
    let mut rng = Rng(0x1234_5678_9abc_def1 ^ mib);
    let budget = mib << 20;
    let (mut written, mut files) = (0u64, 0u64);
    while written < budget {
        let dir = root.join(format!("d{:03}/s{:02}", files / 4096, (files / 64) % 64));
        std::fs::create_dir_all(&dir).unwrap();
        let class = rng.below(100);
        let size = match class {
            0..=84 => 64 + rng.below(3000),
            85..=98 => 4096 + rng.below(80_000),
            _ => (1 << 20) + rng.below(3 << 20),
        }
        .min(budget - written) as usize;
        let path = dir.join(format!("f{files:06}"));
        let (data, exec) = if rng.below(2) == 0 {
            (text_file(&mut rng, size, &cands), false)
        } else {
            (binary_file(&mut rng, size, &cands), rng.below(3) == 0)
        };
        std::fs::write(&path, &data).unwrap();
        if exec {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        if rng.below(50) == 0 {
            std::os::unix::fs::symlink(format!("f{files:06}"), dir.join(format!("l{files:06}")))
                .unwrap();
        }
        written += size as u64;
        files += 1;
    }
    std::fs::write(&stamp_file, stamp).unwrap();
    files
}

fn count_files(p: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            n += count_files(&e.path());
        } else if ft.is_file() {
            n += 1;
        }
    }
    n
}

/// Child process: run one contender, print `<hash> <elapsed ns> <max RSS KiB> <refs>`.
/// Stream the NAR of `dir` through `f` in 256 KiB chunks.
fn each_nar_chunk(dir: &Path, mut f: impl FnMut(&[u8])) {
    let mut dump = NarDump::new(dir);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = dump.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        f(&buf[..n]);
    }
}

fn child(mode: &str, dir: &Path) {
    let start = Instant::now();
    let (hash, refs) = match mode {
        "nix" => {
            let out = Command::new("nix")
                .args([
                    "--extra-experimental-features",
                    "nix-command",
                    "hash",
                    "path",
                    "--type",
                    "sha256",
                ])
                .arg(dir)
                .output()
                .expect("running `nix hash path` (install Nix with scripts/setup-host.sh)");
            assert!(
                out.status.success(),
                "nix hash path failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let h = Hash::parse_prefixed(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
            (h, 0)
        }
        "nar" => {
            let mut hasher = NarHasher::new();
            each_nar_chunk(dir, |chunk| hasher.update(chunk));
            (Hash::sha256(hasher.finish().sha256), 0)
        }
        "scan" => {
            let (d, refs) = hash_and_scan(NarDump::new(dir), candidates()).unwrap();
            (Hash::sha256(d.sha256), refs.len())
        }
        "scan1" => {
            // The same work on one thread (what a one-vCPU guest gets).
            let (mut hasher, mut scanner) = (NarHasher::new(), RefScanner::new(candidates()));
            each_nar_chunk(dir, |chunk| {
                hasher.update(chunk);
                scanner.feed(chunk);
            });
            (Hash::sha256(hasher.finish().sha256), scanner.references().len())
        }
        _ => panic!("unknown child mode {mode}"),
    };
    let elapsed = start.elapsed();
    let who = if mode == "nix" { UsageWho::RUSAGE_CHILDREN } else { UsageWho::RUSAGE_SELF };
    let rss = getrusage(who).unwrap().max_rss();
    println!("{} {} {} {}", hash.to_sri(), elapsed.as_nanos(), rss, refs);
}

struct Run {
    hash: String,
    wall: Duration,
    rss_kib: u64,
    refs: usize,
}

fn spawn(mode: &str, dir: &Path) -> Run {
    let start = Instant::now();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--child", mode])
        .arg(dir)
        .output()
        .unwrap();
    let wall = start.elapsed();
    assert!(out.status.success(), "{mode} child failed: {}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8(out.stdout).unwrap();
    let f: Vec<&str> = s.split_whitespace().collect();
    Run { hash: f[0].to_owned(), wall, rss_kib: f[2].parse().unwrap(), refs: f[3].parse().unwrap() }
}

fn warm(dir: &Path) {
    let mut sink = std::io::sink();
    std::io::copy(&mut NarDump::new(dir), &mut sink).unwrap();
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} must be a number")))
        .unwrap_or(default)
}

fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned());
    let sha_ni =
        info.lines().any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "sha_ni"));
    format!(
        "{} ({} cores, sha_ni: {})",
        model.unwrap_or_default(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if sha_ni { "yes" } else { "no" }
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        return child(&args[i + 1], Path::new(&args[i + 2]));
    }
    let full = args.iter().any(|a| a == "--bench");
    let mib = if full { env_u64("VOUCH_BENCH_TREE_MIB", 512) } else { 4 };
    let iters = if full { env_u64("VOUCH_BENCH_ITERS", 5) } else { 1 };
    let base: PathBuf =
        std::env::var_os("VOUCH_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).unwrap();
    let tree = base.join(format!("vouch-bench-nar-{mib}mib"));
    let small_mib = (mib / 8).max(1);
    let small = base.join(format!("vouch-bench-nar-{small_mib}mib"));
    eprintln!("generating / reusing {} and {}", tree.display(), small.display());
    let files = generate(&tree, mib);
    generate(&small, small_mib);
    warm(&tree);
    warm(&small);

    let mut best: [Option<Run>; 4] = [None, None, None, None];
    let modes = ["nix", "nar", "scan", "scan1"];
    for it in 0..iters {
        for (k, mode) in modes.iter().enumerate() {
            let r = spawn(mode, &tree);
            eprintln!("iteration {it}: {mode:4} {:.3} s", r.wall.as_secs_f64());
            if best[k].as_ref().is_none_or(|b| r.wall < b.wall) {
                best[k] = Some(r);
            }
        }
    }
    let [nix, nar, scan, scan1] = best.map(Option::unwrap);
    assert_eq!(nar.hash, nix.hash, "our NAR hash differs from `nix hash path`");
    assert_eq!(scan.hash, nix.hash, "the scanning run's NAR hash differs from `nix hash path`");
    assert_eq!(scan1.hash, nix.hash, "the one-thread scanning run's NAR hash differs");
    assert_eq!((scan.refs, scan1.refs), (10, 10), "expected the 10 planted references");
    let small_nar = spawn("nar", &small);
    let small_scan = spawn("scan", &small);

    let mb = (mib << 20) as f64 / 1e6;
    let tput = |r: &Run| mb / r.wall.as_secs_f64();
    let ratio = |r: &Run| nix.wall.as_secs_f64() / r.wall.as_secs_f64();
    let nix_version = Command::new("nix")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut out = std::io::stdout().lock();
    writeln!(out, "tree: {mib} MiB, {files} files (+ symlinks), {} candidate paths; best of {iters}; {nix_version}; {}", CANDIDATES, cpu_model()).unwrap();
    writeln!(out, "| contender | best wall | MB/s | vs `nix hash path` | max RSS ({mib} MiB tree) | max RSS ({small_mib} MiB tree) |").unwrap();
    writeln!(out, "|---|---|---|---|---|---|").unwrap();
    writeln!(
        out,
        "| `nix hash path` | {:.3} s | {:.0} | 1.00× | {} MiB | |",
        nix.wall.as_secs_f64(),
        tput(&nix),
        nix.rss_kib / 1024
    )
    .unwrap();
    writeln!(
        out,
        "| NAR + SHA-256 | {:.3} s | {:.0} | {:.2}× | {} MiB | {} MiB |",
        nar.wall.as_secs_f64(),
        tput(&nar),
        ratio(&nar),
        nar.rss_kib / 1024,
        small_nar.rss_kib / 1024
    )
    .unwrap();
    writeln!(
        out,
        "| NAR + SHA-256 + refs (`hash_and_scan`) | {:.3} s | {:.0} | {:.2}× | {} MiB | {} MiB |",
        scan.wall.as_secs_f64(),
        tput(&scan),
        ratio(&scan),
        scan.rss_kib / 1024,
        small_scan.rss_kib / 1024
    )
    .unwrap();
    writeln!(
        out,
        "| NAR + SHA-256 + refs, one thread | {:.3} s | {:.0} | {:.2}× | {} MiB | |",
        scan1.wall.as_secs_f64(),
        tput(&scan1),
        ratio(&scan1),
        scan1.rss_kib / 1024
    )
    .unwrap();
    if full {
        let goal = |name: &str, r: f64, want: f64| {
            if r < want {
                eprintln!("GOAL MISSED: {name} is {r:.2}× `nix hash path` (goal {want}×)");
            }
        };
        goal("NAR + SHA-256", ratio(&nar), 1.0);
        goal("NAR + SHA-256 + refs", ratio(&scan), 0.8);
    }
}
