//! The Kafka (and Azure Event Hubs) source.
//!
//! At-least-once by construction: `enable.auto.commit=false`, and a batch's offsets are
//! committed only after its dead letters are delivered and the next stage has accepted it.
//! A crash in between re-delivers the batch; the streaming job counts exact duplicates
//! once, so re-delivery does not double count.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use rdkafka::{ClientContext, Statistics};
use serde::{Deserialize, Serialize};

use crate::batcher::{BatchConfig, BatchSink, MicroBatcher, hand_on};
use crate::counters::IngestCounters;
use crate::dead_letter::{DeadLetterQueue, Origin};
use crate::error::IngestError;
use crate::validate::ValidationConfig;

/// `[kafka]` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`; ignored when an Event Hubs connection string is given.
    pub brokers: String,
    /// Telemetry topics to consume.
    pub topics: Vec<String>,
    pub group_id: String,
    /// Refused records go here, with headers naming the reason.
    pub dead_letter_topic: String,
    /// An Azure Event Hubs connection string: bootstrap server, SASL and (from
    /// `EntityPath`) the topic are derived from it.
    pub event_hubs_connection_string: Option<String>,
    /// Any librdkafka property, applied last (so it overrides what voltcast derives).
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "localhost:9092".into(),
            topics: vec!["battery-telemetry".into()],
            group_id: "voltcast".into(),
            dead_letter_topic: "battery-telemetry-dlq".into(),
            event_hubs_connection_string: None,
            properties: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// Applies the user's properties to `cfg` (after what voltcast derived, so they
    /// win), except those in `skip`: the other kind of client's, which librdkafka would
    /// ignore with a warning at each start.
    fn apply_properties(&self, cfg: &mut ClientConfig, skip: &[&str]) {
        for (k, v) in &self.properties {
            if !skip.contains(&k.as_str()) {
                cfg.set(k, v);
            }
        }
    }

    /// Connection properties shared by the consumer and the producers, and every user
    /// property (for clients of either kind: admin, probes).
    pub fn connection(&self) -> Result<ClientConfig, IngestError> {
        let mut cfg = self.connection_only()?;
        self.apply_properties(&mut cfg, &[]);
        Ok(cfg)
    }

    fn connection_only(&self) -> Result<ClientConfig, IngestError> {
        let mut cfg = ClientConfig::new();
        match &self.event_hubs_connection_string {
            Some(cs) => {
                for (k, v) in EventHubsConnection::parse(cs)?.librdkafka_properties() {
                    cfg.set(k, v);
                }
            }
            None => {
                cfg.set("bootstrap.servers", &self.brokers);
            }
        }
        Ok(cfg)
    }

    /// The topics to consume: the configured ones, or the Event Hub named by `EntityPath`.
    pub fn effective_topics(&self) -> Result<Vec<String>, IngestError> {
        let from_hub = match &self.event_hubs_connection_string {
            Some(cs) => EventHubsConnection::parse(cs)?.entity_path,
            None => None,
        };
        let topics = match from_hub {
            Some(hub) => vec![hub],
            None => self.topics.clone(),
        };
        if topics.is_empty() || topics.iter().any(|t| t.trim().is_empty()) {
            return Err(IngestError::Config(
                "kafka.topics: name at least one topic".into(),
            ));
        }
        Ok(topics)
    }

    pub fn consumer_config(&self) -> Result<ClientConfig, IngestError> {
        let mut cfg = self.connection_only()?;
        // Derived defaults first, then user overrides win.
        cfg.set("group.id", &self.group_id)
            .set("enable.auto.commit", "false")
            // A rebalance moves only the partitions that change owner: the others keep
            // their state in memory and go on (KIP-429).
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            // Consumer lag for the metrics comes from librdkafka's statistics.
            .set("statistics.interval.ms", "5000")
            // On a backlog the prefetch queue (64 MB) is always over its threshold, and
            // each time librdkafka postponed the next fetch by the default 1 s: the
            // pipeline drained the queue in a fraction of that and then sat idle, reading
            // 115k messages/s on a core that could decode a million.
            .set("fetch.queue.backoff.ms", "10")
            // Prefetch: librdkafka fetches again only while its queue holds less than
            // this. At 16 MB (about one micro-batch) the queue was over it after a single
            // fetch response, so the next fetch left only once the source had drained
            // it: with the stage beside the source, the source then sat idle 9.5 s of
            // 32 on a 20,000-battery backlog, waiting for fetches. 64 MB (librdkafka's
            // default) keeps a fetch in flight while the source decodes.
            .set("queued.max.messages.kbytes", "65536")
            // ...and while it holds fewer messages than this (librdkafka: 100,000).
            // Why lower: the count is of messages, but memory goes by their batches,
            // decompressed whole and freed only when their last message is; with zstd
            // (7x) and many partitions a 100,000-message queue held 96 MB of
            // decompressed batches beside the messages. 10,000 x 730 through a mock
            // broker, 140 partitions: 226 MB in use at the peak -> 114 MB (a file
            // replay: 100 MB); 100,000 x 730, 1,400 partitions: see the README.
            .set("queued.min.messages", "20000");
        self.apply_properties(&mut cfg, PRODUCER_ONLY);
        // Our commit protocol depends on this one: refuse to let it be overridden.
        cfg.set("enable.auto.commit", "false");
        Ok(cfg)
    }

    pub fn producer_config(&self) -> Result<ClientConfig, IngestError> {
        let mut cfg = self.connection_only()?;
        self.apply_properties(&mut cfg, CONSUMER_ONLY);
        cfg.set("acks", "all").set("enable.idempotence", "true");
        Ok(cfg)
    }

    pub fn dead_letter_producer(&self) -> Result<FutureProducer, IngestError> {
        self.producer_config()?
            .create()
            .map_err(IngestError::kafka("creating the dead-letter producer"))
    }
}

