//! s2d replication: moving blocks between `storaged` nodes.
//!
//! - [`message`]: the replica protocol ([`Request`], [`Response`],
//!   [`ErrorCode`]) and its invariants (block-aligned offsets, size limits).
//! - [`frame`]: the byte encoding (fixed little-endian header, CRC32C over
//!   header and payload, payloads in [`block_api::AlignedBuf`]), and the
//!   frame reader and writer.
//! - [`Transport`] / [`Handler`]: the seam. A coordinator calls
//!   `Transport::call(peer, request, timeout)`; a replica node implements
//!   `Handler::handle(peer, request)`. [`TcpTransport`] and [`serve`] are
//!   the TCP pair; [`MemTransport`] calls handlers in-process for tests. An
//!   RDMA transport plugs in behind the same trait (see its docs).
//!
//! Use (what `storaged` does):
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use replication::{Handler, Request, Response, TcpConfig, TcpTransport, Transport};
//! use tokio_util::sync::CancellationToken;
//!
//! struct Replica; // over the node's extent store
//! #[async_trait::async_trait]
//! impl Handler for Replica {
//!     async fn handle(&self, _peer: std::net::SocketAddr, _req: Request) -> Response {
//!         Response::Ok
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let shutdown = CancellationToken::new();
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7420").await?;
//! tokio::spawn(replication::serve(listener, Arc::new(Replica), shutdown.clone()));
//!
//! let transport = TcpTransport::new(TcpConfig::default());
//! let _reply = transport
//!     .call("127.0.0.1:7420".parse()?, Request::Flush, Duration::from_secs(5))
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Invariants: nothing a peer sends makes either side panic or allocate
//! more than one frame's limit ([`FRAME_PAYLOAD_MAX`]); a corrupt stream
//! closes that one connection; a reply is delivered only to its own call
//! and only when it fits the request; every wait has a timeout.
//!
//! What lives elsewhere: disks, epochs and their meaning in `storaged`
//! (this crate carries the epoch, the handler enforces it); which replicas
//! to write to in `storaged`'s volume layer with `placement`.

pub mod frame;
pub mod message;
mod tcp;
mod transport;

pub use frame::FRAME_PAYLOAD_MAX;
pub use message::{
    BLOCK_SIZE, CHECKSUM_BLOCKS_MAX, ERROR_MESSAGE_MAX, ErrorCode, InvalidRequest,
    PROTOCOL_VERSION, READ_LEN_MAX, ReplyShape, Request, Response, WRITE_DATA_MAX,
};
pub use tcp::{InvalidConfig, ServerConfig, TcpConfig, TcpTransport, serve, serve_with_config};
pub use tokio_util::sync::CancellationToken;
pub use transport::{Handler, MemTransport, Transport, TransportError};
