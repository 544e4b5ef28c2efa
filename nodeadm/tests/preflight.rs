//! Every preflight check, passing and failing, on a fake host.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt as _;

use common::{FakeProbe, Node};
use edgeflow_nodeadm::activation::ActivationError;
use edgeflow_nodeadm::config::BootstrapSettings;
use edgeflow_nodeadm::preflight::{self, CheckName, CheckResult, CheckStatus, PreflightInput, PreflightReport};
use edgeflow_runtime::config::{Invalid, Secret};

struct Case<'a> {
    node: &'a Node,
    settings: BootstrapSettings,
    probe: FakeProbe,
    code: Result<Secret, ActivationError>,
    ours: bool,
}

impl<'a> Case<'a> {
    fn new(node: &'a Node) -> Self {
        Self {
            node,
            settings: node.settings(),
            probe: node.probe.clone(),
            code: Ok(Secret::new(common::CODE)),
            ours: false,
        }
    }

    fn report(&self) -> PreflightReport {
        preflight::run(&PreflightInput {
            settings: &self.settings,
            root: &self.node.root,
            state_dir: &self.node.data.join("bootstrap"),
            probe: &self.probe,
            activation_code: Some(&self.code),
            registration_is_ours: self.ours,
        })
    }

    fn check(&self, name: CheckName) -> CheckResult {
        self.report().get(name).unwrap().clone()
    }
}

fn assert_fails(result: &CheckResult, detail: &str, remedy: &str, retryable: bool) {
    assert_eq!(result.status, CheckStatus::Failed, "{result:?}");
    assert!(result.detail.contains(detail), "detail {:?} lacks {detail:?}", result.detail);
    assert!(
        result.remedy.as_deref().unwrap_or_default().contains(remedy),
        "remedy {:?} lacks {remedy:?}",
        result.remedy
    );
    assert_eq!(result.retryable, retryable, "{result:?}");
}

#[test]
fn a_good_host_passes_every_check() {
    let node = Node::new();
    let report = Case::new(&node).report();
    assert!(report.passed(), "{report}");
    let names: Vec<&str> = report.results.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "root",
            "nodeadm_binary",
            "supported_os",
            "swap",
            "time_sync",
            "node_ip",
            "endpoints",
            "previous_registration",
            "credentials"
        ]
    );
}

#[test]
fn root() {
    let node = Node::new();
    let mut case = Case::new(&node);
    case.probe.uid = 1000;
    assert_fails(&case.check(CheckName::Root), "uid 1000", "as root", false);
}

