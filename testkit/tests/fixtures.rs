//! The fixtures themselves work against the real servers.

use std::time::Duration;

use edgeflow_testkit::{FaultProxy, Mosquitto, Tansu, TansuStorage, free_port, kafka, wait_for_port};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

async fn produce(bootstrap: &str, topic: &str, n: usize) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()?;
    for i in 0..n {
        let key = format!("k{}", i % 3);
        let value = format!("v{i}");
        let headers = OwnedHeaders::new().insert(Header { key: "h", value: Some("x") });
        producer
            .send(FutureRecord::to(topic).key(&key).payload(&value).headers(headers), Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn tansu_round_trips_records_with_headers() -> anyhow::Result<()> {
    let tansu = Tansu::start(TansuStorage::Memory)?;
    kafka::create_topics(&tansu.bootstrap(), &[("t", 3)]).await?;
    produce(&tansu.bootstrap(), "t", 30).await?;
    let got = kafka::consume_count(&tansu.bootstrap(), "t", 30, Duration::from_secs(20), Duration::from_millis(500))?;
    assert_eq!(got.len(), 30);
    assert!(got.iter().all(|m| m.headers == vec![("h".to_owned(), b"x".to_vec())]));
    // Same key, same partition, in order.
    for msgs in kafka::by_key(&got).values() {
        assert!(msgs.windows(2).all(|w| w[0].partition == w[1].partition && w[0].offset < w[1].offset));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn tansu_behind_a_proxy_is_cut_off_and_healed() -> anyhow::Result<()> {
    let listen = free_port();
    let proxy = FaultProxy::start(0, listen)?;
    let tansu = Tansu::start_advertising(TansuStorage::Memory, listen, proxy.port)?;
    kafka::create_topics(&tansu.bootstrap(), &[("t", 1)]).await?;
    proxy.cut();
    let cut = tokio::time::timeout(Duration::from_secs(3), produce(&tansu.bootstrap(), "t", 1)).await;
    assert!(cut.is_err() || cut.is_ok_and(|r| r.is_err()), "produce must not succeed while cut off");
    proxy.heal();
    produce(&tansu.bootstrap(), "t", 5).await?;
    let got = kafka::consume_count(&tansu.bootstrap(), "t", 5, Duration::from_secs(20), Duration::from_millis(300))?;
    assert!(got.len() >= 5);
    Ok(())
}

#[test]
fn mosquitto_starts_and_restarts_on_its_port() -> anyhow::Result<()> {
    let mut m = Mosquitto::start()?;
    wait_for_port(m.port, Duration::from_secs(5))?;
    m.restart()?;
    wait_for_port(m.port, Duration::from_secs(5))?;
    Ok(())
}
