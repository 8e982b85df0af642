//! The `wharf.v1` gRPC API between the control plane, data-plane nodes and `regctl`.
//!
//! Not built yet: the control-plane issue adds the `.proto` files and their tonic code here.
