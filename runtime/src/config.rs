//! Configuration values and loading.
//!
//! Each binary has one TOML file, parsed into a serde struct with `deny_unknown_fields`, then
//! validated into a `Settings` type with real types. This module holds the pieces they share:
//!
//! * [`load`] reads and parses a file; a syntax error or unknown key names the line and key.
//! * [`Invalid`] is a validation error naming the field and the problem.
//! * [`Duration`] parses `"30s"`, `"5m"`, `"1h 30m"`; [`ByteSize`] parses `"512MiB"`, `"1GB"`.
//! * [`Secret`] never shows its value in `Debug` or `Display`; [`SecretSource`] reads a secret
//!   from a file, or from systemd's `$CREDENTIALS_DIRECTORY` (`LoadCredential=`).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a configuration file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read (missing, permissions).
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
}

/// Reads and parses a TOML configuration file.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read { path: path.to_owned(), source })?;
    parse(&text).map_err(|message| LoadError::Parse { path: path.to_owned(), message })
}

/// Parses TOML text; the error is a one-paragraph message naming the line and key.
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
}

/// A configuration value that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: {problem}")]
pub struct Invalid {
    /// Dotted path of the key, as written in the file (`mqtt.url`).
    pub field: String,
    /// What is wrong with it, and what would be right.
    pub problem: String,
}

impl Invalid {
    /// Builds a validation error for `field`.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { field: field.into(), problem: problem.into() }
    }
}

/// A duration written like `"30s"`, `"250ms"`, `"1h 30m"`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }

    pub const fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }

    /// The std duration.
    pub const fn get(self) -> std::time::Duration {
        self.0
    }
}

impl fmt::Debug for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(Duration)
            .map_err(|e| serde::de::Error::custom(format!("`{text}` is not a duration like \"30s\" or \"5m\": {e}")))
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A size in bytes written like `"512MiB"`, `"64KiB"`, `"1GB"` (or a plain integer).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn kib(n: u64) -> Self {
        Self(n * 1024)
    }

    pub const fn mib(n: u64) -> Self {
        Self(n * 1024 * 1024)
    }

    pub const fn gib(n: u64) -> Self {
        Self(n * 1024 * 1024 * 1024)
    }

    /// The number of bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", bytesize::ByteSize(self.0).display().iec())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(text) => text.trim().parse::<bytesize::ByteSize>().map(|b| ByteSize(b.as_u64())).map_err(|e| {
                serde::de::Error::custom(format!("`{text}` is not a size like \"512MiB\" or \"64KiB\": {e}"))
            }),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A secret value: shown as `***` by `Debug` and `Display`, so it cannot leak through logs.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Call only where it is handed to the library that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Reads a secret from a file. A relative path is looked up in systemd's
/// `$CREDENTIALS_DIRECTORY` first (so `LoadCredential=name:/etc/…` pairs with `"name"`), then
/// relative to the working directory. Trailing newlines are trimmed.
pub fn read_secret_file(field: &str, path: &Path) -> Result<Secret, Invalid> {
    let resolved = resolve_credential_path(path);
    let text = std::fs::read_to_string(&resolved)
        .map_err(|e| Invalid::new(field, format!("cannot read secret file {}: {e}", resolved.display())))?;
    let value = text.trim_end_matches(['\n', '\r']).to_owned();
    if value.is_empty() {
        return Err(Invalid::new(field, format!("secret file {} is empty", resolved.display())));
    }
    Ok(Secret(value))
}

/// Where a credential file actually is: `$CREDENTIALS_DIRECTORY/<path>` when `path` is relative
/// and that file exists, `path` otherwise.
pub fn resolve_credential_path(path: &Path) -> PathBuf {
    if path.is_relative()
        && let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY")
    {
        let candidate = Path::new(&dir).join(path);
        if candidate.exists() {
            return candidate;
        }
    }
    path.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        wait: Duration,
        size: ByteSize,
        #[serde(default)]
        password: Secret,
    }

    #[test]
    fn parses_human_values() {
        let s: Sample = parse("wait = \"1m 30s\"\nsize = \"512MiB\"\npassword = \"hunter2\"").expect("valid");
        assert_eq!(s.wait.get(), std::time::Duration::from_secs(90));
        assert_eq!(s.size.bytes(), 512 * 1024 * 1024);
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "secret leaked in {shown}");
        assert_eq!(s.password.expose(), "hunter2");
    }

    #[test]
    fn errors_name_the_key() {
        let err = parse::<Sample>("wait = \"soon\"\nsize = 1").expect_err("bad duration");
        assert!(err.contains("wait") && err.contains("soon"), "{err}");
        let err = parse::<Sample>("wait = \"1s\"\nsize = 1\ncolour = \"red\"").expect_err("unknown key");
        assert!(err.contains("colour"), "{err}");
        let err = parse::<Sample>("wait = \"1s\"\nsize = \"lots\"").expect_err("bad size");
        assert!(err.contains("size") && err.contains("lots"), "{err}");
    }

    #[test]
    fn secret_files_resolve_through_credentials_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("mqtt-password"), "s3cret\n").expect("write");
        let abs = read_secret_file("mqtt.password_file", &dir.path().join("mqtt-password")).expect("readable");
        assert_eq!(abs.expose(), "s3cret");
        let missing = read_secret_file("mqtt.password_file", Path::new("/nonexistent/x")).expect_err("missing");
        assert_eq!(missing.field, "mqtt.password_file");
    }
}
