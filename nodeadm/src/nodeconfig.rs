//! The NodeConfig handed to `nodeadm init`: built from the settings, checked with the rules
//! nodeadm applies, written as YAML with mode 0600.
//!
//! Only fields of the `node.eks.aws/v1alpha1` CRD are written (nodeadm rejects unknown fields):
//! `spec.cluster.{name,region}`, `spec.hybrid.ssm.{activationCode,activationId}` or
//! `spec.hybrid.iamRolesAnywhere.{…}`, and `spec.kubelet.flags`.
//!
//! The rules mirror nodeadm's hybrid validator (aws/eks-hybrid
//! `internal/node/hybrid/validator.go`): cluster name and region present, no
//! `--hostname-override` kubelet flag, exactly one of SSM and IAM Roles Anywhere with all their
//! fields, node name at most 64 characters, certificate and key present on disk. The activation
//! id and code formats are SSM's (CreateActivation), checked here so a bad code fails before
//! nodeadm echoes it into its logs.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use edgeflow_runtime::config::Secret;
use serde_json::{Value, json};

use crate::activation::{check_activation_code, check_activation_id};
use crate::config::{BootstrapSettings, CredentialSettings, IamRaSettings};
use crate::host_path;

/// `apiVersion` of the NodeConfig.
pub const API_VERSION: &str = "node.eks.aws/v1alpha1";
/// `kind` of the NodeConfig.
pub const KIND: &str = "NodeConfig";

/// What the NodeConfig says about the node's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeCredentials {
    /// `spec.hybrid.ssm`.
    Ssm {
        /// `activationId`.
        activation_id: String,
        /// `activationCode`.
        activation_code: Secret,
    },
    /// `spec.hybrid.iamRolesAnywhere`.
    IamRolesAnywhere(IamRaSettings),
}

/// A hybrid-node NodeConfig.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// `spec.cluster.name`.
    pub cluster_name: String,
    /// `spec.cluster.region`.
    pub region: String,
    /// `spec.hybrid`.
    pub credentials: NodeCredentials,
    /// `spec.kubelet.flags`.
    pub kubelet_flags: Vec<String>,
}

/// The NodeConfig breaks one of nodeadm's rules; nodeadm would refuse it (or SSM would).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NodeConfigError(pub String);

impl NodeConfig {
    /// Builds the NodeConfig. `activation_code` is required for SSM and ignored otherwise.
    pub fn new(settings: &BootstrapSettings, activation_code: Option<Secret>) -> Self {
        let credentials = match &settings.credentials {
            CredentialSettings::Ssm { activation_id, .. } => NodeCredentials::Ssm {
                activation_id: activation_id.clone(),
                activation_code: activation_code.unwrap_or_default(),
            },
            CredentialSettings::IamRolesAnywhere(ra) => NodeCredentials::IamRolesAnywhere(ra.clone()),
        };
        let mut kubelet_flags = settings.kubelet_flags.clone();
        if let Some(ip) = settings.node_ip {
            kubelet_flags.push(format!("--node-ip={ip}"));
        }
        Self {
            cluster_name: settings.cluster_name.clone(),
            region: settings.region.clone(),
            credentials,
            kubelet_flags,
        }
    }

    /// The document; `mask` replaces the activation code with `***`.
    pub fn to_value(&self, mask: bool) -> Value {
        let hybrid = match &self.credentials {
            NodeCredentials::Ssm { activation_id, activation_code } => json!({
                "ssm": {
                    "activationCode": if mask { "***" } else { activation_code.expose() },
                    "activationId": activation_id,
                }
            }),
            NodeCredentials::IamRolesAnywhere(ra) => json!({
                "iamRolesAnywhere": {
                    "nodeName": ra.node_name,
                    "trustAnchorArn": ra.trust_anchor_arn,
                    "profileArn": ra.profile_arn,
                    "roleArn": ra.role_arn,
                    "certificatePath": ra.certificate_path.to_string_lossy(),
                    "privateKeyPath": ra.private_key_path.to_string_lossy(),
                }
            }),
        };
        let mut spec = json!({
            "cluster": { "name": self.cluster_name, "region": self.region },
            "hybrid": hybrid,
        });
        if !self.kubelet_flags.is_empty() {
            spec["kubelet"] = json!({ "flags": self.kubelet_flags });
        }
        json!({ "apiVersion": API_VERSION, "kind": KIND, "spec": spec })
    }

