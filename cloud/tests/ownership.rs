//! Who owns an object in S3: a create-only write answered 412 counts as done only when the
//! object there is this deployment's (the same content hash in its metadata); two deployments
//! sharing a bucket prefix write disjoint keys.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use common::*;
use edgeflow_aggregator::Stages;
use edgeflow_testkit::{Tansu, TansuStorage, kafka};

/// Dead letters of `node`: seq 1..=10 in hour 10, then seq 11 in hour 11 past the grace, which
/// seals hour 10 of the dead-letter partition.
fn hour_10_of(node: &str) -> Vec<(i32, &'static str, Vec<u8>)> {
    let mut out: Vec<(i32, &str, Vec<u8>)> =
        (1..=10u64).map(|seq| (0, "k", dead_letter(node, seq, "bad_json", b"x", H10 + seq as i64 * MIN))).collect();
    out.push((0, "k", dead_letter(node, 11, "bad_json", b"x", H10 + HOUR + 2 * MIN)));
    out
}

async fn scrape(port: u16, series: &str) -> f64 {
    let text = http_get(port, "/metrics").await.map(|(_, t)| t).unwrap_or_default();
    metric(&text, series).unwrap_or(0.0)
}

async fn wait_until(timeout: Duration, what: &str, mut ok: impl AsyncFnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !ok().await {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

fn listen(port: u16) -> String {
    format!("\"127.0.0.1:{port}\"")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_object_of_another_writer_at_our_key_is_never_counted_done() -> Result<()> {
    init_logging();
    let env = Env::start(1).await?;
    let data_key = env.data_key("deadletter", H10, DLQ, 0, 0);
    let manifest = env.manifest_key(H10, DLQ, 0);
    // Another writer got there first: different bytes, no edgeflow metadata.
    let foreign = b"PAR1 not ours".to_vec();
    env.s3.put_object().bucket(BUCKET).key(&data_key).body(foreign.clone().into()).send().await?;

    let port = edgeflow_testkit::free_port();
    let agg = Running::start(env.settings("a", &[("metrics.listen", &listen(port))])?, Stages::Sink);
    produce(&producer(&env.bootstrap())?, DLQ, &hour_10_of("n0")).await?;

    let conflicts = "edgeflow_aggregator_upload_conflicts_total";
    wait_until(Duration::from_secs(60), "an upload conflict or the manifest", async || {
        scrape(port, conflicts).await >= 1.0 || env.keys().await.is_ok_and(|k| k.contains(&manifest))
    })
    .await?;
    // Retries keep meeting the same object: still a conflict, never success.
    wait_until(Duration::from_secs(30), "a second conflict", async || scrape(port, conflicts).await >= 2.0).await?;
    assert!(!env.keys().await?.contains(&manifest), "the hour of a conflicting file has no manifest");
    let body = env.s3.get_object().bucket(BUCKET).key(&data_key).send().await?.body.collect().await?.into_bytes();
    assert_eq!(body.as_ref(), foreign.as_slice(), "the other writer's object is left alone");
    agg.stop().await?;

    // No checkpoint moved past the group: once the object is out of the way, a new instance
    // replays the hour and writes it whole.
    env.s3.delete_object().bucket(BUCKET).key(&data_key).send().await?;
    wait_out_dead_member().await;
    let agg = Running::start(env.settings("b", &[])?, Stages::Sink);
    env.wait_for_keys(Duration::from_secs(60), "the hour's manifest", |k| k.contains(&manifest)).await?;
    let report = wait_verified(&env, 10, Duration::from_secs(30)).await?;
    assert_eq!(report.rows.get("deadletter"), Some(&10));
    check_manifests(&env).await?;
    agg.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_deployments_on_one_prefix_write_disjoint_keys() -> Result<()> {
    init_logging();
    // Two sites, each with its own Kafka cluster (same topics, same partitions, so the same
    // input coordinates), one bucket and prefix.
    let env = Env::start(1).await?;
    let other = Tansu::start(TansuStorage::Memory)?;
    kafka::create_topics(&other.bootstrap(), &[(RAW, 1), (PROCESSED, 1), (DLQ, 1)]).await?;
    let brokers = format!("{:?}", other.bootstrap());
    let a = Running::start(env.settings("a", &[("s3.deployment_id", "\"site-a\"")])?, Stages::Sink);
    let b = Running::start(
        env.settings("b", &[("s3.deployment_id", "\"site-b\""), ("kafka.brokers", &brokers)])?,
        Stages::Sink,
    );
    produce(&producer(&env.bootstrap())?, DLQ, &hour_10_of("n0")).await?;
    produce(&producer(&other.bootstrap())?, DLQ, &hour_10_of("n1")).await?;

    let manifests = [env.manifest_key_of("site-a", H10, DLQ, 0), env.manifest_key_of("site-b", H10, DLQ, 0)];
    let keys = env
        .wait_for_keys(Duration::from_secs(60), "both sites' manifests", |k| manifests.iter().all(|m| k.contains(m)))
        .await?;
    let data: Vec<&String> = keys.iter().filter(|k| k.ends_with(".parquet")).collect();
    assert_eq!(data.len(), 2, "{keys:#?}");
    assert!(data[0].starts_with(&format!("{PREFIX}/site-a/")) && data[1].starts_with(&format!("{PREFIX}/site-b/")));
    let report = wait_verified(&env, 20, Duration::from_secs(30)).await?;
    assert_eq!(report.nodes.len(), 2);
    check_manifests(&env).await?;
    a.stop().await?;
    b.stop().await?;
    Ok(())
}

/// An S3 stand-in that ignores `If-None-Match`: it answers 200 to every PUT (and anything
/// else), `head` to a HEAD, and records `METHOD path` of each request.
async fn overwriting_store(head: u16) -> Result<(u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>)> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    let mut request = String::new();
                    if stream.read_line(&mut request).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let (mut length, mut expect) = (0usize, false);
                    loop {
                        let mut line = String::new();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                        expect |= lower.starts_with("expect:") && lower.contains("100-continue");
                        if line == "\r\n" {
                            break;
                        }
                    }
                    if expect {
                        let _ = stream.get_mut().write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
                    }
                    let mut body = vec![0; length];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let line: Vec<&str> = request.split_whitespace().take(2).collect();
                    log.lock().expect("log").push(line.join(" "));
                    let status = if line.first() == Some(&"HEAD") { head } else { 200 };
                    let answer = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nETag: \"0\"\r\n\r\n");
                    if stream.get_mut().write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((port, seen))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_ignores_if_none_match_is_refused_and_stops_the_sink() -> Result<()> {
    init_logging();
    let env = Env::start(1).await?;
    let probe = format!("{PREFIX}/{DEPLOYMENT}/_edgeflow/create-only-probe");
    let path = format!("/{BUCKET}/{probe}");
    // The check itself: the probe exists (HEAD 200) and one create-only PUT "succeeds"; or it
    // does not (HEAD 404), is created, and the second create-only PUT "succeeds" too.
    for (head, puts) in [(200, 1), (404, 2)] {
        let (port, seen) = overwriting_store(head).await?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let settings = env.settings("a", &[("s3.endpoint_url", &format!("{endpoint:?}"))])?;
        let s3 = edgeflow_aggregator::s3::S3::new(&settings.s3).await;
        match s3.check_create_only(&probe).await {
            Err(e @ edgeflow_aggregator::s3::ProbeError::CreateOnlyIgnored { .. }) => {
                let text = e.to_string();
                assert!(text.contains(&endpoint) && text.contains("If-None-Match"), "{text}");
            }
            other => bail!("HEAD {head}: expected CreateOnlyIgnored, got {other:?}"),
        }
        let requests = seen.lock().expect("log").clone();
        assert_eq!(requests.first(), Some(&format!("HEAD {path}")), "{requests:#?}");
        assert_eq!(requests.iter().filter(|r| r.starts_with(&format!("PUT {path}"))).count(), puts, "{requests:#?}");
    }
    let (port, _) = overwriting_store(404).await?;
    let settings = env.settings("a", &[("s3.endpoint_url", &format!("\"http://127.0.0.1:{port}\""))])?;

    // The stage: fatal, an error out of run (the process exits non-zero).
    let agg = Running::start(settings, Stages::Sink);
    let result = tokio::time::timeout(Duration::from_secs(60), agg.task).await??;
    let error = result.expect_err("the sink stage stops");
    assert!(error.to_string().contains("does not honour If-None-Match"), "{error}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_honours_if_none_match_and_the_probe_is_written_once() -> Result<()> {
    init_logging();
    let env = Env::start(1).await?;
    let s3 = edgeflow_aggregator::s3::S3::new(&env.settings("a", &[])?.s3).await;
    let probe = format!("{PREFIX}/{DEPLOYMENT}/_edgeflow/create-only-probe");
    // First start: created, then a second create-only PUT answers 412.
    s3.check_create_only(&probe).await?;
    let first = env.s3.head_object().bucket(BUCKET).key(&probe).send().await?;
    assert_eq!(first.metadata().and_then(|m| m.get("edgeflow-writer")).map(String::as_str), Some(DEPLOYMENT));
    // Later starts find it and check the 412 only.
    s3.check_create_only(&probe).await?;
    let again = env.s3.head_object().bucket(BUCKET).key(&probe).send().await?;
    assert_eq!(first.e_tag(), again.e_tag());
    assert_eq!(first.last_modified(), again.last_modified(), "never overwritten");
    // Not data: verify skips it.
    let report = edgeflow_aggregator::verify::verify(&s3, PREFIX).await?;
    assert!(report.ok && report.objects == 0, "{}", report.render());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_412_is_ours_by_writer_and_hash_single_and_multipart() -> Result<()> {
    use edgeflow_aggregator::s3::{S3Error, Written, sha256_file, sha256_hex};
    init_logging();
    let env = Env::start(1).await?;
    let s3 = edgeflow_aggregator::s3::S3::new(&env.settings("a", &[])?.s3).await;
    let other = edgeflow_aggregator::s3::S3::new(&env.settings("b", &[("s3.deployment_id", "\"site-b\"")])?.s3).await;
    let body = b"{\"version\": 1}\n".to_vec();
    let sha = sha256_hex(&body);

    assert_eq!(s3.put_bytes("telemetry/m.json", body.clone(), "application/json", &sha).await?, Written::Created);
    let head = env.s3.head_object().bucket(BUCKET).key("telemetry/m.json").send().await?;
    let meta = head.metadata().cloned().unwrap_or_default();
    assert_eq!(meta.get("edgeflow-sha256"), Some(&sha));
    assert_eq!(meta.get("edgeflow-writer").map(String::as_str), Some(DEPLOYMENT));
    // A retry or a replay: same bytes.
    assert_eq!(s3.put_bytes("telemetry/m.json", body.clone(), "application/json", &sha).await?, Written::AlreadyThere);
    // Another version's encoding of the same input: ours, other bytes.
    let reencoded = b"{\"version\":1}\n".to_vec();
    let written =
        s3.put_bytes("telemetry/m.json", reencoded.clone(), "application/json", &sha256_hex(&reencoded)).await?;
    assert_eq!(written, Written::OursReencoded { found_sha256: sha.clone() });
    // Another deployment at the same key, even with the same bytes: a conflict.
    match other.put_bytes("telemetry/m.json", body.clone(), "application/json", &sha).await {
        Err(S3Error::Conflict { found_writer, .. }) => assert_eq!(found_writer.as_deref(), Some(DEPLOYMENT)),
        r => bail!("expected a conflict, got {r:?}"),
    }

    // Multipart (a file above the threshold): an object without metadata at the key is a
    // conflict, found before any part is uploaded; our own is found ours.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("big.parquet");
    std::fs::write(&path, (0..6 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect::<Vec<u8>>())?;
    let size = std::fs::metadata(&path)?.len();
    let sha = sha256_file(&path)?;
    let threshold = 5 * 1024 * 1024;
    env.s3.put_object().bucket(BUCKET).key("telemetry/big.parquet").body(b"foreign".to_vec().into()).send().await?;
    match s3.put_file("telemetry/big.parquet", &path, size, threshold, &sha).await {
        Err(S3Error::Conflict { found_writer: None, .. }) => {}
        r => bail!("expected a conflict, got {r:?}"),
    }
    match s3.put_file("telemetry/mine.parquet", &path, size, threshold, &sha).await {
        Ok(Written::Created) => {}
        // moto 5 answers a conditional CompleteMultipartUpload with a
        // `CompleteMultipartUploadResponse` root, which the SDK cannot decode: the object is
        // created all the same, and the uploader's retry finds it ours (below).
        Err(S3Error::Status { operation: "CompleteMultipartUpload", status: 200, .. }) => {}
        r => bail!("expected the object created, got {r:?}"),
    }
    let head = env.s3.head_object().bucket(BUCKET).key("telemetry/mine.parquet").send().await?;
    assert!(head.e_tag().is_some_and(|t| t.contains('-')), "multipart: {:?}", head.e_tag());
    assert_eq!(head.metadata().and_then(|m| m.get("edgeflow-sha256")), Some(&sha));
    assert_eq!(s3.put_file("telemetry/mine.parquet", &path, size, threshold, &sha).await?, Written::AlreadyThere);
    Ok(())
}
