//! Synthetic WAL files for tests.