    /// The YAML nodeadm reads, with the activation code in clear.
    pub fn to_yaml(&self) -> String {
        format!("{HEADER}{}", crate::yaml::to_yaml(&self.to_value(false)))
    }

    /// The YAML with the activation code masked, for dry runs and logs.
    pub fn to_masked_yaml(&self) -> String {
        format!("{HEADER}{}", crate::yaml::to_yaml(&self.to_value(true)))
    }

    /// The checks nodeadm (and SSM) apply. Host paths are looked up under `root`.
    pub fn validate(&self, root: &Path) -> Result<(), NodeConfigError> {
        let fail = |m: &str| Err(NodeConfigError(m.to_owned()));
        if self.cluster_name.is_empty() {
            return fail("Name is missing in cluster configuration");
        }
        if self.region.is_empty() {
            return fail("Region is missing in cluster configuration");
        }
        if let Some(flag) = self.kubelet_flags.iter().find(|f| f.starts_with("--hostname-override")) {
            return Err(NodeConfigError(format!(
                "hostname-override kubelet flag is not supported for hybrid nodes but found {flag}; use --node-ip= to pin the node's address"
            )));
        }
        match &self.credentials {
            NodeCredentials::Ssm { activation_id, activation_code } => {
                if activation_code.is_empty() {
                    return fail("ActivationCode is missing in hybrid ssm configuration");
                }
                if activation_id.is_empty() {
                    return fail("ActivationID is missing in hybrid ssm configuration");
                }
                check_activation_id(activation_id).map_err(|p| NodeConfigError(format!("activationId {p}")))?;
                check_activation_code(activation_code).map_err(NodeConfigError)?;
            }
            NodeCredentials::IamRolesAnywhere(ra) => {
                for (value, name) in [
                    (&ra.role_arn, "RoleARN"),
                    (&ra.profile_arn, "ProfileARN"),
                    (&ra.trust_anchor_arn, "TrustAnchorARN"),
                ] {
                    if value.is_empty() {
                        return Err(NodeConfigError(format!(
                            "{name} is missing in hybrid iam roles anywhere configuration"
                        )));
                    }
                }
                if ra.node_name.is_empty() {
                    return fail("NodeName can't be empty in hybrid iam roles anywhere configuration");
                }
                if ra.node_name.len() > 64 {
                    return fail(
                        "NodeName can't be longer than 64 characters in hybrid iam roles anywhere configuration",
                    );
                }
                for (path, what) in [(&ra.certificate_path, "certificate"), (&ra.private_key_path, "private key")] {
                    if path.as_os_str().is_empty() {
                        return Err(NodeConfigError(format!("the IAM Roles Anywhere {what} path is missing")));
                    }
                    if !host_path(root, path).is_file() {
                        return Err(NodeConfigError(format!("IAM Roles Anywhere {what} {} not found", path.display())));
                    }
                }
            }
        }
        Ok(())
    }

    /// The activation code, if any (to redact it from nodeadm's output).
    pub fn secret(&self) -> Option<&Secret> {
        match &self.credentials {
            NodeCredentials::Ssm { activation_code, .. } => Some(activation_code),
            NodeCredentials::IamRolesAnywhere(_) => None,
        }
    }
}

const HEADER: &str =
    "# Written by edgeflow-agent for `nodeadm init`; it holds the SSM activation code, keep it 0600.\n";

