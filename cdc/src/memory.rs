//! Keeping the binaries' resident memory close to what they hold.
//!
//! mimalloc (the global allocator of `cdc`, `view-agent` and `cdc-bench`) maps large arenas.
//! Where transparent huge pages are enabled (`always` or `madvise`, as on most distributions),
//! the kernel backs those arenas with 2 MiB pages, so a few live bytes in a 2 MiB range keep all
//! of it resident. Measured on this project's benchmark: the reader's peak while a
//! 1,000,000-row transaction streams through went from 21 MB to 13 MB; an agent's store alone
//! holding 1,000,000 rows from 160–170 MB to 110–130 MB, at the same throughput.
//!
//! mimalloc also keeps memory it freed resident for a while (10 ms, 100 ms for its arenas) in
//! case it is allocated again. An agent's store churns through node copies of every size, so
//! that memory was rarely taken again in time and its resident set grew during the copy of a
//! large transaction into the views: [`return_freed_memory_at_once`].

/// Opts this process out of transparent huge pages (`PR_SET_THP_DISABLE`); call it first in
/// `main`. Memory already faulted in keeps its pages; everything faulted later uses 4 KiB
/// pages. A kernel that refuses (older than 3.15) only costs the memory described above, so
/// the result is returned for logging, never fatal.
#[cfg(target_os = "linux")]
pub fn disable_transparent_huge_pages() -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) takes plain integers, touches no memory of
    // ours and only sets a flag of this process.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Elsewhere there is nothing to opt out of.
#[cfg(not(target_os = "linux"))]
pub fn disable_transparent_huge_pages() -> std::io::Result<()> {
    Ok(())
}

/// mimalloc's `mi_option_purge_delay` (its position in the `mi_option_e` enum of mimalloc v2's
/// `mimalloc.h`; libmimalloc-sys names only some options).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Makes mimalloc return memory to the OS as soon as it frees it (`purge_delay` 0 instead of
/// 10 ms), for a process whose allocator is mimalloc; call it first in `main`. Measured on the
/// benchmark's memory row: a `view-agent` taking one 1,000,000-row transaction peaked at
/// 96–111 MB (median 99, outliers to 122) instead of 105–111 MB (93–99 against 107–113 in a
/// later interleaved A/B). It costs the apply rate on small transactions about 10% (quiet
/// machine, interleaved: 104–110k against 116–125k events/s): pages returned at once are
/// faulted in and zeroed again, and each return interrupts the other CPU (TLB shootdown).
pub fn return_freed_memory_at_once() {
    // SAFETY: mi_option_set takes two integers and stores the value in mimalloc's option
    // table (the index is checked against mimalloc's default in this module's test). It is not
    // synchronized, hence "first in main", before other threads start; mimalloc reads the
    // option on each purge, so the change takes effect from then on.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0)
    };
}

#[cfg(test)]
mod tests {
    /// The index is mimalloc's `purge_delay`: its default (10 ms, unless the environment sets
    /// `MIMALLOC_PURGE_DELAY`) before, 0 after.
    #[test]
    fn purge_delay_is_the_option_set() {
        // SAFETY: reads mimalloc's option table.
        #[allow(unsafe_code)]
        let get = || unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(get(), 10, "mimalloc v2's default purge delay");
        }
        super::return_freed_memory_at_once();
        assert_eq!(get(), 0);
    }
}
