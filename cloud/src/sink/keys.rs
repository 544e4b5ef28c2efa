//! Object keys and manifests: deterministic from what the sink read, so a retried or replayed
//! upload targets the same key (and S3's create-only write turns it into a no-op).
//!
//! * Parquet: `<prefix>/<deployment>/<YYYY>/<MM>/<DD>/<family>_<YYYYMMDDTHH>Z_<topic>-<partition>_<first offset>.parquet`
//! * Manifest of an hour: `<prefix>/<deployment>/<YYYY>/<MM>/<DD>/_manifest_<YYYYMMDDTHH>Z_<topic>-<partition>.json`
//! * Manifest of a late bucket: `…/_manifest_<YYYYMMDDTHH>Z_<topic>-<partition>_<first offset>.json`
//! * The start-up probe of create-only writes: `<prefix>/<deployment>/_edgeflow/create-only-probe`
//!
//! `deployment` is `[s3] deployment_id`. The input coordinates (topic, partition, offset) are
//! only unique within one Kafka cluster: two sites or clusters writing to one bucket prefix
//! would otherwise compute the same keys, and each would take the other's object for its own
//! earlier upload (a 412) and skip its own data. The id makes their keys disjoint; every
//! replica of one deployment shares it, so a rebalance or a replay targets the same key.
//!
//! The date and hour are the bucket's event hour (UTC). `first offset` is the input offset of
//! the bucket's first row: a late bucket of the same hour has a different first offset, hence
//! its own file. Files and directories starting with `_` are not data, which is the convention
//! batch engines (Spark, Hive, Athena) use to skip them; `verify` skips them too.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::sink::state::{Family, FileInfo, HOUR_MS};

/// Names the objects of one input partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyScheme {
    /// Empty, or a prefix without leading/trailing slash.
    pub prefix: String,
    /// `[s3] deployment_id`.
    pub deployment: String,
    pub topic: String,
    pub partition: i32,
}

fn hour_parts(hour_ms: i64) -> (String, String) {
    let t: DateTime<Utc> = DateTime::from_timestamp_millis(hour_ms).unwrap_or_default();
    (t.format("%Y/%m/%d").to_string(), t.format("%Y%m%dT%HZ").to_string())
}

/// The directory of a deployment's objects: `<prefix>/<deployment>`.
pub fn deployment_dir(prefix: &str, deployment: &str) -> String {
    if prefix.is_empty() { deployment.to_owned() } else { format!("{prefix}/{deployment}") }
}

/// The key of the object the uploader writes at start to check that the store honours
/// `If-None-Match: *`.
pub fn probe_key(prefix: &str, deployment: &str) -> String {
    format!("{}/_edgeflow/create-only-probe", deployment_dir(prefix, deployment))
}

impl KeyScheme {
    fn dir(&self, date: &str) -> String {
        format!("{}/{date}", deployment_dir(&self.prefix, &self.deployment))
    }

    /// The key of a bucket's Parquet file.
    pub fn data(&self, family: Family, hour_ms: i64, first_offset: i64) -> String {
        let (date, hour) = hour_parts(hour_ms);
        format!(
            "{}/{}_{hour}_{}-{}_{first_offset}.parquet",
            self.dir(&date),
            family.as_str(),
            self.topic,
            self.partition
        )
    }

    /// The key of a seal group's manifest.
    pub fn manifest(&self, hour_ms: i64, late_first_offset: Option<i64>) -> String {
        let (date, hour) = hour_parts(hour_ms);
        match late_first_offset {
            None => format!("{}/_manifest_{hour}_{}-{}.json", self.dir(&date), self.topic, self.partition),
            Some(first) => {
                format!("{}/_manifest_{hour}_{}-{}_{first}.json", self.dir(&date), self.topic, self.partition)
            }
        }
    }
}

/// The manifest written when an hour (or a late bucket) seals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Manifest {
    pub version: u32,
    /// Start of the hour, RFC 3339.
    pub hour: String,
    /// End of the hour, RFC 3339.
    pub hour_end: String,
    pub topic: String,
    pub partition: i32,
    /// A late bucket's manifest (rows that arrived after the hour sealed).
    pub late: bool,
    /// The input offset whose reading sealed the group.
    pub sealed_at_offset: i64,
    pub files: Vec<ManifestFile>,
}

