//! Database connections for every service: an embedded SQLite file by default, PostgreSQL in
//! production, chosen by the URL alone. Migrations run at start-up.
//!
//! # Layout
//! - [`DatabaseSettings`]: the `database` section of a service's settings.
//! - [`connect`]: open the pool, tune SQLite, run the service's migrations.
//! - [`Backend`]: which engine a connection talks to, for the few places SQL differs.
//! - [`is_unavailable`]: whether an error is the database's absence (retry later) rather
//!   than a problem with the statement.

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use sea_orm::{
    ConnectOptions, ConnectionTrait as _, Database, DatabaseConnection, DbBackend, DbErr,
    RuntimeErr,
};
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
    /// Connections opened at start. Default 1. (Every connection opened stays open until the
    /// pool closes: see [`connect`]'s options.)
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
    /// PostgreSQL only: the server cancels a statement running longer than this
    /// (`statement_timeout`); the caller sees UNAVAILABLE and retries. 0 turns it off.
    /// Default 30s.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// PostgreSQL only: the server fails a statement that waits longer than this for a lock
    /// (`lock_timeout`). 0 turns it off. Default 10s.
    #[serde(with = "humantime_serde")]
    pub lock_timeout: Duration,
    /// PostgreSQL only: TCP keepalive idle time the server uses on our connections
    /// (`tcp_keepalives_idle`, probes every 10s, 3 lost probes end the session), so a
    /// vanished replica's session and its locks go within about a minute. Default 30s.
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive: Duration,
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
            statement_timeout: Duration::from_secs(30),
            lock_timeout: Duration::from_secs(10),
            tcp_keepalive: Duration::from_secs(30),
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

    /// A raw statement for this engine from SQL written with PostgreSQL's `$N` parameters.
    /// Only for SQL both engines understand (no `$` outside placeholders).
    ///
    /// On SQLite every `$N` becomes an anonymous `?` bound to the N-th value (again for each
    /// use): SQLite finds a numbered parameter's name by a linear scan, and the driver asks
    /// for every parameter's name, so binding the thousands of values of a set-based
    /// statement was quadratic (a tenth of a delivery round's CPU, measured).
    pub fn statement(
        self,
        sql: &str,
        values: impl IntoIterator<Item = sea_orm::Value>,
    ) -> sea_orm::Statement {
        match self {
            Self::Postgres => {
                sea_orm::Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
            }
            Self::Sqlite => {
                let (sql, values) = anonymous_placeholders(sql, values.into_iter().collect());
                sea_orm::Statement::from_sql_and_values(DbBackend::Sqlite, sql, values)
            }
        }
    }
}

/// `sql` with each `$N` replaced by `?`, and the values in the order the `?`s take them.
///
/// # Panics
/// On a `$` that is not a placeholder of one of `values` (a bug in the statement: SQLite's
/// driver would bind NULL to it silently).
fn anonymous_placeholders(sql: &str, values: Vec<sea_orm::Value>) -> (String, Vec<sea_orm::Value>) {
    let mut text = String::with_capacity(sql.len());
    let mut ordered = Vec::with_capacity(values.len());
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        text.push_str(&rest[..at]);
        text.push('?');
        let after = &rest[at + 1..];
        let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let value = after[..digits]
            .parse::<usize>()
            .ok()
            .and_then(|n| n.checked_sub(1))
            .and_then(|i| values.get(i));
        let Some(value) = value else {
            panic!(
                "`${}` is not a placeholder of the {} values of: {sql}",
                &after[..digits],
                values.len()
            );
        };
        ordered.push(value.clone());
        rest = &after[digits..];
    }
    text.push_str(rest);
    (text, ordered)
}

