//! What every service process sets for itself before anything else runs.

/// Turns transparent huge pages off for this process (inherited by the processes it starts).
///
/// Every service allocates through mimalloc, which asks the kernel for transparent huge pages
/// (2 MiB) for its arenas (`madvise`); hosts set to `madvise` (as the benchmarks' hosts are)
/// or `always` give them. The first touch of such a page then zeroes all 2 MiB, and touching
/// a whole page that mimalloc gave back to the system zeroes it again. With bursts of large
/// requests (a bulk write of 1,000 products, a relay batch) that zeroing was 11 % of the
/// catalog's worker threads in a profile of its bulk benchmark, and with the switch on the
/// catalog's first bulk round (the one that faults its memory in) cost a third less CPU.
/// Later rounds, and the relay benchmark's end-to-end run, were within this machine's noise
/// (medians of five alternating pairs 1 % apart). Resident memory is lower too (log-ingest
/// measured it first). Called first thing in `main`; pages touched before stay huge. The
/// host's setting stays as it is; on a kernel without the switch this only says so.
pub fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(error) = nix::sys::prctl::set_thp_disable(true) {
        // Before telemetry exists: the one line a process can still write.
        eprintln!(
            "cannot turn transparent huge pages off ({error}); large requests will cost more CPU \
             and memory"
        );
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn transparent_huge_pages_are_off_afterwards() {
        super::disable_transparent_huge_pages();
        assert!(nix::sys::prctl::get_thp_disable().expect("PR_GET_THP_DISABLE"));
    }
}
