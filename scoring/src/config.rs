//! The effective configuration: defaults, then a TOML file, then `VOLTCAST_*` variables.
//!
//! Every stage owns its own config struct (`[kafka]`, `[batch]`, `[validation]`, ...);
//! this module only assembles them. Unknown keys are errors, not warnings: a typo in a
//! config file that silently falls back to a default is the hardest kind of bug to find
//! in production, so start-up stops with a message naming the key.
//!
//! Environment overrides use `__` between levels: `VOLTCAST_KAFKA__BROKERS=host:9092`,
//! `VOLTCAST_BATCH__MAX_ROWS=10000`. Values are read as TOML literals when they parse as
//! one (numbers, booleans, `["a","b"]`) and as strings otherwise. Under
//! `kafka.properties`, `_` stands for `.` (librdkafka names have dots, which shells do
//! not allow in variable names): `VOLTCAST_KAFKA__PROPERTIES__SASL_USERNAME`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use toml::Value;
use voltcast_ingest::simulate::SimulatorConfig;

use crate::alerts::{AlertConfig, WebhookConfig};
use crate::api::ApiConfig;
use crate::archive::ArchiveConfig;
use crate::checkpoint::CheckpointConfig;
use crate::windows::WindowConfig;
use voltcast_ingest::{
    BatchConfig, EventHubsConnection, FileSourceConfig, KafkaConfig, ValidationConfig,
};

/// Where telemetry comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    #[default]
    Kafka,
    File,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct VoltcastConfig {
    pub source: SourceKind,
    pub kafka: KafkaConfig,
    pub file: FileSourceConfig,
    pub batch: BatchConfig,
    pub validation: ValidationConfig,
    pub windows: WindowConfig,
    pub archive: ArchiveConfig,
    pub checkpoint: CheckpointConfig,
    pub forecast: voltcast_forecaster::SelectionConfig,
    pub risk: voltcast_forecaster::RiskConfig,
    pub simulator: SimulatorConfig,
    pub alerts: AlertConfig,
    pub webhook: WebhookConfig,
    pub api: ApiConfig,
    pub metrics: MetricsConfig,
}

/// `[metrics]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Batteries in the top at-risk gauge (the only per-battery label).
    pub top_k: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { top_k: 10 }
    }
}

/// A configuration problem, naming the key and where its value came from.
#[derive(Debug, Error)]
#[error("config key `{key}`{origin}: {message}")]
pub struct ConfigError {
    pub key: String,
    /// " (from VOLTCAST_X)" or " (in path.toml)" or empty.
    pub origin: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            origin: String::new(),
            message: message.into(),
        }
    }
}

const ENV_PREFIX: &str = "VOLTCAST_";

/// The signing secret docker-compose.yml falls back to when `VOLTCAST_WEBHOOK_SECRET` is
/// unset: public, so a webhook signed with it proves nothing. Start-up refuses it.
pub const COMPOSE_PLACEHOLDER_SECRET: &str = "change-me-in-production";

impl VoltcastConfig {
    /// Loads from an optional file and the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Loads from an optional file and the given variables (tests pass their own).
    pub fn load_from(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut tree = match file {
            Some(path) => read_file(path)?,
            None => Value::Table(Default::default()),
        };
        let file_origin = file
            .map(|p| format!(" (in {})", p.display()))
            .unwrap_or_default();
        let mut origins: BTreeMap<String, String> = BTreeMap::new();
        for (name, raw) in vars {
            let Some(path) = env_key_path(&name) else {
                continue;
            };
            origins.insert(path.join("."), format!(" (from {name})"));
            set_path(&mut tree, &path, parse_env_value(&path, &raw)).map_err(|message| {
                ConfigError {
                    key: path.join("."),
                    origin: format!(" (from {name})"),
                    message,
                }
            })?;
        }
        let config: Self = serde_path_to_error::deserialize(tree).map_err(|e| {
            let key = e.path().to_string();
            let origin = origins
                .iter()
                .find(|(k, _)| key == **k || key.starts_with(&format!("{k}.")))
                .map(|(_, o)| o.clone())
                .unwrap_or_else(|| file_origin.clone());
            ConfigError {
                key,
                origin,
                message: e
                    .into_inner()
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or("")
                    .into(),
            }
        })?;
        config.check().map_err(|mut e| {
            e.origin = origins.get(&e.key).cloned().unwrap_or(file_origin);
            e
        })?;
        Ok(config)
    }

