//! Peak heap accounting for the fuzz targets' "allocates no more than the input justifies"
//! invariant: a global allocator that forwards to the system allocator and counts, per thread,
//! the bytes live and the peak since [`measure`] started.
//!
//! One file, used by the cargo-fuzz binaries (`fuzz/src/lib.rs`) and by each crate's stable
//! seed-replay test (`<crate>/tests/fuzz_seeds.rs`, through `#[path]`), so both check the same
//! bound ([`nix_formats::fuzzing::AllocBound`]). Counters are thread-local (const-initialised
//! `Cell`s: no allocation, no destructor), so test threads running in parallel do not see each
//! other's allocations. Memory freed on another thread than the one that allocated it is not
//! tracked precisely; the targets run on one thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The counting allocator; install it with `#[global_allocator]`.
#[derive(Debug)]
pub struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn grow(n: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(n as isize);
        live.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

fn shrink(n: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(n as isize)));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged and only
// updates thread-local counters (which never allocate), so `System`'s guarantees carry over.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract, which `System.alloc` shares.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator, i.e. by `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        shrink(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr`/`layout` come from this allocator (i.e. `System`); the caller upholds
        // `realloc`'s contract for `new_size`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Both blocks exist for a moment: count the new one before freeing the old.
            grow(new_size);
            shrink(layout.size());
        }
        p
    }
}

/// Runs `f` and returns its result with the peak number of heap bytes it had live at once
/// (beyond what was live when it started), on this thread.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let r = f();
    let peak = PEAK.with(Cell::get);
    (r, peak.saturating_sub(start).max(0) as usize)
}
