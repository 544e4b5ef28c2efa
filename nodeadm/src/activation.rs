//! The SSM hybrid activation: format rules for its id and code, and reading the code from a
//! root-only file (or systemd credential) or from SSM Parameter Store.
//!
//! The node has no AWS credentials before it registers, so the code normally arrives out of band
//! (a file, `LoadCredential=`, cloud-init). Parameter Store is for sites where bootstrap
//! credentials exist (an instance profile, a profile file, environment variables): the standard
//! AWS chain provides them.

use std::path::{Path, PathBuf};

use aws_config::BehaviorVersion;
use aws_sdk_ssm::config::Region;
use edgeflow_runtime::config::{Secret, read_secret_file, resolve_credential_path};

/// Shortest activation code SSM issues (CreateActivation's `ActivationCode`: 20–250 characters).
pub const CODE_MIN_LEN: usize = 20;
/// Longest activation code.
pub const CODE_MAX_LEN: usize = 250;

/// Where the activation code comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActivationCodeSource {
    /// A file (relative names resolve through `$CREDENTIALS_DIRECTORY` first).
    File(PathBuf),
    /// An SSM Parameter Store parameter, read with decryption.
    Parameter {
        /// Parameter name or ARN.
        name: String,
        /// Endpoint override for the Parameter Store client only.
        endpoint_url: Option<String>,
    },
}

impl std::fmt::Display for ActivationCodeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "file {}", resolve_credential_path(path).display()),
            Self::Parameter { name, .. } => write!(f, "SSM parameter {name}"),
        }
    }
}

/// Why the activation code could not be obtained. Always retryable: the file may be delivered
/// later, the parameter created, the network restored. The message never contains the code.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// The code file is missing, unreadable or empty.
    #[error("{0}")]
    File(edgeflow_runtime::config::Invalid),
    /// Parameter Store answered with an error (not found, access denied, throttled) or could not
    /// be reached.
    #[error("cannot read SSM parameter {name}: {message}")]
    Parameter {
        /// The parameter name.
        name: String,
        /// The SDK's error, with its service code when there is one.
        message: String,
    },
    /// The parameter exists but holds no value.
    #[error("SSM parameter {name} has no value")]
    EmptyParameter {
        /// The parameter name.
        name: String,
    },
}

/// `activationId`: a lowercase UUID, as `aws ssm create-activation` prints it.
pub fn check_activation_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("is required (the ActivationId printed by `aws ssm create-activation`)".into());
    }
    let groups: Vec<&str> = id.split('-').collect();
    let lengths_ok = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]);
    let hex_ok = groups.iter().all(|g| g.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
    if !lengths_ok || !hex_ok {
        let hint = if id.chars().any(|c| c.is_ascii_uppercase()) { " (it must be lowercase)" } else { "" };
        return Err(format!(
            "`{id}` is not a lowercase UUID like 0b3c1b2e-9d0f-4a51-8c1e-3f2a4b5c6d7e{hint}; nodeadm passes it to SSM as is"
        ));
    }
    Ok(())
}

/// `activationCode`: 20–250 characters, no whitespace. The message never includes the code.
pub fn check_activation_code(code: &Secret) -> Result<(), String> {
    let len = code.expose().chars().count();
    if !(CODE_MIN_LEN..=CODE_MAX_LEN).contains(&len) {
        return Err(format!(
            "the activation code has {len} characters; SSM issues {CODE_MIN_LEN}–{CODE_MAX_LEN} (is it the ActivationCode, not the id?)"
        ));
    }
    if code.expose().chars().any(char::is_whitespace) {
        return Err("the activation code contains whitespace; it must be the ActivationCode exactly as issued".into());
    }
    Ok(())
}

/// Parameter Store names: `/a/b` paths or plain names, 1–2048 characters, or an ARN.
pub fn check_parameter_name(name: &str) -> Result<(), String> {
    let valid_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/' | ':'));
    if name.is_empty() || name.len() > 2048 || !valid_chars || name.ends_with('/') || name.len() < 3 {
        return Err(format!("`{name}` is not an SSM parameter name like \"/edgeflow/nodes/plant-1/activation-code\""));
    }
    Ok(())
}

/// Reads SecureString parameters. Built from the standard AWS configuration chain, or handed in
/// (tests build one with static credentials against a local server).
#[derive(Debug, Clone)]
pub struct ParameterStore {
    client: aws_sdk_ssm::Client,
}

