//! Prefetch tests: being written.
