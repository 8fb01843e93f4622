//! Keys and signed checkpoints: the log's Ed25519 note key (C2SP signed-note, type 0x01), the
//! witnesses' cosigning keys (C2SP tlog-cosignature `cosignature/v1`, Ed25519, type 0x04), and
//! checkpoints (C2SP tlog-checkpoint) verified under a log key and a quorum of witnesses.
//!
//! Key strings: a verifier key (vkey) is `<name>+<8 hex key id>+<base64(type || public key)>`;
//! a signer key is `PRIVATE+KEY+<name>+<8 hex key id>+<base64(type || seed)>`. A log key's name
//! is the log's origin. A cosignature is `base64(key id || u64 BE timestamp || Ed25519
//! signature)` over `cosignature/v1\ntime <timestamp>\n<checkpoint text>`.

use std::collections::BTreeMap;
#[cfg(feature = "producer")]
use std::os::unix::fs::PermissionsExt;
#[cfg(feature = "producer")]
use std::path::Path;

use base64::prelude::{Engine, BASE64_STANDARD};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use signed_note::{Note, Signature, Signer, StandardSigner, StandardVerifier, Verifier};
use tlog_tiles::Hash;

#[cfg(feature = "producer")]
use super::io_err;
use super::TlogError;

const ALG_ED25519: u8 = 0x01;
const ALG_COSIGNATURE_V1: u8 = 0x04;

fn key_err(e: impl std::fmt::Display) -> TlogError {
    TlogError::Key(e.to_string())
}

/// The log's signing key (the checkpoint signer). Its name is the log's origin.
#[derive(Clone)]
pub struct LogKey {
    signer: StandardSigner,
    #[cfg_attr(not(feature = "producer"), allow(dead_code))] // written to disk by the producer
    skey: String,
    vkey: String,
}

impl std::fmt::Debug for LogKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogKey").field("vkey", &self.vkey).finish_non_exhaustive()
    }
}

/// The file names of the log key in `<state dir>/keys/`.
pub const LOG_KEY_FILE: &str = "log.note-key";
/// The public half, a vkey line.
pub const LOG_VKEY_FILE: &str = "log.note-vkey";

fn encode_keys(name: &str, alg: u8, seed: &[u8; 32]) -> (String, String) {
    let sk = SigningKey::from_bytes(seed);
    let public = [&[alg][..], sk.verifying_key().as_bytes()].concat();
    let id = signed_note::key_id(name, &public);
    let private = [&[alg][..], seed].concat();
    (
        format!("PRIVATE+KEY+{name}+{id:08x}+{}", BASE64_STANDARD.encode(private)),
        format!("{name}+{id:08x}+{}", BASE64_STANDARD.encode(public)),
    )
}

fn check_name(name: &str) -> Result<(), TlogError> {
    if signed_note::is_key_name_valid(name) {
        Ok(())
    } else {
        Err(TlogError::Key(format!("{name:?} is not a note key name (no spaces, no `+`)")))
    }
}

impl LogKey {
    /// A log key for `origin` from a 32-byte seed.
    pub fn from_seed(origin: &str, seed: [u8; 32]) -> Result<LogKey, TlogError> {
        check_name(origin)?;
        let (skey, _) = encode_keys(origin, ALG_ED25519, &seed);
        LogKey::from_skey(&skey)
    }

    /// Parse a signer key string.
    pub fn from_skey(skey: &str) -> Result<LogKey, TlogError> {
        let skey = skey.trim();
        let signer = StandardSigner::new(skey).map_err(key_err)?;
        let seed =
            BASE64_STANDARD.decode(skey.splitn(5, '+').nth(4).unwrap_or("")).map_err(key_err)?;
        let sk = SigningKey::try_from(&seed[1..]).map_err(key_err)?;
        let vkey = signed_note::new_ed25519_verifier_key(signer.name(), &sk.verifying_key());
        Ok(LogKey { signer, skey: skey.to_owned(), vkey })
    }

