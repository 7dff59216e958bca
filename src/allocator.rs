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
//! labelcast ships for) keeps what is freed for reuse and never returns it
//! on a clock of its own (`dirty_decay_ms:-1`): labelcast returns it, all
//! at once ([`release_freed_memory`]), at moments it picks. After each stage
//! of building a tract graph (parsing, declutter, optimisation), around the
//! INT8 check's probe runs, once the model is loaded and once the
//! first-frame check drops the graph as quantised (a start without a cached
//! verdict peaked at 100.5 MB on the demo model without the stage purges
//! and with the two graphs built side by side, 74.9-75.0 MB with both
//! changes); and while frames flow, every [`RELEASE_INTERVAL`] between two
//! of an inference thread's frames ([`PeriodicRelease`]), so that what a
//! one-off spike freed (a snapshot, a burst of messages) does not stay
//! resident. Other threads (the next frame's decoding, a second model's
//! inference) may be running at that moment; they fault in again what they
//! had freed.
//!
//! Why not jemalloc's decay clock. Each frame's activations are several MB,
//! freed and allocated again within milliseconds. A decay of 0 or one second
//! returned part of them every frame and the next frame faulted them in
//! again (measured on the demo model, tract, one thread, x86-64, `perf stat
//! -e page-faults` over `bench --engines tract --iterations 300`: one
//! second from the start, 646 K faults, p50 6.7 ms; 1.6 M faults and p50
//! 10.9 ms with the decay at 0 while loading; ten seconds from the start,
//! 175 K faults and 6.2 ms). Ten seconds, the setting until now, still
//! fell into that cycle in some processes of the same binary and not in
//! others: with a channels-first depthwise op that was tried (and not kept:
//! no faster as a whole), three of five `bench --engines tract --threads 1
//! --iterations 200` processes ran weights-only at p50 8.7-9.2 ms with
//! 520-550 K page faults (about 2,150 more per inference, ~8.6 MB, and one
//! more `madvise` per inference under `strace -c`: 914 against 665-690),
//! the other two at 4.8-4.9 ms with 87-100 K. jemalloc 5.3 also returns at
//! once, whenever its decay is not -1, any freed run that merges with free
//! neighbours to 8 MiB or more (its oversize threshold), which depends on
//! where each frame's blocks lie; but raising that threshold to 1 GiB (or
//! setting it to 0) with the ten-second decay made all six processes slow
//! (8.2-9.2 ms), so which of jemalloc's purges made the cycle is not pinned
//! down. With `dirty_decay_ms:-1` all ten processes of that binary and of
//! the shipped one ran at 4.6-5.1 ms with 69 K faults. The daemon's
//! resident set (`ROUNDS=2 bash benches/allocator.sh`, embedded defaults,
//! 10 fps), ten-second decay / now: steady 52.2-52.7 / 53.0-53.2 MB
//! (swinging within 47.6-53.6 / flat within 53.0-53.3), peak 57.1-57.6 /
//! 58.3-58.6 MB; a first start with no cached INT8 verdict peaked at
//! 66.1-66.7 / 67.6-67.8 MB.
//!
//! `muzzy_decay_ms:0`: lazily freed pages would stay counted in the
//! resident set until the kernel wants them. `_RJEM_MALLOC_CONF` in the
//! environment (jemalloc's own variable, prefixed as the crate builds it)
//! overrides these key by key, e.g. `_RJEM_MALLOC_CONF=dirty_decay_ms:1000`.
//! jemalloc runs no background thread here, and the periodic release runs
//! between frames, so an idle daemon (a camera gone) keeps what every
//! thread freed since the last release until frames come again.
//!
//! Elsewhere (other targets, or built without the `jemalloc` feature, e.g.
//! for heaptrack or valgrind) the system allocator stays and
//! [`release_freed_memory`] falls back to glibc's `malloc_trim`.

use std::time::{Duration, Instant};

/// The compiled-in `dirty_decay_ms`: -1, freed pages are kept until
/// [`release_freed_memory`] (see the module doc for the measurement).
pub const DIRTY_DECAY_MS: isize = -1;