/// The pool's idle timeout: long enough that sqlx's reaper never runs after start (see
/// [`connect`]).
const IDLE_FOR_EVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// Opens a pool for `settings.url` and applies migrator `M`.
///
/// # Errors
/// When the URL is neither SQLite nor PostgreSQL, the database cannot be reached within the
/// timeouts, or a migration fails.
pub async fn connect<M: MigratorTrait>(
    settings: &DatabaseSettings,
) -> anyhow::Result<DatabaseConnection> {
    let url = settings.url.expose_secret();
    let scheme = url.split(':').next().unwrap_or_default();
    // sea-orm's connect span records its options, URL included, and a trace-level filter
    // would log or export it: the password is taken out of the URL and handed to the driver
    // on its own.
    let (url, password) = match scheme {
        "postgres" | "postgresql" => without_password(url)?,
        _ => (url.to_owned(), None),
    };
    let mut options = ConnectOptions::new(url.clone());
    options
        .max_connections(settings.max_connections)
        .min_connections(settings.min_connections)
        .connect_timeout(settings.connect_timeout)
        .acquire_timeout(settings.acquire_timeout)
        // sqlx's pool reaper (0.9.0, the latest) loops over its count of idle connections,
        // which a race between returning and taking a connection can wrap below zero; the
        // reaper then spins on a runtime thread for ever without yielding
        // (launchbadge/sqlx#3645, fixed by #4289, not released). Seen here: a test's process
        // at 100% CPU in `spawn_maintenance_tasks`, hung at its runtime's shutdown. The
        // reaper runs once as the pool starts, then every `idle_timeout`: a year, so it
        // does not run again. (Not none: without a period sqlx opens
        // `min_connections` in a task of its own at once, racing the caller's first
        // connection, and two connections opening a new SQLite file at once get "database
        // is locked".) So connections stay open until the pool closes; one the server
        // dropped is found by the ping before each acquire (sqlx's `test_before_acquire`,
        // on by default) and replaced.
        .idle_timeout(IDLE_FOR_EVER)
        .max_lifetime(None)
        // Statements are traced by our own spans; sqlx's per-statement logs are noise.
        .sqlx_logging(false);

    match scheme {
        "sqlite" => {
            ensure_sqlite_directory(&url)?;
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
        "postgres" | "postgresql" => {
            let parameters = postgres_parameters(settings);
            options.map_sqlx_postgres_opts(move |o| {
                let o = o.options(parameters.clone());
                match &password {
                    Some(password) => o.password(password),
                    None => o,
                }
            });
        }
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

/// `url` without its password, and the password (percent-decoded), if it had one.
fn without_password(url: &str) -> anyhow::Result<(String, Option<String>)> {
    // Not `{url}` in the message: it may hold the password.
    let mut parsed = url::Url::parse(url)
        .map_err(|e| anyhow::anyhow!("database.url is not a valid URL: {e}"))?;
    let Some(password) = parsed.password() else {
        return Ok((url.to_owned(), None));
    };
    let password = percent_encoding::percent_decode_str(password)
        .decode_utf8()
        .map_err(|_| anyhow::anyhow!("database.url's password is not UTF-8"))?
        .into_owned();
    parsed
        .set_password(None)
        .map_err(|()| anyhow::anyhow!("database.url cannot drop its password"))?;
    Ok((parsed.to_string(), Some(password)))
}

/// Session settings every PostgreSQL connection starts with.
fn postgres_parameters(settings: &DatabaseSettings) -> Vec<(&'static str, String)> {
    let millis = |d: Duration| d.as_millis().to_string();
    vec![
        ("statement_timeout", millis(settings.statement_timeout)),
        ("lock_timeout", millis(settings.lock_timeout)),
        (
            "tcp_keepalives_idle",
            settings.tcp_keepalive.as_secs().max(1).to_string(),
        ),
        ("tcp_keepalives_interval", "10".to_owned()),
        ("tcp_keepalives_count", "3".to_owned()),
    ]
}

/// Whether `error` is a transient conflict that a new attempt of the same transaction
/// resolves: PostgreSQL serialization failures and deadlocks, SQLite busy and locked.
pub fn is_retryable(error: &DbErr) -> bool {
    let (DbErr::Exec(RuntimeErr::SqlxError(e))
    | DbErr::Query(RuntimeErr::SqlxError(e))
    | DbErr::Conn(RuntimeErr::SqlxError(e))) = error
    else {
        return false;
    };
    let sea_orm::sqlx::Error::Database(db) = e.as_ref() else {
        return false;
    };
    let Some(code) = db.code() else {
        return false;
    };
    match code.as_ref() {
        // serialization_failure, deadlock_detected
        "40001" | "40P01" => true,
        // SQLite extended result codes: the primary code is the low byte (5 BUSY, 6 LOCKED).
        other => other
            .parse::<i32>()
            .is_ok_and(|c| matches!(c & 0xff, 5 | 6)),
    }
}

/// Whether `error` means the database cannot serve now, so the same work succeeds later: no
/// connection (refused, reset, lost, pool exhausted or closed), the server shutting down or
/// failing over (SQLSTATE class 08, 57P01-57P03), out of connections or resources (class
/// 53), a statement or lock timeout (57014, 55P03), or a read-only standby after a failover
/// (25006). Everything else is about the statement and is not retried blindly.
pub fn is_unavailable(error: &DbErr) -> bool {
    let sqlx = match error {
        DbErr::ConnectionAcquire(_) => return true,
        DbErr::Conn(RuntimeErr::SqlxError(e))
        | DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e)) => e.as_ref(),
        DbErr::Conn(_) => return true,
        _ => return false,
    };
    use sea_orm::sqlx::Error;
    match sqlx {
        Error::Io(_)
        | Error::Tls(_)
        | Error::PoolTimedOut
        | Error::PoolClosed
        | Error::WorkerCrashed
        | Error::Protocol(_) => true,
        Error::Database(db) => db.code().is_some_and(|code| is_unavailable_sqlstate(&code)),
        _ => false,
    }
}

/// The SQLSTATEs of [`is_unavailable`].
fn is_unavailable_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "57014" | "55P03" | "25006"
        )
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

    #[test]
    fn the_password_leaves_the_url_decoded_and_the_rest_stays() {
        let (url, password) = without_password(
            "postgres://app:p%40ss%2Fword@db.internal:5432/catalog?sslmode=require",
        )
        .expect("a valid URL");
        assert_eq!(
            url,
            "postgres://app@db.internal:5432/catalog?sslmode=require"
        );
        assert_eq!(password.as_deref(), Some("p@ss/word"));
        let (url, password) = without_password("postgres://app@db/catalog").expect("valid");
        assert_eq!(
            (url.as_str(), password),
            ("postgres://app@db/catalog", None)
        );
        let error = without_password("postgres://app:secret@[bad").expect_err("invalid");
        assert!(!error.to_string().contains("secret"), "{error}");
    }

    #[test]
    fn sqlite_statements_take_anonymous_placeholders_in_order() {
        let values: Vec<sea_orm::Value> = (1..=10_i64).map(sea_orm::Value::from).collect();
        let statement = Backend::Sqlite.statement(
            "UPDATE t SET a = $2, b = $1 WHERE c = $2 AND d IN ($3, $10)",
            values,
        );
        assert_eq!(
            statement.sql,
            "UPDATE t SET a = ?, b = ? WHERE c = ? AND d IN (?, ?)"
        );
        assert_eq!(
            statement.values.map(|v| v.0),
            Some([2_i64, 1, 2, 3, 10].map(sea_orm::Value::from).to_vec())
        );
        let postgres = Backend::Postgres.statement("a = $1", [sea_orm::Value::from(1_i64)]);
        assert_eq!(postgres.sql, "a = $1");
    }

    #[test]
    #[should_panic(expected = "`$3` is not a placeholder of the 2 values")]
    fn a_placeholder_without_a_value_is_a_bug_caught_at_once() {
        Backend::Sqlite.statement("a = $1 AND b = $3", [1_i64, 2].map(sea_orm::Value::from));
    }

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

    #[test]
    fn lost_connections_and_timeouts_are_unavailable_and_statement_errors_are_not() {
        for code in [
            "08006", "08001", "57P01", "57P03", "57014", "55P03", "53300", "25006",
        ] {
            assert!(is_unavailable_sqlstate(code), "{code}");
        }
        for code in ["23505", "42P01", "40001", "22001"] {
            assert!(!is_unavailable_sqlstate(code), "{code}");
        }
        let io = DbErr::Exec(RuntimeErr::SqlxError(std::sync::Arc::new(
            sea_orm::sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        )));
        assert!(is_unavailable(&io));
        assert!(!is_unavailable(&DbErr::Custom("bad".into())));
    }

    #[test]
    fn postgres_sessions_get_the_configured_timeouts() {
        let parameters = postgres_parameters(&DatabaseSettings::default());
        assert!(parameters.contains(&("statement_timeout", "30000".to_owned())));
        assert!(parameters.contains(&("lock_timeout", "10000".to_owned())));
        assert!(parameters.contains(&("tcp_keepalives_idle", "30".to_owned())));
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
