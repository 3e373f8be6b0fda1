//! task-center: placeholder crate docs (being written).
#![deny(missing_docs)]

pub mod coord;
pub mod model;
