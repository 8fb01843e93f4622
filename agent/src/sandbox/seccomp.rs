//! The builder's seccomp filter, written out as classic BPF (sixteen instructions, no library).
//!
//! What it denies, and why:
//! - `socket`/`socketpair` with domain `AF_VSOCK` (40) → `EAFNOSUPPORT`, as if the kernel had no
//!   vsock: the host channel is vsock, and a builder that reached it (or any other vsock port on
//!   the host) could talk to the host behind the agent's back. Every other address family stays
//!   (loopback TCP/UDP, Unix sockets), as in Nix's sandbox.
//! - `io_uring_setup`/`io_uring_enter`/`io_uring_register` → `ENOSYS`: io_uring can create
//!   sockets without the `socket` system call (`IORING_OP_SOCKET`), which this filter could not
//!   see. (Our kernel is built without io_uring; the rule keeps that true if it ever is not.)
//! - any other system-call ABI than native x86-64 (i386 `int 0x80`, x32) → `ENOSYS`: on i386,
//!   sockets are made through `socketcall`, whose arguments live in memory where a filter cannot
//!   read them.
//!
//! Everything else is allowed: the filter is one of several layers (unprivileged uid, no new
//! privileges, namespaces, no device nodes); see `docs/threat-model.md`.
//!
//! What is not here: installing the program (`super::sys::install_filter`).

use libc::sock_filter;

/// `AUDIT_ARCH_X86_64` (`EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE`).
pub const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// System-call numbers with this bit set are the x32 ABI.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// `AF_VSOCK`.
pub const AF_VSOCK: u32 = 40;

// Offsets into `struct seccomp_data` { int nr; u32 arch; u64 ip; u64 args[6]; }.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// The low 32 bits of `args[0]` (little endian); `socket`'s domain is an `int`, and the kernel
/// looks at those bits only.
const OFF_ARG0_LO: u32 = 16;

const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// The action that allows a system call.
pub const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;

/// The action that fails a system call with `errno`.
pub const fn deny(errno: i32) -> u32 {
    libc::SECCOMP_RET_ERRNO | (errno as u32 & libc::SECCOMP_RET_DATA)
}

