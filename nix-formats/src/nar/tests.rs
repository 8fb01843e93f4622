//! NAR round trips (property tests) and the refusal of hostile archives, one per error variant.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use proptest::prelude::*;

use super::*;

/// A tree model: what a NAR describes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    File(bool, Vec<u8>),
    Link(Vec<u8>),
    Dir(BTreeMap<Vec<u8>, Node>),
}

fn encode(node: &Node) -> Vec<u8> {
    fn go(w: &mut NarWriter<Vec<u8>>, n: &Node) {
        match n {
            Node::File(x, c) => w.regular(*x, c).unwrap(),
            Node::Link(t) => w.symlink(t).unwrap(),
            Node::Dir(m) => {
                w.dir_start().unwrap();
                for (k, v) in m {
                    w.entry(k).unwrap();
                    go(w, v);
                    w.entry_end().unwrap();
                }
                w.dir_end().unwrap();
            }
        }
    }
    let mut w = NarWriter::new(Vec::new()).unwrap();
    go(&mut w, node);
    w.into_inner()
}

fn decode(nar: &[u8]) -> Result<Node, NarError> {
    fn node(r: &mut NarReader<&[u8]>, ev: NarEvent) -> Result<Node, NarError> {
        Ok(match ev {
            NarEvent::Regular { executable, size } => {
                let mut c = Vec::new();
                std::io::Read::read_to_end(r, &mut c).unwrap();
                assert_eq!(c.len() as u64, size);
                Node::File(executable, c)
            }
            NarEvent::Symlink { target } => Node::Link(target),
            NarEvent::DirectoryStart => {
                let mut m = BTreeMap::new();
                loop {
                    match r.next_event()?.expect("event") {
                        NarEvent::DirectoryEnd => break,
                        NarEvent::Entry { name } => {
                            let ev = r.next_event()?.expect("node");
                            m.insert(name, node(r, ev)?);
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                Node::Dir(m)
            }
            other => panic!("unexpected {other:?}"),
        })
    }
    let mut r = NarReader::new(nar, NarLimits::default());
    let first = r.next_event()?.expect("root");
    let n = node(&mut r, first)?;
    assert_eq!(r.next_event()?, None);
    Ok(n)
}

fn arb_name() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            Just(b'a'),
            Just(b'Z'),
            Just(b'.'),
            Just(b'-'),
            Just(0xc3u8),
            1u8..=0x2e,
            0x30u8..=0xff
        ],
        1..6,
    )
    .prop_filter("valid name", |n| n != b"." && n != b".." && !n.contains(&b'/') && !n.contains(&0))
}

fn arb_tree() -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        (any::<bool>(), prop::collection::vec(any::<u8>(), 0..200))
            .prop_map(|(x, c)| Node::File(x, c)),
        prop::collection::vec(1u8..=255, 1..30).prop_map(Node::Link),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        prop::collection::btree_map(arb_name(), inner, 0..6).prop_map(Node::Dir)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn writer_reader_round_trip(tree in arb_tree()) {
        let nar = encode(&tree);
        prop_assert_eq!(decode(&nar).unwrap(), tree);
    }

    #[test]
    fn unpack_then_dump_is_identity(tree in arb_tree()) {
        let nar = encode(&tree);
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("out");
        let stats = unpack(&nar[..], &dest, &UnpackOptions::default()).unwrap();
        prop_assert_eq!(stats.nar_size, nar.len() as u64);
        let mut again = Vec::new();
        dump_path(&dest, &mut again).unwrap();
        prop_assert_eq!(&again, &nar);
        prop_assert_eq!(hash_path(&dest).unwrap(), hash_nar(&nar[..]).unwrap());
        let scratch = t.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        prop_assert_eq!(fuzzing::check_unpack(&nar, &scratch), Ok(true));
    }
}