    /// The key in `<state_dir>/keys/log.note-key`, generated for `origin` if there is none; an
    /// existing key must be `origin`'s when one is asked for.
    #[cfg(feature = "producer")]
    pub fn load_or_generate(state_dir: &Path, origin: Option<&str>) -> Result<LogKey, TlogError> {
        let dir = state_dir.join("keys");
        let secret = dir.join(LOG_KEY_FILE);
        let key = match std::fs::read_to_string(&secret) {
            Ok(text) => {
                let mode = std::fs::metadata(&secret).map_err(io_err("stat", &secret))?;
                if mode.permissions().mode() & 0o077 != 0 {
                    return Err(TlogError::Key(format!(
                        "{} is readable by others (chmod 600 it)",
                        secret.display()
                    )));
                }
                let key = LogKey::from_skey(&text)?;
                if let Some(o) = origin.filter(|o| *o != key.origin()) {
                    return Err(TlogError::Key(format!(
                        "{} signs for origin {:?}, not {o:?} (one state directory, one log)",
                        secret.display(),
                        key.origin()
                    )));
                }
                key
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let origin = origin.ok_or_else(|| {
                    TlogError::Key(format!(
                        "no log key in {} and no origin to make one",
                        dir.display()
                    ))
                })?;
                let mut seed = [0u8; 32];
                rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
                let key = LogKey::from_seed(origin, seed)?;
                match write_secret(&dir, &secret, key.skey.as_bytes()) {
                    // Another publisher made it first: use theirs.
                    Err(TlogError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::AlreadyExists =>
                    {
                        return LogKey::load_or_generate(state_dir, Some(origin));
                    }
                    r => r?,
                }
                key
            }
            Err(e) => return Err(io_err("read", &secret)(e)),
        };
        let public = dir.join(LOG_VKEY_FILE);
        if std::fs::read_to_string(&public).ok().as_deref().map(str::trim) != Some(&key.vkey) {
            crate::store::write_atomic(&public, format!("{}\n", key.vkey).as_bytes())
                .map_err(io_err("write", &public))?;
        }
        Ok(key)
    }

    /// The origin (the key's name).
    pub fn origin(&self) -> &str {
        self.signer.name()
    }

    /// The verifier key string.
    pub fn vkey(&self) -> &str {
        &self.vkey
    }

    /// A checkpoint of `size` entries with root `root`, signed.
    pub fn sign_checkpoint(&self, size: u64, root: &Hash) -> Result<Vec<u8>, TlogError> {
        let text = checkpoint_text(self.origin(), size, root);
        let mut note = Note::new(text.as_bytes(), &[]).map_err(key_err)?;
        note.add_sigs(&[&self.signer]).map_err(key_err)?;
        Ok(note.to_bytes())
    }
}

/// The note text of a checkpoint.
pub fn checkpoint_text(origin: &str, size: u64, root: &Hash) -> String {
    format!("{origin}\n{size}\n{root}\n")
}

/// Write a secret key file (mode 0600) whole, or fail with `AlreadyExists` if there is one: a
/// temporary file, synced, then hard-linked to its name (no reader sees it half-written).
#[cfg(feature = "producer")]
fn write_secret(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), TlogError> {
    use std::io::Write;
    std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-key-")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(io_err("create", dir))?;
    tmp.write_all(bytes).and_then(|()| tmp.as_file().sync_all()).map_err(io_err("write", path))?;
    std::fs::hard_link(tmp.path(), path).map_err(io_err("create", path))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("sync", dir))
}

/// A witness's cosigning key (`cosignature/v1`).
#[derive(Clone)]
pub struct CosignerKey {
    name: String,
    id: u32,
    key: SigningKey,
}

impl std::fmt::Debug for CosignerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CosignerKey").field("vkey", &self.vkey()).finish_non_exhaustive()
    }
}

/// The file name of a witness key in `<state dir>/keys/`.
pub const WITNESS_KEY_FILE: &str = "witness.note-key";

