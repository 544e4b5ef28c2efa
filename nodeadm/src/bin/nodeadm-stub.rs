//! A stand-in for AWS's hybrid-nodes `nodeadm`, for tests (built only with the `stub` feature).
//!
//! It accepts `install`, `init`, `debug` and `uninstall` as nodeadm does, checks the NodeConfig
//! it is given against the NodeConfig CRD (unknown fields and wrong types are rejected, as
//! nodeadm's strict decoder does) and against nodeadm's hybrid validation rules, and leaves on
//! disk what nodeadm leaves: the install tracker, the SSM registration, kubelet's kubeconfig.
//! Like nodeadm, `init` exits 0 doing nothing when the tracker is missing, skips registration
//! when a registration file exists, and echoes the activation code into its output.
//!
//! Environment:
//! * `NODEADM_STUB_ROOT` (required): the host root its files go under.
//! * `NODEADM_STUB_ARGS_LOG`: a file to which each invocation's arguments are appended as a
//!   JSON array, one per line.
//! * `NODEADM_STUB_FAIL`, `NODEADM_STUB_HANG`, `NODEADM_STUB_NOOP`: comma-separated
//!   subcommands that exit 1, sleep for an hour, or exit 0 doing nothing.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use yaml_rust2::{Yaml, YamlLoader};

const CRD: &str = include_str!("../../tests/data/nodeconfig-crd.yaml");
const TRACKER: &str = "opt/nodeadm/tracker";
const REGISTRATION: &str = "var/lib/amazon/ssm/registration";
const KUBECONFIG: &str = "var/lib/kubelet/kubeconfig";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(log) = std::env::var_os("NODEADM_STUB_ARGS_LOG") {
        let line = serde_json::to_string(&args).unwrap_or_default();
        if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = writeln!(file, "{line}");
        }
    }
    let Some(root) = std::env::var_os("NODEADM_STUB_ROOT").map(PathBuf::from) else {
        eprintln!("nodeadm-stub: NODEADM_STUB_ROOT is not set");
        return ExitCode::from(2);
    };
    let command = args.first().map(String::as_str).unwrap_or_default();
    let listed = |var: &str| std::env::var(var).is_ok_and(|v| v.split(',').any(|c| c.trim() == command));
    if listed("NODEADM_STUB_HANG") {
        println!("{{\"level\":\"info\",\"msg\":\"{command} is taking its time\"}}");
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
    let result = match command {
        "install" => install(&root, &args[1..], listed("NODEADM_STUB_FAIL"), listed("NODEADM_STUB_NOOP")),
        "init" => init(&root, &args[1..], listed("NODEADM_STUB_FAIL"), listed("NODEADM_STUB_NOOP")),
        "debug" => debug(&root, &args[1..], listed("NODEADM_STUB_FAIL")),
        "uninstall" => uninstall(&root),
        other => Err(format!("unknown subcommand `{other}`")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{{\"level\":\"error\",\"msg\":\"{}\"}}", message.replace('"', "'"));
            ExitCode::from(1)
        }
    }
}

fn log(msg: &str) {
    println!("{{\"level\":\"info\",\"msg\":\"{}\"}}", msg.replace('"', "'"));
}

fn write(root: &Path, relative: &str, contents: &str) -> Result<(), String> {
    let path = root.join(relative);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    }
    std::fs::write(&path, contents).map_err(|e| format!("write {}: {e}", path.display()))
}

fn install(root: &Path, args: &[String], fail: bool, noop: bool) -> Result<(), String> {
    let [version, flag, provider] = args else {
        return Err(format!(
            "usage: nodeadm install KUBERNETES_VERSION --credential-provider ssm|iam-ra (got {args:?})"
        ));
    };
    let parts: Vec<&str> = version.split('.').collect();
    if !(1..=3).contains(&parts.len()) || !parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(format!("invalid Kubernetes version {version}"));
    }
    if flag != "--credential-provider" && flag != "-p" {
        return Err(format!("unknown flag {flag}"));
    }
    if provider != "ssm" && provider != "iam-ra" {
        return Err(format!("invalid credential process provided {provider}. Valid options are ssm and iam-ra"));
    }
    log(&format!("Validating Kubernetes version {version}"));
    if fail {
        return Err("downloading artifacts: connection reset by peer".into());
    }
    if noop {
        log("Finished installing");
        return Ok(());
    }
    let (ssm, ra) = (provider == "ssm", provider == "iam-ra");
    write(
        root,
        TRACKER,
        &format!(
            "Artifacts:\n  Containerd: distro\n  CniPlugins: true\n  IamAuthenticator: true\n  IamRolesAnywhere: {ra}\n  \
             ImageCredentialProvider: true\n  Kubectl: true\n  Kubelet: true\n  Ssm: {ssm}\n"
        ),
    )?;
    log("Finished installing");
    Ok(())
}