/// librdkafka's consumer-only properties (scope "C" in its CONFIGURATION.md): one
/// `kafka.properties` section serves the consumer and the producers, and a producer given
/// these logs a CONFWARN at every start.
const CONSUMER_ONLY: &[&str] = &[
    "group.id",
    "group.instance.id",
    "partition.assignment.strategy",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "group.protocol",
    "group.protocol.type",
    "group.remote.assignor",
    "coordinator.query.interval.ms",
    "max.poll.interval.ms",
    "enable.auto.commit",
    "auto.commit.interval.ms",
    "enable.auto.offset.store",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "fetch.wait.max.ms",
    "fetch.queue.backoff.ms",
    "fetch.message.max.bytes",
    "max.partition.fetch.bytes",
    "fetch.max.bytes",
    "fetch.min.bytes",
    "fetch.error.backoff.ms",
    "isolation.level",
    "enable.partition.eof",
    "check.crcs",
    "auto.offset.reset",
];

/// librdkafka's producer-only properties (scope "P"), kept from the consumer likewise.
const PRODUCER_ONLY: &[&str] = &[
    "transactional.id",
    "transaction.timeout.ms",
    "enable.idempotence",
    "enable.gapless.guarantee",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.ms",
    "linger.ms",
    "message.send.max.retries",
    "retries",
    "retry.backoff.ms",
    "queue.buffering.backpressure.threshold",
    "compression.codec",
    "compression.type",
    "compression.level",
    "batch.num.messages",
    "batch.size",
    "delivery.report.only.error",
    "sticky.partitioning.linger.ms",
    "request.required.acks",
    "acks",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "partitioner",
];

/// The parts of an Azure Event Hubs connection string that the Kafka endpoint needs.
#[derive(Debug, Clone, PartialEq)]
pub struct EventHubsConnection {
    /// `NAMESPACE.servicebus.windows.net`
    pub host: String,
    pub entity_path: Option<String>,
    raw: String,
}

impl EventHubsConnection {
    pub fn parse(s: &str) -> Result<Self, IngestError> {
        let bad = |m: &str| IngestError::EventHubs(m.to_string());
        let mut parts = HashMap::new();
        for part in s.trim().split(';').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(&format!("segment {:?} is not Key=Value", redact(part))))?;
            parts.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
        let endpoint = parts
            .get("endpoint")
            .ok_or_else(|| bad("Endpoint is missing"))?;
        let host = endpoint
            .strip_prefix("sb://")
            .ok_or_else(|| bad("Endpoint must start with sb://"))?
            .trim_end_matches('/');
        if host.is_empty() || host.contains('/') {
            return Err(bad(
                "Endpoint must be sb://NAMESPACE.servicebus.windows.net/",
            ));
        }
        let has_key =
            parts.contains_key("sharedaccesskeyname") && parts.contains_key("sharedaccesskey");
        if !has_key && !parts.contains_key("sharedaccesssignature") {
            return Err(bad(
                "SharedAccessKeyName and SharedAccessKey (or SharedAccessSignature) are missing",
            ));
        }
        let entity_path = parts.get("entitypath").filter(|p| !p.is_empty()).cloned();
        Ok(Self {
            host: host.to_string(),
            entity_path,
            raw: s.trim().to_string(),
        })
    }

    /// What librdkafka needs to talk to the Event Hubs Kafka endpoint.
    pub fn librdkafka_properties(&self) -> Vec<(&'static str, String)> {
        vec![
            ("bootstrap.servers", format!("{}:9093", self.host)),
            ("security.protocol", "SASL_SSL".into()),
            ("sasl.mechanism", "PLAIN".into()),
            ("sasl.username", "$ConnectionString".into()),
            ("sasl.password", self.raw.clone()),
        ]
    }
}

