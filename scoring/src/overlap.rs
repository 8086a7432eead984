//! The stage on a thread of its own, one micro-batch behind the source.
//!
//! Why: run in turn, the source (poll, decode, validate) and the stage (windows,
//! forecasts, alerts) each left a core idle while the other worked. On a 20,000-battery
//! backlog the source loop spent 21 s reading and 33 s waiting on the stage, one after
//! the other. Overlapped, the source reads batch N+1 while the stage works on batch N.
//!
//! What keeps this exactly-once:
//! - At most one batch is in flight. `accept` first waits for the batch before, so the
//!   stage sees batches in order and the source never runs more than one batch ahead.
//! - Rebalances wait for the batch in flight. They run on the source's thread, inside a
//!   poll. The stage holds the partition set's gate ([`PartitionSet::batch_gate`]) for
//!   the whole of a batch: its windows, its decisions carried out, its checkpoint. A
//!   revoked partition is therefore saved after the batch's decisions went out, never
//!   between, as when the two ran in turn.
//! - No rebalance can come between handing a batch over and the stage taking the gate:
//!   the source waits for the stage to say it holds the gate before it polls again. A
//!   rebalance during the read of the next batch takes a revoked partition's rows out
//!   of that batch before it is handed over, as before.
//!
//! [`PartitionSet::batch_gate`]: crate::partition::PartitionSet::batch_gate

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use voltcast_ingest::{BatchSink, MicroBatch, SinkError, SourcePosition};

enum Job {
    Accept(MicroBatch),
    Checkpoint,
    Idle,
}

enum Reply {
    /// The stage holds the gate: rebalances now wait for this job.
    Started,
    Done(Result<Vec<SourcePosition>, SinkError>),
}

/// A [`BatchSink`] that runs `S` on its own thread, overlapped with the source.
pub struct Overlapped<S: BatchSink + 'static> {
    jobs: std::sync::mpsc::Sender<Job>,
    replies: UnboundedReceiver<Reply>,
    in_flight: bool,
    thread: JoinHandle<S>,
    /// Wall time the source spent waiting for the stage.
    waited: Duration,
}

impl<S: BatchSink + 'static> Overlapped<S> {
    /// Starts `sink`'s thread. `gate`: held by the thread for each job; whatever must
    /// not run while a batch is in flight (rebalance callbacks) locks it too.
    pub fn start(sink: S, gate: Arc<Mutex<()>>) -> std::io::Result<Self> {
        let (jobs, inbox) = std::sync::mpsc::channel();
        let (outbox, replies) = unbounded_channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("voltcast-stage".into())
            .spawn(move || work(sink, &runtime, &inbox, &outbox, &gate))?;
        Ok(Self {
            jobs,
            replies,
            in_flight: false,
            thread,
            waited: Duration::ZERO,
        })
    }

    /// Wall time the source spent waiting for the stage to finish a batch.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// Waits for the batch in flight and gives the sink back.
    pub async fn into_inner(mut self) -> Result<S, SinkError> {
        let last = self.finish_in_flight().await;
        let Self { jobs, thread, .. } = self;
        // Hung up: the thread ends its loop and hands the sink back.
        drop(jobs);
        let sink = voltcast_ingest::blocking::off_runtime(|| thread.join())
            .map_err(|_| SinkError::from("the stage thread panicked"))?;
        last.map(|_| sink)
    }

    /// The positions the batch in flight made durable, once it is done.
    async fn finish_in_flight(&mut self) -> Result<Vec<SourcePosition>, SinkError> {
        if !std::mem::take(&mut self.in_flight) {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let reply = self.replies.recv().await;
        self.waited += started.elapsed();
        match reply {
            Some(Reply::Done(result)) => result,
            _ => Err(stopped()),
        }
    }

    /// Hands `job` over; returns once the stage holds the gate.
    async fn begin(&mut self, job: Job) -> Result<(), SinkError> {
        self.jobs.send(job).map_err(|_| stopped())?;
        match self.replies.recv().await {
            Some(Reply::Started) => {
                self.in_flight = true;
                Ok(())
            }
            _ => Err(stopped()),
        }
    }

    /// Runs `job` to the end, after the batch in flight.
    async fn complete(&mut self, job: Job) -> Result<Vec<SourcePosition>, SinkError> {
        let mut durable = self.finish_in_flight().await?;
        self.begin(job).await?;
        durable.extend(self.finish_in_flight().await?);
        Ok(durable)
    }
}

