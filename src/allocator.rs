//! The memory allocator, and when freed memory goes back to the system.
//!
//! Why not glibc's: the daemon's live heap is ~30 MB on the demo model, but
//! glibc's malloc kept it at ~79 MB resident (release build, tract, the
//! shipped photos looped at 10 fps): loading a model frees far more than
//! the daemon keeps, and tract allocates and frees each frame's activations
//! from two threads, each with its own arena that glibc seldom gives back.
//! `malloc_trim` after loading helped only for a while; glibc's trim
//! threshold made every frame map and zero fresh pages (1.3-1.8x the
//! inference time).
//!
//! jemalloc (`tikv-jemallocator`, on Linux x86-64 and aarch64, the targets
//! labelcast ships for) purges freed pages on a clock instead: a page freed
//! is kept ten seconds (`dirty_decay_ms:10000`) for reuse, then returned.
//! What loading frees is returned at once all the same, by an explicit purge
//! ([`release_freed_memory`]): after each stage of building a tract graph
//! (parsing, declutter, optimisation), around the INT8 check's probe runs,
//! once the model is loaded and once the first-frame check drops the graph
//! as quantised (a start without a cached verdict peaked at 100.5 MB on the
//! demo model without the stage purges and with the two graphs built side
//! by side, 74.9-75.0 MB with both changes). None of these runs per frame.
//!
//! The decay used to be 0 while loading and one second from the first frame
//! on. Measured on the demo model (tract, one thread, x86-64
//! with the 8-bit 1x1 kernel, `perf stat -e page-faults` over `bench
//! --engines tract --iterations 300`): 1.6 M page faults, about 1,500 per
//! inference, and weights-only p50 10.9 ms; with ten seconds from the
//! start, 175 K faults and 6.2 ms. A constant one second still faulted
//! 646 K times (p50 6.7, p90 9.1 ms): each frame's activations are several
//! MB, freed and allocated again within milliseconds, and jemalloc's decay
//! curve purged part of them every frame. The daemon's resident set
//! (`ROUNDS=1 bash benches/allocator.sh`, embedded defaults, 10 fps, INT8
//! check cached): steady 54.6 -> 55.3 MB, peak 56.2 -> 63.4 MB, weights-only
//! p50 10.93 -> 6.49 ms (both binaries with the stem kernel). The steady
//! switch at the first frame (`settle`) went with the loading phase.
//!
//! `muzzy_decay_ms:0`: lazily freed pages would stay counted in the
//! resident set until the kernel wants them. `_RJEM_MALLOC_CONF` in the
//! environment (jemalloc's own variable, prefixed as the crate builds it)
//! overrides these key by key, e.g. `_RJEM_MALLOC_CONF=dirty_decay_ms:1000`.
//! jemalloc runs no background thread here: pages freed are returned on a
//! later allocation once their time is up, so an idle daemon (a camera
//! gone) keeps the last frame's pages until frames come again.
//!
//! Elsewhere (other targets, or built without the `jemalloc` feature, e.g.
//! for heaptrack or valgrind) the system allocator stays and
//! [`release_freed_memory`] falls back to glibc's `malloc_trim`.

/// How long (ms) a freed page is kept for reuse (see the module doc for the
/// measurement behind ten seconds); the compiled-in `dirty_decay_ms`.
pub const DIRTY_DECAY_MS: isize = 10000;

#[cfg(all(feature = "jemalloc", target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
mod jemalloc {
    use std::ffi::{CString, c_char, c_void};

    #[global_allocator]
    static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

    /// jemalloc's compile-time options, read before `main` (the decay is
    /// [`super::DIRTY_DECAY_MS`]).
    /// The symbol carries the prefix tikv-jemalloc-sys builds jemalloc with.
    #[unsafe(export_name = "_rjem_malloc_conf")]
    static MALLOC_CONF: &[u8; 38] = b"dirty_decay_ms:10000,muzzy_decay_ms:0\0";

    /// `mallctl(name, NULL, NULL, value, size)`; `value` None for a command.
    fn control<T>(name: &str, value: Option<&mut T>) -> bool {
        let Ok(name) = CString::new(name) else { return false };
        let (new, len) = match value {
            Some(v) => (v as *mut T as *mut c_void, std::mem::size_of::<T>()),
            None => (std::ptr::null_mut(), 0),
        };
        // SAFETY: the name is NUL-terminated and `new` points at a value of
        // the type the control expects (ssize_t for the decay times) or is
        // null with length 0 for a command.
        unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr() as *const c_char,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                new,
                len,
            ) == 0
        }
    }

    /// Reads a `ssize_t` control (`opt.dirty_decay_ms`, `arena.0.dirty_decay_ms`).
    #[cfg(test)]
    pub fn read_isize(name: &str) -> Option<isize> {
        let name = CString::new(name).ok()?;
        let mut value: isize = 0;
        let mut size = std::mem::size_of::<isize>();
        // SAFETY: the controls read here are ssize_t, read into one.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                &mut value as *mut isize as *mut c_void,
                &mut size,
                std::ptr::null_mut(),
                0,
            )
        };
        (rc == 0).then_some(value)
    }

    pub fn purge() {
        // MALLCTL_ARENAS_ALL (4096): every arena.
        control::<()>("arena.4096.purge", None);
    }
}

/// Hands memory that was freed back to the system now: after loading a
/// model (the file's tensors, tract's graphs before optimisation) and after
/// the first-frame INT8 check drops the graph as quantised.
pub fn release_freed_memory() {
    #[cfg(all(feature = "jemalloc", target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
    jemalloc::purge();
    #[cfg(all(
        target_os = "linux",
        target_env = "gnu",
        not(all(feature = "jemalloc", any(target_arch = "x86_64", target_arch = "aarch64")))
    ))]
    // SAFETY: malloc_trim only returns free pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(all(test, feature = "jemalloc", target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
mod tests {
    use super::*;

    #[test]
    fn jemalloc_reads_its_decay_from_the_compiled_in_options() {
        if std::env::var("_RJEM_MALLOC_CONF").is_ok_and(|conf| conf.contains("dirty_decay_ms")) {
            return;
        }
        // opt.* are the options as parsed at start.
        assert_eq!(jemalloc::read_isize("opt.dirty_decay_ms"), Some(DIRTY_DECAY_MS), "malloc_conf was not read");
        assert_eq!(jemalloc::read_isize("opt.muzzy_decay_ms"), Some(0));
    }
}
