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
//! ([`release_freed_memory`]) once the model is loaded and once the
//! first-frame INT8 check drops the graph as quantised.
//!
//! The decay used to be 0 while loading and one second from the first frame
//! on ([`settle`]). Measured on the demo model (tract, one thread, x86-64
//! with the 8-bit 1x1 kernel, `perf stat -e page-faults` over `bench
//! --engines tract --iterations 300`): 1.6 M page faults, about 1,500 per
//! inference, and weights-only p50 10.9 ms; with ten seconds from the
//! start, 175 K faults and 6.2 ms. A constant one second still faulted
//! 646 K times (p50 6.7, p90 9.1 ms): each frame's activations are several
//! MB, freed and allocated again within milliseconds, and jemalloc's decay
//! curve purged part of them every frame. The daemon's resident set
//! (`ROUNDS=1 bash benches/allocator.sh`, embedded defaults, 10 fps, INT8
//! check cached): steady 54.6 -> 55.3 MB, peak 56.2 -> 63.4 MB, weights-only
//! p50 10.93 -> 6.49 ms. [`settle`] still sets [`STEADY_DIRTY_DECAY_MS`] on
//! every arena at the first frame, which now changes nothing unless
//! `_RJEM_MALLOC_CONF` set another loading value.
//!
//! `muzzy_decay_ms:0`: lazily freed pages would stay counted in the
//! resident set until the kernel wants them. `_RJEM_MALLOC_CONF` in the
//! environment (jemalloc's own variable, prefixed as the crate builds it)
//! overrides these key by key; one that names `dirty_decay_ms` holds for the
//! whole run (no steady switch), e.g. `_RJEM_MALLOC_CONF=dirty_decay_ms:1000`.
//! jemalloc runs no background thread here: pages freed are returned on a
//! later allocation once their time is up, so an idle daemon (a camera
//! gone) keeps the last frame's pages until frames come again.
//!
//! Elsewhere (other targets, or built without the `jemalloc` feature, e.g.
//! for heaptrack or valgrind) the system allocator stays and
//! [`release_freed_memory`] falls back to glibc's `malloc_trim`.

/// How long (ms) a freed page is kept for reuse (see the module doc for the
/// measurement behind ten seconds).
pub const STEADY_DIRTY_DECAY_MS: isize = 10000;

#[cfg(all(feature = "jemalloc", target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
mod jemalloc {
    use std::ffi::{CString, c_char, c_void};

    #[global_allocator]
    static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

    /// jemalloc's compile-time options, read before `main` (the decay is
    /// [`super::STEADY_DIRTY_DECAY_MS`]).
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

    pub fn settle(dirty_decay_ms: isize) {
        let mut ms = dirty_decay_ms;
        // Arenas made from now on, then the ones that exist (the names of
        // arenas not yet initialised fail; those take the default above).
        control("arenas.dirty_decay_ms", Some(&mut ms));
        let mut count: u32 = 0;
        let mut size = std::mem::size_of::<u32>();
        // SAFETY: arenas.narenas is an unsigned int, read into one.
        let read = unsafe {
            tikv_jemalloc_sys::mallctl(
                c"arenas.narenas".as_ptr(),
                &mut count as *mut u32 as *mut c_void,
                &mut size,
                std::ptr::null_mut(),
                0,
            )
        };
        if read == 0 {
            for arena in 0..count {
                let mut ms = dirty_decay_ms;
                control(&format!("arena.{arena}.dirty_decay_ms"), Some(&mut ms));
            }
        }
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

/// Ends the loading phase: from now on freed pages are kept
/// [`STEADY_DIRTY_DECAY_MS`] for reuse by the next frames. Called once the
/// first frame is classified; calling it again changes nothing.
pub fn settle() {
    // A user's own `dirty_decay_ms` in `_RJEM_MALLOC_CONF` holds for the
    // whole run; other keys there leave the phases as they are.
    #[cfg(all(feature = "jemalloc", target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
    if !std::env::var("_RJEM_MALLOC_CONF").is_ok_and(|conf| conf.contains("dirty_decay_ms")) {
        jemalloc::settle(STEADY_DIRTY_DECAY_MS);
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
        // opt.* are the options as parsed at start; settling does not change them.
        assert_eq!(jemalloc::read_isize("opt.dirty_decay_ms"), Some(STEADY_DIRTY_DECAY_MS), "malloc_conf was not read");
        assert_eq!(jemalloc::read_isize("opt.muzzy_decay_ms"), Some(0));
    }

    #[test]
    fn settling_makes_the_existing_and_future_arenas_keep_freed_pages_for_the_steady_time() {
        if std::env::var("_RJEM_MALLOC_CONF").is_ok_and(|conf| conf.contains("dirty_decay_ms")) {
            return;
        }
        // A thread of its own allocates, so more than one arena exists.
        std::thread::spawn(|| drop(vec![1u8; 1 << 20])).join().unwrap();
        settle();
        assert_eq!(jemalloc::read_isize("arenas.dirty_decay_ms"), Some(STEADY_DIRTY_DECAY_MS));
        assert_eq!(jemalloc::read_isize("arena.0.dirty_decay_ms"), Some(STEADY_DIRTY_DECAY_MS));
        release_freed_memory();
    }
}