#[test]
fn canonical_unpack_sets_nix_metadata() {
    let mut m = BTreeMap::new();
    m.insert(b"bin".to_vec(), Node::File(true, b"#!x".to_vec()));
    m.insert(b"data".to_vec(), Node::File(false, b"d".to_vec()));
    m.insert(b"link".to_vec(), Node::Link(b"data".to_vec()));
    m.insert(b"sub".to_vec(), Node::Dir(BTreeMap::new()));
    let nar = encode(&Node::Dir(m));
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("o");
    unpack(&nar[..], &dest, &UnpackOptions { canonical: true, ..Default::default() }).unwrap();
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    let mtime = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(p).unwrap().mtime()
    };
    assert_eq!(mode(&dest.join("bin")), 0o555);
    assert_eq!(mode(&dest.join("data")), 0o444);
    assert_eq!(mode(&dest.join("sub")), 0o555);
    assert_eq!(mode(&dest), 0o555);
    for p in ["bin", "data", "link", "sub"] {
        assert_eq!(mtime(&dest.join(p)), 1, "{p}");
    }
    assert_eq!(mtime(&dest), 1);
    let mut again = Vec::new();
    dump_path(&dest, &mut again).unwrap();
    assert_eq!(again, nar);
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dest.join("sub"), std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn large_file_streams_in_chunks() {
    let data: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7 % 251) as u8).collect();
    let nar = encode(&Node::File(false, data.clone()));
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("f");
    unpack(&nar[..], &dest, &UnpackOptions::default()).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
}

/// Hostile archives, each with the error it must produce.
pub(crate) fn hostile_seeds() -> Vec<(&'static str, Vec<u8>)> {
    fn nar(f: impl FnOnce(&mut NarWriter<Vec<u8>>)) -> Vec<u8> {
        let mut w = NarWriter::new(Vec::new()).unwrap();
        f(&mut w);
        w.into_inner()
    }
    fn dir_with(names: &[&[u8]]) -> Vec<u8> {
        nar(|w| {
            w.dir_start().unwrap();
            for n in names {
                w.entry(n).unwrap();
                w.regular(false, b"x").unwrap();
                w.entry_end().unwrap();
            }
            w.dir_end().unwrap();
        })
    }
    let mut trailing = nar(|w| w.regular(false, b"x").unwrap());
    trailing.extend_from_slice(b"garbage!");
    let mut bad_pad = nar(|w| w.regular(false, b"abc").unwrap());
    let at = bad_pad.len() - 16 - 5;
    bad_pad[at] = 1;
    let mut truncated = nar(|w| w.regular(false, b"abcdefgh").unwrap());
    truncated.truncate(truncated.len() - 20);
    let deep = nar(|w| {
        for _ in 0..40 {
            w.dir_start().unwrap();
            w.entry(b"d").unwrap();
        }
        w.dir_start().unwrap();
        w.dir_end().unwrap();
        for _ in 0..40 {
            w.entry_end().unwrap();
            w.dir_end().unwrap();
        }
    });
    let many = nar(|w| {
        w.dir_start().unwrap();
        for i in 0..257u32 {
            w.entry(format!("{i:05}").as_bytes()).unwrap();
            w.symlink(b"t").unwrap();
            w.entry_end().unwrap();
        }
        w.dir_end().unwrap();
    });
    vec![
        ("bad-magic", NarWriter::without_magic(Vec::new()).into_inner()),
        ("bad-magic-2", nar(|_| ()).iter().map(|b| if *b == b'1' { b'2' } else { *b }).collect()),
        ("eof", nar(|_| ())),
        ("truncated", truncated),
        ("bad-token", nar(|w| w.strs(&[b"(", b"type", b"fifo", b")"]).unwrap())),
        ("huge-token", nar(|w| w.strs(&[b"(", b"type", &[b'r'; 100], b")"]).unwrap())),
        ("nonzero-padding", bad_pad),
        ("empty-name", dir_with(&[b""])),
        ("dot", dir_with(&[b"."])),
        ("dotdot", dir_with(&[b".."])),
        ("slash", dir_with(&[b"a/b"])),
        ("nul", dir_with(&[b"a\0b"])),
        ("unsorted", dir_with(&[b"b", b"a"])),
        ("duplicate", dir_with(&[b"a", b"a"])),
        ("empty-target", nar(|w| w.symlink(b"").unwrap())),
        ("nul-target", nar(|w| w.symlink(b"a\0").unwrap())),
        ("trailing", trailing),
        (
            "file-too-large",
            nar(|w| {
                // Declares 1 MiB + 1 bytes; the reader refuses before reading them.
                w.strs(&[b"(", b"type", b"regular", b"contents"]).unwrap();
                w.raw(&((1u64 << 20) + 1).to_le_bytes()).unwrap();
            }),
        ),
        ("too-many", many),
        ("name-too-long", dir_with(&[&[b'n'; 256]])),
        ("too-deep", deep),
        ("target-too-long", nar(|w| w.symlink(&[b't'; 4096]).unwrap())),
        (
            "escape-via-symlink",
            nar(|w| {
                w.dir_start().unwrap();
                w.entry(b"a").unwrap();
                w.symlink(b"..").unwrap();
                w.entry_end().unwrap();
                w.entry(b"a").unwrap();
                w.dir_start().unwrap();
                w.entry(b"evil").unwrap();
                w.regular(false, b"x").unwrap();
                w.entry_end().unwrap();
                w.dir_end().unwrap();
                w.entry_end().unwrap();
                w.dir_end().unwrap();
            }),
        ),
    ]
}