    /// Rules the types cannot express.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.batch.max_rows == 0 {
            return Err(ConfigError::new("batch.max_rows", "must be at least 1"));
        }
        if self.batch.max_wait_ms == 0 {
            return Err(ConfigError::new("batch.max_wait_ms", "must be at least 1"));
        }
        let v = &self.validation;
        for (key, ok) in [
            ("validation.max_message_bytes", v.max_message_bytes > 0),
            ("validation.max_id_len", v.max_id_len > 0),
            (
                "validation.max_cycles_per_report",
                v.max_cycles_per_report > 0.0,
            ),
            (
                "validation.max_minutes_per_report",
                v.max_minutes_per_report > 0.0,
            ),
            ("validation.max_rated_cycles", v.max_rated_cycles > 0.0),
            ("validation.max_future_hours", v.max_future_hours >= 0),
        ] {
            if !ok {
                return Err(ConfigError::new(key, "must be positive"));
            }
        }
        let w = &self.windows;
        if w.allowed_lateness_hours < 0 {
            return Err(ConfigError::new(
                "windows.allowed_lateness_hours",
                "must not be negative",
            ));
        }
        if w.idle_partition_seconds <= 0 {
            return Err(ConfigError::new(
                "windows.idle_partition_seconds",
                "must be positive",
            ));
        }
        if w.shards > 256 {
            return Err(ConfigError::new(
                "windows.shards",
                "must be at most 256 (0: one per core)",
            ));
        }
        if w.retention_days < 30 {
            return Err(ConfigError::new(
                "windows.retention_days",
                "must be at least 30 (the forecast horizon)",
            ));
        }
        if let Some(cs) = &self.kafka.event_hubs_connection_string {
            EventHubsConnection::parse(cs).map_err(|e| {
                ConfigError::new("kafka.event_hubs_connection_string", e.to_string())
            })?;
        }
        match self.source {
            SourceKind::Kafka => {
                self.kafka
                    .effective_topics()
                    .map_err(|_| ConfigError::new("kafka.topics", "name at least one topic"))?;
                if self.kafka.event_hubs_connection_string.is_none()
                    && self.kafka.brokers.trim().is_empty()
                {
                    return Err(ConfigError::new("kafka.brokers", "is empty"));
                }
            }
            SourceKind::File => {
                if self.file.path.as_os_str().is_empty() {
                    return Err(ConfigError::new(
                        "file.path",
                        "is required when source = \"file\"",
                    ));
                }
                if !self.file.path.exists() {
                    return Err(ConfigError::new(
                        "file.path",
                        format!("{} does not exist", self.file.path.display()),
                    ));
                }
            }
        }
        self.check_alerts()?;
        self.simulator
            .validate()
            .map_err(|e| ConfigError::new(format!("simulator.{}", e.key), e.problem))?;
        Ok(())
    }

    fn check_alerts(&self) -> Result<(), ConfigError> {
        let a = &self.alerts;
        let p = |x: f64| (0.0..=1.0).contains(&x);
        if !p(a.raise_probability) || a.raise_probability == 0.0 {
            return Err(ConfigError::new(
                "alerts.raise_probability",
                "must be in (0, 1]",
            ));
        }
        if !p(a.clear_probability) || a.clear_probability >= a.raise_probability {
            return Err(ConfigError::new(
                "alerts.clear_probability",
                "must be in [0, alerts.raise_probability)",
            ));
        }
        if a.topic.trim().is_empty() {
            return Err(ConfigError::new("alerts.topic", "is empty"));
        }
        let w = &self.webhook;
        if w.enabled() {
            let t = w.url_template.trim();
            if !(t.starts_with("http://") || t.starts_with("https://")) {
                return Err(ConfigError::new(
                    "webhook.url_template",
                    format!("must start with http:// or https://, got {t:?}"),
                ));
            }
            if w.secret.is_empty() {
                return Err(ConfigError::new(
                    "webhook.secret",
                    "is required when webhook.url_template is set (set VOLTCAST_WEBHOOK__SECRET)",
                ));
            }
            if w.secret == COMPOSE_PLACEHOLDER_SECRET {
                return Err(ConfigError::new(
                    "webhook.secret",
                    "is docker-compose.yml's placeholder, which anyone can read: set VOLTCAST_WEBHOOK_SECRET to one of your own (e.g. `openssl rand -hex 32`)",
                ));
            }
            for (key, v) in [
                ("webhook.timeout_ms", w.timeout_ms),
                ("webhook.initial_backoff_ms", w.initial_backoff_ms),
                ("webhook.concurrency", w.concurrency as u64),
            ] {
                if v == 0 {
                    return Err(ConfigError::new(key, "must be at least 1"));
                }
            }
            if w.max_backoff_ms < w.initial_backoff_ms {
                return Err(ConfigError::new(
                    "webhook.max_backoff_ms",
                    "must be at least webhook.initial_backoff_ms",
                ));
            }
        }
        let listen = self.api.listen.trim();
        if !listen.is_empty() && listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::new(
                "api.listen",
                format!("expected host:port such as 127.0.0.1:8088, got {listen:?}"),
            ));
        }
        if self.metrics.top_k > 1000 {
            return Err(ConfigError::new(
                "metrics.top_k",
                "at most 1000: each is a labelled series",
            ));
        }
        Ok(())
    }

    /// The effective configuration as TOML, secrets masked.
    pub fn to_masked_toml(&self) -> String {
        let mut tree = Value::try_from(self).expect("config serializes");
        mask_secrets(&mut tree);
        toml::to_string_pretty(&tree).expect("config serializes")
    }
}

