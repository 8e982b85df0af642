//! The `wharf.v1` gRPC API between the control plane, data-plane nodes and `regctl`, generated from
//! `wharf/v1/wharf.proto`. Only the gRPC edges use these types; the rest of Wharf speaks the domain
//! types of `wharf-core`.

#![allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]

pub mod v1 {
    tonic::include_proto!("wharf.v1");
}
