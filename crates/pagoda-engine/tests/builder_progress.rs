//! The builder passes load progress through: events from zero to the checkpoint's size.

mod support;

use std::sync::{Arc, Mutex};

use pagoda_engine::LoadEvent;

#[test]
fn the_builder_reports_load_progress() {
    let events: Arc<Mutex<Vec<LoadEvent>>> = Arc::default();
    let sink = Arc::clone(&events);
    support::tiny_llama()
        .on_load_progress(move |event| sink.lock().unwrap().push(event))
        .build()
        .unwrap();
    let events = events.lock().unwrap();
    let (first, last) = (events[0], events[events.len() - 1]);
    assert_eq!(first.bytes_done, 0);
    assert!(last.is_done(), "{last:?}");
    // tiny-llama: 320 x 64 embedding and head; two layers of 64 x 64 Q and O, 32 x 64 K and V
    // (2 KV heads of 16), 3 x 64 x 128 MLP weights; five norms of 64; all f32.
    let elements = 2 * 320 * 64 + 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128) + 5 * 64;
    assert_eq!(last.bytes_total, elements * 4);
    assert!(
        events
            .windows(2)
            .all(|pair| pair[1].bytes_done >= pair[0].bytes_done)
    );
    assert!(events.len() > 10);
}
