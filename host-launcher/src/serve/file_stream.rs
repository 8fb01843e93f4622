//! A file's bytes as a response body stream: each chunk read with `pread` on a blocking thread
//! into a buffer of its own, the next chunk read while the current one is being sent.
//!
//! - **One copy** out of the page cache per byte (into the chunk that is sent), no buffer
//!   between the read and the stream, and one blocking task per [`CHUNK`].
//! - **Bounded**: at most two chunks of a stream exist at once, the one handed to the
//!   connection and the one being read.
//! - A file shorter than announced ends the stream with an error (the connection is then cut,
//!   as the response's `Content-Length` cannot be honoured).
//!
//! What is not here: ranges and headers ([`super::http`]).

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use axum::body::Bytes;
use futures_util::Stream;
use tokio::task::JoinHandle;

/// Bytes read at once.
pub const CHUNK: usize = 512 << 10;

type Read = JoinHandle<std::io::Result<Bytes>>;

fn read_at(file: &Arc<std::fs::File>, offset: u64, len: usize) -> Read {
    let file = file.clone();
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0; len];
        let mut got = 0;
        while got < len {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the file ended {} bytes early", len - got),
                    ))
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Bytes::from(buf))
    })
}

/// `count` bytes of `file` from `start`, in chunks of at most [`CHUNK`].
pub fn chunks(
    file: std::fs::File,
    start: u64,
    count: u64,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
    let file = Arc::new(file);
    let first = (count > 0).then(|| read_at(&file, start, CHUNK.min(count as usize)));
    // (file, where the chunk being read starts, bytes left from there, its read)
    let state = (file, start, count, first);
    futures_util::stream::unfold(state, |(file, offset, left, pending)| async move {
        let pending = pending?;
        let chunk = match pending.await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return Some((Err(e), (file, offset, 0, None))),
            Err(e) => return Some((Err(std::io::Error::other(e)), (file, offset, 0, None))),
        };
        let (offset, left) = (offset + chunk.len() as u64, left - chunk.len() as u64);
        let next = (left > 0).then(|| read_at(&file, offset, CHUNK.min(left as usize)));
        Some((Ok(chunk), (file, offset, left, next)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::io::Write;

    async fn collect(file: std::fs::File, start: u64, count: u64) -> (Vec<u8>, Option<String>) {
        let mut got = Vec::new();
        let mut s = Box::pin(chunks(file, start, count));
        while let Some(c) = s.next().await {
            match c {
                Ok(b) => {
                    assert!(b.len() <= CHUNK);
                    got.extend_from_slice(&b);
                }
                Err(e) => return (got, Some(e.to_string())),
            }
        }
        (got, None)
    }

    #[tokio::test]
    async fn whole_files_ranges_and_short_files() {
        let data: Vec<u8> = (0..(CHUNK * 2 + 1234)).map(|i| (i * 7 % 251) as u8).collect();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&data).unwrap();
        let open = || f.try_clone().unwrap();
        assert_eq!(collect(open(), 0, data.len() as u64).await, (data.clone(), None));
        let (a, n) = (CHUNK - 10, CHUNK + 20);
        assert_eq!(collect(open(), a as u64, n as u64).await, (data[a..a + n].to_vec(), None));
        assert_eq!(collect(open(), 5, 0).await, (vec![], None));
        // Announced longer than it is: an error, after the bytes that were there.
        let (got, err) = collect(open(), 0, data.len() as u64 + 1).await;
        assert!(err.unwrap().contains("ended 1 bytes early"));
        assert_eq!(got, data[..CHUNK * 2].to_vec());
    }
}