fn config_source(args: &[String]) -> Result<PathBuf, String> {
    let mut iter = args.iter();
    let mut source = None;
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--config-source" | "-c" => source = iter.next().cloned(),
            other if other.starts_with("--config-source=") => {
                source = Some(other["--config-source=".len()..].to_owned())
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let source = source.ok_or("--config-source is a required flag")?;
    let path = source.strip_prefix("file://").ok_or_else(|| format!("unsupported config source {source}"))?;
    if !path.starts_with('/') {
        return Err(format!("config source {source} is not an absolute file:// URI"));
    }
    Ok(PathBuf::from(path))
}

fn load_config(path: &Path) -> Result<Yaml, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut docs = YamlLoader::load_from_str(&text).map_err(|e| format!("parsing {}: {e}", path.display()))?;
    if docs.len() != 1 {
        return Err(format!("{} holds {} documents", path.display(), docs.len()));
    }
    let doc = docs.remove(0);
    if doc["apiVersion"].as_str() != Some("node.eks.aws/v1alpha1") || doc["kind"].as_str() != Some("NodeConfig") {
        return Err("apiVersion must be node.eks.aws/v1alpha1 and kind NodeConfig".into());
    }
    let crd = YamlLoader::load_from_str(CRD).map_err(|e| format!("CRD: {e}"))?;
    let versions = crd[0]["spec"]["versions"].as_vec().ok_or("CRD has no versions")?;
    let schema = versions
        .iter()
        .find(|v| v["name"].as_str() == Some("v1alpha1"))
        .map(|v| &v["schema"]["openAPIV3Schema"])
        .ok_or("CRD has no v1alpha1 schema")?;
    let mut errors = Vec::new();
    check_schema(&doc, schema, "", &mut errors);
    if !errors.is_empty() {
        return Err(format!("strict decoding error: {}", errors.join(", ")));
    }
    Ok(doc)
}

/// The CRD's structural schema, as a strict decoder applies it.
fn check_schema(value: &Yaml, schema: &Yaml, path: &str, errors: &mut Vec<String>) {
    let ty = schema["type"].as_str().unwrap_or("object");
    match (ty, value) {
        ("object", Yaml::Hash(map)) => {
            for (key, child) in map {
                let Some(key) = key.as_str() else {
                    errors.push(format!("non-string key under {path}"));
                    continue;
                };
                let child_path = if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") };
                let property = &schema["properties"][key];
                if !property.is_badvalue() {
                    check_schema(child, property, &child_path, errors);
                } else if !schema["additionalProperties"].is_badvalue() {
                    check_schema(child, &schema["additionalProperties"], &child_path, errors);
                } else if schema["x-kubernetes-preserve-unknown-fields"].as_bool() != Some(true)
                    && (schema["properties"].as_hash().is_some() || path.is_empty())
                {
                    errors.push(format!("unknown field \"{child_path}\""));
                }
            }
        }
        ("array", Yaml::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                check_schema(item, &schema["items"], &format!("{path}[{i}]"), errors);
            }
        }
        ("string", Yaml::String(s)) => {
            if let Some(allowed) = schema["enum"].as_vec()
                && !allowed.iter().any(|a| a.as_str() == Some(s))
            {
                errors.push(format!("{path}: `{s}` is not one of the allowed values"));
            }
        }
        ("boolean", Yaml::Boolean(_)) => {}
        (ty, other) => errors.push(format!("{path}: expected {ty}, got {other:?}")),
    }
}

