//! The certificate table a host may attach to an extended attestation report: what the guest
//! reads from configfs-tsm's `auxblob` or the `certs_address` buffer of `SNP_GET_EXT_REPORT`.
//!
//! Format (GHCB specification 56421, §4.1.8.1, MSG_REPORT_REQ): a list of 24-byte entries
//! `{ guid: [u8; 16], offset: u32 LE, length: u32 LE }`, ended by an all-zero entry; each
//! offset counts from the start of the table, and the certificates (DER) follow the entries.
//! The GUIDs name the certificate: ARK, ASK, VCEK, VLEK, CRL. virtee/sev and go-sev-guest write
//! them in RFC 4122 byte order; a host that writes an EFI `guid_t` uses the mixed-endian form,
//! so both are accepted (the known GUIDs cannot be confused either way).
//!
//! What is here: parsing ([`parse`]) and writing ([`encode`], used to describe a host's table in
//! tests and by hosts that supply one). What is not here: trusting the certificates. A table
//! comes from the untrusted host; its certificates are only ever checked against AMD's pinned
//! roots like any other ([`super::verify`]).

use std::fmt;

/// What a table entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertKind {
    /// AMD Root Key.
    Ark,
    /// AMD SEV Key (the VCEK's intermediate).
    Ask,
    /// Versioned Chip Endorsement Key.
    Vcek,
    /// Versioned Loaded Endorsement Key (cloud providers).
    Vlek,
    /// Certificate revocation list.
    Crl,
    /// A GUID this parser does not know (kept, never used).
    Other([u8; 16]),
}

/// The GUIDs of the known kinds, as text.
const KNOWN: [(CertKind, &str); 5] = [
    (CertKind::Ark, "c0b406a4-a803-4952-9743-3fb6014cd0ae"),
    (CertKind::Ask, "4ab7b379-bbac-4fe4-a02f-05aef327c782"),
    (CertKind::Vcek, "63da758d-e664-4564-adc5-f4b93be8accd"),
    (CertKind::Vlek, "a8074bc2-a25a-483e-aae6-39c045a0b8a1"),
    (CertKind::Crl, "92f81bc3-5811-4d3d-97ff-d19f88dc67ea"),
];

/// Size of one entry.
pub const ENTRY_LEN: usize = 24;

fn guid_bytes(text: &str) -> [u8; 16] {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0);
    }
    out
}

/// RFC 4122 bytes ↔ EFI mixed-endian bytes (the first three fields swapped); an involution.
fn swap_mixed(g: [u8; 16]) -> [u8; 16] {
    let mut m = g;
    m[0..4].reverse();
    m[4..6].reverse();
    m[6..8].reverse();
    m
}

impl CertKind {
    /// The kind of a GUID in either byte order.
    pub fn from_guid(guid: [u8; 16]) -> CertKind {
        KNOWN
            .iter()
            .find(|(_, text)| {
                let rfc = guid_bytes(text);
                guid == rfc || guid == swap_mixed(rfc)
            })
            .map(|(k, _)| *k)
            .unwrap_or(CertKind::Other(guid))
    }

    /// The GUID in RFC 4122 byte order.
    pub fn guid(self) -> [u8; 16] {
        match self {
            CertKind::Other(g) => g,
            k => {
                KNOWN.iter().find(|(kk, _)| *kk == k).map(|(_, t)| guid_bytes(t)).unwrap_or([0; 16])
            }
        }
    }
}

impl fmt::Display for CertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertKind::Ark => f.write_str("ARK"),
            CertKind::Ask => f.write_str("ASK"),
            CertKind::Vcek => f.write_str("VCEK"),
            CertKind::Vlek => f.write_str("VLEK"),
            CertKind::Crl => f.write_str("CRL"),
            CertKind::Other(g) => write!(f, "unknown GUID {}", hex::encode(g)),
        }
    }
}

/// One certificate of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertEntry {
    /// What it is.
    pub kind: CertKind,
    /// Its bytes (DER for certificates).
    pub data: Vec<u8>,
}

