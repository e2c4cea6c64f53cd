//! s2d's control-plane API: the gRPC services `storaged` serves and
//! `s2dctl` calls, generated from `proto/s2d.proto`.
//!
//! Invariant: this crate holds only generated types and services, no logic,
//! so the CLI depends on nothing of the daemon.

pub mod v1 {
    tonic::include_proto!("s2d.v1");
}
