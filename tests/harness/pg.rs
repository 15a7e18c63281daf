//! PostgreSQL clusters for tests.
