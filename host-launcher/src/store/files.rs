//! Files in and out of the content store: a batch of NAR files as an upload ([`FileUploads`]:
//! a build's outputs, an HTTP upload's staged NAR), and a stored `.drv`'s bytes
//! ([`drv_contents`]).

use std::fs::File;
use std::path::PathBuf;

use nix_formats::nar::{NarEvent, NarLimits, NarReader};

use crate::core::{UploadError, UploadSource, ValidPathInfo};

/// The largest `.drv` file read from the store ([`drv_contents`]).
pub const MAX_DRV_BYTES: u64 = 16 << 20;

/// The contents of a stored NAR that is one regular file (how a `.drv` is stored), at most
/// [`MAX_DRV_BYTES`].
pub fn drv_contents(file: std::fs::File) -> Result<Vec<u8>, String> {
    let limits = NarLimits { max_file_size: MAX_DRV_BYTES, ..NarLimits::default() };
    let mut r = NarReader::new(std::io::BufReader::new(file), limits);
    match r.next_event().map_err(|e| e.to_string())? {
        Some(NarEvent::Regular { size, .. }) => {
            let mut out = vec![0u8; size as usize];
            let mut got = 0;
            while got < out.len() {
                let n = r.read_contents(&mut out[got..]).map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("the file ended early".into());
                }
                got += n;
            }
            Ok(out)
        }
        other => Err(format!("expected a regular file, found {other:?}")),
    }
}

/// Uploads from files (built outputs): each item is a path's info and the file holding its NAR.
#[derive(Debug)]
pub struct FileUploads {
    items: std::vec::IntoIter<(ValidPathInfo, PathBuf)>,
    current: Option<std::io::BufReader<File>>,
    empty: std::io::Empty,
}

impl FileUploads {
    /// A batch from `(info, NAR file)` pairs.
    pub fn new(items: Vec<(ValidPathInfo, PathBuf)>) -> Self {
        FileUploads { items: items.into_iter(), current: None, empty: std::io::empty() }
    }
}

impl UploadSource for FileUploads {
    fn next_path(&mut self) -> Result<Option<ValidPathInfo>, UploadError> {
        let Some((info, file)) = self.items.next() else {
            self.current = None;
            return Ok(None);
        };
        let f = File::open(&file).map_err(|e| format!("opening {}: {e}", file.display()))?;
        self.current = Some(std::io::BufReader::new(f));
        Ok(Some(info))
    }

    fn nar(&mut self) -> &mut dyn std::io::Read {
        match &mut self.current {
            Some(r) => r,
            None => &mut self.empty,
        }
    }
}