fn variant(name: &str, e: &NarError) -> bool {
    use NarError::*;
    match name {
        "bad-magic" | "bad-magic-2" => matches!(e, BadMagic | UnexpectedEof { .. }),
        "eof" | "truncated" => matches!(e, UnexpectedEof { .. }),
        "bad-token" | "huge-token" => matches!(e, UnexpectedToken { .. }),
        "nonzero-padding" => matches!(e, NonZeroPadding { .. }),
        "empty-name" => matches!(e, EmptyName),
        "dot" => matches!(e, DotName),
        "dotdot" => matches!(e, DotDotName),
        "slash" => matches!(e, NameContainsSlash { .. }),
        "nul" => matches!(e, NameContainsNul { .. }),
        "unsorted" => matches!(e, UnsortedEntries { .. }),
        "duplicate" | "escape-via-symlink" => matches!(e, DuplicateEntry { .. }),
        "empty-target" => matches!(e, EmptySymlinkTarget),
        "nul-target" => matches!(e, SymlinkTargetContainsNul),
        "trailing" => matches!(e, TrailingData { .. }),
        "file-too-large" => matches!(e, FileTooLarge { .. }),
        "too-many" => matches!(e, TooManyEntries { .. }),
        "name-too-long" => matches!(e, NameTooLong { .. }),
        "too-deep" => matches!(e, TooDeep { .. }),
        "target-too-long" => matches!(e, SymlinkTargetTooLong { .. }),
        _ => false,
    }
}

#[test]
fn hostile_nars_are_refused_with_their_own_error() {
    let t = tempfile::tempdir().unwrap();
    for (name, data) in hostile_seeds() {
        let err = NarReader::new(&data[..], fuzzing::fuzz_limits()).validate_to_end().unwrap_err();
        assert!(variant(name, &err), "{name}: got {err:?}");
        let scratch = t.path().join(name);
        std::fs::create_dir(&scratch).unwrap();
        assert_eq!(fuzzing::check_unpack(&data, &scratch), Ok(false), "{name}");
    }
}

#[test]
fn total_size_limit() {
    let data = encode(&Node::File(false, vec![1; 5000]));
    let limits = NarLimits { max_total_size: 4096, ..NarLimits::default() };
    let err = NarReader::new(&data[..], limits).validate_to_end().unwrap_err();
    assert!(matches!(err, NarError::TotalSizeExceeded { limit: 4096 }), "{err:?}");
}