/// nodeadm's hybrid validator, plus the SSM formats.
fn validate(root: &Path, doc: &Yaml) -> Result<(), String> {
    let spec = &doc["spec"];
    if spec["cluster"]["name"].as_str().unwrap_or_default().is_empty() {
        return Err("Name is missing in cluster configuration".into());
    }
    if spec["cluster"]["region"].as_str().unwrap_or_default().is_empty() {
        return Err("Region is missing in cluster configuration".into());
    }
    if let Some(flags) = spec["kubelet"]["flags"].as_vec() {
        for flag in flags.iter().filter_map(Yaml::as_str) {
            if let Some(value) = flag.strip_prefix("--hostname-override=") {
                return Err(format!(
                    "hostname-override kubelet flag is not supported for hybrid nodes but found override: {value}"
                ));
            }
        }
    }
    let ssm = &spec["hybrid"]["ssm"];
    let ra = &spec["hybrid"]["iamRolesAnywhere"];
    match (ssm.is_badvalue(), ra.is_badvalue()) {
        (true, true) => {
            return Err("Either IAMRolesAnywhere or SSM must be provided for hybrid node configuration".into());
        }
        (false, false) => {
            return Err("Only one of IAMRolesAnywhere or SSM must be provided for hybrid node configuration".into());
        }
        _ => {}
    }
    if !ssm.is_badvalue() {
        let code = ssm["activationCode"].as_str().unwrap_or_default();
        let id = ssm["activationId"].as_str().unwrap_or_default();
        if code.is_empty() {
            return Err("ActivationCode is missing in hybrid ssm configuration".into());
        }
        if id.is_empty() {
            return Err("ActivationID is missing in hybrid ssm configuration".into());
        }
        if !(20..=250).contains(&code.chars().count()) {
            // As nodeadm does: the malformed code ends up in the output.
            return Err(format!("InvalidActivation: activation code {code} is malformed"));
        }
        let groups: Vec<&str> = id.split('-').collect();
        let uuid = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
            && groups.iter().all(|g| g.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        if !uuid {
            return Err(format!("InvalidActivation: activation id {id} is not a lowercase UUID"));
        }
    } else {
        for key in ["roleArn", "profileArn", "trustAnchorArn", "nodeName", "certificatePath", "privateKeyPath"] {
            if ra[key].as_str().unwrap_or_default().is_empty() {
                return Err(format!("{key} is missing in hybrid iam roles anywhere configuration"));
            }
        }
        if ra["nodeName"].as_str().unwrap_or_default().len() > 64 {
            return Err("NodeName can't be longer than 64 characters in hybrid iam roles anywhere configuration".into());
        }
        for key in ["certificatePath", "privateKeyPath"] {
            let path = ra[key].as_str().unwrap_or_default().trim_start_matches('/');
            if !root.join(path).is_file() {
                return Err(format!("IAM Roles Anywhere {key} {path} not found"));
            }
        }
    }
    Ok(())
}

fn init(root: &Path, args: &[String], fail: bool, noop: bool) -> Result<(), String> {
    let path = config_source(args)?;
    log("Checking user is root..");
    log("Loading installed components");
    if noop || !root.join(TRACKER).exists() {
        // nodeadm's silent no-op: exit 0 without doing anything.
        log("Nodeadm components are not installed. Please run `nodeadm install` before running init");
        return Ok(());
    }
    let doc = load_config(&path)?;
    validate(root, &doc)?;
    let spec = &doc["spec"];
    let region = spec["cluster"]["region"].as_str().unwrap_or_default();
    if let Some(code) = spec["hybrid"]["ssm"]["activationCode"].as_str() {
        let id = spec["hybrid"]["ssm"]["activationId"].as_str().unwrap_or_default();
        // What the SSM setup CLI's command line looks like in nodeadm's debug output.
        eprintln!(
            "Running /opt/ssm/ssm-setup-cli -register -activation-code {code} -activation-id {id} -region {region}"
        );
        if fail {
            return Err(format!("registering with SSM (activation code {code}): RequestError: send request failed"));
        }
        if root.join(REGISTRATION).exists() {
            log("SSM instance already registered, skipping registration");
        } else {
            write(
                root,
                REGISTRATION,
                &format!("{{\"ManagedInstanceID\":\"mi-0123456789abcdef0\",\"Region\":\"{region}\"}}"),
            )?;
        }
    } else if fail {
        return Err("configuring aws_signing_helper: exit status 1".into());
    }
    write(root, KUBECONFIG, "apiVersion: v1\nkind: Config\n")?;
    log("Starting kubelet");
    Ok(())
}

fn debug(root: &Path, args: &[String], fail: bool) -> Result<(), String> {
    let path = config_source(args)?;
    let doc = load_config(&path)?;
    validate(root, &doc)?;
    if fail || !root.join(KUBECONFIG).exists() || !root.join(TRACKER).exists() {
        println!("[x] node-readiness: the node is not Ready");
        println!("Issues found during validation. Please follow the remediation advice above.");
        return Err("validation failed".into());
    }
    println!("[✓] ntp-sync, swap, aws-auth, k8s-endpoint-network, node-readiness");
    Ok(())
}

fn uninstall(root: &Path) -> Result<(), String> {
    for relative in [TRACKER, REGISTRATION, KUBECONFIG] {
        let _ = std::fs::remove_file(root.join(relative));
    }
    log("Finished uninstallation tasks...");
    Ok(())
}