/// Why bytes are not a certificate table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertTableError {
    /// The entries run past the end without a terminator.
    #[error("certificate table of {0} bytes has no terminating all-zero entry")]
    Unterminated(usize),
    /// Two entries share bytes (each certificate has its own; this also keeps the entries'
    /// copies within the table's size).
    #[error("certificate table entries {first} and {second} overlap")]
    Overlap {
        /// The entry that starts first.
        first: usize,
        /// The entry that starts inside it.
        second: usize,
    },
    /// An entry points outside the table.
    #[error("certificate table entry {index} ({kind}) covers bytes {offset}..{end}, past the table's {len} bytes")]
    OutOfBounds {
        /// Entry index.
        index: usize,
        /// Its kind.
        kind: CertKind,
        /// Offset.
        offset: u64,
        /// Offset plus length.
        end: u64,
        /// Table length.
        len: usize,
    },
}

/// The entries of a table. An empty input, or one that starts with the terminator, is an empty
/// table (a host that supplies no certificates). Entries must not share bytes, so what they
/// hold is never more than the table (their bytes are copied only once that is checked).
pub fn parse(table: &[u8]) -> Result<Vec<CertEntry>, CertTableError> {
    if table.iter().all(|b| *b == 0) {
        return Ok(Vec::new());
    }
    let mut found: Vec<(CertKind, u64, u64)> = Vec::new();
    for (index, raw) in table.chunks(ENTRY_LEN).enumerate() {
        if raw.len() < ENTRY_LEN {
            break;
        }
        if raw.iter().all(|b| *b == 0) {
            disjoint(&found)?;
            let copy = |&(kind, offset, end): &(CertKind, u64, u64)| CertEntry {
                kind,
                data: table[offset as usize..end as usize].to_vec(),
            };
            return Ok(found.iter().map(copy).collect());
        }
        let mut guid = [0u8; 16];
        guid.copy_from_slice(&raw[..16]);
        let offset = u32::from_le_bytes([raw[16], raw[17], raw[18], raw[19]]) as u64;
        let length = u32::from_le_bytes([raw[20], raw[21], raw[22], raw[23]]) as u64;
        let kind = CertKind::from_guid(guid);
        let end = offset + length;
        if end > table.len() as u64 {
            return Err(CertTableError::OutOfBounds { index, kind, offset, end, len: table.len() });
        }
        found.push((kind, offset, end));
    }
    Err(CertTableError::Unterminated(table.len()))
}

/// Whether the entries' non-empty byte ranges are pairwise disjoint.
fn disjoint(found: &[(CertKind, u64, u64)]) -> Result<(), CertTableError> {
    let mut ranges: Vec<(u64, u64, usize)> = found
        .iter()
        .enumerate()
        .filter(|(_, (_, start, end))| start < end)
        .map(|(i, &(_, start, end))| (start, end, i))
        .collect();
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        let ((_, end, first), (start, _, second)) = (pair[0], pair[1]);
        if start < end {
            return Err(CertTableError::Overlap { first, second });
        }
    }
    Ok(())
}

/// A table holding `entries` in order (GUIDs in RFC 4122 byte order).
pub fn encode(entries: &[CertEntry]) -> Vec<u8> {
    let header = (entries.len() + 1) * ENTRY_LEN;
    let mut table = Vec::with_capacity(header);
    let mut offset = header;
    for e in entries {
        table.extend_from_slice(&e.kind.guid());
        table.extend_from_slice(&(offset as u32).to_le_bytes());
        table.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
        offset += e.data.len();
    }
    table.extend_from_slice(&[0u8; ENTRY_LEN]);
    for e in entries {
        table.extend_from_slice(&e.data);
    }
    table
}

