//! The transparency log's host side over the network (`docs/transparency-log.md`): reading a
//! log over HTTP, the witness's HTTP endpoint, and asking witnesses to cosign.
//!
//! What is here: plain HTTP/1.1 over TCP (`http://` only: put TLS in front, as for `vouch
//! serve`). What is not: the log's format and rules (`build_trace::tlog`), the launcher's log
//! key and origin (`crate::core::keys`).

pub mod client;
pub mod http1;
pub mod witness;
