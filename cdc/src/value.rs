//! Value mapping (being written).
