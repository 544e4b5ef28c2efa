//! mqtts:// with a private CA, a client certificate and a password, against a TLS mosquitto.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use edgeflow_testkit::{Mosquitto, free_port};

fn sh(cmd: &mut Command) {
    let out = cmd.output().expect("runs");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
fn make_pki(dir: &Path) {
    let d = |f: &str| dir.join(f);
    sh(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=edgeflow test CA"])
        .arg("-keyout")
        .arg(d("ca.key"))
        .arg("-out")
        .arg(d("ca.crt")));
    std::fs::write(d("server.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
        .expect("write");
    std::fs::write(d("client.ext"), "extendedKeyUsage=clientAuth\n").expect("write");
    for name in ["server", "client"] {
        sh(Command::new("openssl")
            .args(["req", "-newkey", "rsa:2048", "-nodes", "-subj"])
            .arg(format!("/CN={name}"))
            .arg("-keyout")
            .arg(d(&format!("{name}.key")))
            .arg("-out")
            .arg(d(&format!("{name}.csr"))));
        let mut sign = Command::new("openssl");
        sign.args(["x509", "-req", "-days", "2", "-CAcreateserial"])
            .arg("-in")
            .arg(d(&format!("{name}.csr")))
            .arg("-CA")
            .arg(d("ca.crt"))
            .arg("-CAkey")
            .arg(d("ca.key"))
            .arg("-out")
            .arg(d(&format!("{name}.crt")))
            .arg("-extfile")
            .arg(d(&format!("{name}.ext")));
        sh(&mut sign);
    }
    sh(Command::new("mosquitto_passwd").args(["-b", "-c"]).arg(d("passwd")).args(["edge", "s3cret-pw"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_client_certificate_and_password() -> anyhow::Result<()> {
    let mut env = Env::start(false).await?;
    let pki = env.dir.path().join("pki");
    std::fs::create_dir_all(&pki)?;
    make_pki(&pki);
    let p = |f: &str| pki.join(f).display().to_string();
    env.mosquitto = Mosquitto::start_with(&format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\npassword_file {}\nallow_anonymous false\n",
        p("ca.crt"),
        p("server.crt"),
        p("server.key"),
        p("passwd")
    ))?;
    std::fs::write(pki.join("mqtt-password"), "s3cret-pw\n")?;

    let port = free_port();
    let tls = format!(
        "ca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\nusername = \"edge\"\npassword_file = \"{}\"\n",
        p("ca.crt"),
        p("client.crt"),
        p("client.key"),
        p("mqtt-password")
    );
    let config_text = env.config("node-tls", port, "").replace(
        &format!("url = \"{}\"", env.mosquitto.url()),
        &format!("url = \"mqtts://127.0.0.1:{}\"\n{tls}", env.mosquitto.port),
    );
    let config = env.write_config("tls", &config_text)?;
    let agent = start_agent(&config, port)?;
    agent.wait_metric("edgeflow_agent_mqtt_connected", Duration::from_secs(15), |v| v == 1.0)?;

    let start = chrono::Utc::now();
    for i in 0..20 {
        let ts = (start + chrono::Duration::milliseconds(i)).to_rfc3339();
        let payload = format!(
            r#"{{"device_id": "tls-dev", "timestamp": "{ts}", "temperature": 70.{i}, "humidity": 50, "status": "OK"}}"#
        );
        sh(Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &env.mosquitto.port.to_string(),
                "-q",
                "1",
                "-t",
                "devices/tls-dev/telemetry",
            ])
            .args(["--cafile", &p("ca.crt"), "--cert", &p("client.crt"), "--key", &p("client.key")])
            .args(["-u", "edge", "-P", "s3cret-pw", "-m", &payload]));
    }
    let got = read_raw(&env.tansu.bootstrap(), 20, Duration::from_secs(30))?;
    assert_eq!(got.len(), 20, "every message sent over TLS reached Kafka");
    assert!(got.iter().all(|g| g.device_id == "tls-dev" && g.node_id == "node-tls"));
    assert!(!agent.log_text().contains("s3cret-pw"), "password leaked into the log");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_reported_not_fatal_and_never_logged() -> anyhow::Result<()> {
    let mut env = Env::start(false).await?;
    let pki = env.dir.path().join("pki");
    std::fs::create_dir_all(&pki)?;
    make_pki(&pki);
    env.mosquitto =
        Mosquitto::start_with(&format!("password_file {}\nallow_anonymous false\n", pki.join("passwd").display()))?;
    std::fs::write(pki.join("bad-password"), "not-the-password-xyz\n")?;
    let port = free_port();
    let text = env.config("node-pw", port, "").replace(
        "keep_alive = \"5s\"",
        &format!(
            "keep_alive = \"5s\"\nusername = \"edge\"\npassword_file = \"{}\"",
            pki.join("bad-password").display()
        ),
    );
    let config = env.write_config("pw", &text)?;
    let agent = start_agent(&config, port)?;
    agent.wait_metric("edgeflow_agent_mqtt_connection_errors_total", Duration::from_secs(15), |v| v >= 2.0)?;
    let (code, body) = http_get(port, "/readyz")?;
    assert_eq!(code, 503);
    assert!(body.contains("[-] mqtt"), "{body}");
    assert_eq!(http_get(port, "/healthz")?.0, 200, "a refused login is not a wedged process");
    assert!(!agent.log_text().contains("not-the-password-xyz"));
    Ok(())
}
