//! `walship-key`: makes the keys of `[encryption]` and starts encrypting a repository.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use walship::encryption::{self, KeyId};
use walship::log::Log;
use walship::{Error, retry};
use walship_cli::{COMMON_HELP, CommonArgs};

#[derive(Parser, Debug)]
#[command(
    name = "walship-key",
    version,
    about = "Make encryption keys for walship, and start encrypting a repository",
    long_about = "Make encryption keys for walship's [encryption] table, and start encrypting a repository.\n\n\
        generate writes a new private key (an age identity) to a file only its owner can read and prints \
        its public key (the recipient for [encryption] recipients) on stdout. public prints the public \
        keys and key ids of an identity file. passphrase writes a long random passphrase file. enable \
        marks an existing plain repository encrypted from now on: pushes must then be encrypted, and \
        objects written before stay readable with accept_plain = true. status says whether the \
        repository is encrypted and which keys the configuration has.\n\n\
        Keys are age's (X25519): `age-keygen -o FILE` makes the same kind of file. Key ids (16 hex \
        digits) name a key pair in messages without revealing its public key.",
    after_long_help = COMMON_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write a new private key to FILE (mode 0600, never overwritten); print its public key
    Generate {
        /// The identity file to create
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Print the public key and key id of every private key in an identity file
    Public {
        /// The identity file
        file: PathBuf,
    },
    /// Write a random 256-bit passphrase to FILE (mode 0600, never overwritten)
    Passphrase {
        /// The passphrase file to create
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Mark the configured repository encrypted from now on
    Enable {
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Say whether the configured repository is encrypted, and which keys the configuration has
    Status {
        #[command(flatten)]
        common: CommonArgs,
    },
}

fn main() {
    walship_cli::exit_on_panic("walship-key", |code| code as u8);
    let cli: Cli = walship_cli::parse_or_exit("walship-key", |code| code as u8);
    let verbose = match &cli.command {
        Command::Enable { common } | Command::Status { common } => common.verbose,
        _ => false,
    };
    let log = Log::new("walship-key", verbose);
    let result = match cli.command {
        Command::Generate { output } => generate(&output),
        Command::Public { file } => public(&file),
        Command::Passphrase { output } => passphrase(&output),
        Command::Enable { common } => walship_cli::block_on(enable(&common, &log)),
        Command::Status { common } => walship_cli::block_on(status(&common, &log)),
    };
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => walship_cli::exit_with(&log, &e),
    }
}

/// Creates `path` for a secret: readable by its owner only from the first byte, never replacing a file.
fn write_secret(path: &Path, text: &str) -> Result<(), Error> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::local_io(path, "create", e))?;
    file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(|e| Error::local_io(path, "write", e))?;
    walship::fs::fsync_dir(walship::fs::parent_dir(path)).map_err(|e| Error::local_io(path, "sync directory", e))
}

fn generate(output: &Path) -> Result<(), Error> {
    let (text, public, id) = encryption::generate();
    write_secret(output, &text)?;
    println!("{public}");
    eprintln!("walship-key: wrote private key {id} to {}; its public key is above", output.display());
    Ok(())
}

fn public(file: &Path) -> Result<(), Error> {
    let identities = encryption::load_identity_file(file)
        .map_err(|message| Error::Config { source_name: file.display().to_string(), message })?;
    for identity in identities {
        println!("{}  key id {}", identity.identity.to_public(), identity.id);
    }
    Ok(())
}

fn passphrase(output: &Path) -> Result<(), Error> {
    let text = walship::fs::random_hex(32).map_err(|e| Error::local_io(Path::new("/dev/urandom"), "read", e))?;
    write_secret(output, &format!("{text}\n"))?;
    eprintln!("walship-key: wrote a random passphrase to {}", output.display());
    Ok(())
}

fn ids(list: &[KeyId]) -> String {
    if list.is_empty() { "none".into() } else { list.iter().map(KeyId::to_string).collect::<Vec<_>>().join(", ") }
}

async fn enable(common: &CommonArgs, log: &Log) -> Result<(), Error> {
    let config = common.load_config()?;
    if config.encryption.writing.is_none() {
        return Err(Error::Config {
            source_name: config.source_file.map_or("configuration".into(), |p| p.display().to_string()),
            message: "[encryption] has no recipients or passphrase_file: nothing to encrypt for; add them first".into(),
        });
    }
    walship_cli::on_repository(&config, log, async |repo, deadline| {
        retry::until(deadline, log, repo.url(), || repo.require_identity()).await?;
        if let Some(record) = retry::until(deadline, log, repo.url(), || repo.encryption_record()).await? {
            walship_cli::print_result_line(&format!("{}: already encrypted since {}", repo.url(), record.since));
            return Ok(());
        }
        let record = retry::until(deadline, log, repo.url(), || repo.create_encryption_record()).await?;
        walship_cli::print_result_line(&format!(
            "{}: encrypted from now on (since {}); objects written before are plain: readers need \
             accept_plain = true for them",
            repo.url(),
            record.since
        ));
        Ok(())
    })
    .await
}

async fn status(common: &CommonArgs, log: &Log) -> Result<(), Error> {
    let config = common.load_config()?;
    let writing = match &config.encryption.writing {
        None => "plain".to_owned(),
        Some(encryption::Writing::Recipients(list)) => {
            format!("for key {}", ids(&list.iter().map(|(id, _)| *id).collect::<Vec<_>>()))
        }
        Some(encryption::Writing::Passphrase { .. }) => "with the passphrase".to_owned(),
    };
    let reading = ids(&config.encryption.identity_ids());
    walship_cli::on_repository(&config, log, async |repo, deadline| {
        let record = retry::until(deadline, log, repo.url(), || repo.encryption_record()).await?;
        let state = match record {
            Some(record) => format!("encrypted since {}", record.since),
            None => "plain".to_owned(),
        };
        println!("repository: {} ({state})", repo.url());
        println!("writes: {writing}");
        println!("reads with: identities {reading}; passphrase {}", config.encryption.passphrase.is_some());
        Ok(())
    })
    .await
}
