//! [`cdc::memory::return_freed_memory`] returns what a thread freed: its own test binary, so
//! that no other test's allocations move the resident set it measures.

// mimalloc's C API is called directly: the test binary's global allocator is the system's.
#![allow(unsafe_code)]

/// Resident bytes of this process (`/proc/self/statm`, in pages of 4 KiB).
fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("reading /proc/self/statm");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("statm's second field, resident pages");
    pages * 4096
}

#[test]
fn freed_memory_leaves_the_resident_set_when_returned() {
    const BLOCKS: usize = 32 * 1024;
    const SIZE: usize = 1024;
    // A thread of its own: a fresh heap, and the one whose memory is returned.
    std::thread::spawn(|| {
        let blocks: Vec<*mut u8> = (0..BLOCKS)
            // SAFETY: mi_malloc returns a block of SIZE bytes or null (checked below).
            .map(|_| unsafe { libmimalloc_sys::mi_malloc(SIZE) }.cast::<u8>())
            .collect();
        assert!(
            blocks.iter().all(|b| !b.is_null()),
            "mimalloc out of memory"
        );
        for &b in &blocks {
            // SAFETY: each block is SIZE bytes, writable, not yet freed.
            unsafe { std::ptr::write_bytes(b, 1, SIZE) };
        }
        let touched = resident_bytes();
        for b in blocks {
            // SAFETY: each block came from mi_malloc and is freed once.
            unsafe { libmimalloc_sys::mi_free(b.cast()) };
        }
        cdc::memory::return_freed_memory();
        let returned = resident_bytes();
        assert!(
            touched.saturating_sub(returned) >= BLOCKS * SIZE / 2,
            "32 MiB were touched and freed: {touched} bytes resident with them, {returned} \
             after returning them"
        );
    })
    .join()
    .expect("the allocating thread");
}
