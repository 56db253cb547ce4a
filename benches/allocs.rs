//! Heap allocations per proxied call: sends the same GET a few thousand times straight to a
//! loopback upstream and through an in-process broker (`fsync = "never"`), counting every
//! allocation in the process, and prints the difference per call. The client and upstream do
//! the same work in both runs, so the difference is the broker's own. Allocations matter most
//! under many connections, where each one is likely a cache miss.
//!
//! `cargo bench --bench allocs`

use std::alloc::System;

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

mod support;
use support::{config, connect, get, token, upstream, CREDENTIAL};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const CALLS: u64 = 5_000;

/// Allocations and bytes per call over `CALLS` calls, after a warm-up.
fn count(mut call: impl FnMut()) -> (f64, f64) {
    for _ in 0..200 {
        call();
    }
    let region = Region::new(GLOBAL);
    for _ in 0..CALLS {
        call();
    }
    let stats = region.change();
    // A reallocation may move the block: count it as an allocation.
    let allocations = stats.allocations + stats.reallocations;
    let bytes = stats.bytes_allocated + stats.bytes_reallocated.max(0) as usize;
    (
        allocations as f64 / CALLS as f64,
        bytes as f64 / CALLS as f64,
    )
}

fn main() {
    // One thread: the broker, client and upstream tasks all run here, as on one worker.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let up = rt.block_on(upstream());
    let mut direct = rt.block_on(connect(up));
    let auth = format!("Bearer {CREDENTIAL}");
    let (direct_allocs, direct_bytes) =
        count(|| rt.block_on(get(&mut direct, "/repos/acme/widget/issues", &auth)));

    let running = rt
        .block_on(credbroker::cli::serve::start(config(
            dir.path(),
            up,
            "never",
        )))
        .unwrap();
    let bearer = format!("Bearer {}", rt.block_on(token(running.proxy_addr)));
    let mut client = rt.block_on(connect(running.proxy_addr));
    let path = "/github/repos/acme/widget/issues";
    let (proxied_allocs, proxied_bytes) = count(|| rt.block_on(get(&mut client, path, &bearer)));
    rt.block_on(running.shutdown());

    println!("allocations per call (bytes per call), {CALLS} sequential GETs on one connection:");
    println!("  direct to the upstream   {direct_allocs:7.1} ({direct_bytes:8.0})");
    println!("  through the broker       {proxied_allocs:7.1} ({proxied_bytes:8.0})");
    println!(
        "  the broker's own         {:7.1} ({:8.0})",
        proxied_allocs - direct_allocs,
        proxied_bytes - direct_bytes
    );
}
