//! `vouch_probe`: a tiny program the confinement tests run as part of a builder inside the VM,
//! for the two escapes busybox cannot attempt: an `AF_VSOCK` connection to the host (CID 2) —
//! the host channel's port and any other — and `setuid(0)`/`setgid(0)`.
//!
//! It prints one `name: result` line per attempt (`ok`, or `denied (errno N)`) and always exits
//! 0, so the builder records what happened instead of failing. The tests compile this file
//! statically with `rustc -C target-feature=+crt-static` and put it in the derivation's inputs.
//! Only `std` and a few libc functions declared here: no crate is needed inside the guest.
//! Its `unsafe` is those libc calls, all in `main`, each with its SAFETY comment.
//!
//! Usage: `vouch_probe <host vsock port>`.

use std::io::Error;

#[repr(C)]
struct SockaddrVm {
    svm_family: u16,
    svm_reserved1: u16,
    svm_port: u32,
    svm_cid: u32,
    svm_flags: u8,
    svm_zero: [u8; 3],
}

const AF_VSOCK: i32 = 40;
const AF_INET: i32 = 2;
const SOCK_STREAM: i32 = 1;
const VMADDR_CID_HOST: u32 = 2;

extern "C" {
    fn socket(domain: i32, ty: i32, protocol: i32) -> i32;
    fn socketpair(domain: i32, ty: i32, protocol: i32, sv: *mut i32) -> i32;
    fn connect(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn close(fd: i32) -> i32;
    fn setuid(uid: u32) -> i32;
    fn setgid(gid: u32) -> i32;
}

fn result(r: i32) -> String {
    if r < 0 {
        format!("denied (errno {})", Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        "ok".to_owned()
    }
}

fn main() {
    let port: u32 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(1024);
    // SAFETY: plain socket(2) call with constant arguments.
    let fd = unsafe { socket(AF_VSOCK, SOCK_STREAM, 0) };
    println!("vsock-socket: {}", result(fd));
    if fd >= 0 {
        let addr = SockaddrVm {
            svm_family: AF_VSOCK as u16,
            svm_reserved1: 0,
            svm_port: port,
            svm_cid: VMADDR_CID_HOST,
            svm_flags: 0,
            svm_zero: [0; 3],
        };
        let len = std::mem::size_of::<SockaddrVm>() as u32;
        // SAFETY: `addr` is a valid sockaddr_vm that lives for the call; `fd` is ours.
        let r = unsafe { connect(fd, &addr, len) };
        println!("vsock-connect-host: {}", result(r));
        // SAFETY: closing our own descriptor.
        unsafe { close(fd) };
    } else {
        println!("vsock-connect-host: denied (no vsock socket)");
    }
    let mut pair = [0i32; 2];
    // SAFETY: `pair` has room for the two descriptors.
    let r = unsafe { socketpair(AF_VSOCK, SOCK_STREAM, 0, pair.as_mut_ptr()) };
    println!("vsock-socketpair: {}", result(r));
    // A control: ordinary sockets still work.
    // SAFETY: plain socket(2) call with constant arguments.
    println!("inet-socket: {}", result(unsafe { socket(AF_INET, SOCK_STREAM, 0) }));
    // SAFETY: plain system calls with constant arguments.
    println!("setgid0: {}", result(unsafe { setgid(0) }));
    // SAFETY: as above.
    println!("setuid0: {}", result(unsafe { setuid(0) }));
}
