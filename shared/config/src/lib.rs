//! Typed settings for every service: built-in defaults < an optional TOML file < environment.
//!
//! This is the only crate that reads the process environment. A service describes its
//! settings as plain structs with `#[serde(default, deny_unknown_fields)]`, so that
//!
//! - every field has a documented default (the struct's `Default`), and a service starts with
//!   no configuration at all;
//! - sources are merged key by key over the serialized defaults, so setting one key of a
//!   section (`PRODUCT_CATALOG__SERVER__REQUEST_TIMEOUT`) keeps the service's defaults for the
//!   section's other keys (its listen port), not the section type's generic ones;
//! - a TOML file named by `--config <path>` or `<PREFIX>_CONFIG` overrides the defaults;
//! - environment variables `<PREFIX>__SECTION__KEY=value` override both (`__` separates
//!   levels, names are case-insensitive, values are parsed as TOML-ish scalars);
//! - an unknown key or a bad value fails start-up with an error that names the key and
//!   where it came from (`PRODUCT_CATALOG__GRPC__LISTEN_ADDR environment variable`).
//!
//! # Layout
//! - [`load`]: what `main` calls; reads the real arguments and environment.
//! - [`Sources`] and [`load_from`]: the same with injected inputs, for tests.
//! - [`ConfigError`]: what went wrong, naming the key.

use std::path::{Path, PathBuf};

use figment::{
    Figment, Metadata, Profile, Provider,
    providers::{Format, Serialized, Toml},
    value::{Dict, Map, Value},
};
use serde::{Serialize, Serializer, de::DeserializeOwned};

pub use secrecy::{ExposeSecret, SecretString};

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file named on the command line or in `<PREFIX>_CONFIG` is missing.
    #[error("config file {0} does not exist")]
    FileNotFound(PathBuf),
    /// A key is unknown or its value has the wrong type. The message names the key and its source.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The command line has an argument this program does not take.
    #[error("invalid command line: {0}")]
    Usage(String),
}

/// Everything settings are read from; [`Sources::from_process`] fills it from the real process.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// TOML file that overrides the defaults.
    pub file: Option<PathBuf>,
    /// Environment variables, as `(name, value)` pairs; those without the service prefix are ignored.
    pub env: Vec<(String, String)>,
}

impl Sources {
    /// Reads `--config <path>` (or `--config=<path>`) from the arguments, `<PREFIX>_CONFIG` and
    /// every `<PREFIX>__*` variable from the environment.
    ///
    /// # Errors
    /// [`ConfigError::Usage`] for any other argument, so a typo is not silently ignored.
    pub fn from_process(prefix: &str) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let mut file = env
            .iter()
            .find(|(name, _)| *name == format!("{prefix}_CONFIG"))
            .map(|(_, value)| PathBuf::from(value));
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            if let Some(path) = arg.strip_prefix("--config=") {
                file = Some(PathBuf::from(path));
            } else if arg == "--config" {
                let path = args
                    .next()
                    .ok_or_else(|| ConfigError::Usage("--config needs a file path".into()))?;
                file = Some(PathBuf::from(path));
            } else {
                return Err(ConfigError::Usage(format!(
                    "unexpected argument {arg:?}; the only argument is --config <file.toml>, \
                     everything else is set with {prefix}__* environment variables"
                )));
            }
        }
        Ok(Self { file, env })
    }
}

/// Loads settings for the service whose environment prefix is `prefix` (for example
/// `PRODUCT_CATALOG`) from the real command line and environment.
///
/// # Errors
/// See [`load_from`].
pub fn load<T: DeserializeOwned + Serialize + Default>(prefix: &str) -> Result<T, ConfigError> {
    load_from(prefix, Sources::from_process(prefix)?)
}

/// Loads settings from explicit sources: defaults, then `sources.file`, then `sources.env`.
///
/// # Errors
/// [`ConfigError::FileNotFound`] when the file is named but absent; [`ConfigError::Invalid`]
/// naming the key for an unknown key, a malformed value or a malformed file.
pub fn load_from<T: DeserializeOwned + Serialize + Default>(
    prefix: &str,
    sources: Sources,
) -> Result<T, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(file) = &sources.file {
        if !Path::new(file).is_file() {
            return Err(ConfigError::FileNotFound(file.clone()));
        }
        figment = figment.merge(Toml::file_exact(file));
    }
    figment = figment.merge(EnvProvider::new(prefix, &sources.env));
    figment
        .extract::<T>()
        .map_err(|error| ConfigError::Invalid(describe(error)))
}

/// Serializes a secret setting into the defaults the sources are merged over. Use it as
/// `#[serde(serialize_with = "mall_config::serialize_secret")]`: the value only goes into the
/// in-memory merge, never to a log or a message.
///
/// # Errors
/// Those of the serializer.
pub fn serialize_secret<S: Serializer>(
    secret: &SecretString,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(secret.expose_secret())
}

/// [`serialize_secret`] for an optional secret.
///
/// # Errors
/// Those of the serializer.
pub fn serialize_optional_secret<S: Serializer>(
    secret: &Option<SecretString>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match secret {
        Some(secret) => serializer.serialize_some(secret.expose_secret()),
        None => serializer.serialize_none(),
    }
}