impl CosignerKey {
    /// A cosigner named `name` from a 32-byte seed.
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Result<CosignerKey, TlogError> {
        check_name(name)?;
        let key = SigningKey::from_bytes(&seed);
        let public = [&[ALG_COSIGNATURE_V1][..], key.verifying_key().as_bytes()].concat();
        Ok(CosignerKey { name: name.into(), id: signed_note::key_id(name, &public), key })
    }

    /// Parse `PRIVATE+KEY+<name>+<id>+<base64(0x04 || seed)>`.
    pub fn from_skey(skey: &str) -> Result<CosignerKey, TlogError> {
        let parts: Vec<&str> = skey.trim().splitn(5, '+').collect();
        let ["PRIVATE", "KEY", name, id, b64] = parts[..] else {
            return Err(TlogError::Key("not PRIVATE+KEY+<name>+<id>+<key>".into()));
        };
        let raw = BASE64_STANDARD.decode(b64).map_err(key_err)?;
        let seed: [u8; 32] = match raw.split_first() {
            Some((&ALG_COSIGNATURE_V1, seed)) => seed.try_into().map_err(key_err)?,
            _ => return Err(TlogError::Key(format!("{name}: not a cosignature/v1 (0x04) key"))),
        };
        let k = CosignerKey::from_seed(name, seed)?;
        if format!("{:08x}", k.id) != id {
            return Err(TlogError::Key(format!("{name}: key id {id} does not match the key")));
        }
        Ok(k)
    }

    /// The key in `<state_dir>/keys/witness.note-key`, generated with `name` if there is none.
    #[cfg(feature = "producer")]
    pub fn load_or_generate(state_dir: &Path, name: &str) -> Result<CosignerKey, TlogError> {
        let dir = state_dir.join("keys");
        let secret = dir.join(WITNESS_KEY_FILE);
        match std::fs::read_to_string(&secret) {
            Ok(text) => CosignerKey::from_skey(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
                let k = CosignerKey::from_seed(name, seed)?;
                let (skey, _) = encode_keys(name, ALG_COSIGNATURE_V1, &seed);
                write_secret(&dir, &secret, skey.as_bytes())?;
                Ok(k)
            }
            Err(e) => Err(io_err("read", &secret)(e)),
        }
    }

    /// The witness's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The verifier key string (type 0x04).
    pub fn vkey(&self) -> String {
        let public = [&[ALG_COSIGNATURE_V1][..], self.key.verifying_key().as_bytes()].concat();
        format!("{}+{:08x}+{}", self.name, self.id, BASE64_STANDARD.encode(public))
    }

    /// The cosignature line (`— <name> <base64>\n`) of a checkpoint text at `timestamp`.
    pub fn cosign(&self, text: &[u8], timestamp: u64) -> String {
        let sig = self.key.sign(&cosigned_message(text, timestamp));
        let mut raw = self.id.to_be_bytes().to_vec();
        raw.extend_from_slice(&timestamp.to_be_bytes());
        raw.extend_from_slice(&sig.to_bytes());
        format!("— {} {}\n", self.name, BASE64_STANDARD.encode(raw))
    }
}

fn cosigned_message(text: &[u8], timestamp: u64) -> Vec<u8> {
    let mut m = format!("cosignature/v1\ntime {timestamp}\n").into_bytes();
    m.extend_from_slice(text);
    m
}

/// A `cosignature/v1` verifier.
#[derive(Debug, Clone)]
struct CosignatureVerifier {
    name: String,
    id: u32,
    key: VerifyingKey,
}

impl Verifier for CosignatureVerifier {
    fn name(&self) -> &str {
        &self.name
    }
    fn key_id(&self) -> u32 {
        self.id
    }
    fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        let Ok(raw) = <[u8; 72]>::try_from(sig) else { return false };
        let timestamp = u64::from_be_bytes(raw[..8].try_into().expect("8 bytes"));
        let sig = ed25519_dalek::Signature::from_bytes(raw[8..].try_into().expect("64 bytes"));
        timestamp < 1 << 63
            && self.key.verify_strict(&cosigned_message(msg, timestamp), &sig).is_ok()
    }
}

