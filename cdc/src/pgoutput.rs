//! pgoutput wire decoder (being written).