/// How often the pipeline returns freed memory between frames
/// ([`PeriodicRelease`]): the ten seconds jemalloc's decay used to keep a
/// freed page. Each release costs the next frame its activations' page
/// faults once: on the demo model about 1,500-2,150 faults, what a decay of
/// 0 cost per inference (module doc), which took p50 from 6.2 to 10.9 ms.
/// At 10 fps that is one frame in 100, which did not show in the daemon's
/// latency: the embedded defaults at 10 fps for 60 s (598 frames, one run
/// each), per-frame inference p50 / p90 / p99 / max 11.10 / 15.78 / 20.99
/// / 23.31 ms with the ten-second decay, 10.48 / 13.18 / 17.36 / 24.13 ms
/// with this, its slowest frames not at the releases.
pub const RELEASE_INTERVAL: Duration = Duration::from_secs(10);

#[cfg(all(feature = "jemalloc", target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
mod jemalloc {
    use std::ffi::{CString, c_char, c_void};

    #[global_allocator]
    static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

    /// jemalloc's compile-time options, read before `main` (the decay is
    /// [`super::DIRTY_DECAY_MS`]).
    /// The symbol carries the prefix tikv-jemalloc-sys builds jemalloc with.
    #[unsafe(export_name = "_rjem_malloc_conf")]
    static MALLOC_CONF: &[u8; 35] = b"dirty_decay_ms:-1,muzzy_decay_ms:0\0";

    /// `mallctl(name, NULL, NULL, value, size)`; `value` None for a command.
    fn control<T>(name: &str, value: Option<&mut T>) -> bool {
        let Ok(name) = CString::new(name) else { return false };
        let (new, len) = match value {
            Some(v) => (v as *mut T as *mut c_void, std::mem::size_of::<T>()),
            None => (std::ptr::null_mut(), 0),
        };
        // SAFETY: the name is NUL-terminated and `new` points at a value of
        // the type the control expects (uint64_t for `epoch`) or is null
        // with length 0 for a command.
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

    /// The integer types jemalloc's controls read here have: `ssize_t`
    /// (`opt.dirty_decay_ms`) and `size_t` (`stats.arenas.4096.pdirty`).
    ///
    /// # Safety
    /// Every bit pattern of the type's size is a valid value of it.
    #[cfg(test)]
    pub unsafe trait Integer: Copy + Default {}
    // SAFETY: plain integers.
    #[cfg(test)]
    unsafe impl Integer for isize {}
    // SAFETY: plain integers.
    #[cfg(test)]
    unsafe impl Integer for usize {}

    /// Reads a control of type `T`; `None` if there is none of that size.
    #[cfg(test)]
    pub fn read<T: Integer>(name: &str) -> Option<T> {
        let name = CString::new(name).ok()?;
        let mut value = T::default();
        let mut size = std::mem::size_of::<T>();
        // SAFETY: jemalloc writes at most `size` bytes into `value`, and any
        // bytes make a valid `T` (`Integer`).
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                &mut value as *mut T as *mut c_void,
                &mut size,
                std::ptr::null_mut(),
                0,
            )
        };
        (rc == 0 && size == std::mem::size_of::<T>()).then_some(value)
    }

    /// Pages freed and kept for reuse, over every arena (jemalloc's
    /// statistics are a snapshot, refreshed by writing `epoch`).
    #[cfg(test)]
    pub fn dirty_pages() -> Option<usize> {
        let mut epoch: u64 = 1;
        if !control("epoch", Some(&mut epoch)) {
            return None;
        }
        read::<usize>("stats.arenas.4096.pdirty")
    }

    pub fn purge() {
        // MALLCTL_ARENAS_ALL (4096): every arena.
        control::<()>("arena.4096.purge", None);
    }
}

/// Hands memory that was freed back to the system now: after loading a
/// model (the file's tensors, tract's graphs before optimisation), after
/// the first-frame INT8 check drops the graph as quantised, and every
/// [`RELEASE_INTERVAL`] between frames ([`PeriodicRelease`]).
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

/// Calls [`release_freed_memory`] at most once per [`RELEASE_INTERVAL`]:
/// each of the pipeline's inference threads ticks it between its frames, so
/// memory goes back while that thread classifies nothing (other threads
/// may be working; see the module doc).
#[derive(Debug)]
pub struct PeriodicRelease {
    last: Instant,
    interval: Duration,
}

impl PeriodicRelease {
    /// Starts counting now (the model was just loaded and released).
    pub fn new() -> PeriodicRelease {
        PeriodicRelease::every(RELEASE_INTERVAL, Instant::now())
    }

    /// Every `interval`, counting from `now`.
    pub fn every(interval: Duration, now: Instant) -> PeriodicRelease {
        PeriodicRelease { last: now, interval }
    }

    /// Releases freed memory if `interval` has passed since the last
    /// release; true if it did.
    pub fn tick(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.last) < self.interval {
            return false;
        }
        release_freed_memory();
        self.last = now;
        true
    }
}