fn redact(segment: &str) -> String {
    segment.chars().take(12).collect::<String>() + "..."
}

/// Whoever owns the state of the partitions this consumer reads: told when the group
/// gives partitions to this consumer and when it takes them away.
///
/// The calls come from inside the consumer's poll, on the thread that drives the source,
/// while no batch is being worked on. They may block (load or write a checkpoint), but
/// must not wait on a task of the async runtime the source runs on.
pub trait PartitionListener: Send + Sync {
    /// `partitions` are now this consumer's; returns, for each, the offset to start
    /// from (`None`: the group's committed offset).
    fn assigned(&self, partitions: &[crate::batcher::PartitionId]) -> Vec<Option<i64>>;
    /// `partitions` go to another consumer: save what they need and let them go.
    fn revoked(&self, partitions: &[crate::batcher::PartitionId]);
    /// `partitions` were lost (this consumer was thrown out of the group): someone else
    /// may own them already, so nothing may be written for them.
    fn lost(&self, partitions: &[crate::batcher::PartitionId]);
}

/// The consumer's context: hands librdkafka's statistics (consumer lag) to the counters,
/// and rebalances to the [`PartitionListener`].
pub struct SourceContext {
    counters: Arc<IngestCounters>,
    listener: OnceLock<Arc<dyn PartitionListener>>,
    /// What the rebalances since the source last looked changed, for its open batch.
    changes: Mutex<Vec<AssignmentChange>>,
    changed: AtomicBool,
}

/// A rebalance, as the source's open batch needs to know it.
#[derive(Debug, Clone)]
enum AssignmentChange {
    Assigned(crate::batcher::PartitionId, Option<i64>),
    Gone(crate::batcher::PartitionId),
}

impl ClientContext for SourceContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // -1 is librdkafka's internal "unassigned" partition; lag -1 is unknown.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    self.counters.set_lag(topic, *partition, p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    /// Before librdkafka applies an assignment: the listener loads each partition's
    /// state, and the offsets it names go on the list librdkafka then assigns (the
    /// documented way to keep offsets outside Kafka). Before a revoke: the listener
    /// saves and drops the partitions, unless they were lost.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let ids = |list: &TopicPartitionList| -> Vec<crate::batcher::PartitionId> {
            list.elements()
                .iter()
                .map(|e| (Arc::from(e.topic()), e.partition()))
                .collect()
        };
        let mut changes = Vec::new();
        match rebalance {
            Rebalance::Assign(list) => {
                let partitions = ids(list);
                tracing::info!(partitions = ?names(&partitions), "partitions assigned");
                let offsets = match self.listener.get() {
                    Some(l) => l.assigned(&partitions),
                    None => vec![None; partitions.len()],
                };
                for (mut element, offset) in list.elements().into_iter().zip(&offsets) {
                    if let Some(o) = offset
                        && let Err(e) = element.set_offset(Offset::Offset(*o))
                    {
                        tracing::error!(error = %e, "setting a partition's start offset");
                    }
                }
                changes.extend(
                    partitions
                        .into_iter()
                        .zip(offsets)
                        .map(|(p, o)| AssignmentChange::Assigned(p, o)),
                );
            }
            Rebalance::Revoke(list) => {
                let partitions = ids(list);
                let lost = consumer.assignment_lost();
                tracing::info!(partitions = ?names(&partitions), lost, "partitions revoked");
                if let Some(l) = self.listener.get() {
                    if lost {
                        l.lost(&partitions);
                    } else {
                        l.revoked(&partitions);
                    }
                }
                changes.extend(partitions.into_iter().map(AssignmentChange::Gone));
            }
            Rebalance::Error(e) => tracing::error!(error = %e, "rebalance failed"),
        }
        self.changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(changes);
        self.changed.store(true, Ordering::Release);
    }
}

