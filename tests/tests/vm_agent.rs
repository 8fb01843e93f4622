//! The agent as PID 1 in a real VM: it powers the VM off whatever happens. `vouch bench boot`
//! boots an image with extra command-line words; the deliberate panic needs the bench image
//! (its agent has the `vouch.bench=` modes), and the real image must refuse them.

use std::path::Path;
use std::process::Command;

use test_support::vm::{bench_image_dir, bench_vouch_bin, image_dir};

fn boot(image: &Path, append: &str) -> (bool, String) {
    let out = Command::new(bench_vouch_bin())
        .args(["bench", "boot", "--timeout", "60", "--append", append, "--image"])
        .arg(image)
        .output()
        .expect("running vouch");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// A panicking agent (the `agent` profile aborts on panic) still powers the VM off: the panic
/// hook prints the panic and powers off; QEMU exits by itself.
#[test]
fn panicking_agent_powers_off() {
    let (ended_by_itself, text) = boot(&bench_image_dir(), "vouch.bench=panic");
    assert!(ended_by_itself, "the VM did not end by itself:\n{text}");
    assert!(text.contains("+bench starting"), "the bench image's agent says what it is: {text}");
    assert!(text.contains("PANIC: "), "{text}");
    assert!(text.contains("deliberate panic"), "{text}");
    assert!(text.contains("powering off"), "{text}");
    assert!(text.contains("exited with status 0"), "{text}");
}

/// A bad command line is a clear fatal error on the console, and the VM still powers off. The
/// real image's agent has no benchmark modes: to it `vouch.bench` is an unknown key.
#[test]
fn bad_command_line_powers_off_with_a_message() {
    let (ended_by_itself, text) = boot(&image_dir(), "vouch.bench=panic");
    assert!(ended_by_itself, "{text}");
    assert!(
        text.contains(
            "FATAL: kernel command line: unknown kernel command-line key \"vouch.bench\""
        ),
        "{text}"
    );
    assert!(!text.contains("PANIC"), "{text}");
}