impl Default for PeriodicRelease {
    fn default() -> Self {
        PeriodicRelease::new()
    }
}

#[cfg(test)]
mod periodic_tests {
    use super::*;

    #[test]
    fn the_periodic_release_runs_once_per_interval_and_not_before() {
        let start = Instant::now();
        let mut release = PeriodicRelease::every(Duration::from_secs(10), start);
        assert!(!release.tick(start + Duration::from_secs(9)));
        assert!(release.tick(start + Duration::from_secs(10)));
        // Counted again from the release, not from the start.
        assert!(!release.tick(start + Duration::from_secs(19)));
        assert!(release.tick(start + Duration::from_secs(21)));
        // A clock read before the last release (another thread's instant)
        // is no time passed.
        assert!(!release.tick(start));
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
        assert_eq!(jemalloc::read::<isize>("opt.dirty_decay_ms"), Some(DIRTY_DECAY_MS), "malloc_conf was not read");
        assert_eq!(jemalloc::read::<isize>("opt.muzzy_decay_ms"), Some(0));
    }

    /// Runs in a child process forked from the test (one thread, this
    /// test's): other tests load models, and each load releases every
    /// arena's freed pages, which would empty them under this test. The
    /// child reports through its exit status and a pipe, never through
    /// stderr, whose lock another thread may have held at the fork.
    #[test]
    fn freed_pages_stay_for_reuse_until_labelcast_releases_them() {
        use std::os::fd::FromRawFd;

        if std::env::var("_RJEM_MALLOC_CONF").is_ok_and(|conf| conf.contains("dirty_decay_ms")) {
            eprintln!("skipped: _RJEM_MALLOC_CONF sets dirty_decay_ms");
            return;
        }
        let mut pipe = [0 as libc::c_int; 2];
        // SAFETY: pipe() fills the two descriptors, each closed once (the
        // read end by its File); fork() is followed in the child only by
        // jemalloc calls (made fork-safe by its own pthread_atfork
        // handlers), write() and _exit().
        unsafe {
            assert_eq!(libc::pipe(pipe.as_mut_ptr()), 0, "pipe()");
            let pid = libc::fork();
            assert!(pid >= 0, "fork()");
            if pid == 0 {
                libc::close(pipe[0]);
                let outcome = std::panic::catch_unwind(freed_pages_are_kept_then_released)
                    .unwrap_or_else(|_| Err("panicked".into()));
                let message = outcome.as_ref().err().map_or("", String::as_str);
                libc::write(pipe[1], message.as_ptr().cast(), message.len());
                libc::_exit(i32::from(outcome.is_err()));
            }
            libc::close(pipe[1]);
            // The parent owns the read end from here: std reads it to the
            // child's exit and closes it.
            let mut message = Vec::new();
            std::io::Read::read_to_end(&mut std::fs::File::from_raw_fd(pipe[0]), &mut message)
                .expect("reading the pipe");
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid, "waitpid()");
            let message = String::from_utf8_lossy(&message);
            assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "{message} (status {status:#x})");
        }
    }

    /// The child's part of the test above: frees 64 MiB and reads how much
    /// jemalloc keeps, before and after [`release_freed_memory`].
    fn freed_pages_are_kept_then_released() -> Result<(), String> {
        let page = jemalloc::read::<usize>("arenas.page").ok_or("no arenas.page")?;
        let dirty = || jemalloc::dirty_pages().map(|pages| pages * page).ok_or("no stats.arenas.4096.pdirty");
        // Twelve blocks of 4 MiB (the demo's largest activation is
        // [112, 112, 96] floats, 4.6 MiB) and one of 16 MiB: jemalloc
        // treats blocks and freed runs of 8 MiB or more (its oversize
        // threshold) apart, returning them at once when its decay is not -1.
        let mut blocks: Vec<Vec<u8>> = (0..12).map(|_| vec![0u8; 4 << 20]).chain([vec![0u8; 16 << 20]]).collect();
        for block in &mut blocks {
            for p in block.chunks_mut(page) {
                p[0] = 1;
            }
        }
        std::hint::black_box(&blocks);
        drop(blocks);
        let kept = dirty()?;
        if kept < 60 << 20 {
            return Err(format!("{kept} bytes kept after freeing 64 MiB: returned at once"));
        }
        release_freed_memory();
        let left = dirty()?;
        if left >= 4 << 20 {
            return Err(format!("{left} bytes still kept after the release"));
        }
        Ok(())
    }
}
