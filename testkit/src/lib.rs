//! Test support shared by dnsfence's crates (a dev-dependency only).
//!
//! - [`fixtures`]: the policy and endpoints the engine's tests and the callgrind gate share.
//! - [`kube`]: a programmable fake Kubernetes API server (LIST and WATCH) on loopback.
//!
//! [`CountingAllocator`] proves "no allocation per query": install it as the test binary's
//! global allocator, warm the code up, then compare [`allocations`] before and after a loop.
//!
//! ```ignore
//! #[global_allocator]
//! static GLOBAL: dnsfence_testkit::CountingAllocator = dnsfence_testkit::CountingAllocator;
//!
//! let before = dnsfence_testkit::allocations();
//! hot_loop();
//! assert_eq!(dnsfence_testkit::allocations() - before, 0);
//! ```

pub mod fixtures;
pub mod kube;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting every allocation and reallocation (of every thread).
pub struct CountingAllocator;

/// Allocations and reallocations so far, when [`CountingAllocator`] is the global allocator.
pub fn allocations() -> usize {
    ALLOCATIONS.load(Ordering::Relaxed)
}

// SAFETY: forwards every call to the system allocator unchanged; only counts them.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we pass on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator, with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract, which we pass on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