impl<S: BatchSink + 'static> BatchSink for Overlapped<S> {
    /// Returns what the batch before made durable; this batch's positions come with
    /// the next call.
    async fn accept(&mut self, batch: MicroBatch) -> Result<Vec<SourcePosition>, SinkError> {
        let durable = self.finish_in_flight().await?;
        self.begin(Job::Accept(batch)).await?;
        Ok(durable)
    }

    async fn checkpoint(&mut self) -> Result<Vec<SourcePosition>, SinkError> {
        self.complete(Job::Checkpoint).await
    }

    async fn idle(&mut self) -> Result<Vec<SourcePosition>, SinkError> {
        self.complete(Job::Idle).await
    }
}

fn stopped() -> SinkError {
    SinkError::from("the stage thread stopped")
}

/// The stage thread: each job under the gate, until the source hangs up.
fn work<S: BatchSink>(
    mut sink: S,
    runtime: &tokio::runtime::Runtime,
    inbox: &std::sync::mpsc::Receiver<Job>,
    outbox: &UnboundedSender<Reply>,
    gate: &Mutex<()>,
) -> S {
    while let Ok(job) = inbox.recv() {
        let held = gate.lock().unwrap_or_else(|e| e.into_inner());
        if outbox.send(Reply::Started).is_err() {
            break;
        }
        let result = runtime.block_on(async {
            match job {
                Job::Accept(batch) => sink.accept(batch).await,
                Job::Checkpoint => sink.checkpoint().await,
                Job::Idle => sink.idle().await,
            }
        });
        drop(held);
        if outbox.send(Reply::Done(result)).is_err() {
            break;
        }
    }
    sink
}

#[cfg(test)]
mod tests {
    use voltcast_ingest::arrow::array::RecordBatch;
    use voltcast_ingest::schema;

    use super::*;

    /// Takes a batch only when the test lets it (one permit per batch), and records
    /// the order it saw them in.
    struct Gated {
        permits: std::sync::mpsc::Receiver<()>,
        seen: Arc<Mutex<Vec<i64>>>,
    }

    impl BatchSink for Gated {
        async fn accept(&mut self, batch: MicroBatch) -> Result<Vec<SourcePosition>, SinkError> {
            self.permits
                .recv()
                .map_err(|_| SinkError::from("no permit"))?;
            self.seen
                .lock()
                .unwrap()
                .push(batch.positions[0].first_offset);
            Ok(batch.positions)
        }
    }

    fn batch(offset: i64) -> MicroBatch {
        MicroBatch {
            rows: RecordBatch::new_empty(schema::telemetry_schema()),
            parts: Vec::new(),
            positions: vec![SourcePosition {
                source: Arc::from("t"),
                partition: 0,
                first_offset: offset,
                next_offset: offset + 1,
                max_event_time: None,
            }],
            dead_letters: 0,
            assigned: Vec::new(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_source_goes_on_while_the_stage_works_and_rebalances_wait_for_it() {
        let (permit, permits) = std::sync::mpsc::channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Mutex::new(()));
        let sink = Gated {
            permits,
            seen: seen.clone(),
        };
        let mut stage = Overlapped::start(sink, gate.clone()).unwrap();
        // The first batch is handed over and the call returns while the stage is
        // still on it (it has no permit yet): nothing is durable yet.
        assert!(stage.accept(batch(0)).await.unwrap().is_empty());
        assert!(
            seen.lock().unwrap().is_empty(),
            "batch 0 is still in the stage"
        );
        // A rebalance now would wait: the gate is held for the batch in flight.
        assert!(
            gate.try_lock().is_err(),
            "the gate is free while a batch is in flight"
        );
        permit.send(()).unwrap();
        permit.send(()).unwrap();
        // The second call returns batch 0's positions, once batch 0 is done.
        let durable = stage.accept(batch(1)).await.unwrap();
        assert_eq!(durable[0].first_offset, 0);
        let durable = stage.checkpoint().await.unwrap();
        assert_eq!(
            durable[0].first_offset, 1,
            "the checkpoint waits for batch 1"
        );
        assert!(
            gate.try_lock().is_ok(),
            "the gate is held with nothing in flight"
        );
        let sink = stage.into_inner().await.unwrap();
        assert_eq!(*sink.seen.lock().unwrap(), vec![0, 1]);
    }

    struct Failing;

    impl BatchSink for Failing {
        async fn accept(&mut self, _: MicroBatch) -> Result<Vec<SourcePosition>, SinkError> {
            Err(SinkError::from("disk full"))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_batch_fails_the_next_call() {
        let mut stage = Overlapped::start(Failing, Arc::new(Mutex::new(()))).unwrap();
        assert!(stage.accept(batch(0)).await.is_ok());
        let e = stage.checkpoint().await.unwrap_err();
        assert_eq!(e.to_string(), "disk full");
    }
}