#[test]
fn embedded_reader_stops_at_the_end() {
    let mut data = encode(&Node::Link(b"x".to_vec()));
    let n = data.len();
    data.extend_from_slice(b"next message");
    let mut cursor = &data[..];
    let mut r = NarReader::embedded(&mut cursor, NarLimits::default());
    assert_eq!(r.validate_to_end().unwrap(), n as u64);
    assert_eq!(cursor, b"next message");
}

#[test]
fn unpack_refuses_existing_destination_and_keeps_it() {
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("exists");
    std::fs::write(&dest, b"keep").unwrap();
    let err =
        unpack(&encode(&Node::File(false, b"new".to_vec()))[..], &dest, &UnpackOptions::default())
            .unwrap_err();
    assert!(matches!(err, UnpackError::Fs { .. }), "{err:?}");
    assert_eq!(std::fs::read(&dest).unwrap(), b"keep");
}

#[test]
fn valid_seeds_pass_the_fuzz_invariant() {
    let t = tempfile::tempdir().unwrap();
    for (i, tree) in [
        Node::File(false, vec![]),
        Node::File(true, b"#!/bin/sh\necho hi\n".to_vec()),
        Node::Link(b"/nix/store/x".to_vec()),
        Node::Dir(BTreeMap::new()),
    ]
    .into_iter()
    .enumerate()
    {
        let scratch = t.path().join(i.to_string());
        std::fs::create_dir(&scratch).unwrap();
        assert_eq!(fuzzing::check_unpack(&encode(&tree), &scratch), Ok(true));
    }
}

fn valid_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut m = BTreeMap::new();
    m.insert(b"bin".to_vec(), Node::File(true, b"#!/bin/sh\necho hi\n".to_vec()));
    m.insert(b"empty".to_vec(), Node::File(false, vec![]));
    m.insert(b"link".to_vec(), Node::Link(b"bin".to_vec()));
    m.insert(
        b"sub".to_vec(),
        Node::Dir([(b"x".to_vec(), Node::File(false, b"12345678".to_vec()))].into()),
    );
    m.insert(b"void".to_vec(), Node::Dir(BTreeMap::new()));
    vec![
        ("valid-empty-file", encode(&Node::File(false, vec![]))),
        ("valid-exec", encode(&Node::File(true, b"#!/bin/sh\n".to_vec()))),
        ("valid-symlink", encode(&Node::Link(b"/nix/store/x".to_vec()))),
        ("valid-empty-dir", encode(&Node::Dir(BTreeMap::new()))),
        ("valid-tree", encode(&Node::Dir(m))),
    ]
}

fn corpus_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/nar_unpack")
}

/// Writes the seed corpus of the `nar_unpack` fuzz target (run with `--ignored`).
#[test]
#[ignore = "regenerates fuzz/seeds/nar_unpack"]
fn write_nar_fuzz_seeds() {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    for (name, data) in valid_seeds().into_iter().chain(hostile_seeds()) {
        std::fs::write(dir.join(format!("{name}.nar")), data).unwrap();
    }
}

/// Every file of the committed fuzz corpus (seeds and anything a fuzzer added) keeps the
/// invariant, and the seeds are all there.
#[test]
fn fuzz_corpus_keeps_the_invariant() {
    let t = tempfile::tempdir().unwrap();
    let mut accepted = 0;
    let mut names = Vec::new();
    for (i, e) in std::fs::read_dir(corpus_dir()).expect("fuzz corpus directory").enumerate() {
        let e = e.unwrap();
        let data = std::fs::read(e.path()).unwrap();
        let scratch = t.path().join(i.to_string());
        std::fs::create_dir(&scratch).unwrap();
        match fuzzing::check_unpack(&data, &scratch) {
            Ok(true) => accepted += 1,
            Ok(false) => {}
            Err(v) => panic!("{}: {v}", e.path().display()),
        }
        names.push(e.file_name().into_string().unwrap());
    }
    for (name, _) in valid_seeds().into_iter().chain(hostile_seeds()) {
        assert!(
            names.contains(&format!("{name}.nar")),
            "seed {name} missing: run write_nar_fuzz_seeds"
        );
    }
    assert_eq!(accepted, valid_seeds().len());
}
