//! What a frame header alone makes an endpoint allocate, in process on loopback. This file holds
//! one test: it counts the process's heap, so nothing else may run beside it.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use handoff::identity::Identity;
use support::inproc::*;

/// Bytes allocated and not yet freed, by the whole process.
static LIVE: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: every call is passed to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A request frame's 4-byte header announces up to 64 KiB, and the server allocated the whole
/// payload buffer on reading it, then waited up to 5 s for the bytes: a host sending only
/// headers on every stream it may open (4 per connection, a connection per key, 256 keys per
/// source) had the server hold 256 MiB for 20 bytes a stream. Now a payload buffer grows with
/// the bytes that actually arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_header_alone_does_not_make_the_server_allocate_the_frame() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path()).await;
    let mut conns = Vec::new();
    // As many streams as a connection may open at once (`max_streams_per_connection`, 4).
    for _ in 0..16 {
        let key = Identity::generate().unwrap();
        conns.push(raw_connect(&key, server.id(), server.local_addr()).await);
    }
    let before = LIVE.load(Ordering::Relaxed);
    let mut streams = Vec::new();
    for conn in &conns {
        for _ in 0..4 {
            let (mut send, recv) = conn.open_bi().await.unwrap();
            send.write_all(&65_536u32.to_be_bytes()).await.unwrap();
            streams.push((send, recv));
        }
    }
    // 64 announced frames of 64 KiB: 4 MiB if the server allocates them. Give it time to read
    // every header (well within its 5 s read timeout), stopping early once it has.
    let announced = 64 * 65_536;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline
        && LIVE.load(Ordering::Relaxed).saturating_sub(before) < announced
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let grew = LIVE.load(Ordering::Relaxed).saturating_sub(before);
    assert!(
        grew < announced / 4,
        "64 frame headers made the process hold {grew} more bytes"
    );
    drop(streams);
    server.shutdown().await;
}