#[test]
fn nodeadm_binary() {
    let node = Node::new();
    let case = Case::new(&node);
    std::fs::set_permissions(&node.wrapper, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_fails(&case.check(CheckName::NodeadmBinary), "not an executable", "hybrid-assets.eks.amazonaws.com", false);
    std::fs::remove_file(&node.wrapper).unwrap();
    assert_fails(&case.check(CheckName::NodeadmBinary), "No such file", "nodeadm_path", false);
}

#[test]
fn supported_os() {
    let node = Node::new();
    let case = Case::new(&node);
    let os_release = node.root.join("etc/os-release");
    for (text, ok) in [
        ("ID=ubuntu\nVERSION_ID=\"24.04\"\n", true),
        ("ID=ubuntu\nVERSION_ID=\"20.04\"\n", true),
        ("ID=\"rhel\"\nVERSION_ID=\"9.4\"\n", true),
        ("ID=\"rhel\"\nVERSION_ID=\"8.10\"\n", true),
        ("ID=amzn\nVERSION_ID=\"2023\"\n", true),
        ("PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_ID=\"12\"\n", false),
        ("ID=ubuntu\nVERSION_ID=\"18.04\"\n", false),
    ] {
        std::fs::write(&os_release, text).unwrap();
        let result = case.check(CheckName::SupportedOs);
        if ok {
            assert_eq!(result.status, CheckStatus::Passed, "{text}: {result:?}");
        } else {
            assert_fails(
                &result,
                "is not an OS EKS Hybrid Nodes supports",
                "Ubuntu 20.04/22.04/24.04, RHEL 8/9",
                false,
            );
        }
    }
    std::fs::remove_file(&os_release).unwrap();
    assert_fails(&case.check(CheckName::SupportedOs), "cannot read", "skip_checks", false);
}

#[test]
fn swap() {
    let node = Node::new();
    let case = Case::new(&node);
    let swaps = node.root.join("proc/swaps");
    let header = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n";
    std::fs::write(&swaps, format!("{header}/swap.img                               file\t\t2097148\t\t0\t\t-2\n"))
        .unwrap();
    let result = case.check(CheckName::Swap);
    assert_eq!(result.status, CheckStatus::Passed);
    assert!(result.detail.contains("swap file"), "{result:?}");
    std::fs::write(&swaps, format!("{header}/dev/sda3                               partition\t2097148\t\t0\t\t-2\n"))
        .unwrap();
    assert_fails(&case.check(CheckName::Swap), "/dev/sda3", "swapoff /dev/sda3", false);
    std::fs::remove_file(&swaps).unwrap();
    assert_eq!(case.check(CheckName::Swap).status, CheckStatus::Passed);
}

#[test]
fn time_sync() {
    let node = Node::new();
    let mut case = Case::new(&node);
    case.probe.synced = Ok(false);
    assert_fails(&case.check(CheckName::TimeSync), "not synchronised", "timedatectl set-ntp true", true);
    case.probe.synced = Err("timedatectl: not found".into());
    assert_fails(&case.check(CheckName::TimeSync), "timedatectl: not found", "NTP", true);
}

#[test]
fn node_ip() {
    let node = Node::new();
    let mut case = Case::new(&node);
    case.probe.addresses = vec!["10.80.0.9".parse().unwrap()];
    assert_fails(
        &case.check(CheckName::NodeIp),
        "10.80.0.5 is not on any interface (found: 10.80.0.9)",
        "node_ip",
        true,
    );

    // Without node_ip, some address must be inside the remote node networks.
    let text = node.config_text("").replace("node_ip = \"10.80.0.5\"", "");
    case.settings = common::parse_section(&text).validate().unwrap().unwrap();
    let result = case.check(CheckName::NodeIp);
    assert_eq!(result.status, CheckStatus::Passed);
    assert!(result.detail.contains("10.80.0.9") && result.detail.contains("pin"), "{result:?}");
    case.probe.addresses = vec!["192.168.1.7".parse().unwrap(), "fe80::1".parse().unwrap()];
    assert_fails(&case.check(CheckName::NodeIp), "no interface address (192.168.1.7)", "remote_node_cidrs", true);
}

#[test]
fn endpoints() {
    let node = Node::new();
    let mut case = Case::new(&node);
    assert_eq!(case.check(CheckName::Endpoints).status, CheckStatus::Passed);
    let asked = case.probe.asked.lock().unwrap().clone();
    for host in [
        "hybrid-assets.eks.amazonaws.com:443",
        "eks.eu-west-1.amazonaws.com:443",
        "sts.eu-west-1.amazonaws.com:443",
        "api.ecr.eu-west-1.amazonaws.com:443",
        "ssm.eu-west-1.amazonaws.com:443",
        "amazon-ssm-eu-west-1.s3.eu-west-1.amazonaws.com:443",
    ] {
        assert!(asked.iter().any(|a| a == host), "{host} not checked: {asked:?}");
    }
    case.probe.unreachable = vec!["ssm.eu-west-1.amazonaws.com".into()];
    assert_fails(&case.check(CheckName::Endpoints), "ssm.eu-west-1.amazonaws.com:443 (SSM", "outbound HTTPS", true);

    // IAM Roles Anywhere needs its own endpoints instead of SSM's.
    let ra = common::parse_section(&node.iam_ra_config_text()).validate().unwrap().unwrap();
    let hosts: Vec<String> = preflight::endpoints(&ra).into_iter().map(|(h, _)| h).collect();
    assert!(hosts.contains(&"rolesanywhere.eu-west-1.amazonaws.com".to_owned()), "{hosts:?}");
    assert!(!hosts.iter().any(|h| h.starts_with("ssm.")), "{hosts:?}");
}

#[test]
fn previous_registration() {
    let node = Node::new();
    let mut case = Case::new(&node);
    let registration = node.host_file(preflight::SSM_REGISTRATION);
    std::fs::create_dir_all(registration.parent().unwrap()).unwrap();
    std::fs::write(&registration, r#"{"ManagedInstanceID":"mi-0aaaaaaaaaaaaaaaa","Region":"eu-central-1"}"#).unwrap();
    assert_fails(
        &case.check(CheckName::PreviousRegistration),
        "mi-0aaaaaaaaaaaaaaaa in eu-central-1",
        "sudo nodeadm uninstall",
        false,
    );
    case.ours = true;
    assert_eq!(case.check(CheckName::PreviousRegistration).status, CheckStatus::Passed);
    case.ours = false;
    std::fs::remove_file(&registration).unwrap();
    let kubeconfig = node.host_file(preflight::KUBELET_KUBECONFIG);
    std::fs::create_dir_all(kubeconfig.parent().unwrap()).unwrap();
    std::fs::write(&kubeconfig, "apiVersion: v1\n").unwrap();
    assert_fails(&case.check(CheckName::PreviousRegistration), "kubelet kubeconfig", "kubectl delete node", false);
}

#[test]
fn credentials() {
    let node = Node::new();
    let mut case = Case::new(&node);
    case.code = Ok(Secret::new("tooShortCode"));
    let result = case.check(CheckName::Credentials);
    assert_fails(&result, "12 characters", "ActivationCode", false);
    assert!(!result.detail.contains("tooShortCode"));
    case.code =
        Err(ActivationError::File(Invalid::new("bootstrap.ssm.activation_code_file", "cannot read secret file /x")));
    assert_fails(&case.check(CheckName::Credentials), "cannot read secret file", "deliver the activation code", true);

    let case = Case {
        settings: common::parse_section(&node.iam_ra_config_text()).validate().unwrap().unwrap(),
        ..Case::new(&node)
    };
    assert_fails(&case.check(CheckName::Credentials), "certificate /etc/iam/pki/server.pem not found", "install", true);
    std::fs::create_dir_all(node.root.join("etc/iam/pki")).unwrap();
    std::fs::write(node.root.join("etc/iam/pki/server.pem"), "cert").unwrap();
    std::fs::write(node.root.join("etc/iam/pki/server.key"), "key").unwrap();
    assert_eq!(case.check(CheckName::Credentials).status, CheckStatus::Passed);
}

#[test]
fn skipped_checks_are_reported_as_skipped() {
    let node = Node::new();
    let mut case = Case::new(&node);
    case.probe.uid = 1000;
    case.probe.synced = Ok(false);
    case.settings = node.settings_with("skip_checks = [\"root\", \"time_sync\"]");
    let report = case.report();
    assert!(report.passed(), "{report}");
    assert_eq!(report.get(CheckName::Root).unwrap().status, CheckStatus::Skipped);
    assert_eq!(report.get(CheckName::TimeSync).unwrap().status, CheckStatus::Skipped);
    case.probe.asked.lock().unwrap().clear();
    case.settings = node.settings_with("skip_checks = \"all\"");
    let report = case.report();
    assert!(report.results.iter().all(|r| r.status == CheckStatus::Skipped));
    assert!(case.probe.asked.lock().unwrap().is_empty(), "a skipped endpoint check connects nowhere");
}
