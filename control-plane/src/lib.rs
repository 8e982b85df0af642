//! Wharf control plane. Not built yet: see the control-plane issue. No binary is shipped until it works.

pub mod store;
