use super::*;
use nix_formats::hash::Hash;
use nix_formats::StorePath;

fn nar() -> (Vec<u8>, [u8; 32], String) {
    let mut w = nix_formats::nar::NarWriter::new(Vec::new()).unwrap();
    w.regular(false, b"staged").unwrap();
    let nar = w.into_inner();
    let h: [u8; 32] = Sha256::digest(&nar).into();
    let name = format!("{}.nar", nix_formats::base32::encode(&h));
    (nar, h, name)
}

fn info(name: &str, h: [u8; 32], size: usize) -> NarInfo {
    NarInfo {
        store_path: StorePath::from_parts([3; 20], "p").unwrap(),
        url: format!("nar/{name}"),
        compression: Some("none".into()),
        file_hash: Some(Hash::sha256(h)),
        file_size: Some(size as u64),
        nar_hash: Hash::sha256(h),
        nar_size: size as u64,
        references: Default::default(),
        deriver: None,
        system: None,
        sigs: Vec::new(),
        ca: None,
    }
}

fn uploader(ip: &str) -> Uploader {
    Uploader::new(&Caller::default(), ip.parse().unwrap())
}

#[test]
fn staging_is_bounded_and_a_nar_already_in_the_cache_is_used_in_place() {
    let t = tempfile::tempdir().unwrap();
    let st = Staging::open(&t.path().join("staging"), u64::MAX).unwrap();
    let a = uploader("127.0.0.1");
    let (nar, h, name) = nar();
    let len = nar.len() as u64;
    st.put_nar(&a, &name, &mut &nar[..], len, len).unwrap();
    let e = st.put_nar(&a, &name, &mut &nar[..], len, len).unwrap_err();
    assert_eq!(e.status, 507, "{e}");
    let e = st.put_nar(&a, &name, &mut &nar[..len as usize - 1], len, 10 * len).unwrap_err();
    assert_eq!(e.status, 400, "a short body: {e}");
    // The same NAR again replaces the staged copy: counted once.
    st.put_nar(&a, &name, &mut &nar[..], len, 2 * len).unwrap();
    assert_eq!(st.ledger().reserved, len);
    let i = info(&name, h, nar.len());
    let hp = i.store_path.hash_part().to_owned();
    let cache_nar = t.path().join("cache/nar");
    let taken = st.take(&a, &hp, &i, &cache_nar).unwrap();
    let pi = taken.path_info();
    assert!(taken.owned && taken.file.starts_with(t.path().join("staging")));
    assert_eq!((pi.info.nar_hash.0, pi.info.nar_size), (h, len));
    assert_eq!(st.ledger().reserved, 0, "taken: no longer counted");
    let file = taken.file.clone();
    drop(taken);
    assert!(!file.exists(), "removed once registered");
    // Taken: a second narinfo finds nothing, unless the cache has the NAR (Nix skipped the
    // upload after `HEAD nar/…` found it there).
    assert_eq!(st.take(&a, &hp, &i, &cache_nar).unwrap_err().status, 409);
    fs::create_dir_all(&cache_nar).unwrap();
    fs::write(cache_nar.join(&name), &nar).unwrap();
    let taken = st.take(&a, &hp, &i, &cache_nar).unwrap();
    assert!(!taken.owned && taken.file == cache_nar.join(&name));
    drop(taken);
    assert!(cache_nar.join(&name).exists(), "the cache's own file stays");
    let mut wrong = i.clone();
    wrong.file_size = Some(1);
    assert_eq!(st.take(&a, &hp, &wrong, &cache_nar).unwrap_err().status, 400);
}

#[test]
fn a_staged_nar_is_its_uploaders_alone() {
    let t = tempfile::tempdir().unwrap();
    let st = Staging::open(&t.path().join("staging"), u64::MAX).unwrap();
    let (nar, h, name) = nar();
    let len = nar.len() as u64;
    let (a, b) = (uploader("192.0.2.1"), uploader("192.0.2.2"));
    let trusted_a = Uploader::new(
        &Caller {
            scopes: super::super::auth::Scopes::ALL,
            authenticated: true,
            trusted: true,
            token: Some(0),
            client: Some(0),
        },
        "192.0.2.1".parse().unwrap(),
    );
    assert!(a != b && a != trusted_a, "address and credential both count");
    st.put_nar(&a, &name, &mut &nar[..], len, 10 * len).unwrap();
    let i = info(&name, h, nar.len());
    let hp = i.store_path.hash_part().to_owned();
    let none = t.path().join("no-cache");
    for other in [&b, &trusted_a] {
        let e = st.take(other, &hp, &i, &none).unwrap_err();
        assert_eq!(e.status, 409, "{e}");
        assert!(e.to_string().contains("by this client"), "{e}");
    }
    assert!(st.take(&a, &hp, &i, &none).is_ok(), "still there for its uploader");
}

