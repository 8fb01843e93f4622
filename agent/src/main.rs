//! `vouch-agent`: PID 1 of a vouch build VM.
fn main() {
    eprintln!("vouch-agent: not wired yet");
    std::process::exit(1);
}
