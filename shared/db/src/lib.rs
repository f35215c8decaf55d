//! Database connections for every service: an embedded SQLite file by default, PostgreSQL in
//! production, chosen by the URL alone. Migrations run at start-up.
//!
//! # Layout
//! - [`DatabaseSettings`]: the `database` section of a service's settings.
//! - [`connect`]: open the pool, tune SQLite, run the service's migrations.
//! - [`Backend`]: which engine a connection talks to, for the few places SQL differs.

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use sea_orm::{ConnectOptions, ConnectionTrait as _, Database, DatabaseConnection, DbBackend};
use sea_orm_migration::MigratorTrait;
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};

pub use sea_orm;

/// The `database` section of a service's settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `sqlite://<path>` (file created if missing) or `postgres://user:password@host/db`.
    /// Secret because it may hold a password; printed as `[REDACTED]`.
    /// Default: `sqlite://.data/<service>.sqlite`, relative to the working directory.
    #[serde(serialize_with = "mall_config::serialize_secret")]
    pub url: SecretString,
    /// Most connections in the pool. Default 10 (SQLite serializes writers anyway).
    pub max_connections: u32,
    /// Connections kept open when idle. Default 1.
    pub min_connections: u32,
    /// Longest wait for a new connection to open. Default 10s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait for a free connection from the pool. Default 10s.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// SQLite only: how long a writer waits for the write lock before failing. Default 10s.
    #[serde(with = "humantime_serde")]
    pub sqlite_busy_timeout: Duration,
}

impl DatabaseSettings {
    /// Defaults with an SQLite database at `path`.
    pub fn sqlite_file(path: &str) -> Self {
        Self {
            url: SecretString::from(format!("sqlite://{path}")),
            ..Self::default()
        }
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("sqlite://.data/mall.sqlite"),
            max_connections: 10,
            min_connections: 1,
            connect_timeout: Duration::from_secs(10),
            acquire_timeout: Duration::from_secs(10),
            sqlite_busy_timeout: Duration::from_secs(10),
        }
    }
}

/// The engine behind a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

impl Backend {
    /// The engine `db` talks to.
    ///
    /// # Panics
    /// Never for connections made by [`connect`], which only accepts SQLite and PostgreSQL.
    pub fn of(db: &DatabaseConnection) -> Self {
        match db.get_database_backend() {
            DbBackend::Sqlite => Self::Sqlite,
            DbBackend::Postgres => Self::Postgres,
            other => unreachable!("connect() only accepts sqlite and postgres, not {other:?}"),
        }
    }
}

/// Opens a pool for `settings.url` and applies migrator `M`.
///
/// # Errors
/// When the URL is neither SQLite nor PostgreSQL, the database cannot be reached within the
/// timeouts, or a migration fails.
pub async fn connect<M: MigratorTrait>(
    settings: &DatabaseSettings,
) -> anyhow::Result<DatabaseConnection> {
    let url = settings.url.expose_secret();
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(settings.max_connections)
        .min_connections(settings.min_connections)
        .connect_timeout(settings.connect_timeout)
        .acquire_timeout(settings.acquire_timeout)
        // Statements are traced by our own spans; sqlx's per-statement logs are noise.
        .sqlx_logging(false);

    let scheme = url.split(':').next().unwrap_or_default();
    match scheme {
        "sqlite" => {
            ensure_sqlite_directory(url)?;
            let busy = settings.sqlite_busy_timeout;
            options.map_sqlx_sqlite_opts(move |o| {
                o.create_if_missing(true)
                    // WAL lets readers run while one writer commits; NORMAL sync is durable
                    // across process crashes (what we promise), cheaper than FULL.
                    .journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
                    .busy_timeout(busy)
                    .foreign_keys(true)
            });
        }
        "postgres" | "postgresql" => {}
        other => {
            anyhow::bail!("database.url has scheme {other:?}; expected sqlite:// or postgres://")
        }
    }

    // The URL may carry a password: name the engine, never the URL.
    let db = Database::connect(options)
        .await
        .with_context(|| format!("failed to connect to the {scheme} database"))?;
    M::up(&db, None)
        .await
        .with_context(|| format!("failed to run migrations on the {scheme} database"))?;
    tracing::info!(engine = scheme, "database ready");
    Ok(db)
}

/// Checks that the database answers; used by readiness probes.
///
/// # Errors
/// When a trivial statement fails.
pub async fn ping(db: &DatabaseConnection) -> anyhow::Result<()> {
    db.execute_unprepared("SELECT 1")
        .await
        .map(|_| ())
        .context("database did not answer SELECT 1")
}

/// Creates the directory of an SQLite file URL, so a fresh checkout starts without setup.
fn ensure_sqlite_directory(url: &str) -> anyhow::Result<()> {
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:")
        .split('?')
        .next()
        .unwrap_or_default();
    if path.is_empty() || path.starts_with(":memory:") {
        return Ok(());
    }
    if let Some(parent) = Path::new(path)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("failed to create database directory {}", parent.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use sea_orm_migration::{MigrationTrait, MigratorTrait};

    use super::*;

    struct NoMigrations;

    impl MigratorTrait for NoMigrations {
        fn migrations() -> Vec<Box<dyn MigrationTrait>> {
            Vec::new()
        }
    }

    #[tokio::test]
    async fn sqlite_file_and_its_directory_are_created() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("nested/dir/app.sqlite");
        let settings = DatabaseSettings::sqlite_file(path.to_str().expect("utf-8 path"));
        let db = connect::<NoMigrations>(&settings).await.expect("connects");
        ping(&db).await.expect("answers");
        assert_eq!(Backend::of(&db), Backend::Sqlite);
        assert!(path.exists());
    }

    #[tokio::test]
    async fn an_unknown_scheme_is_refused_by_name() {
        let settings = DatabaseSettings {
            url: SecretString::from("mysql://root@localhost/x"),
            ..DatabaseSettings::default()
        };
        let error = connect::<NoMigrations>(&settings)
            .await
            .expect_err("refused");
        assert!(error.to_string().contains("mysql"), "{error}");
    }
}
