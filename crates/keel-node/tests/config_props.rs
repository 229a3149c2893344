//! Untrusted input a node reads before it starts: the TOML configuration
//! file (any value of any type in any field, a mutated valid file, bytes
//! that are not UTF-8), the auto-compaction retention text, and the
//! REMOVED marker in the data directory (any bytes). Never a panic; a bad
//! file is an error that names the file or the setting; a file that loads
//! keeps the limits `validate` promises; a REMOVED marker refuses a start
//! whatever it holds.

use keel_node::config::{check_auto_compaction, retention_secs, ConfigError};
use keel_node::runtime::{NodeError, REMOVED_FILE};
use keel_node::NodeConfig;
use proptest::prelude::*;
use std::path::Path;

/// A valid configuration using most settings, one per line.
const VALID: &str = r#"id = 1
cluster_id = 77
data_dir = "d"
peer_addr = "127.0.0.1:7001"
client_addr = "127.0.0.1:7101"
http_addr = "127.0.0.1:7301"
etcd_addr = "127.0.0.1:2379"
etcd_cors = ["https://dash.example.com"]
auto_compaction_mode = "periodic"
auto_compaction_retention = "1h30m"
kv_quota_bytes = 1048576
durability = "replicated"
replicated_sync_interval_ms = 5
service = "kv"
service_thread = "shared"
thread_scheduling = "batch"
net_threads = 2
heartbeat_ms = 50
commit_notify_delay_ms = 1
follower_apply_interval_ms = 2
lease_reads = true
clock_drift_ppm = 1000
election_timeout_min_ms = 500
election_timeout_max_ms = 1000
preferred_leaders = [1, 2]
preferred_leader_hold_ms = 2000
snapshot_every_bytes = 1000000
snapshot_log_percent = 50
log_cache_bytes = 1000000
queue_depth = 1000
max_unapplied_bytes = 10000000
write_timeout_ms = 5000
max_request_bytes = 1572864
join = false

[[peers]]
id = 2
peer_addr = "127.0.0.1:7002"
client_addr = "127.0.0.1:7102"
etcd_addr = "127.0.0.1:12379"
"#;

/// The settings of `VALID` (the keys of its top-level lines).
fn fields() -> Vec<&'static str> {
    VALID
        .lines()
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(" = ").map(|(k, _)| k))
        .collect()
}

