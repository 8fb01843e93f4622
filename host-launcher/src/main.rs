//! `vouch`: the host launcher.
fn main() {
    eprintln!("vouch: not wired yet");
    std::process::exit(2);
}
