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
//! case it is allocated again, and purges it only when the thread that owns it next calls into
//! the allocator. That is right for the steady state: an agent decodes a batch of events on
//! one thread, applies and frees them on another, and decodes the next batch into the same
//! pages. Returning freed memory at once instead (`purge_delay` 0) cost the apply row about 12%
//! of the agent's CPU (18.2–18.8 against 15.8–16.1 µs per event, interleaved runs): each page
//! emptied was returned, faulted in and zeroed again moments later, and each return interrupted
//! the other CPU (TLB shootdown); delays of 1 or 3 ms cost the same. It is wrong while a large
//! transaction is staged and copied, when memory is freed faster than it is taken again and the
//! resident set grew by 6–10 MB (a 1,000,000-row transaction: an agent's peak 98–101 MB against
//! 89–93 with the delay 0). So the agent returns freed memory where that happens, and only
//! there: [`return_freed_memory`], on the thread that decodes the parts of a large transaction
//! after handing each one over, and on the thread that stages and copies them after each batch
//! (93–96 MB), and on the applying thread whenever it waits for sled's log.

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

/// Returns to the OS, now, the memory the calling thread's allocator heap holds freed
/// (mimalloc's `mi_collect(true)`: its empty pages, the purges it had delayed, the arenas'
/// delayed purges). For a thread that just freed much and will not soon take it again.
///
/// It walks the thread's heap, so call it every few thousand freed allocations, not per
/// allocation. Where mimalloc is not the global allocator (the tests) it returns what the
/// thread allocated through mimalloc directly, which is usually nothing.
pub fn return_freed_memory() {
    // SAFETY: mi_collect takes a bool and works on the calling thread's own heap and on the
    // process-wide arenas, which mimalloc synchronizes; any thread may call it at any time,
    // also one whose heap was never initialized (it then returns at once).
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_collect(true)
    };
}