const fn ins(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// The filter (see the module documentation). Jump offsets are relative to the next
/// instruction; the unit tests run the program on every branch.
pub fn builder_filter() -> Vec<sock_filter> {
    let nr = |n: libc::c_long| n as u32;
    vec![
        /* 0 */ ins(LD_W_ABS, 0, 0, OFF_ARCH),
        /* 1 */ ins(JEQ_K, 1, 0, AUDIT_ARCH_X86_64), // → 3, else → 2
        /* 2 */ ins(RET_K, 0, 0, deny(libc::ENOSYS)),
        /* 3 */ ins(LD_W_ABS, 0, 0, OFF_NR),
        /* 4 */ ins(JGE_K, 6, 0, X32_SYSCALL_BIT), // → 11
        /* 5 */ ins(JEQ_K, 6, 0, nr(libc::SYS_socket)), // → 12
        /* 6 */ ins(JEQ_K, 5, 0, nr(libc::SYS_socketpair)), // → 12
        /* 7 */ ins(JEQ_K, 3, 0, nr(libc::SYS_io_uring_setup)), // → 11
        /* 8 */ ins(JEQ_K, 2, 0, nr(libc::SYS_io_uring_enter)), // → 11
        /* 9 */ ins(JEQ_K, 1, 0, nr(libc::SYS_io_uring_register)), // → 11
        /* 10 */ ins(RET_K, 0, 0, ALLOW),
        /* 11 */ ins(RET_K, 0, 0, deny(libc::ENOSYS)),
        /* 12 */ ins(LD_W_ABS, 0, 0, OFF_ARG0_LO),
        /* 13 */ ins(JEQ_K, 0, 1, AF_VSOCK), // → 14, else → 15
        /* 14 */ ins(RET_K, 0, 0, deny(libc::EAFNOSUPPORT)),
        /* 15 */ ins(RET_K, 0, 0, ALLOW),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A classic-BPF interpreter for the instructions the filter uses, over a `seccomp_data`.
    fn run(prog: &[sock_filter], nr: u32, arch: u32, arg0: u64) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        data[16..24].copy_from_slice(&arg0.to_le_bytes());
        let (mut pc, mut acc) = (0usize, 0u32);
        for _ in 0..prog.len() {
            let i = prog[pc];
            let jump = |cond: bool| pc + 1 + if cond { i.jt as usize } else { i.jf as usize };
            pc = match i.code {
                LD_W_ABS => {
                    let o = i.k as usize;
                    acc = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
                    pc + 1
                }
                JEQ_K => jump(acc == i.k),
                JGE_K => jump(acc >= i.k),
                RET_K => return i.k,
                other => panic!("unexpected instruction {other:#x}"),
            };
            assert!(pc < prog.len(), "jumped past the end");
        }
        panic!("no return")
    }

    const X86: u32 = AUDIT_ARCH_X86_64;
    const SOCKET: u32 = libc::SYS_socket as u32;
    const SOCKETPAIR: u32 = libc::SYS_socketpair as u32;

    #[test]
    fn vsock_sockets_are_refused_and_others_allowed() {
        let p = builder_filter();
        assert_eq!(run(&p, SOCKET, X86, 40), deny(libc::EAFNOSUPPORT));
        assert_eq!(run(&p, SOCKETPAIR, X86, 40), deny(libc::EAFNOSUPPORT));
        // Garbage in the upper half of the register does not hide the domain.
        assert_eq!(run(&p, SOCKET, X86, 0xffff_ffff_0000_0028), deny(libc::EAFNOSUPPORT));
        for domain in [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6, libc::AF_NETLINK] {
            assert_eq!(run(&p, SOCKET, X86, domain as u64), ALLOW, "domain {domain}");
            assert_eq!(run(&p, SOCKETPAIR, X86, domain as u64), ALLOW, "domain {domain}");
        }
    }

    #[test]
    fn io_uring_and_foreign_abis_are_refused() {
        let p = builder_filter();
        for n in [libc::SYS_io_uring_setup, libc::SYS_io_uring_enter, libc::SYS_io_uring_register] {
            assert_eq!(run(&p, n as u32, X86, 0), deny(libc::ENOSYS));
        }
        // x32 socket(AF_VSOCK) and i386 socketcall.
        assert_eq!(run(&p, X32_SYSCALL_BIT | 41, X86, 40), deny(libc::ENOSYS));
        assert_eq!(run(&p, 102, 0x4000_0003, 1), deny(libc::ENOSYS));
    }

    #[test]
    fn ordinary_system_calls_pass() {
        let p = builder_filter();
        for n in
            [libc::SYS_read, libc::SYS_write, libc::SYS_execve, libc::SYS_clone, libc::SYS_connect]
        {
            assert_eq!(run(&p, n as u32, X86, 40), ALLOW, "syscall {n}");
        }
    }

    /// The real kernel agrees with the interpreter: a child with the filter installed cannot
    /// make a vsock socket but can make the others.
    #[test]
    fn the_kernel_enforces_the_filter() {
        let results = super::super::sys::probe_filter_in_child(&builder_filter());
        let results = results.expect("forking the probe child");
        assert_eq!(results.vsock_socket, Err(libc::EAFNOSUPPORT));
        assert_eq!(results.vsock_socketpair, Err(libc::EAFNOSUPPORT));
        assert_eq!(results.inet_socket, Ok(()));
        assert_eq!(results.unix_socketpair, Ok(()));
        assert_eq!(results.io_uring_setup, Err(libc::ENOSYS));
        assert_eq!(results.no_new_privs, 1);
    }
}
