//! walship: keeps PostgreSQL recoverable by archiving WAL and base backups to a repository.
//!
//! Data flows one way: a command asks [`repo`] what to store where, [`codec`] turns bytes into a
//! verifiable object, and a [`storage`] backend places it durably. A backend never learns what WAL is;
//! the codec never learns where bytes go. [`config`] reads the settings and hands each backend its
//! own table; [`fs`] holds the file-system helpers (durable directories, temp-and-rename, the one
//! temporary-file name) that every layer writing local files shares.

#![warn(missing_docs)]

pub mod base;
pub mod codec;
pub mod config;
pub mod encryption;
pub mod error;
pub mod expire;
pub mod failpoint;
pub mod fs;
pub mod log;
pub mod lookahead;
pub mod prefetch;
pub mod process;
pub mod remembered;
pub mod repo;
pub mod retry;
pub mod storage;
pub mod verify;
pub mod wal;

pub use config::{Config, ConfigFlags};
pub use error::{Error, ExitCode};
