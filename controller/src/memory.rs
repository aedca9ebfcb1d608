//! How the controller's allocator holds memory: glibc's, tuned so what a
//! burst of reconciles frees goes back to the system.
//!
//! The cache lives as long as the process and is made of small allocations,
//! made while reconciles and watch events allocate and free far more around
//! them. glibc gives each thread an arena of its own (up to 8 per core); a
//! cached view lands in whichever arena its thread had, scattered among the
//! burst's freed memory, and a page with one live allocation cannot be
//! given back. Measured with `cargo xtask bench controller --nodes 1000
//! --prefetches 20 --reports 1` (docs/benchmarks.md): one arena took the
//! steady RSS with every set reported from 59.5 to 50.6 MiB; the controller
//! has two worker threads and no allocation-heavy parallel work, so sharing
//! one arena costs it nothing measurable.

/// Before any thread starts: one arena for the whole process.
pub fn use_one_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's parameters; called
    // before any other thread exists, so nothing races with it.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Hands memory freed after a burst of reconciles back to the system. glibc
/// keeps freed memory in its arenas; after 50,000 NodeImageSets were written
/// that was about as much again as the cache itself, held for good. A trim
/// every few seconds costs a walk over the arena.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused pages of the allocator's own
    // arenas; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