/// A verifier key: a log's (Ed25519 note signature) or a witness's (cosignature/v1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteVerifierKey {
    /// The key string as given.
    pub vkey: String,
    /// Its name.
    pub name: String,
    /// Whether it is a cosignature/v1 key.
    pub cosigner: bool,
}

impl NoteVerifierKey {
    /// Parse a vkey (type 0x01 or 0x04).
    pub fn parse(vkey: &str) -> Result<NoteVerifierKey, TlogError> {
        let vkey = vkey.trim();
        let parts: Vec<&str> = vkey.splitn(3, '+').collect();
        let [name, _, b64] = parts[..] else {
            return Err(TlogError::Key(format!("{vkey:?} is not <name>+<id>+<key>")));
        };
        let alg = BASE64_STANDARD.decode(b64).ok().and_then(|k| k.first().copied());
        let k = NoteVerifierKey {
            vkey: vkey.to_owned(),
            name: name.to_owned(),
            cosigner: alg == Some(ALG_COSIGNATURE_V1),
        };
        k.verifier()?;
        Ok(k)
    }

    fn verifier(&self) -> Result<Box<dyn Verifier>, TlogError> {
        let bad = |why: &str| TlogError::Key(format!("{}: {why}", self.vkey));
        if !self.cosigner {
            return Ok(Box::new(
                StandardVerifier::new(&self.vkey).map_err(|e| bad(&e.to_string()))?,
            ));
        }
        let parts: Vec<&str> = self.vkey.splitn(3, '+').collect();
        let raw = BASE64_STANDARD.decode(parts[2]).map_err(|e| bad(&e.to_string()))?;
        let id = u32::from_str_radix(parts[1], 16).map_err(|_| bad("key id is not hex"))?;
        if parts[1].len() != 8 || id != signed_note::key_id(&self.name, &raw) {
            return Err(bad("the key id does not match the key"));
        }
        let key: [u8; 32] = raw[1..].try_into().map_err(|_| bad("not a 32-byte key"))?;
        let key = VerifyingKey::from_bytes(&key).map_err(|e| bad(&e.to_string()))?;
        Ok(Box::new(CosignatureVerifier { name: self.name.clone(), id, key }))
    }
}

/// A checkpoint whose log signature (and witness quorum) checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The origin line.
    pub origin: String,
    /// The tree size.
    pub size: u64,
    /// The root hash.
    pub root: [u8; 32],
    /// The signed note as received.
    pub note: Vec<u8>,
    /// Witnesses whose cosignature checked, with its timestamp.
    pub cosigned_by: BTreeMap<String, u64>,
}

impl Checkpoint {
    /// The root as a `tlog_tiles` hash.
    pub fn root_hash(&self) -> Hash {
        Hash(self.root)
    }

    /// Parse `note` and check it: a valid signature by one of `logs` named after its origin, no
    /// invalid signature by any key in `logs` or `witnesses`, and valid cosignatures by at least
    /// `quorum` distinct `witnesses` (unknown signatures are ignored, as C2SP says).
    pub fn verify(
        note: &[u8],
        logs: &[NoteVerifierKey],
        witnesses: &[NoteVerifierKey],
        quorum: usize,
    ) -> Result<Checkpoint, TlogError> {
        let bad = |why: String| TlogError::Checkpoint(why);
        let parsed = Note::from_bytes(note).map_err(|e| bad(format!("not a signed note: {e}")))?;
        let body = tlog_tiles::Checkpoint::from_bytes(parsed.text())
            .map_err(|e| bad(format!("not a C2SP checkpoint: {e}")))?;
        if !body.extension().is_empty() {
            return Err(bad("extension lines are not used by vouch's log".into()));
        }
        let origin = body.origin().to_owned();
        let mut verifiers = Vec::new();
        for k in logs.iter().filter(|k| !k.cosigner && k.name == origin) {
            verifiers.push(k.verifier()?);
        }
        if verifiers.is_empty() {
            return Err(bad(format!("no trusted log key for origin {origin:?}")));
        }
        for k in witnesses.iter().filter(|k| k.cosigner) {
            verifiers.push(k.verifier()?);
        }
        let list = signed_note::VerifierList::new(verifiers);
        let (ok, _unknown) = parsed.verify(&list).map_err(|e| bad(format!("{origin}: {e}")))?;
        let log_signed = ok.iter().any(|s| s.name() == origin);
        let mut cosigned_by = BTreeMap::new();
        for s in ok.iter().filter(|s| s.name() != origin) {
            let ts = u64::from_be_bytes(s.signature()[..8].try_into().expect("checked: 72 bytes"));
            cosigned_by.insert(s.name().to_owned(), ts);
        }
        if !log_signed {
            return Err(bad(format!("{origin}: no valid signature by the log key")));
        }
        if cosigned_by.len() < quorum {
            return Err(bad(format!(
                "{origin} at size {}: cosigned by {} trusted witness(es) {:?}, the policy needs {quorum}",
                body.size(),
                cosigned_by.len(),
                cosigned_by.keys().collect::<Vec<_>>()
            )));
        }
        Ok(Checkpoint {
            origin,
            size: body.size(),
            root: body.hash().0,
            note: note.to_vec(),
            cosigned_by,
        })
    }