/// Writes `contents` to `path` atomically with mode 0600 (temporary file, fsync, rename, fsync of
/// the directory). The directory is created with mode 0700 if missing.
pub fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    let tmp = tmp_path(path);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        // The mode given to open() is filtered by the umask and ignored for an existing file.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CODE: &str = "Zq3kT0pWm9xYv2Lr8NsA";

    fn ssm_config() -> NodeConfig {
        NodeConfig {
            cluster_name: "edge-1".into(),
            region: "eu-west-1".into(),
            credentials: NodeCredentials::Ssm {
                activation_id: "0b3c1b2e-9d0f-4a51-8c1e-3f2a4b5c6d7e".into(),
                activation_code: Secret::new(CODE),
            },
            kubelet_flags: vec!["--node-ip=10.80.0.5".into()],
        }
    }

    #[test]
    fn yaml_has_the_crd_fields_and_masks_on_request() {
        let config = ssm_config();
        let yaml = config.to_yaml();
        let doc = &yaml_rust2::YamlLoader::load_from_str(&yaml).expect("yaml")[0];
        assert_eq!(doc["apiVersion"].as_str(), Some(API_VERSION));
        assert_eq!(doc["kind"].as_str(), Some(KIND));
        assert_eq!(doc["spec"]["cluster"]["name"].as_str(), Some("edge-1"));
        assert_eq!(doc["spec"]["hybrid"]["ssm"]["activationCode"].as_str(), Some(CODE));
        assert_eq!(doc["spec"]["kubelet"]["flags"][0].as_str(), Some("--node-ip=10.80.0.5"));
        let masked = config.to_masked_yaml();
        assert!(!masked.contains(CODE) && masked.contains("\"***\""), "{masked}");
        assert!(!format!("{config:?}").contains(CODE));
    }

    #[test]
    fn nodeadm_rules_are_enforced() {
        let root = Path::new("/");
        assert_eq!(ssm_config().validate(root), Ok(()));
        let mut c = ssm_config();
        c.kubelet_flags.push("--hostname-override=edge".into());
        assert!(c.validate(root).expect_err("hostname").0.contains("--node-ip="));
        let mut c = ssm_config();
        c.cluster_name.clear();
        assert!(c.validate(root).is_err());
        let mut c = ssm_config();
        c.credentials = NodeCredentials::Ssm { activation_id: "ABC".into(), activation_code: Secret::new(CODE) };
        assert!(c.validate(root).is_err());
        let mut c = ssm_config();
        c.credentials = NodeCredentials::Ssm {
            activation_id: "0b3c1b2e-9d0f-4a51-8c1e-3f2a4b5c6d7e".into(),
            activation_code: Secret::new("short"),
        };
        let err = c.validate(root).expect_err("short code");
        assert!(!err.0.contains("short"), "{err}");
    }

    #[test]
    fn iam_ra_needs_its_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ra = IamRaSettings {
            trust_anchor_arn: "arn:aws:rolesanywhere:eu-west-1:111122223333:trust-anchor/a".into(),
            profile_arn: "arn:aws:rolesanywhere:eu-west-1:111122223333:profile/b".into(),
            role_arn: "arn:aws:iam::111122223333:role/r".into(),
            node_name: "plant-1".into(),
            certificate_path: "/etc/iam/pki/server.pem".into(),
            private_key_path: "/etc/iam/pki/server.key".into(),
        };
        let config = NodeConfig { credentials: NodeCredentials::IamRolesAnywhere(ra), ..ssm_config() };
        assert!(config.validate(dir.path()).expect_err("missing").0.contains("certificate"));
        std::fs::create_dir_all(dir.path().join("etc/iam/pki")).expect("mkdir");
        std::fs::write(dir.path().join("etc/iam/pki/server.pem"), "cert").expect("write");
        std::fs::write(dir.path().join("etc/iam/pki/server.key"), "key").expect("write");
        assert_eq!(config.validate(dir.path()), Ok(()));
        let doc = config.to_value(false);
        assert_eq!(doc["spec"]["hybrid"]["iamRolesAnywhere"]["nodeName"], "plant-1");
        assert!(doc["spec"]["hybrid"].get("ssm").is_none());
    }

    #[test]
    fn private_file_is_0600_and_replaced_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bootstrap/nodeconfig.yaml");
        write_private_file(&path, b"one").expect("write");
        write_private_file(&path, b"two").expect("rewrite");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(path.parent().expect("dir")).expect("stat").permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        assert!(!tmp_path(&path).exists());
    }
}
