//! The activation code from SSM Parameter Store (a SecureString read with decryption), against
//! `moto_server` on 127.0.0.1.

#![allow(clippy::unwrap_used)]

mod common;

use aws_sdk_ssm::config::{BehaviorVersion, Credentials, Region, SharedCredentialsProvider};
use aws_sdk_ssm::types::ParameterType;
use common::{CODE, Node};
use edgeflow_nodeadm::activation::{ActivationCodeSource, ActivationError};
use edgeflow_nodeadm::config::CredentialSettings;
use edgeflow_nodeadm::{BootstrapError, Outcome, ParameterStore, Step};
use edgeflow_testkit::Moto;

const REGION: &str = "eu-west-1";
const PARAMETER: &str = "/edgeflow/nodes/plant-1/activation-code";

/// Configuration with static test credentials: moto accepts any.
fn sdk_config() -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "testing", "testing", None, None, "test",
        )))
        .build()
}

async fn put_secure_string(moto: &Moto, name: &str, value: &str) {
    let config = aws_sdk_ssm::config::Builder::from(&sdk_config()).endpoint_url(moto.endpoint()).build();
    aws_sdk_ssm::Client::from_conf(config)
        .put_parameter()
        .name(name)
        .value(value)
        .r#type(ParameterType::SecureString)
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn reads_a_secure_string_and_reports_a_missing_one() {
    let moto = Moto::start().unwrap();
    put_secure_string(&moto, PARAMETER, CODE).await;
    let store = ParameterStore::from_sdk_config(&sdk_config(), REGION, Some(&moto.endpoint()));
    assert_eq!(store.get(PARAMETER).await.unwrap().expose(), CODE);

    match store.get("/edgeflow/nodes/nowhere/activation-code").await.unwrap_err() {
        ActivationError::Parameter { name, message } => {
            assert_eq!(name, "/edgeflow/nodes/nowhere/activation-code");
            assert!(message.contains("ParameterNotFound"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn the_bootstrap_takes_the_code_from_parameter_store() {
    let moto = Moto::start().unwrap();
    put_secure_string(&moto, PARAMETER, CODE).await;
    let node = Node::new();
    let text = node.config_text("").replace(
        &format!("activation_code_file = \"{}\"", node.code_file.display()),
        &format!("activation_code_parameter = \"{PARAMETER}\"\nendpoint_url = \"{}\"", moto.endpoint()),
    );
    let settings = common::parse_section(&text).validate().unwrap().unwrap();
    let CredentialSettings::Ssm { code: ActivationCodeSource::Parameter { endpoint_url, .. }, .. } =
        &settings.credentials
    else {
        panic!("not a parameter source")
    };
    let mut host = node.host();
    host.parameter_store = Some(ParameterStore::from_sdk_config(&sdk_config(), REGION, endpoint_url.as_deref()));

    let (result, _) = node.run_on(&settings, &host, edgeflow_nodeadm::Mode::Apply).await;
    assert_eq!(result.unwrap(), Outcome::Joined { ran: vec![Step::Install, Step::Init, Step::Verify] });
    let yaml = std::fs::read_to_string(node.nodeconfig_path()).unwrap();
    assert!(yaml.contains(CODE), "the NodeConfig carries the code from Parameter Store");

    // An unreachable Parameter Store is a retryable failure that changes nothing.
    let fresh = Node::new();
    let text = fresh.config_text("").replace(
        &format!("activation_code_file = \"{}\"", fresh.code_file.display()),
        &format!("activation_code_parameter = \"{PARAMETER}\""),
    );
    let settings = common::parse_section(&text).validate().unwrap().unwrap();
    let mut host = fresh.host();
    let closed = format!("http://127.0.0.1:{}", edgeflow_testkit::free_port());
    host.parameter_store = Some(ParameterStore::from_sdk_config(&sdk_config(), REGION, Some(&closed)));
    let error = fresh.run_on(&settings, &host, edgeflow_nodeadm::Mode::Apply).await.0.unwrap_err();
    let BootstrapError::Preflight { report } = &error else { panic!("unexpected {error:?}") };
    assert!(report.summary().contains(PARAMETER), "{}", report.summary());
    assert!(error.is_retryable());
    assert!(fresh.invocations().is_empty());
}
