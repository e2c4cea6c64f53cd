//! Serve one in-memory sparse volume named `vol` over NBD, for trying real
//! clients and for benchmarks of the protocol engine without storage:
//!
//! ```text
//! cargo run --release -p nbd-server --example mem_server -- 127.0.0.1:10809 1024
//! ```
//! (address, volume size in MiB). Stops on Ctrl-C after in-flight requests.

#[path = "../tests/common/mod.rs"]
mod common;

use nbd_server::{CancellationToken, NbdServer, ServerConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:10809".into());
    let size_mib: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let volume = common::MemVolume::new("vol", size_mib << 20);
    let provider = common::MemProvider::new(vec![volume]);
    let server = NbdServer::new(provider, ServerConfig::default())?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!(
        "serving nbd://{}/vol ({size_mib} MiB)",
        listener.local_addr()?
    );
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
        }
    });
    server.serve(listener, shutdown).await?;
    let stats = server.stats().snapshot();
    eprintln!("stopped: {stats:?}");
    Ok(())
}