/// Renders every error figment collected, one per line, each naming its key and source.
fn describe(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Environment variables `<PREFIX>__A__B=value` as the nested key `a.b`.
///
/// figment's own `Env` provider reads the real environment only; this one takes the pairs it is
/// given, so tests need not touch the process environment.
struct EnvProvider {
    prefix: String,
    data: Dict,
}

impl EnvProvider {
    fn new(prefix: &str, env: &[(String, String)]) -> Self {
        let marker = format!("{prefix}__");
        let mut data = Dict::new();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(&marker) else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if path.iter().any(String::is_empty) {
                continue;
            }
            let parsed: Value = value
                .parse()
                .expect("figment parses any string into a value, falling back to a string");
            insert(&mut data, &path, parsed);
        }
        Self {
            prefix: prefix.to_owned(),
            data,
        }
    }
}

fn insert(dict: &mut Dict, path: &[String], value: Value) {
    match path {
        [] => {}
        [last] => {
            dict.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry(first.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}

impl Provider for EnvProvider {
    fn metadata(&self) -> Metadata {
        let prefix = self.prefix.clone();
        Metadata::named("environment variable").interpolater(move |_profile, keys| {
            let path = keys
                .iter()
                .map(|k| k.to_ascii_uppercase())
                .collect::<Vec<_>>()
                .join("__");
            format!("{prefix}__{path}")
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.data.clone()))
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Write, net::SocketAddr, time::Duration};

    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Settings {
        server: Server,
        name: String,
    }

    impl Default for Settings {
        fn default() -> Self {
            Self {
                server: Server::default(),
                name: "default".into(),
            }
        }
    }

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Server {
        listen_addr: SocketAddr,
        #[serde(with = "humantime_serde")]
        timeout: Duration,
        limit: u32,
    }

    impl Default for Server {
        fn default() -> Self {
            Self {
                listen_addr: "127.0.0.1:1".parse().expect("valid literal"),
                timeout: Duration::from_secs(5),
                limit: 10,
            }
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn one_key_of_a_section_keeps_the_services_defaults_for_the_others() {
        #[derive(Debug, Deserialize, Serialize)]
        #[serde(default, deny_unknown_fields)]
        struct Service {
            server: Server,
        }
        impl Default for Service {
            fn default() -> Self {
                Self {
                    server: Server {
                        listen_addr: "127.0.0.1:50051".parse().expect("valid literal"),
                        ..Server::default()
                    },
                }
            }
        }
        let settings: Service = load_from(
            "APP",
            Sources {
                file: None,
                env: env(&[("APP__SERVER__LIMIT", "3")]),
            },
        )
        .expect("loads");
        assert_eq!(settings.server.limit, 3);
        assert_eq!(settings.server.listen_addr.port(), 50051);
    }

    #[test]
    fn no_sources_gives_the_defaults() {
        let settings: Settings = load_from("APP", Sources::default()).expect("defaults load");
        assert_eq!(settings, Settings::default());
    }

    #[test]
    fn environment_overrides_file_which_overrides_defaults() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(
            file,
            "name = \"from-file\"\n[server]\nlimit = 20\ntimeout = \"2s\""
        )
        .expect("write config");
        let sources = Sources {
            file: Some(file.path().to_owned()),
            env: env(&[
                ("APP__SERVER__LIMIT", "30"),
                ("APP__SERVER__LISTEN_ADDR", "0.0.0.0:8080"),
                ("OTHER__SERVER__LIMIT", "99"),
            ]),
        };
        let settings: Settings = load_from("APP", sources).expect("settings load");
        assert_eq!(settings.name, "from-file");
        assert_eq!(settings.server.limit, 30);
        assert_eq!(settings.server.timeout, Duration::from_secs(2));
        assert_eq!(
            settings.server.listen_addr,
            "0.0.0.0:8080".parse::<SocketAddr>().expect("valid literal")
        );
    }

    #[test]
    fn a_bad_value_names_the_environment_variable() {
        let sources = Sources {
            file: None,
            env: env(&[("APP__SERVER__LISTEN_ADDR", "not-an-address")]),
        };
        let error = load_from::<Settings>("APP", sources).expect_err("must fail");
        let message = error.to_string();
        assert!(
            message.contains("APP__SERVER__LISTEN_ADDR"),
            "message should name the variable: {message}"
        );
    }

    #[test]
    fn an_unknown_key_is_rejected_with_its_name() {
        let sources = Sources {
            file: None,
            env: env(&[("APP__SERVER__LIMTI", "3")]),
        };
        let message = load_from::<Settings>("APP", sources)
            .expect_err("must fail")
            .to_string();
        assert!(message.contains("limti"), "{message}");
    }

    #[test]
    fn an_unknown_key_in_the_file_is_rejected() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(file, "[server]\nlisten = \"127.0.0.1:1\"").expect("write config");
        let sources = Sources {
            file: Some(file.path().to_owned()),
            env: vec![],
        };
        let message = load_from::<Settings>("APP", sources)
            .expect_err("must fail")
            .to_string();
        assert!(message.contains("listen"), "{message}");
    }

    #[test]
    fn a_missing_file_is_an_error_not_silently_ignored() {
        let sources = Sources {
            file: Some("/nonexistent/mall.toml".into()),
            env: vec![],
        };
        let error = load_from::<Settings>("APP", sources).expect_err("must fail");
        assert!(matches!(error, ConfigError::FileNotFound(_)));
    }
}