fn names(partitions: &[crate::batcher::PartitionId]) -> Vec<String> {
    partitions.iter().map(|(t, p)| format!("{t}/{p}")).collect()
}

impl SourceContext {
    /// Applies the rebalances since the last call to the open batch: a revoked
    /// partition's rows leave it, an assigned one skips what its checkpoint covers.
    fn settle(&self, batcher: &mut MicroBatcher) {
        // Called per message: a plain load, and the swap only after a rebalance.
        if !self.changed.load(Ordering::Relaxed) || !self.changed.swap(false, Ordering::Acquire) {
            return;
        }
        let changes = std::mem::take(&mut *self.changes.lock().unwrap_or_else(|e| e.into_inner()));
        for change in changes {
            match change {
                AssignmentChange::Assigned(p, offset) => batcher.resume_at(p, offset),
                AssignmentChange::Gone(p) => {
                    batcher.forget(std::slice::from_ref(&p));
                    batcher.resume_at(p, None);
                }
            }
        }
    }
}

/// Consumes telemetry topics into micro-batches.
pub struct KafkaSource {
    consumer: StreamConsumer<SourceContext>,
    batcher: MicroBatcher,
    dlq: DeadLetterQueue,
    topic_names: TopicNames,
}

impl KafkaSource {
    /// Subscribes to the configured topics; dead letters go to the configured topic.
    pub fn new(
        kafka: &KafkaConfig,
        batch: BatchConfig,
        rules: ValidationConfig,
        counters: Arc<IngestCounters>,
    ) -> Result<Self, IngestError> {
        let dlq = DeadLetterQueue::kafka(
            kafka.dead_letter_producer()?,
            kafka.dead_letter_topic.clone(),
        );
        Self::with_dead_letters(kafka, batch, rules, counters, dlq)
    }

    pub fn with_dead_letters(
        kafka: &KafkaConfig,
        batch: BatchConfig,
        rules: ValidationConfig,
        counters: Arc<IngestCounters>,
        dlq: DeadLetterQueue,
    ) -> Result<Self, IngestError> {
        let context = SourceContext {
            counters: counters.clone(),
            listener: OnceLock::new(),
            changes: Mutex::new(Vec::new()),
            changed: AtomicBool::new(false),
        };
        let consumer: StreamConsumer<SourceContext> = kafka
            .consumer_config()?
            .create_with_context(context)
            .map_err(IngestError::kafka("creating the consumer"))?;
        let topics = kafka.effective_topics()?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .map_err(IngestError::kafka(format!("subscribing to {topics:?}")))?;
        Ok(Self {
            consumer,
            batcher: MicroBatcher::new(batch, rules, counters),
            dlq,
            topic_names: TopicNames::default(),
        })
    }

    /// Tells `listener` about every rebalance, from the first assignment on.
    pub fn with_partition_listener(self, listener: Arc<dyn PartitionListener>) -> Self {
        if self.consumer.context().listener.set(listener).is_err() {
            tracing::warn!("the source already has a partition listener");
        }
        self
    }

    /// Skips what a checkpoint already covers (see [`MicroBatcher::resume_from`]).
    pub fn resume_from(mut self, positions: &[crate::SourcePosition]) -> Self {
        self.batcher.resume_from(positions);
        self
    }

