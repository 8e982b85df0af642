//! Wharf's control plane: repos in a configuration store (etcd, or the embedded store), served
//! over gRPC and a REST gateway on one port, and streamed to every data-plane node.
//!
//! - [`store`]: the `ConfigStore` trait, etcd and embedded implementations.
//! - [`repos`]: validation and compare-and-swap writes, the one implementation behind both APIs.
//! - [`grpc`], [`rest`]: the two edges; [`error`]: how failures leave through each.
//! - [`hub`], [`distribute`]: one store watch per replica, fanned out to node Watch streams.
//! - [`nodes`]: the node list, held by leases; [`commands`]: on-demand requests to nodes (cache verification).
//! - [`state`]: `ApiState`, what every call needs.
//! - [`server`]: the router (gRPC, REST, health, metrics, token checks), `run(listener, state, shutdown)`.
//! - [`app`]: a whole control plane from its flags (`wharf-control`, `wharf dev`).

pub mod app;
pub mod auth;
pub mod commands;
pub mod distribute;
pub mod error;
pub mod grpc;
pub mod hub;
pub mod keys;
pub mod nodes;
pub mod repos;
pub mod rest;
pub mod server;
pub mod state;
pub mod store;
pub mod tokens;
