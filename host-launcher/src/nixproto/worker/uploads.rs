//! The NAR streams of worker-protocol uploads, as [`UploadSource`]s for the content store: one path of
//! `AddToStoreNar` (op 39) or the batch of `AddMultipleToStore` (op 44), both inside a framed
//! stream. Each NAR is bounded by its declared size; a broken stream is remembered, so the
//! front-end can tell a client that hung up (nothing to answer) from a bad upload (answered with
//! an error after the rest of the frames are drained).

use std::io::{self, Read};

use super::super::action::error_chain;
use super::super::types::{self, CodecError};
use super::super::wire::{FramedReader, MessageBudget, Taken, WireError, WireRead};
use crate::core::{UploadError, UploadSource, ValidPathInfo};

/// `AddToStoreNar`: one path, its NAR in the framed stream.
pub(super) struct OneUpload<'f, 'r, R: Read + ?Sized> {
    pub(super) info: Option<ValidPathInfo>,
    pub(super) nar: Taken<'f, FramedReader<'r, R>>,
}

impl<R: Read + ?Sized> UploadSource for OneUpload<'_, '_, R> {
    fn next_path(&mut self) -> Result<Option<ValidPathInfo>, UploadError> {
        self.nar.skip_rest()?;
        let info = self.info.take();
        match &info {
            Some(i) => self.nar.left = i.info.nar_size,
            None => check_end(&mut self.nar)?,
        }
        Ok(info)
    }

    fn nar(&mut self) -> &mut dyn Read {
        &mut self.nar
    }
}

/// `AddMultipleToStore`: in the framed stream, a count, then per path its info and NAR.
pub(super) struct ManyUploads<'f, 'r, R: Read + ?Sized> {
    pub(super) left: Option<u64>,
    pub(super) nar: Taken<'f, FramedReader<'r, R>>,
    pub(super) bad: Option<String>,
}

impl<R: Read + ?Sized> UploadSource for ManyUploads<'_, '_, R> {
    fn next_path(&mut self) -> Result<Option<ValidPathInfo>, UploadError> {
        if let Some(bad) = &self.bad {
            return Err(bad.clone().into());
        }
        self.nar.skip_rest()?;
        // Each path's info is a message of its own (the NARs between them are not counted).
        let _budget = MessageBudget::start();
        let left = match self.left {
            Some(n) => n,
            None => match self.nar.inner.read_count("number of paths") {
                Ok(n) => n as u64,
                Err(e) => return Err(self.note(e)),
            },
        };
        if left == 0 {
            self.left = Some(0);
            check_end(&mut self.nar)?;
            return Ok(None);
        }
        let info = match types::read_upload_info(&mut *self.nar.inner) {
            Ok(info) => info,
            Err(CodecError::Wire(w)) => return Err(self.note(w)),
            Err(other) => {
                self.bad = Some(error_chain(&other));
                return Err(Box::new(other));
            }
        };
        self.left = Some(left - 1);
        self.nar.left = info.info.nar_size;
        Ok(Some(info))
    }

    fn nar(&mut self) -> &mut dyn Read {
        &mut self.nar
    }
}

impl<R: Read + ?Sized> ManyUploads<'_, '_, R> {
    fn note(&mut self, e: WireError) -> UploadError {
        match &e {
            WireError::Eof => self.nar.wire_failed = Some(io::ErrorKind::UnexpectedEof),
            WireError::Io(io) if io.kind() != io::ErrorKind::InvalidData => {
                self.nar.wire_failed = Some(io.kind())
            }
            _ => {}
        }
        Box::new(e)
    }
}

/// After the last NAR the framed stream must end: bytes beyond it mean the declared sizes were
/// wrong, and the upload is refused before anything is committed.
fn check_end<R: Read + ?Sized>(
    nar: &mut Taken<'_, FramedReader<'_, R>>,
) -> Result<(), UploadError> {
    match nar.inner.drain() {
        Ok(0) => Ok(()),
        Ok(extra) => Err(format!(
            "the upload carried {extra} bytes after its last NAR (a declared narSize is wrong)"
        )
        .into()),
        Err(e) => {
            if matches!(e, WireError::Eof)
                || matches!(&e, WireError::Io(io) if io.kind() != io::ErrorKind::InvalidData)
            {
                nar.wire_failed = Some(io::ErrorKind::UnexpectedEof);
            }
            Err(Box::new(e))
        }
    }
}
