//! Gives freed heap memory back to the operating system after a configuration change, which
//! frees megabytes of decoded resources and old snapshots at once (glibc keeps them otherwise).

/// Returns free heap pages to the kernel (glibc's `malloc_trim`); a no-op elsewhere.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own heap metadata; it takes no pointers from us.
    unsafe {
        libc::malloc_trim(0);
    }
}