/// One file of a manifest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ManifestFile {
    pub key: String,
    pub family: Family,
    pub rows: u64,
    /// Input offsets of the first and last row.
    pub first_offset: i64,
    pub last_offset: i64,
}

impl Manifest {
    /// Builds a manifest; files are listed in key order so replays write identical bytes.
    pub fn new(
        scheme: &KeyScheme,
        hour_ms: i64,
        late: bool,
        sealed_at_offset: i64,
        files: &[(Family, FileInfo)],
    ) -> Self {
        let rfc = |ms: i64| {
            DateTime::<Utc>::from_timestamp_millis(ms)
                .unwrap_or_default()
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        };
        let mut files: Vec<ManifestFile> = files
            .iter()
            .map(|(family, f)| ManifestFile {
                key: f.object_key.clone(),
                family: *family,
                rows: f.rows,
                first_offset: f.first_offset,
                last_offset: f.last_offset,
            })
            .collect();
        files.sort_by(|a, b| a.key.cmp(&b.key));
        Self {
            version: 1,
            hour: rfc(hour_ms),
            hour_end: rfc(hour_ms + HOUR_MS),
            topic: scheme.topic.clone(),
            partition: scheme.partition,
            late,
            sealed_at_offset,
            files,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Strings and integers serialise into memory infallibly.
        let mut out = serde_json::to_vec_pretty(self).expect("serialising a manifest is infallible");
        out.push(b'\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 1_735_207_200_000; // 2024-12-26T10:00:00Z

    #[test]
    fn keys_are_deterministic_and_family_first() {
        let s = KeyScheme {
            prefix: "telemetry".into(),
            deployment: "plant-7".into(),
            topic: "processed-data".into(),
            partition: 2,
        };
        assert_eq!(
            s.data(Family::Filtered, H, 1041),
            "telemetry/plant-7/2024/12/26/filtered_20241226T10Z_processed-data-2_1041.parquet"
        );
        assert_eq!(s.manifest(H, None), "telemetry/plant-7/2024/12/26/_manifest_20241226T10Z_processed-data-2.json");
        assert_eq!(
            s.manifest(H, Some(77)),
            "telemetry/plant-7/2024/12/26/_manifest_20241226T10Z_processed-data-2_77.json"
        );
        assert_eq!(probe_key("telemetry", "plant-7"), "telemetry/plant-7/_edgeflow/create-only-probe");
        let root = KeyScheme { prefix: String::new(), ..s.clone() };
        assert_eq!(
            root.data(Family::Deadletter, H, 0),
            "plant-7/2024/12/26/deadletter_20241226T10Z_processed-data-2_0.parquet"
        );
        assert_eq!(probe_key("", "plant-7"), "plant-7/_edgeflow/create-only-probe");
        // Another deployment on the same prefix, same input coordinates: no key in common.
        let other = KeyScheme { deployment: "plant-8".into(), ..s.clone() };
        assert_ne!(other.data(Family::Filtered, H, 1041), s.data(Family::Filtered, H, 1041));
        assert_ne!(other.manifest(H, None), s.manifest(H, None));
    }

    #[test]
    fn manifest_lists_files_in_key_order() {
        let s = KeyScheme { prefix: "p".into(), deployment: "d".into(), topic: "t".into(), partition: 0 };
        let f = |key: &str, first| FileInfo {
            object_key: key.into(),
            rows: 3,
            first_offset: first,
            last_offset: first + 9,
        };
        let m = Manifest::new(&s, H, false, 120, &[(Family::Rejected, f("b", 5)), (Family::Filtered, f("a", 1))]);
        assert_eq!(m.files.iter().map(|f| f.key.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let json: serde_json::Value = serde_json::from_slice(&m.to_json()).expect("json");
        assert_eq!(json["hour"], "2024-12-26T10:00:00Z");
        assert_eq!(json["hour_end"], "2024-12-26T11:00:00Z");
        assert_eq!(json["files"][1]["family"], "rejected");
    }
}