impl ParameterStore {
    /// Loads the standard AWS configuration (environment, profile files, instance metadata) for
    /// `region`, with `endpoint_url` applied to this client only.
    pub async fn from_environment(region: &str, endpoint_url: Option<&str>) -> Self {
        let shared =
            aws_config::defaults(BehaviorVersion::latest()).region(Region::new(region.to_owned())).load().await;
        Self::from_sdk_config(&shared, region, endpoint_url)
    }

    /// Builds the client from an already loaded configuration.
    pub fn from_sdk_config(shared: &aws_config::SdkConfig, region: &str, endpoint_url: Option<&str>) -> Self {
        let mut builder = aws_sdk_ssm::config::Builder::from(shared).region(Region::new(region.to_owned()));
        if let Some(url) = endpoint_url {
            builder = builder.endpoint_url(url);
        }
        Self { client: aws_sdk_ssm::Client::from_conf(builder.build()) }
    }

    /// `GetParameter` with decryption.
    pub async fn get(&self, name: &str) -> Result<Secret, ActivationError> {
        let output = self.client.get_parameter().name(name).with_decryption(true).send().await.map_err(|error| {
            use aws_sdk_ssm::error::ProvideErrorMetadata as _;
            let message = match (error.code(), error.message()) {
                (Some(code), Some(msg)) => format!("{code}: {msg}"),
                (Some(code), None) => code.to_owned(),
                _ => aws_sdk_ssm::error::DisplayErrorContext(&error).to_string(),
            };
            ActivationError::Parameter { name: name.to_owned(), message }
        })?;
        let value = output.parameter().and_then(|p| p.value()).unwrap_or_default().trim();
        if value.is_empty() {
            return Err(ActivationError::EmptyParameter { name: name.to_owned() });
        }
        Ok(Secret::new(value))
    }
}

/// Reads the activation code from its source. `store` overrides the client built from the
/// environment (tests).
pub(crate) async fn read_code(
    source: &ActivationCodeSource,
    region: &str,
    store: Option<&ParameterStore>,
) -> Result<Secret, ActivationError> {
    match source {
        ActivationCodeSource::File(path) => read_code_file(path),
        ActivationCodeSource::Parameter { name, endpoint_url } => match store {
            Some(store) => store.get(name).await,
            None => ParameterStore::from_environment(region, endpoint_url.as_deref()).await.get(name).await,
        },
    }
}

fn read_code_file(path: &Path) -> Result<Secret, ActivationError> {
    read_secret_file("bootstrap.ssm.activation_code_file", path).map_err(ActivationError::File)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_id_must_be_a_lowercase_uuid() {
        assert!(check_activation_id("0b3c1b2e-9d0f-4a51-8c1e-3f2a4b5c6d7e").is_ok());
        let upper = check_activation_id("0B3C1B2E-9D0F-4A51-8C1E-3F2A4B5C6D7E").expect_err("upper");
        assert!(upper.contains("lowercase"), "{upper}");
        for bad in [
            "",
            "0b3c1b2e9d0f4a518c1e3f2a4b5c6d7e",
            "0b3c1b2e-9d0f-4a51-8c1e-3f2a4b5c6d7",
            "zb3c1b2e-9d0f-4a51-8c1e-3f2a4b5c6d7e",
        ] {
            assert!(check_activation_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn activation_code_length_is_checked_without_echoing_it() {
        assert!(check_activation_code(&Secret::new("a".repeat(20))).is_ok());
        assert!(check_activation_code(&Secret::new("a".repeat(250))).is_ok());
        let short = check_activation_code(&Secret::new("tooShortCode")).expect_err("short");
        assert!(!short.contains("tooShortCode") && short.contains("12 characters"), "{short}");
        assert!(check_activation_code(&Secret::new("a".repeat(251))).is_err());
        assert!(check_activation_code(&Secret::new(format!("{} x", "a".repeat(20)))).is_err());
    }

    #[test]
    fn code_file_is_trimmed_and_errors_name_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("code");
        std::fs::write(&path, "abcdefghijklmnopqrstuvwxyz\n").expect("write");
        assert_eq!(read_code_file(&path).expect("readable").expose(), "abcdefghijklmnopqrstuvwxyz");
        let err = read_code_file(&dir.path().join("missing")).expect_err("missing");
        assert!(err.to_string().contains("bootstrap.ssm.activation_code_file"), "{err}");
    }

    #[test]
    fn parameter_names() {
        assert!(check_parameter_name("/edgeflow/nodes/plant-1/activation-code").is_ok());
        assert!(check_parameter_name("arn:aws:ssm:eu-west-1:111122223333:parameter/edge/code").is_ok());
        assert!(check_parameter_name("/a b").is_err());
        assert!(check_parameter_name("/x/").is_err());
    }
}
