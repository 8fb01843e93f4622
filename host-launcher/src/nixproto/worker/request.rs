//! Reading one worker-protocol request: the operation's arguments, parsed into what
//! [`super::Conn`] runs, under the per-message budget ([`MessageBudget`]). Nothing here answers
//! the client or touches the store.

use nix_formats::StorePath;

use crate::core::ValidPathInfo;
use crate::nixproto::action::{Action, BuildDerivation, BuildMode, DerivedPath};
use crate::nixproto::types::{self, CodecError};
use crate::nixproto::version::{minor, ClientProfile};
use crate::nixproto::wire::{MessageBudget, WireRead};

/// One request, as read from the wire.
pub(super) enum Parsed<'a> {
    Action(Action<'a>),
    IsValid(StorePath),
    PathInfo(StorePath),
    Nar(StorePath),
    AddOne(Box<ValidPathInfo>, bool),
    AddMany(bool),
    /// `BuildPaths`/`BuildPathsWithResults`.
    Ensure {
        op: u64,
        wanted: Vec<String>,
        mode: BuildMode,
    },
    TempRoot(StorePath),
    /// `QueryMissing`: what would have to be built or fetched.
    Missing(Vec<String>),
    Unsupported,
}

/// Read the arguments of operation `op` from `r`.
pub(super) fn read<R: std::io::Read>(
    op: u64,
    r: &mut R,
    profile: &ClientProfile,
) -> Result<Parsed<'static>, CodecError> {
    let _budget = MessageBudget::start();
    let version = profile.version;
    Ok(match op {
        1 => Parsed::IsValid(types::read_store_path(r, "path")?),
        9 | 46 => {
            let wanted = r.read_string_list("derived paths")?;
            let mode =
                if minor(version) >= 15 { types::read_build_mode(r)? } else { BuildMode::Normal };
            Parsed::Ensure { op, wanted, mode }
        }
        11 => Parsed::TempRoot(types::read_store_path(r, "path")?),
        40 => Parsed::Missing(r.read_string_list("derived paths")?),
        19 => Parsed::Action(Action::SetOptions(types::read_client_options(r, version)?)),
        26 => Parsed::PathInfo(types::read_store_path(r, "path")?),
        31 => {
            let paths = types::read_store_path_set(r, "paths")?;
            let substitute = minor(version) >= 27 && r.read_bool()?;
            Parsed::Action(Action::QueryValidPaths { paths, substitute })
        }
        36 => {
            let drv_path = types::read_store_path(r, "drvPath")?;
            let drv = types::read_basic_derivation(r, &drv_path)?;
            let mode = types::read_build_mode(r)?;
            Parsed::Action(Action::BuildDerivation(Box::new(BuildDerivation {
                drv_path,
                drv,
                mode,
                options: None,
                client: profile.clone(),
            })))
        }
        38 => Parsed::Nar(types::read_store_path(r, "path")?),
        39 => {
            let info = types::read_upload_info(r)?;
            let repair = r.read_bool()?;
            let _dont_check_sigs = r.read_bool()?; // uploads are checked by content
            Parsed::AddOne(Box::new(info), repair)
        }
        44 => {
            let repair = r.read_bool()?;
            let _dont_check_sigs = r.read_bool()?;
            Parsed::AddMany(repair)
        }
        _ => Parsed::Unsupported,
    })
}

/// Paths a client names (`QueryMissing`): each with its store path when it is an opaque one
/// (`drv!out` derived paths and malformed ones have none).
pub(super) fn parse_wanted(wanted: Vec<String>) -> Vec<(String, Option<StorePath>)> {
    wanted
        .into_iter()
        .map(|w| {
            let p = match DerivedPath::parse(&w) {
                Ok(DerivedPath::Opaque(p)) => Some(p),
                _ => None,
            };
            (w, p)
        })
        .collect()
}