/// The endorsement key (VCEK, else VLEK) of a table, with its kind.
pub fn endorsement_key(entries: &[CertEntry]) -> Option<&CertEntry> {
    entries
        .iter()
        .find(|e| e.kind == CertKind::Vcek)
        .or_else(|| entries.iter().find(|e| e.kind == CertKind::Vlek))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<CertEntry> {
        vec![
            CertEntry { kind: CertKind::Ark, data: vec![1; 10] },
            CertEntry { kind: CertKind::Ask, data: vec![2; 3] },
            CertEntry { kind: CertKind::Vcek, data: vec![3; 7] },
        ]
    }

    #[test]
    fn round_trip_and_layout() {
        let t = encode(&entries());
        assert_eq!(t.len(), 4 * ENTRY_LEN + 20);
        // First entry: the ARK GUID in RFC order, offset = header size.
        assert_eq!(&t[..4], &[0xc0, 0xb4, 0x06, 0xa4]);
        assert_eq!(u32::from_le_bytes(t[16..20].try_into().unwrap()), 96);
        assert_eq!(parse(&t).unwrap(), entries());
        assert_eq!(endorsement_key(&parse(&t).unwrap()).unwrap().data, vec![3; 7]);
    }

    /// Found by the `cert_table` fuzz target: entries could point at the same bytes, so a table
    /// of n bytes made the parser copy about n²/24 bytes (every entry covering the whole table).
    #[test]
    fn overlapping_entries_are_refused() {
        let mut t = encode(&entries());
        // The ASK's offset moved into the ARK's bytes.
        let ark_offset = u32::from_le_bytes(t[16..20].try_into().unwrap());
        t[ENTRY_LEN + 16..ENTRY_LEN + 20].copy_from_slice(&(ark_offset + 2).to_le_bytes());
        assert_eq!(parse(&t), Err(CertTableError::Overlap { first: 0, second: 1 }));
        // Adjacent entries and empty ones are fine.
        let mut t = encode(&entries());
        t[ENTRY_LEN + 20..ENTRY_LEN + 24].copy_from_slice(&0u32.to_le_bytes());
        t[ENTRY_LEN + 16..ENTRY_LEN + 20].copy_from_slice(&(ark_offset + 3).to_le_bytes());
        assert_eq!(parse(&t).unwrap()[1].data, Vec::<u8>::new());
        let mut whole = vec![0u8; 4 * ENTRY_LEN];
        for i in 0..3 {
            whole[i * ENTRY_LEN..i * ENTRY_LEN + 16].copy_from_slice(&CertKind::Ark.guid());
            whole[i * ENTRY_LEN + 20..i * ENTRY_LEN + 24]
                .copy_from_slice(&((4 * ENTRY_LEN) as u32).to_le_bytes());
        }
        assert!(matches!(parse(&whole), Err(CertTableError::Overlap { .. })));
    }

    #[test]
    fn mixed_endian_guids_are_recognised() {
        let mut t = encode(&entries()[2..]);
        let swapped = swap_mixed(CertKind::Vcek.guid());
        t[..16].copy_from_slice(&swapped);
        assert_eq!(parse(&t).unwrap()[0].kind, CertKind::Vcek);
        assert_ne!(swapped, CertKind::Vcek.guid());
    }

    #[test]
    fn empty_tables_and_bad_ones() {
        assert!(parse(&[]).unwrap().is_empty());
        assert!(parse(&[0u8; 4096]).unwrap().is_empty(), "a host that supplies nothing");
        let mut t = encode(&entries());
        // Point the ASK past the end.
        t[ENTRY_LEN + 16..ENTRY_LEN + 20].copy_from_slice(&1000u32.to_le_bytes());
        let e = parse(&t).unwrap_err();
        assert!(
            matches!(e, CertTableError::OutOfBounds { index: 1, kind: CertKind::Ask, .. }),
            "{e}"
        );
        // No terminator: one entry (an empty ARK right after it) and nothing else.
        let mut t = CertKind::Ark.guid().to_vec();
        t.extend_from_slice(&(ENTRY_LEN as u32).to_le_bytes());
        t.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(parse(&t), Err(CertTableError::Unterminated(ENTRY_LEN)));
        let unknown = CertKind::from_guid([9; 16]);
        assert_eq!(unknown, CertKind::Other([9; 16]));
        assert!(unknown.to_string().contains("0909"));
    }
}
