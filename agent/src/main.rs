//! `vouch-agent`: PID 1 of a vouch build VM (see the crate docs). `--version` prints the version
//! (the image build records it); anything else requires running as PID 1.
#![forbid(unsafe_code)]

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("{}", agent::session::agent_version());
        return;
    }
    if std::process::id() != 1 {
        eprintln!("vouch-agent runs only as PID 1 of a vouch build VM (try --version)");
        std::process::exit(2);
    }
    agent::pid1::install_panic_hook();
    agent::run::pid1_main();
}