    /// The note text (the three lines that are signed).
    pub fn text(&self) -> String {
        checkpoint_text(&self.origin, self.size, &self.root_hash())
    }
}

/// `note` with signature `lines` (`— name base64\n` each) added; a line by a key already there
/// replaces that one.
pub fn add_signatures(note: &[u8], lines: &str) -> Result<Vec<u8>, TlogError> {
    let bad = |e: signed_note::NoteError| TlogError::Checkpoint(e.to_string());
    let parsed = Note::from_bytes(note).map_err(bad)?;
    let existing = &note[parsed.text().len() + 1..];
    let mut sigs: Vec<Signature> = Vec::new();
    for line in std::str::from_utf8(existing).unwrap_or("").lines().chain(lines.lines()) {
        if line.is_empty() {
            continue;
        }
        let s = Signature::from_bytes(line.as_bytes()).map_err(bad)?;
        // The first signature of a key is the one a verifier reads (later ones of the same key
        // are skipped), so it is the one kept: replacing it with a later line could turn a
        // note that verifies into one that does not (found by the `tlog` fuzz target).
        if !sigs.iter().any(|o| (o.name(), o.id()) == (s.name(), s.id())) {
            sigs.push(s);
        }
    }
    Ok(Note::new(parsed.text(), &sigs).map_err(bad)?.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (LogKey, CosignerKey, CosignerKey) {
        (
            LogKey::from_seed("example.com/log", [1; 32]).unwrap(),
            CosignerKey::from_seed("w1.example", [2; 32]).unwrap(),
            CosignerKey::from_seed("w2.example", [3; 32]).unwrap(),
        )
    }

    #[test]
    fn a_later_signature_of_the_same_key_does_not_replace_the_first() {
        let (log, w1, w2) = keys();
        let logk = [NoteVerifierKey::parse(log.vkey()).unwrap()];
        let ws = [
            NoteVerifierKey::parse(&w1.vkey()).unwrap(),
            NoteVerifierKey::parse(&w2.vkey()).unwrap(),
        ];
        let note = log.sign_checkpoint(5, &Hash([9; 32])).unwrap();
        // The log key's line again, with its signature bytes changed (key id kept).
        let text = std::str::from_utf8(&note).unwrap();
        let line = text.lines().find(|l| l.starts_with('\u{2014}')).unwrap();
        let (head, b64) = line.rsplit_once(' ').unwrap();
        let mut raw = BASE64_STANDARD.decode(b64).unwrap();
        *raw.last_mut().unwrap() ^= 1;
        let forged = format!("{head} {}\n", BASE64_STANDARD.encode(raw));
        let both = add_signatures(&note, &forged).unwrap();
        assert_eq!(both, note, "the first line of a key is kept");
        Checkpoint::verify(&both, &logk, &ws, 0).unwrap();
    }

    #[test]
    fn checkpoints_need_the_log_key_and_a_quorum() {
        let (log, w1, w2) = keys();
        let logk = [NoteVerifierKey::parse(log.vkey()).unwrap()];
        let ws = [
            NoteVerifierKey::parse(&w1.vkey()).unwrap(),
            NoteVerifierKey::parse(&w2.vkey()).unwrap(),
        ];
        assert!(ws.iter().all(|w| w.cosigner) && !logk[0].cosigner);
        let note = log.sign_checkpoint(5, &Hash([9; 32])).unwrap();
        let cp = Checkpoint::verify(&note, &logk, &ws, 0).unwrap();
        assert_eq!((cp.origin.as_str(), cp.size, cp.root), ("example.com/log", 5, [9; 32]));
        let e = Checkpoint::verify(&note, &logk, &ws, 1).unwrap_err().to_string();
        assert!(e.contains("cosigned by 0 trusted witness(es)"), "{e}");

        let text = cp.text();
        let cosigned = add_signatures(&note, &w1.cosign(text.as_bytes(), 1_700_000_000)).unwrap();
        let cp = Checkpoint::verify(&cosigned, &logk, &ws, 1).unwrap();
        assert_eq!(cp.cosigned_by, BTreeMap::from([("w1.example".into(), 1_700_000_000)]));
        assert!(Checkpoint::verify(&cosigned, &logk, &ws, 2).is_err());
        // The same witness twice is one witness; a second witness makes two.
        let twice = add_signatures(&cosigned, &w1.cosign(text.as_bytes(), 1_700_000_001)).unwrap();
        assert!(Checkpoint::verify(&twice, &logk, &ws, 2).is_err());
        let both = add_signatures(&twice, &w2.cosign(text.as_bytes(), 7)).unwrap();
        assert_eq!(Checkpoint::verify(&both, &logk, &ws, 2).unwrap().cosigned_by.len(), 2);

        // A cosignature over another checkpoint is invalid and rejects the note.
        let other = checkpoint_text("example.com/log", 6, &Hash([9; 32]));
        let forged = add_signatures(&note, &w2.cosign(other.as_bytes(), 7)).unwrap();
        assert!(Checkpoint::verify(&forged, &logk, &ws, 1).is_err());
        // Another log key, or none for this origin, is refused.
        let other_log = LogKey::from_seed("example.com/log", [7; 32]).unwrap();
        let k2 = [NoteVerifierKey::parse(other_log.vkey()).unwrap()];
        assert!(Checkpoint::verify(&note, &k2, &ws, 0).is_err());
        let k3 =
            [NoteVerifierKey::parse(LogKey::from_seed("x/y", [1; 32]).unwrap().vkey()).unwrap()];
        assert!(Checkpoint::verify(&note, &k3, &ws, 0)
            .unwrap_err()
            .to_string()
            .contains("no trusted log key"));
    }

    #[test]
    fn keys_round_trip_through_their_strings() {
        let (log, w1, _) = keys();
        assert_eq!(LogKey::from_skey(&log.skey).unwrap().vkey(), log.vkey());
        let (skey, vkey) = encode_keys("w1.example", ALG_COSIGNATURE_V1, &[2; 32]);
        assert_eq!(vkey, w1.vkey());
        assert_eq!(CosignerKey::from_skey(&skey).unwrap().vkey(), w1.vkey());
        assert!(NoteVerifierKey::parse("w1.example+00000000+BA==").is_err());
        let t = tempfile::tempdir().unwrap();
        let k = LogKey::load_or_generate(t.path(), Some("a.example/log")).unwrap();
        assert_eq!(LogKey::load_or_generate(t.path(), None).unwrap().vkey(), k.vkey());
        assert!(LogKey::load_or_generate(t.path(), Some("b.example/log")).is_err());
        let mode = std::fs::metadata(t.path().join("keys").join(LOG_KEY_FILE)).unwrap();
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
        // Publishers racing to make the first key all end with the same one.
        let t = tempfile::tempdir().unwrap();
        let keys: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| LogKey::load_or_generate(t.path(), Some("c.example/log"))))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap().unwrap().vkey().to_owned()).collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
    }
}
