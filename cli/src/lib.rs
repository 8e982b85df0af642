//! `regctl`, the operator's CLI (a gRPC client of the control plane). Not built yet: no binary is shipped until it works.