    /// Runs until `shutdown` completes or a stage fails. On shutdown the open batch is
    /// handed on and committed first.
    ///
    /// Why the loop looks like this: on a backlog librdkafka has thousands of messages
    /// ready, so after the first message of a round the rest are drained as they are
    /// (one poll each, no timer, no `select!`), until the batch is full or nothing is
    /// ready. Only an idle consumer waits, and then on the batch's deadline.
    pub async fn run<S: BatchSink>(
        self,
        sink: &mut S,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), IngestError> {
        let Self {
            consumer,
            mut batcher,
            mut dlq,
            mut topic_names,
        } = self;
        let mut stream = consumer.stream();
        let counters = consumer.context().counters.clone();
        tokio::pin!(shutdown);
        let idle_wait = Duration::from_millis(200);
        loop {
            let wait = batcher.time_left().unwrap_or(idle_wait);
            // A ready message returns at once, so the time spent here is the idle time.
            let polled = Instant::now();
            let first = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                received = tokio::time::timeout(wait, stream.next()) => received.ok().flatten(),
            };
            counters.record_idle(polled.elapsed());
            consumer.context().settle(&mut batcher);
            if let Some(first) = first {
                let now = crate::now_millis();
                let mut next = Some(first);
                let mut drained = 0u32;
                while let Some(received) = next.take() {
                    match received {
                        Ok(msg) => {
                            let origin = Origin {
                                source: topic_names.name(msg.topic()),
                                partition: msg.partition(),
                                offset: msg.offset(),
                            };
                            let payload = msg.payload().unwrap_or_default();
                            batcher.push_json(payload, &origin, now, &mut dlq)?;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "kafka consumer error; retrying");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            break;
                        }
                    }
                    drained = drained.wrapping_add(1);
                    // A flood of refused messages never fills a batch: keep its deadline.
                    if batcher.is_full() || (drained.is_multiple_of(1024) && batcher.is_due()) {
                        break;
                    }
                    next = stream.next().now_or_never().flatten();
                    // A poll may have run a rebalance: a revoked partition's rows must
                    // not reach the stage that just saved and dropped its state.
                    consumer.context().settle(&mut batcher);
                }
            }
            if batcher.is_full() || batcher.is_due() {
                flush(&consumer, &mut topic_names, &mut batcher, &mut dlq, sink).await?;
                // A backlog keeps every poll ready: let the runtime's other tasks in.
                tokio::task::yield_now().await;
            } else if batcher.is_empty() {
                let durable = sink.idle().await.map_err(IngestError::Sink)?;
                commit(&consumer, &durable, CommitMode::Async);
            }
        }
        flush(&consumer, &mut topic_names, &mut batcher, &mut dlq, sink).await?;
        // A clean stop saves every partition's state and commits where it got to.
        let durable = sink.checkpoint().await.map_err(IngestError::Sink)?;
        commit(&consumer, &durable, CommitMode::Sync);
        Ok(())
    }
}

/// One shared name per topic, not an allocation per message; the batcher tells
/// partitions apart by these pointers first.
#[derive(Default)]
struct TopicNames {
    names: HashMap<String, Arc<str>>,
    /// The topic of the previous message: messages come in runs of one partition.
    last: Option<Arc<str>>,
}

impl TopicNames {
    fn name(&mut self, topic: &str) -> Arc<str> {
        if let Some(last) = &self.last
            && **last == *topic
        {
            return last.clone();
        }
        let name = match self.names.get(topic) {
            Some(name) => name.clone(),
            None => {
                let name: Arc<str> = Arc::from(topic);
                self.names.insert(topic.to_string(), name.clone());
                name
            }
        };
        self.last = Some(name.clone());
        name
    }
}

/// The partitions `consumer` reads now, as batch partition ids.
fn assigned(
    consumer: &StreamConsumer<SourceContext>,
    names: &mut TopicNames,
) -> Vec<crate::batcher::PartitionId> {
    let Ok(list) = consumer.assignment() else {
        return Vec::new();
    };
    list.elements()
        .iter()
        .map(|e| (names.name(e.topic()), e.partition()))
        .collect()
}

/// Hands the open batch on and commits what the sink made durable.
async fn flush<S: BatchSink>(
    consumer: &StreamConsumer<SourceContext>,
    names: &mut TopicNames,
    batcher: &mut MicroBatcher,
    dlq: &mut DeadLetterQueue,
    sink: &mut S,
) -> Result<(), IngestError> {
    consumer.context().settle(batcher);
    if batcher.is_empty() {
        return Ok(());
    }
    let Some(batch) = batcher.take_assigned(assigned(consumer, names)) else {
        return Ok(());
    };
    let durable = hand_on(batch, dlq, sink).await?;
    commit(consumer, &durable, CommitMode::Async);
    Ok(())
}