/// A TOML value of any type, in range or far out of it.
fn toml_value() -> impl Strategy<Value = String> {
    let int = prop_oneof![
        any::<i64>(),
        Just(i64::MAX),
        Just(i64::MIN),
        Just(-1),
        Just(0),
        0i64..100_000
    ];
    prop_oneof![
        int.clone().prop_map(|i| i.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        Just("nan".to_string()),
        Just("-inf".to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        "[ -~]{0,12}".prop_map(|s| format!("{s:?}")),
        "[0-9.hms]{0,8}".prop_map(|s| format!("{s:?}")),
        proptest::collection::vec(int, 0..3).prop_map(|v| format!("{v:?}")),
        Just("{ a = 1 }".to_string()),
        Just("1979-05-27T07:32:00Z".to_string()),
        Just("\"\\u0000\"".to_string()),
        Just(String::new()),
    ]
}

fn load(dir: &Path, text: &[u8]) -> Result<NodeConfig, ConfigError> {
    let path = dir.join("node.toml");
    std::fs::write(&path, text).expect("write config");
    NodeConfig::load(&path)
}

/// What `validate` promises of a configuration that loads.
fn check_loaded(c: &NodeConfig) -> Result<(), TestCaseError> {
    prop_assert!(c.id != 0);
    prop_assert!(c.heartbeat_ms > 0 && c.heartbeat_ms < c.election_timeout_min_ms);
    prop_assert!(c.election_timeout_min_ms < c.election_timeout_max_ms);
    prop_assert!(c.election_timeout_max_ms <= keel_node::config::MAX_ELECTION_TIMEOUT_MS);
    prop_assert!((1..=60_000).contains(&c.replicated_sync_interval_ms));
    prop_assert!(c.write_timeout_ms >= 100 && c.queue_depth >= 16 && c.net_threads <= 256);
    prop_assert!(c.max_request_bytes <= keel_node::config::MAX_REQUEST_BYTES);
    prop_assert!(c.max_unapplied_bytes >= c.max_request_bytes as u64);
    prop_assert!(
        check_auto_compaction(&c.auto_compaction_mode, &c.auto_compaction_retention).is_ok()
    );
    prop_assert!(c.peers.iter().all(|p| p.id != 0 && p.id != c.id));
    let preferred = c.preferred_leader_set();
    prop_assert!(!preferred.contains(&0) && preferred.len() == c.preferred_leaders.len());
    prop_assert!(
        (1..=keel_node::config::MAX_PREFERRED_LEADER_HOLD_MS).contains(&c.preferred_leader_hold_ms)
    );
    prop_assert!(preferred.is_empty() || c.preferred_leader_hold_ms >= c.election_timeout_max_ms);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any value of any type in any setting: loads (then within every
    /// limit) or is refused with an error naming the file or the setting;
    /// never a panic.
    #[test]
    fn any_value_in_any_setting_loads_or_is_refused_by_name(
        field in prop::sample::select(fields()),
        value in toml_value(),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let text: String = VALID
            .lines()
            .map(|l| match l.split_once(" = ") {
                Some((k, _)) if k == field => format!("{k} = {value}\n"),
                _ => format!("{l}\n"),
            })
            .collect();
        match load(dir.path(), text.as_bytes()) {
            Ok(c) => check_loaded(&c)?,
            Err(ConfigError::Parse { path, message }) => {
                prop_assert!(path.ends_with("node.toml"));
                prop_assert!(!message.is_empty());
            }
            Err(ConfigError::Invalid(m)) => {
                prop_assert!(m.contains(field) || field.ends_with("_addr") || field == "id", "{} = {}: {}", field, value, m);
            }
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
    }

    /// Any list of preferred leaders with any hold and election timeout:
    /// loads exactly when the ids are not 0 and not repeated and the hold
    /// is 1 ms to a day and, with a list, no shorter than the longest
    /// election timeout; a refusal names the setting and its value.
    #[test]
    fn preferred_leaders_load_exactly_when_valid(
        ids in proptest::collection::vec(prop_oneof![Just(0u64), 1u64..6, any::<u64>()], 0..5),
        hold in prop_oneof![Just(0u64), 1u64..3000, Just(86_400_000), Just(86_400_001), any::<u64>()],
        max in 600u64..3000,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let text: String = VALID
            .lines()
            .map(|l| match l.split_once(" = ") {
                Some(("preferred_leaders", _)) => format!("preferred_leaders = {ids:?}\n"),
                Some(("preferred_leader_hold_ms", _)) => format!("preferred_leader_hold_ms = {hold}\n"),
                Some(("election_timeout_max_ms", _)) => format!("election_timeout_max_ms = {max}\n"),
                _ => format!("{l}\n"),
            })
            .collect();
        let distinct: std::collections::BTreeSet<u64> = ids.iter().copied().collect();
        let ids_ok = !distinct.contains(&0) && distinct.len() == ids.len();
        let hold_ok = (1..=86_400_000).contains(&hold) && (ids.is_empty() || hold >= max);
        let too_big = ids.iter().any(|&i| i > i64::MAX as u64) || hold > i64::MAX as u64;
        match load(dir.path(), text.as_bytes()) {
            Ok(c) => {
                prop_assert!(ids_ok && hold_ok, "{:?} {} {} loaded", ids, hold, max);
                prop_assert_eq!(&c.preferred_leaders, &ids);
                prop_assert_eq!(c.preferred_leader_hold_ms, hold);
                check_loaded(&c)?;
            }
            // TOML integers are i64: larger ones do not parse.
            Err(ConfigError::Parse { .. }) => prop_assert!(too_big, "{:?} {}", ids, hold),
            Err(ConfigError::Invalid(m)) => {
                prop_assert!(!(ids_ok && hold_ok), "{:?} {} {} refused: {}", ids, hold, max, m);
                if !ids_ok {
                    prop_assert!(m.contains(&format!("preferred_leaders {ids:?}")), "{}", m);
                } else {
                    prop_assert!(m.contains(&format!("preferred_leader_hold_ms ({hold})")), "{}", m);
                }
            }
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
    }

    /// The valid file with a byte changed, cut, or a line duplicated:
    /// never a panic; what loads keeps every limit.
    #[test]
    fn mutated_files_never_panic(
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<prop::sample::Index>(),
        line in any::<prop::sample::Index>(),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = VALID.as_bytes().to_vec();
        let i = at.index(b.len());
        b[i] = byte;
        let lines: Vec<&str> = VALID.lines().collect();
        let dup = lines[line.index(lines.len())];
        let doubled = format!("{VALID}{dup}\n");
        for text in [&b[..], &VALID.as_bytes()[..cut.index(VALID.len())], doubled.as_bytes()] {
            match load(dir.path(), text) {
                Ok(c) => check_loaded(&c)?,
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }

    /// A retention is refused or a finite number of seconds up to ten
    /// years, whatever the text; never a panic.
    #[test]
    fn retention_text_never_panics(s in "[0-9.hmsu ]{0,12}|.{0,12}") {
        if let Ok(secs) = retention_secs(&s) {
            prop_assert!(secs.is_finite() && (0.0..=10.0 * 365.0 * 86400.0).contains(&secs), "{:?} -> {}", s, secs);
        }
        let _ = check_auto_compaction("periodic", &s);
        let _ = check_auto_compaction("revision", &s);
        let _ = check_auto_compaction(&s, "1");
    }

    /// A data directory holding a REMOVED marker is refused at start,
    /// whatever the marker holds (text, nothing, bytes that are not
    /// UTF-8), with the marker named, and nothing else is written there.
    #[test]
    fn any_removed_marker_refuses_the_start(
        marker in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            Just(vec![0xff, 0xfe, 0x00]),
            Just(Vec::new()),
        ],
    ) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).expect("mkdir");
        std::fs::write(data.join(REMOVED_FILE), &marker).expect("write marker");
        let text = format!(
            "id = 1\ndata_dir = {:?}\npeer_addr = \"127.0.0.1:0\"\nclient_addr = \"127.0.0.1:0\"\n",
            data.display().to_string()
        );
        let cfg: NodeConfig = toml::from_str(&text).expect("config");
        match keel_node::start(cfg, Box::new(keel_kv::KvService::default())) {
            Ok(h) => {
                h.shutdown();
                prop_assert!(false, "a node with a REMOVED marker {:?} started", marker);
            }
            Err(NodeError::Start(m)) => prop_assert!(m.contains(REMOVED_FILE), "{}", m),
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
        let left: Vec<_> = std::fs::read_dir(&data).expect("ls").map(|e| e.expect("entry").file_name()).collect();
        prop_assert_eq!(left, vec![std::ffi::OsString::from(REMOVED_FILE)]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// The etcd API's TLS files, whatever they hold (PEM-like lines among
    /// any bytes, not UTF-8): a file is taken if and only if a BEGIN line
    /// of what it must hold is in it, else refused naming the setting and
    /// the file; never a panic.
    #[test]
    fn tls_files_of_any_content_never_panic(
        pieces in proptest::collection::vec(prop_oneof![
            Just(b"-----BEGIN CERTIFICATE-----\n".to_vec()),
            Just(b"-----BEGIN PRIVATE KEY-----\n".to_vec()),
            Just(b"-----BEGIN EC PRIVATE KEY-----".to_vec()),
            Just(b"-----BEGIN ".to_vec()),
            Just("\u{e9}\u{1F600}-----".as_bytes().to_vec()),
            proptest::collection::vec(any::<u8>(), 0..12),
        ], 0..6),
        which in 0usize..3,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("tls.pem");
        let content = pieces.concat();
        std::fs::write(&file, &content).expect("write");
        let mut c: NodeConfig = toml::from_str(VALID).expect("valid");
        let (setting, marker) = match which {
            0 => { c.etcd_cert_file = Some(file.clone()); ("etcd_cert_file", "CERTIFICATE-----") }
            1 => { c.etcd_key_file = Some(file.clone()); ("etcd_key_file", "PRIVATE KEY-----") }
            _ => { c.etcd_trusted_ca_file = Some(file.clone()); ("etcd_trusted_ca_file", "CERTIFICATE-----") }
        };
        let text = String::from_utf8_lossy(&content);
        let holds = text.match_indices("-----BEGIN ").any(|(i, _)| {
            text[i..].lines().next().is_some_and(|l| l.ends_with(marker))
        });
        match c.check_files() {
            Ok(()) => prop_assert!(holds, "{:?} taken as {}", text, setting),
            Err(e) => {
                prop_assert!(!holds, "{:?} refused: {}", text, e);
                let m = e.to_string();
                prop_assert!(m.contains(setting) && m.contains("tls.pem"), "{}", m);
            }
        }
        // A file that is not there is refused naming it too.
        std::fs::remove_file(&file).expect("rm");
        let m = c.check_files().expect_err("a missing file").to_string();
        prop_assert!(m.contains(setting) && m.contains("tls.pem"), "{}", m);
    }
}

/// A configuration file that is not UTF-8 is refused as unreadable, with
/// the file named.
#[test]
fn a_file_that_is_not_text_is_refused_with_its_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = load(dir.path(), b"id = 1\n\xff\xfe\n").expect_err("binary config accepted");
    assert!(matches!(e, ConfigError::Read { .. }), "{e}");
    assert!(e.to_string().contains("node.toml"), "{e}");
}
