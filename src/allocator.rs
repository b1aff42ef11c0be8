//! The global allocator of `dualroute run`: mimalloc for small blocks,
//! the system's (glibc's) for large ones.
//!
//! Kept because it is worth it (issue 22, BENCHMARKS.md "Issue 22"):
//! callgrind counts 27k to 36k fewer instructions per milter conversation
//! than the same build on plain glibc malloc (186k instead of 215k at one
//! connection, 172k instead of 208k at 64: glibc costs 1.14× to 1.21×),
//! in two runs. On this shared machine the wall clock did not separate
//! them (CPU per conversation 0.93× to 0.98× with mimalloc, ±15% noise).
//! Its cost is memory: 1M accounts peak at 48.2 MiB instead of 41.6 on
//! the old account table; on the hashbrown one, 41.3 MiB with it.
//!
//! Why two (BENCHMARKS.md, "Third round"): a milter conversation makes
//! some 90 small allocations, and with 64 connections open glibc's bins
//! cost 1.7× what the no-op milter's allocations cost; mimalloc took 14k
//! to 19k instructions off every conversation. But the account set of a
//! domain grows as a few large vectors, which glibc grows in place
//! (`mremap`) and mimalloc by copying, and mimalloc keeps freed pages a
//! while: with mimalloc alone, 1M accounts peaked at 59.9 MiB instead of
//! 42.1 MiB (issue 10 allows 48 MB). Blocks of [`LARGE`] and more stay
//! with glibc: 45.2 MiB at 4 KiB (47.1 at 64 KiB, 53.0 at 1 MiB), and the
//! conversation's allocations, all smaller, keep mimalloc's gain.
//!
//! Sound because Rust hands `dealloc` and `realloc` the layout a block was
//! allocated with (`GlobalAlloc`'s contract): its size says which
//! allocator owns it.
//!
//! mimalloc is called through its own functions (libmimalloc-sys), not
//! the mimalloc crate's allocator: that one asks for every block through
//! `mi_malloc_aligned`, whose checks, and its slow path when the alignment
//! exceeds the size (a 4-byte block aligned to 8), cost a conversation
//! some 2k instructions (BENCHMARKS.md, "Fourth round"). Every mimalloc
//! block is aligned to at least a machine word, so a layout that asks for
//! no more ([`WORD`]) goes to plain `mi_malloc`, as std's system allocator
//! sends such layouts to plain `malloc`.

use libmimalloc_sys as mi;
use std::alloc::{GlobalAlloc, Layout, System};

/// The alignment of every block mimalloc hands out: a machine word.
const WORD: usize = std::mem::size_of::<usize>();

/// From this size on, a block is the system allocator's. (Taking a
/// connection's two 8 KiB buffers too, tokio's `BufStream`, saved no
/// instruction and raised the peak of 1M accounts by 2 MiB, to 47.2.)
pub const LARGE: usize = 4096;

/// See the module documentation.
pub struct Allocator;

fn large(size: usize) -> bool {
    size >= LARGE
}

// SAFETY: every call is passed to the allocator that owns the block, chosen
// by the size of its layout, which is the same at allocation and release.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if large(layout.size()) {
            System.alloc(layout)
        } else if layout.align() <= WORD {
            mi::mi_malloc(layout.size()).cast()
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if large(layout.size()) {
            System.alloc_zeroed(layout)
        } else if layout.align() <= WORD {
            mi::mi_zalloc(layout.size()).cast()
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if large(layout.size()) {
            System.dealloc(ptr, layout)
        } else {
            mi::mi_free(ptr.cast())
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match (large(layout.size()), large(new_size)) {
            (true, true) => System.realloc(ptr, layout, new_size),
            (false, false) if layout.align() <= WORD => mi::mi_realloc(ptr.cast(), new_size).cast(),
            (false, false) => mi::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast(),
            // Across the line: a new block from the other allocator.
            _ => {
                // SAFETY: the caller guarantees `new_size`, rounded up to
                // the alignment, does not overflow (`realloc`'s contract).
                let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                let new = self.alloc(new_layout);
                if !new.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                new
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Grows a block from small to large and back, through both
    /// allocators and across the line, and checks it keeps its bytes.
    #[test]
    fn blocks_keep_their_bytes_across_the_line() {
        let a = Allocator;
        unsafe {
            let layout = Layout::from_size_align(1000, 8).unwrap();
            let mut p = a.alloc(layout);
            assert!(!p.is_null());
            for i in 0..1000 {
                *p.add(i) = (i % 251) as u8;
            }
            let mut size = 1000;
            for new_size in [LARGE - 1, LARGE, 3 * LARGE, LARGE + 1, 500] {
                p = a.realloc(p, Layout::from_size_align(size, 8).unwrap(), new_size);
                assert!(!p.is_null());
                assert_eq!(p as usize % 8, 0);
                for i in 0..size.min(new_size).min(1000) {
                    assert_eq!(
                        *p.add(i),
                        (i % 251) as u8,
                        "byte {i} after {size} -> {new_size}"
                    );
                }
                size = new_size;
            }
            a.dealloc(p, Layout::from_size_align(size, 8).unwrap());
            // Plain `mi_malloc` (alignment up to a word) and the aligned
            // path (more): every block as aligned as its layout asks,
            // zeroed when asked, its bytes kept by `realloc`.
            for size in (1..=96).chain([LARGE - 1]) {
                for align in [1, 2, 4, 8, 16, 32] {
                    let layout = Layout::from_size_align(size, align).unwrap();
                    let z = a.alloc_zeroed(layout);
                    assert!(!z.is_null() && z as usize % align == 0, "{size}/{align}");
                    assert!((0..size).all(|i| *z.add(i) == 0), "{size}/{align}");
                    z.write_bytes(0xa5, size);
                    let r = a.realloc(z, layout, size * 2);
                    assert!(!r.is_null() && r as usize % align == 0, "{size}/{align}");
                    assert!((0..size).all(|i| *r.add(i) == 0xa5), "{size}/{align}");
                    a.dealloc(r, Layout::from_size_align(size * 2, align).unwrap());
                    let p = a.alloc(layout);
                    assert!(!p.is_null() && p as usize % align == 0, "{size}/{align}");
                    a.dealloc(p, layout);
                }
            }
            for size in [16, LARGE] {
                let layout = Layout::from_size_align(size, 64).unwrap();
                let z = a.alloc_zeroed(layout);
                assert!(!z.is_null() && z as usize % 64 == 0);
                assert!((0..size).all(|i| *z.add(i) == 0));
                a.dealloc(z, layout);
            }
        }
    }
}
