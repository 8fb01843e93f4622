//! `vouch snp certs fetch|list`: this host's AMD certificates (VCEK and its chain) from AMD's
//! KDS, or from a directory on an offline host, into the state directory's cache that the
//! launcher reads (`host_launcher::snp::certs`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use build_trace::evidence::report::Product;
use host_launcher::snp::certs::{check_chain, check_vcek, import_dir, CertCache, Imported};
use host_launcher::snp::kds::{self, Kds};
use host_launcher::snp::platform::{host_product, HostIdentity, Platform};

use super::{CmdResult, Global};

/// `vouch snp …`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// AMD certificates of this host (VCEK, ASK, ARK).
    #[command(subcommand)]
    Certs(CertsCommand),
}

/// `vouch snp certs …`.
#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Fetch the VCEK for this chip and reported TCB (and the product's chain) from AMD's KDS,
    /// or import certificates from a directory (`--from`), into the cache.
    Fetch(FetchArgs),
    /// List the cached VCEKs.
    List,
}

/// Arguments of `vouch snp certs fetch`.
#[derive(Debug, clap::Args)]
pub struct FetchArgs {
    /// Import every certificate file in DIR instead of fetching (offline hosts): each VCEK is
    /// checked against AMD's roots and filed under the chip and TCB it names.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["report", "force"])]
    pub from: Option<PathBuf>,
    /// Name the VCEK from this raw attestation report (its CHIP_ID and REPORTED_TCB) instead of
    /// this host's /dev/sev.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// The product, where the report cannot say (version 2 reports of Milan and Genoa).
    #[arg(long, value_enum)]
    pub product: Option<ProductArg>,
    /// The KDS (or a mirror) to fetch from.
    #[arg(long, env = "VOUCH_KDS_URL", default_value = kds::AMD_KDS)]
    pub kds_url: String,
    /// Fetch again even if the cache has a valid VCEK for this identity.
    #[arg(long)]
    pub force: bool,
}

/// A product on the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ProductArg {
    /// EPYC 7003.
    Milan,
    /// EPYC 9004 / 8004 (also Bergamo, Siena).
    Genoa,
    /// EPYC 9005.
    Turin,
}

impl From<ProductArg> for Product {
    fn from(p: ProductArg) -> Product {
        match p {
            ProductArg::Milan => Product::Milan,
            ProductArg::Genoa => Product::Genoa,
            ProductArg::Turin => Product::Turin,
        }
    }
}

/// Run `vouch snp …`.
pub fn run(cmd: Command, global: &Global) -> CmdResult {
    let cache = CertCache::new(&global.state_dir());
    match cmd {
        Command::Certs(CertsCommand::Fetch(args)) => match &args.from {
            Some(dir) => import(&cache, dir),
            None => fetch(&cache, &args),
        },
        Command::Certs(CertsCommand::List) => list(&cache),
    }
}

fn identity(args: &FetchArgs) -> Result<HostIdentity, String> {
    let fallback = args.product.map(Product::from).or_else(host_product);
    if let Some(path) = &args.report {
        let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        return HostIdentity::from_report(&raw, fallback)
            .map_err(|e| format!("{}: {e}", path.display()));
    }
    let platform = Platform::probe().map_err(|e| {
        format!("{e}: run this on the SNP host, or name the chip with --report FILE")
    })?;
    if platform.status.mask_chip_id {
        return Err("the firmware masks CHIP_ID (mask_chip_id = 1): reports name no chip, so no \
                    VCEK applies; clear it with SNP_SET_CONFIG"
            .into());
    }
    let mut platform = platform;
    platform.product = platform.product.or(fallback);
    platform.identity().ok_or_else(|| {
        "cannot tell this host's product or chip ID (SEV_GET_ID2 failed?); give --product".into()
    })
}

fn fetch(cache: &CertCache, args: &FetchArgs) -> CmdResult {
    let id = identity(args)?;
    let now = SystemTime::now();
    if !args.force {
        if let Some(der) = cache.lookup(&id) {
            if check_vcek(&der, Some(&id), now).is_ok() {
                println!("{}", cache.vcek_file(&id).display());
                eprintln!("vouch: the cached VCEK for {id} is valid (--force fetches it again)");
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
    let mut kds = Kds::new(&args.kds_url);
    kds.on_retry = Box::new(|url, answer, wait| {
        eprintln!("vouch: {url}: {answer:?}; retrying in {} s", wait.as_secs());
    });
    if !cache.chain_file(id.product).is_file() {
        let pem = kds.get(&kds::chain_path(id.product))?;
        check_chain(id.product, &pem, now).map_err(|e| {
            format!("{}: {}", kds.url(&kds::chain_path(id.product)), build_trace::error_chain(&e))
        })?;
        cache.store_chain(id.product, &pem)?;
    }
    let path = kds::vcek_path(&id);
    let der = kds.get(&path)?;
    check_vcek(&der, Some(&id), now)
        .map_err(|e| format!("{}: {}", kds.url(&path), build_trace::error_chain(&e)))?;
    let stored = cache.store_vcek(&id, &der)?;
    println!("{}", stored.display());
    eprintln!("vouch: fetched and checked the VCEK for {id}");
    Ok(ExitCode::SUCCESS)
}

fn import(cache: &CertCache, dir: &std::path::Path) -> CmdResult {
    let done = import_dir(cache, dir, SystemTime::now())
        .map_err(|(file, why)| format!("{}: {why}", file.display()))?;
    let mut vceks = 0;
    for item in &done {
        match item {
            Imported::Vcek(id, path) => {
                vceks += 1;
                println!("{}", path.display());
                eprintln!("vouch: imported the VCEK for {id}");
            }
            Imported::Chain(p, path) => {
                eprintln!("vouch: imported the {p} chain to {}", path.display())
            }
            Imported::Known(what) => eprintln!("vouch: skipped {what} (not needed)"),
        }
    }
    if vceks == 0 {
        return Err(format!("{}: no VCEK among its files", dir.display()).into());
    }
    Ok(ExitCode::SUCCESS)
}

fn list(cache: &CertCache) -> CmdResult {
    let now = SystemTime::now();
    for path in cache.vceks() {
        let verdict = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|der| check_vcek(&der, None, now).map_err(|e| build_trace::error_chain(&e)));
        match verdict {
            Ok(id) => println!("{}  {id}", path.display()),
            Err(e) => println!("{}  INVALID: {e}", path.display()),
        }
    }
    Ok(ExitCode::SUCCESS)
}