fn read_file(path: &Path) -> Result<Value, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
    })?;
    toml::from_str::<toml::Table>(&text)
        .map(Value::Table)
        .map_err(|e| {
            let message = e.message().to_string();
            let line = e.span().map(|s| text[..s.start].lines().count().max(1));
            ConfigError {
                key: "(syntax)".into(),
                origin: format!(
                    " (in {}{})",
                    path.display(),
                    line.map(|l| format!(", line {l}")).unwrap_or_default()
                ),
                message,
            }
        })
}

/// `VOLTCAST_KAFKA__PROPERTIES__SASL_USERNAME` -> `["kafka", "properties", "sasl.username"]`.
fn env_key_path(name: &str) -> Option<Vec<String>> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    if !rest.contains("__") {
        return None; // VOLTCAST_CONFIG, VOLTCAST_LOG: not config keys
    }
    let mut path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
    if path.len() == 3 && path[0] == "kafka" && path[1] == "properties" {
        path[2] = path[2].replace('_', ".");
    }
    Some(path)
}

fn parse_env_value(path: &[String], raw: &str) -> Value {
    let is_property = path.len() == 3 && path[1] == "properties";
    let literal = || {
        toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()?
            .remove("v")
    };
    match is_property {
        false => literal().unwrap_or_else(|| Value::String(raw.to_string())),
        true => Value::String(raw.to_string()),
    }
}

fn set_path(tree: &mut Value, path: &[String], value: Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut node = tree;
    for p in parents {
        let table = node
            .as_table_mut()
            .ok_or_else(|| format!("`{p}` is not a table"))?;
        node = table
            .entry(p.clone())
            .or_insert_with(|| Value::Table(Default::default()));
    }
    let table = node
        .as_table_mut()
        .ok_or_else(|| format!("cannot set `{last}` inside a value"))?;
    table.insert(last.clone(), value);
    Ok(())
}

fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "connection_string",
        "sasl.username",
    ]
    .iter()
    .any(|s| k.contains(s))
        || k.ends_with(".key")
        || k.ends_with(".pem")
}