fn compressed(nar: &[u8], comp: &str) -> Vec<u8> {
    match comp {
        "xz" => {
            let mut out = Vec::new();
            liblzma::read::XzEncoder::new(nar, 6).read_to_end(&mut out).unwrap();
            out
        }
        _ => ruzstd::encoding::compress_to_vec(nar, ruzstd::encoding::CompressionLevel::Fastest),
    }
}

#[test]
fn compressed_nars_are_decompressed_only_up_to_their_nar_size() {
    let t = tempfile::tempdir().unwrap();
    let st = Staging::open(&t.path().join("staging"), 1 << 20).unwrap();
    let a = uploader("127.0.0.1");
    let (nar, h, _) = nar();
    let none = t.path().join("no-cache");
    for (comp, ext) in [("xz", "xz"), ("zstd", "zst")] {
        let file = compressed(&nar, comp);
        let fh: [u8; 32] = Sha256::digest(&file).into();
        let name = format!("{}.nar.{ext}", nix_formats::base32::encode(&fh));
        let put = |st: &Staging| st.put_nar(&a, &name, &mut &file[..], file.len() as u64, 1 << 20);
        put(&st).unwrap();
        let mut i = info(&name, h, nar.len());
        i.compression = Some(comp.into());
        i.file_hash = Some(Hash::sha256(fh));
        i.file_size = Some(file.len() as u64);
        let hp = i.store_path.hash_part().to_owned();
        let taken = st.take(&a, &hp, &i, &none).unwrap();
        assert_eq!(fs::read(&taken.file).unwrap(), nar, "{comp}");
        assert_eq!(st.ledger().reserved, nar.len() as u64, "NarSize reserved while taken");
        drop(taken);
        assert_eq!(st.ledger().reserved, 0);
        // A narinfo claiming fewer bytes than the stream holds: stopped at NarSize + 1.
        put(&st).unwrap();
        let mut short = i.clone();
        short.nar_size = 10;
        let e = st.take(&a, &hp, &short, &none).unwrap_err();
        assert!(e.status == 400 && e.msg.contains("more than"), "{e}");
        // The staged NAR was consumed and nothing stays reserved.
        assert_eq!(st.ledger().reserved, 0);
        assert_eq!(
            fs::read_dir(t.path().join("staging"))
                .unwrap()
                .filter(|e| {
                    e.as_ref().unwrap().file_name().to_string_lossy().starts_with("tmp-")
                })
                .count(),
            0,
            "temporary files removed"
        );
        // A compression that does not match the extension.
        put(&st).unwrap();
        let mut wrong = i.clone();
        wrong.compression = Some("bzip2".into());
        assert_eq!(st.take(&a, &hp, &wrong, &none).unwrap_err().status, 415);
        wrong.compression = None;
        let e = st.take(&a, &hp, &wrong, &none).unwrap_err();
        assert!(e.msg.contains("bzip2"), "{e}");
        drop(st.take(&a, &hp, &i, &none).unwrap());
        assert_eq!(st.ledger().reserved, 0);
    }
    // A bomb: 64 MiB of zeros in a few KiB of xz, against a 1 MiB bound.
    let zeros = std::io::repeat(0).take(64 << 20);
    let mut bomb = Vec::new();
    liblzma::read::XzEncoder::new(zeros, 6).read_to_end(&mut bomb).unwrap();
    let fh: [u8; 32] = Sha256::digest(&bomb).into();
    let name = format!("{}.nar.xz", nix_formats::base32::encode(&fh));
    st.put_nar(&a, &name, &mut &bomb[..], bomb.len() as u64, 1 << 20).unwrap();
    let mut i = info(&name, h, 64 << 20);
    i.compression = Some("xz".into());
    i.file_hash = None;
    i.file_size = None;
    let hp = i.store_path.hash_part().to_owned();
    assert_eq!(st.take(&a, &hp, &i, &none).unwrap_err().status, 413, "NarSize over the bound");
    st.put_nar(&a, &name, &mut &bomb[..], bomb.len() as u64, 1 << 20).unwrap();
    i.nar_size = 4096;
    let e = st.take(&a, &hp, &i, &none).unwrap_err();
    assert!(e.msg.contains("more than"), "{e}");
}
