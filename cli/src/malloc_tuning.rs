//! Tuning of the C library's allocator, which Rust code does not use (mimalloc is the global
//! allocator) but C libraries linked in do: zstd above all.
//!
//! Reading a Parquet column chunk creates a zstd compression and a decompression context
//! (~200 KiB together; the parquet crate makes both for every chunk it reads, and a patient's
//! history reads ~100 chunks) and frees them at once. With glibc's defaults, each free at the
//! top of a thread's heap gives the pages back (`madvise`) and the next context faults them in
//! again: page faults and trimming took ~15 % of `strata serve`'s CPU on cold history reads.
//! Keeping up to [`TRIM_THRESHOLD`] of freed memory per heap, and serving blocks below
//! [`MMAP_THRESHOLD`] from the heaps, removes that churn: cold reads ~17 % faster
//! (docs/benchmarks.md).
//! What it can keep is bounded: only C code allocates there, a few contexts per reading thread.

/// Freed memory a glibc heap keeps before giving it back to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = 16 << 20;
/// Blocks from this size on get mappings of their own (glibc's default starts at 128 KiB).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 4 << 20;

/// Sets glibc's trim and mmap thresholds (see the module's documentation). Elsewhere a no-op.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread
    // exists (first thing in `main`), and a refused setting leaves glibc's default in place.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}