fn mask_secrets(v: &mut Value) {
    if let Value::Table(t) = v {
        for (k, v) in t.iter_mut() {
            if is_secret_key(k) && !v.is_table() {
                *v = Value::String("********".into());
            } else {
                mask_secrets(v);
            }
        }
    }
}

/// The default path of the config file when `--config` is not given.
pub fn default_config_path() -> Option<PathBuf> {
    let p = PathBuf::from("voltcast.toml");
    p.exists().then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn file_then_environment_override_defaults() {
        let f = write(
            "[kafka]\nbrokers = \"kafka:9092\"\ngroup_id = \"from-file\"\n[batch]\nmax_rows = 10\n",
        );
        let c = VoltcastConfig::load_from(
            Some(f.path()),
            vars(&[
                ("VOLTCAST_KAFKA__GROUP_ID", "from-env"),
                ("VOLTCAST_BATCH__MAX_WAIT_MS", "250"),
                ("VOLTCAST_KAFKA__PROPERTIES__SASL_USERNAME", "alice"),
                ("VOLTCAST_KAFKA__TOPICS", "[\"a\", \"b\"]"),
                ("VOLTCAST_LOG", "debug"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.kafka.brokers, "kafka:9092");
        assert_eq!(c.kafka.group_id, "from-env");
        assert_eq!(c.batch.max_rows, 10);
        assert_eq!(c.batch.max_wait_ms, 250);
        assert_eq!(c.kafka.topics, vec!["a", "b"]);
        assert_eq!(c.kafka.properties["sasl.username"], "alice");
        assert_eq!(c.validation, ValidationConfig::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let f = write("[kafka]\nbrokrs = \"x\"\n");
        let e = VoltcastConfig::load_from(Some(f.path()), vars(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("kafka.brokrs") && e.contains("unknown field"),
            "{e}"
        );

        let e = VoltcastConfig::load_from(None, vars(&[("VOLTCAST_BATCH__MAX_ROWS", "lots")]))
            .unwrap_err();
        assert_eq!(e.key, "batch.max_rows");
        assert!(e.to_string().contains("VOLTCAST_BATCH__MAX_ROWS"), "{e}");

        let e = VoltcastConfig::load_from(None, vars(&[("VOLTCAST_WINDOWS__SHARDS", "5000")]))
            .unwrap_err();
        assert_eq!(e.key, "windows.shards");

        let e = VoltcastConfig::load_from(None, vars(&[("VOLTCAST_BATCH__MAX_ROWS", "0")]))
            .unwrap_err();
        assert_eq!(e.key, "batch.max_rows");

        let e = VoltcastConfig::load_from(
            None,
            vars(&[(
                "VOLTCAST_KAFKA__EVENT_HUBS_CONNECTION_STRING",
                "Endpoint=nope",
            )]),
        )
        .unwrap_err();
        assert_eq!(e.key, "kafka.event_hubs_connection_string");

        let f = write("source = \"file\"\n[file]\npath = \"/definitely/not/here\"\n");
        let e = VoltcastConfig::load_from(Some(f.path()), vars(&[])).unwrap_err();
        assert_eq!(e.key, "file.path");

        let f = write("[kafka\n");
        let e = VoltcastConfig::load_from(Some(f.path()), vars(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn check_output_masks_secrets() {
        let cs = "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=SUPERSECRET;EntityPath=t";
        let c = VoltcastConfig::load_from(
            None,
            vars(&[
                ("VOLTCAST_KAFKA__EVENT_HUBS_CONNECTION_STRING", cs),
                ("VOLTCAST_KAFKA__PROPERTIES__SASL_PASSWORD", "hunter2"),
            ]),
        )
        .unwrap();
        let shown = c.to_masked_toml();
        assert!(
            !shown.contains("SUPERSECRET") && !shown.contains("hunter2"),
            "{shown}"
        );
        assert!(shown.contains("********"));
        assert!(shown.contains("max_rows"));
    }
}
