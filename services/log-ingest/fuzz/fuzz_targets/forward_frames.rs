//! Any bytes a forward connection may send: the frame scanner finds where each message ends
//! (or says it needs more, or that it is garbage) and every whole frame is decoded; neither
//! may panic, hang or allocate more than the bytes and limits allow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use log_ingest::forward;

/// The limits the listener uses, scaled down so the fuzzer explores them.
const MAX_MESSAGE: usize = 64 * 1024;
const MAX_INFLATED: usize = 4 * MAX_MESSAGE;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(len)) = forward::frame_len(rest, MAX_MESSAGE) {
        assert!(len > 0 && len <= rest.len(), "a frame within what arrived");
        let (frame, after) = rest.split_at(len);
        let _ = forward::decode(frame, MAX_INFLATED);
        rest = after;
    }
});
