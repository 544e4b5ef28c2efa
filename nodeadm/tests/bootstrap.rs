//! The bootstrap end to end against `nodeadm-stub`: a full run, failures at each step and the
//! resumed run, nodeadm's silent no-ops, refusals, dry runs, redaction and the retry loop.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use common::{ACTIVATION_ID, CODE, INSTANCE_ID, Node, capture_logs};
use edgeflow_nodeadm::preflight::{CheckName, CheckStatus, NODEADM_TRACKER, SSM_REGISTRATION};
use edgeflow_nodeadm::state::{StateFile, StepStatus};
use edgeflow_nodeadm::{BootstrapError, Mode, Outcome, Phase, Stage, Step};
use tokio_util::sync::CancellationToken;

fn expected_args(node: &Node) -> Vec<Vec<String>> {
    let source = format!("file://{}", node.nodeconfig_path().display());
    vec![
        vec!["install".into(), "1.31".into(), "--credential-provider".into(), "ssm".into()],
        vec!["init".into(), "--config-source".into(), source.clone()],
        vec!["debug".into(), "--config-source".into(), source],
    ]
}

#[tokio::test]
async fn full_run_joins_and_a_rerun_does_nothing() {
    let node = Node::new();
    let settings = node.settings();
    let (result, phase) = node.run(&settings).await;
    assert_eq!(result.unwrap(), Outcome::Joined { ran: vec![Step::Install, Step::Init, Step::Verify] });
    assert_eq!(phase, Phase::Joined);
    assert_eq!(node.invocations(), expected_args(&node));

    // What nodeadm leaves behind, and the NodeConfig it was given: 0600, YAML, the CRD's fields.
    assert!(node.host_file(NODEADM_TRACKER).exists());
    let registration = std::fs::read_to_string(node.host_file(SSM_REGISTRATION)).unwrap();
    assert!(registration.contains(INSTANCE_ID) && registration.contains("eu-west-1"));
    let mode = std::fs::metadata(node.nodeconfig_path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let yaml = std::fs::read_to_string(node.nodeconfig_path()).unwrap();
    let doc = &yaml_rust2::YamlLoader::load_from_str(&yaml).unwrap()[0];
    assert_eq!(doc["spec"]["hybrid"]["ssm"]["activationCode"].as_str(), Some(CODE));
    assert_eq!(doc["spec"]["hybrid"]["ssm"]["activationId"].as_str(), Some(ACTIVATION_ID));
    let flags: Vec<&str> =
        doc["spec"]["kubelet"]["flags"].as_vec().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert_eq!(flags, ["--node-labels=site=plant-1", "--node-ip=10.80.0.5"]);

    // The state records every step and no secret.
    let state = StateFile::in_dir(&node.data.join("bootstrap")).load().unwrap();
    assert!(Step::ALL.iter().all(|s| state.steps[s].status == StepStatus::Done));
    assert!(!std::fs::read_to_string(node.state_path()).unwrap().contains(CODE));

    let (again, phase) = node.run(&settings).await;
    assert_eq!(again.unwrap(), Outcome::AlreadyJoined);
    assert_eq!(phase, Phase::Joined);
    assert_eq!(node.invocations().len(), 3, "nothing ran again");

    // The single-use activation code may be removed once the node joined.
    std::fs::remove_file(&node.code_file).unwrap();
    assert_eq!(node.run(&settings).await.0.unwrap(), Outcome::AlreadyJoined);
    assert_eq!(node.invocations().len(), 3);
}

#[tokio::test]
async fn a_failure_at_each_step_is_resumed_at_that_step() {
    for (subcommand, step) in [("install", Step::Install), ("init", Step::Init), ("debug", Step::Verify)] {
        let node = Node::new();
        let settings = node.settings();
        node.stub(&[("FAIL", subcommand)]);
        let (result, phase) = node.run(&settings).await;
        let error = result.unwrap_err();
        assert!(error.is_retryable(), "{error}");
        assert_eq!(error.stage(), Stage::from(step));
        match (step, &error) {
            (Step::Verify, BootstrapError::VerifyFailed { tail }) => {
                assert!(tail.iter().any(|l| l.contains("not Ready")))
            }
            (_, BootstrapError::StepFailed { step: failed, exit, .. }) => {
                assert_eq!(*failed, step);
                assert_eq!(exit, "exit code 1");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            matches!(phase, Phase::Failed { stage, retryable: true, .. } if stage == Stage::from(step)),
            "{phase:?}"
        );
        let state = StateFile::in_dir(&node.data.join("bootstrap")).load().unwrap();
        assert_eq!(state.steps[&step].status, StepStatus::Failed);
        assert!(state.steps[&step].error.is_some());

        let before = node.invocations().len();
        node.stub(&[]);
        let (result, phase) = node.run(&settings).await;
        let ran: Vec<Step> = Step::ALL.into_iter().filter(|s| *s >= step).collect();
        assert_eq!(result.unwrap(), Outcome::Joined { ran: ran.clone() }, "resumed at {step}");
        assert_eq!(phase, Phase::Joined);
        let resumed: Vec<String> = node.invocations()[before..].iter().map(|a| a[0].clone()).collect();
        let expected: Vec<&str> = ran.iter().map(|s| if *s == Step::Verify { "debug" } else { s.as_str() }).collect();
        assert_eq!(resumed, expected);
    }
}

#[tokio::test]
async fn a_hanging_step_is_stopped_at_its_timeout_and_resumed() {
    let node = Node::new();
    let settings = node.settings_with("init_timeout = \"1s\"");
    node.stub(&[("HANG", "init")]);
    let started = std::time::Instant::now();
    let error = node.run(&settings).await.0.unwrap_err();
    assert!(matches!(error, BootstrapError::TimedOut { step: Step::Init, .. }), "{error}");
    assert!(error.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(20));
    node.stub(&[]);
    assert_eq!(node.run(&settings).await.0.unwrap(), Outcome::Joined { ran: vec![Step::Init, Step::Verify] });
}

#[tokio::test]
async fn init_without_a_completed_install_is_reported_not_claimed() {
    let node = Node::new();
    let settings = node.settings();
    assert!(node.run(&settings).await.0.is_ok());
    // The components disappear (someone ran `nodeadm uninstall`, or the install was undone),
    // and the node must join again: init would exit 0 doing nothing.
    std::fs::remove_file(node.host_file(NODEADM_TRACKER)).unwrap();
    std::fs::remove_file(node.host_file(SSM_REGISTRATION)).unwrap();
    std::fs::remove_file(node.host_file("/var/lib/kubelet/kubeconfig")).unwrap();
    let state_file = StateFile::in_dir(&node.data.join("bootstrap"));
    let mut state = state_file.load().unwrap();
    state.forget(Step::Init);
    state.forget(Step::Verify);
    state_file.save(&state).unwrap();

    let before = node.invocations().len();
    let error = node.run(&settings).await.0.unwrap_err();
    match &error {
        BootstrapError::SilentNoOp { step: Step::Init, detail } => {
            assert!(detail.contains(NODEADM_TRACKER), "{detail}")
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(error.is_retryable());
    assert_eq!(node.invocations().len(), before, "init was not run without an install");

    // The next attempt installs again, then initialises.
    let (result, _) = node.run(&settings).await;
    assert_eq!(result.unwrap(), Outcome::Joined { ran: vec![Step::Install, Step::Init, Step::Verify] });
}

#[tokio::test]
async fn nodeadm_exiting_zero_without_doing_its_job_is_caught() {
    // init prints "Nodeadm components are not installed" and exits 0.
    let node = Node::new();
    let settings = node.settings();
    node.stub(&[("NOOP", "init")]);
    let (result, phase) = node.run(&settings).await;
    match result.unwrap_err() {
        BootstrapError::SilentNoOp { step: Step::Init, detail } => {
            assert!(detail.contains(SSM_REGISTRATION), "{detail}")
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(phase, Phase::Failed { stage: Stage::Init, retryable: true, .. }));
    node.stub(&[]);
    assert!(node.run(&settings).await.0.is_ok());

    // install exits 0 without its tracker.
    let node = Node::new();
    node.stub(&[("NOOP", "install")]);
    match node.run(&settings_for(&node)).await.0.unwrap_err() {
        BootstrapError::SilentNoOp { step: Step::Install, detail } => assert!(detail.contains(NODEADM_TRACKER)),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(node.subcommands(), ["install"]);
}

fn settings_for(node: &Node) -> edgeflow_nodeadm::BootstrapSettings {
    node.settings()
}

#[tokio::test]
async fn an_old_registration_stops_init_with_the_reset_commands() {
    let node = Node::new();
    let old = node.host_file(SSM_REGISTRATION);
    std::fs::create_dir_all(old.parent().unwrap()).unwrap();
    std::fs::write(&old, r#"{"ManagedInstanceID":"mi-0aaaaaaaaaaaaaaaa","Region":"eu-west-1"}"#).unwrap();

    // The preflight check catches it before anything changes…
    let before = node.snapshot();
    let error = node.run(&node.settings()).await.0.unwrap_err();
    let BootstrapError::Preflight { report } = &error else { panic!("unexpected {error:?}") };
    let check = report.get(CheckName::PreviousRegistration).unwrap();
    assert_eq!(check.status, CheckStatus::Failed);
    assert!(check.detail.contains("mi-0aaaaaaaaaaaaaaaa"), "{}", check.detail);
    assert!(check.remedy.as_ref().unwrap().contains("nodeadm uninstall"));
    assert!(!error.is_retryable());
    assert_eq!(node.snapshot(), before, "a failed preflight changes nothing");
    assert!(node.invocations().is_empty());

    // …and with the check skipped, init is still refused: it would ignore the new activation.
    let settings = node.settings_with("skip_checks = [\"previous_registration\"]");
    let error = node.run(&settings).await.0.unwrap_err();
    match &error {
        BootstrapError::StaleRegistration { detail, reset } => {
            assert!(detail.contains("mi-0aaaaaaaaaaaaaaaa"));
            assert!(reset.contains("sudo nodeadm uninstall") && reset.contains("state"), "{reset}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(!error.is_retryable());
    assert_eq!(node.subcommands(), ["install"], "init never ran");
}

#[tokio::test]
async fn a_registration_from_our_own_failed_init_is_resumed() {
    // init registered with SSM, then failed later (kubelet): the registration is ours.
    let node = Node::new();
    let settings = node.settings();
    node.stub(&[("FAIL", "debug")]);
    assert!(node.run(&settings).await.0.is_err());
    let state_file = StateFile::in_dir(&node.data.join("bootstrap"));
    let mut state = state_file.load().unwrap();
    let identity = state.identity.clone().unwrap();
    state.record(Step::Init, &identity, StepStatus::Failed, Some("kubelet did not start".into()));
    state.forget(Step::Verify);
    state_file.save(&state).unwrap();
    node.stub(&[]);
    let (result, _) = node.run(&settings).await;
    assert_eq!(result.unwrap(), Outcome::Joined { ran: vec![Step::Init, Step::Verify] });
}

#[tokio::test]
async fn a_changed_activation_or_cluster_is_refused_with_the_reset_commands() {
    let node = Node::new();
    assert!(node.run(&node.settings()).await.0.is_ok());
    let before = node.snapshot();

    std::fs::write(&node.code_file, "AnotherActivationCode42").unwrap();
    let error = node.run(&node.settings()).await.0.unwrap_err();
    match &error {
        BootstrapError::Changed { changes, reset, .. } => {
            assert_eq!(changes, &vec!["the activation code changed".to_owned()]);
            assert!(reset.contains("sudo nodeadm uninstall"));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(!error.is_retryable());
    let message = error.to_string();
    assert!(!message.contains("AnotherActivationCode42") && !message.contains(CODE), "{message}");

    std::fs::write(&node.code_file, CODE).unwrap();
    let text = node.config_text("").replace("edge-1", "edge-2");
    let settings = common::parse_section(&text).validate().unwrap().unwrap();
    let (result, phase) = node.run(&settings).await;
    let error = result.unwrap_err();
    assert!(error.to_string().contains("cluster_name changed from `edge-1` to `edge-2`"), "{error}");
    assert!(matches!(phase, Phase::Failed { retryable: false, .. }));

    assert_eq!(node.invocations().len(), 3, "nothing ran after the first join");
    let after: Vec<_> = node.snapshot().into_iter().filter(|(p, _)| p != &node.code_file).collect();
    let before: Vec<_> = before.into_iter().filter(|(p, _)| p != &node.code_file).collect();
    assert_eq!(after, before, "a refusal changes nothing");
}

#[tokio::test]
async fn a_new_activation_after_a_failed_init_is_used() {
    // The first code was wrong (SSM refused it): fixing it must not need a reset.
    let node = Node::new();
    node.stub(&[("FAIL", "init")]);
    assert!(node.run(&node.settings()).await.0.is_err());
    std::fs::write(&node.code_file, "AnotherActivationCode42").unwrap();
    node.stub(&[]);
    assert_eq!(node.run(&node.settings()).await.0.unwrap(), Outcome::Joined { ran: vec![Step::Init, Step::Verify] });
    let yaml = std::fs::read_to_string(node.nodeconfig_path()).unwrap();
    assert!(yaml.contains("AnotherActivationCode42"));
}

#[tokio::test]
async fn dry_run_shows_the_plan_and_changes_nothing() {
    let node = Node::new();
    let before = node.snapshot();
    let (result, _) = node.run_on(&node.settings(), &node.host(), Mode::DryRun).await;
    let Outcome::DryRun(plan) = result.unwrap() else { panic!("not a dry run") };
    assert!(plan.preflight.passed(), "{}", plan.preflight);
    assert!(
        !plan.nodeconfig.contains(CODE) && plan.nodeconfig.contains("activationCode: \"***\""),
        "{}",
        plan.nodeconfig
    );
    assert!(plan.nodeconfig.contains(ACTIVATION_ID));
    let wrapper = node.wrapper.display().to_string();
    assert_eq!(
        plan.commands,
        vec![
            format!("{wrapper} install 1.31 --credential-provider ssm"),
            format!("{wrapper} init --config-source file://{}", node.nodeconfig_path().display()),
            format!("{wrapper} debug --config-source file://{}", node.nodeconfig_path().display()),
        ]
    );
    let shown = plan.to_string();
    assert!(shown.contains("[ok]   root") && !shown.contains(CODE), "{shown}");
    assert!(node.invocations().is_empty());
    assert_eq!(node.snapshot(), before);
    assert!(!node.data.join("bootstrap").exists());

    // A failing check is reported, still without changing anything.
    let mut failing = Node::new();
    failing.probe.synced = Ok(false);
    let (result, _) = failing.run_on(&failing.settings(), &failing.host(), Mode::DryRun).await;
    let Outcome::DryRun(plan) = result.unwrap() else { panic!("not a dry run") };
    assert!(!plan.preflight.passed());
    assert!(plan.to_string().contains("[FAIL] time_sync"));
    assert!(!failing.data.join("bootstrap").exists());
}

#[tokio::test]
async fn the_activation_code_never_reaches_the_logs() {
    let (logs, _guard) = capture_logs();
    let node = Node::new();
    let settings = node.settings();
    // The stub echoes the code (as nodeadm does) on every init, and in its error when it fails.
    node.stub(&[("FAIL", "init")]);
    let error = node.run(&settings).await.0.unwrap_err();
    node.stub(&[]);
    assert!(node.run(&settings).await.0.is_ok());
    let text = logs.text();
    assert!(text.contains("ssm-setup-cli -register -activation-code [REDACTED]"), "{text}");
    assert!(text.contains("activation code [REDACTED]"), "{text}");
    assert!(!text.contains(CODE), "the code leaked into the logs:\n{text}");
    assert!(!error.to_string().contains(CODE) && !format!("{error:?}").contains(CODE));
    assert!(!std::fs::read_to_string(node.state_path()).unwrap().contains(CODE));
}

#[tokio::test]
async fn a_failed_preflight_stops_before_anything_changes() {
    let mut node = Node::new();
    node.probe.uid = 1000;
    node.probe.unreachable = vec!["sts.eu-west-1.amazonaws.com".into()];
    let before = node.snapshot();
    let (result, phase) = node.run(&node.settings()).await;
    let BootstrapError::Preflight { report } = result.unwrap_err() else { panic!("not a preflight failure") };
    let failed: Vec<CheckName> = report.failures().map(|r| r.name).collect();
    assert_eq!(failed, [CheckName::Root, CheckName::Endpoints]);
    assert!(matches!(phase, Phase::Failed { stage: Stage::Preflight, retryable: false, .. }));
    assert_eq!(node.snapshot(), before);
    assert!(node.invocations().is_empty());
}

#[tokio::test]
async fn the_retry_loop_retries_until_joined_and_stops_on_shutdown() {
    let node = Node::new();
    let settings = node.settings_with("retry_initial_backoff = \"100ms\"\nretry_max_backoff = \"200ms\"");
    let host = node.host();
    node.stub(&[("FAIL", "install")]);
    let (tx, mut rx) = edgeflow_nodeadm::phase::channel(Phase::Pending);
    let shutdown = CancellationToken::new();
    let task = {
        let (settings, host, shutdown) = (settings.clone(), host.clone(), shutdown.clone());
        tokio::spawn(async move { edgeflow_nodeadm::run_until_joined(&settings, &host, &tx, &shutdown).await })
    };
    rx.wait_for(|p| matches!(p, Phase::Failed { stage: Stage::Install, retryable: true, .. })).await.unwrap();
    node.stub(&[]);
    let outcome = tokio::time::timeout(Duration::from_secs(30), task).await.unwrap().unwrap().unwrap();
    assert!(matches!(outcome, Outcome::Joined { .. }));
    assert_eq!(*rx.borrow(), Phase::Joined);
    assert!(node.subcommands().iter().filter(|s| *s == "install").count() >= 2);

    // A fatal failure ends the loop at once.
    let stale = Node::new();
    std::fs::create_dir_all(stale.host_file(SSM_REGISTRATION).parent().unwrap()).unwrap();
    std::fs::write(stale.host_file(SSM_REGISTRATION), "{}").unwrap();
    let (tx, _rx) = edgeflow_nodeadm::phase::channel(Phase::Pending);
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        edgeflow_nodeadm::run_until_joined(&stale.settings(), &stale.host(), &tx, &CancellationToken::new()),
    )
    .await
    .unwrap();
    assert!(matches!(result, Err(BootstrapError::Preflight { .. })));

    // Shutdown ends the wait between attempts.
    let waiting = Node::new();
    waiting.stub(&[("FAIL", "install")]);
    let settings = waiting.settings_with("retry_initial_backoff = \"1h\"\nretry_max_backoff = \"1h\"");
    let (tx, mut rx) = edgeflow_nodeadm::phase::channel(Phase::Pending);
    let shutdown = CancellationToken::new();
    let task = {
        let (host, shutdown) = (waiting.host(), shutdown.clone());
        tokio::spawn(async move { edgeflow_nodeadm::run_until_joined(&settings, &host, &tx, &shutdown).await })
    };
    rx.wait_for(|p| matches!(p, Phase::Failed { .. })).await.unwrap();
    shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
    assert!(matches!(result, Err(BootstrapError::Cancelled)));
}

#[tokio::test]
async fn iam_roles_anywhere_joins_with_its_own_nodeconfig() {
    let node = Node::new();
    std::fs::create_dir_all(node.root.join("etc/iam/pki")).unwrap();
    std::fs::write(node.root.join("etc/iam/pki/server.pem"), "cert").unwrap();
    std::fs::write(node.root.join("etc/iam/pki/server.key"), "key").unwrap();
    let text = node.iam_ra_config_text();
    let settings = common::parse_section(&text).validate().unwrap().unwrap();
    let (result, phase) = node.run(&settings).await;
    assert_eq!(result.unwrap(), Outcome::Joined { ran: vec![Step::Install, Step::Init, Step::Verify] });
    assert_eq!(phase, Phase::Joined);
    assert_eq!(node.invocations()[0], ["install", "1.31", "--credential-provider", "iam-ra"]);
    assert!(!node.host_file(SSM_REGISTRATION).exists(), "no SSM registration with IAM Roles Anywhere");
    let yaml = std::fs::read_to_string(node.nodeconfig_path()).unwrap();
    let doc = &yaml_rust2::YamlLoader::load_from_str(&yaml).unwrap()[0];
    assert_eq!(doc["spec"]["hybrid"]["iamRolesAnywhere"]["nodeName"].as_str(), Some("plant-1"));
    assert!(doc["spec"]["hybrid"]["ssm"].is_badvalue());
}

#[test]
fn the_stub_rejects_fields_the_crd_does_not_know() {
    // The stub is the test oracle for "only fields nodeadm knows": make sure it does reject.
    let node = Node::new();
    let path = node.dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        format!(
            "apiVersion: node.eks.aws/v1alpha1\nkind: NodeConfig\nspec:\n  cluster:\n    name: edge-1\n    region: eu-west-1\n    \
             nodeIp: 10.0.0.1\n  hybrid:\n    ssm:\n      activationCode: {CODE}\n      activationId: {ACTIVATION_ID}\n"
        ),
    )
    .unwrap();
    std::fs::create_dir_all(node.host_file(NODEADM_TRACKER).parent().unwrap()).unwrap();
    std::fs::write(node.host_file(NODEADM_TRACKER), "Artifacts: {}\n").unwrap();
    let out = std::process::Command::new(&node.wrapper)
        .args(["init", "--config-source", &format!("file://{}", path.display())])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field 'spec.cluster.nodeIp'"), "{out:?}");
}