/// Commits what the sink made durable, for the partitions still assigned. Advisory: the
/// stage's checkpoints say where a partition resumes, so the committed offset only
/// serves lag monitoring and a first start. A failure is logged, and the next
/// checkpoint's commit covers it.
fn commit(
    consumer: &StreamConsumer<SourceContext>,
    durable: &[crate::SourcePosition],
    mode: CommitMode,
) {
    if durable.is_empty() {
        return;
    }
    let assigned = consumer.assignment().unwrap_or_default();
    let mut offsets = TopicPartitionList::new();
    for p in durable {
        if assigned.find_partition(&p.source, p.partition).is_none() {
            continue;
        }
        if let Err(e) =
            offsets.add_partition_offset(&p.source, p.partition, Offset::Offset(p.next_offset))
        {
            tracing::warn!(error = %e, "building the offset list");
        }
    }
    if offsets.count() == 0 {
        return;
    }
    // A synchronous commit waits on the broker.
    let committed = match mode {
        CommitMode::Sync => crate::blocking::off_runtime(|| consumer.commit(&offsets, mode)),
        CommitMode::Async => consumer.commit(&offsets, mode),
    };
    if let Err(e) = committed {
        tracing::warn!(error = %e, "committing offsets (advisory; the next checkpoint retries)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: &str = "Endpoint=sb://fleet-ns.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=abc+def/ghi=;EntityPath=battery-telemetry";

    #[test]
    fn event_hubs_connection_string_becomes_librdkafka_properties() {
        let conn = EventHubsConnection::parse(CS).unwrap();
        assert_eq!(conn.host, "fleet-ns.servicebus.windows.net");
        assert_eq!(conn.entity_path.as_deref(), Some("battery-telemetry"));
        let props: HashMap<_, _> = conn.librdkafka_properties().into_iter().collect();
        assert_eq!(
            props["bootstrap.servers"],
            "fleet-ns.servicebus.windows.net:9093"
        );
        assert_eq!(props["security.protocol"], "SASL_SSL");
        assert_eq!(props["sasl.mechanism"], "PLAIN");
        assert_eq!(props["sasl.username"], "$ConnectionString");
        assert_eq!(props["sasl.password"], CS);

        let cfg = KafkaConfig {
            event_hubs_connection_string: Some(CS.into()),
            topics: vec![],
            ..Default::default()
        };
        assert_eq!(
            cfg.effective_topics().unwrap(),
            vec!["battery-telemetry".to_string()]
        );
        let consumer = cfg.consumer_config().unwrap();
        assert_eq!(
            consumer.get("bootstrap.servers"),
            Some("fleet-ns.servicebus.windows.net:9093")
        );
        assert_eq!(consumer.get("enable.auto.commit"), Some("false"));
        // SASL_SSL needs librdkafka built with SSL: creating a client proves it is.
        let _: rdkafka::producer::BaseProducer = cfg.producer_config().unwrap().create().unwrap();
    }

    #[test]
    fn bad_connection_strings_are_refused_with_a_reason() {
        for (cs, expect) in [
            ("", "Endpoint is missing"),
            (
                "Endpoint=http://x/;SharedAccessKeyName=a;SharedAccessKey=b",
                "sb://",
            ),
            ("Endpoint=sb://x.servicebus.windows.net/", "SharedAccessKey"),
            (
                "Endpoint=sb://x.servicebus.windows.net/;garbage",
                "Key=Value",
            ),
            (
                "Endpoint=sb:///;SharedAccessKeyName=a;SharedAccessKey=b",
                "NAMESPACE",
            ),
        ] {
            let err = EventHubsConnection::parse(cs).unwrap_err().to_string();
            assert!(err.contains(expect), "{cs:?} gave {err:?}");
            assert!(!err.contains("SharedAccessKey=b"), "secret leaked: {err}");
        }
    }

    #[test]
    fn each_client_gets_the_properties_of_its_kind() {
        let mut cfg = KafkaConfig::default();
        for (k, v) in [
            ("session.timeout.ms", "6000"),
            ("linger.ms", "5"),
            ("socket.timeout.ms", "9000"),
        ] {
            cfg.properties.insert(k.into(), v.into());
        }
        let consumer = cfg.consumer_config().unwrap();
        let producer = cfg.producer_config().unwrap();
        assert_eq!(consumer.get("session.timeout.ms"), Some("6000"));
        assert_eq!(consumer.get("linger.ms"), None);
        assert_eq!(producer.get("linger.ms"), Some("5"));
        assert_eq!(producer.get("session.timeout.ms"), None);
        for shared in [&consumer, &producer] {
            assert_eq!(shared.get("socket.timeout.ms"), Some("9000"));
        }
    }

    #[test]
    fn user_properties_override_but_not_auto_commit() {
        let mut cfg = KafkaConfig::default();
        cfg.properties
            .insert("auto.offset.reset".into(), "latest".into());
        cfg.properties
            .insert("enable.auto.commit".into(), "true".into());
        let c = cfg.consumer_config().unwrap();
        assert_eq!(c.get("queued.min.messages"), Some("20000"), "the default");
        cfg.properties
            .insert("queued.min.messages".into(), "100000".into());
        let c = cfg.consumer_config().unwrap();
        assert_eq!(c.get("queued.min.messages"), Some("100000"));
        assert_eq!(c.get("auto.offset.reset"), Some("latest"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
    }
}
