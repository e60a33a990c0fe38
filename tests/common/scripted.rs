//! Scripted protocol-level clients for policy tests: they "train" by sleeping, push random
//! sparse updates, follow directives, and report round times.

use std::time::Duration;

use sparsync::client::{Connection, Event};
use sparsync::protocol::message::{ClientMessage, RoundTime, SkipReport};
use sparsync::protocol::model::SplitMix64;
use sparsync::server::ServerHandle;
use tokio::time::Instant;

use super::{header, options, random_update};

/// How a scripted client behaves.
#[derive(Clone, Debug)]
pub struct Script {
    pub id: String,
    /// Seconds per local step (the client's speed).
    pub step_s: f64,
    /// Local steps per round when no directive says otherwise.
    pub steps: u64,
    /// Extra delay before each push (a slow uplink): part of the commit overhead.
    pub uplink_s: f64,
    /// Push nnz.
    pub nnz: usize,
    /// Stop starting rounds after this long.
    pub run_for: Duration,
    /// Hermes: every `skip_every`-th round sends a skip instead of a push (0: never).
    pub skip_every: u64,
    pub loss: f32,
    /// The reported loss is multiplied by this after every push (training progress).
    pub loss_decay: f32,
}

impl Script {
    pub fn new(id: &str, step_s: f64) -> Self {
        Self {
            id: id.into(),
            step_s,
            steps: 5,
            uplink_s: 0.0,
            nnz: 20,
            run_for: Duration::from_secs(3),
            skip_every: 0,
            loss: 1.0,
            loss_decay: 1.0,
        }
    }
}

/// What a scripted client saw.
#[derive(Clone, Debug, Default)]
pub struct Log {
    pub pushes: u64,
    pub acks: u64,
    pub rejects: u64,
    pub round_dropped: u64,
    pub directives: Vec<sparsync::protocol::message::Directive>,
}

/// Runs a scripted client against `h` until its time is up and its last push is answered.
pub async fn run(h: &ServerHandle, s: Script) -> Log {
    let mut c = Connection::connect(&options(h, &s.id)).await.expect("connect");
    let n = c.num_params();
    let mut rng = SplitMix64::new(s.id.bytes().fold(7u64, |a, b| a.wrapping_mul(31).wrapping_add(b as u64)));
    let mut log = Log::default();
    let start = Instant::now();
    let mut seq = 0u64;
    let mut round = 0u64;
    let mut overhead = 0.0;
    let mut loss = s.loss;
    while start.elapsed() < s.run_for {
        round += 1;
        // Local round: as many steps as the directive allows (ADSP: train for the commit
        // interval; Hermes: E·D/b steps), or the default.
        let d = &c.directive;
        let train_s = match (d.commit_interval_s, d.chunk_size, d.batch_size) {
            (Some(t), _, _) => t,
            (None, Some(chunk), Some(b)) => {
                d.local_epochs.unwrap_or(1) as f64 * chunk as f64 / b as f64 * s.step_s
            }
            _ => s.steps as f64 * s.step_s,
        };
        sleep_handling(&mut c, &mut log, train_s).await;
        if s.skip_every > 0 && round.is_multiple_of(s.skip_every) {
            let report = SkipReport { round, loss: loss as f64, round_seconds: Some(train_s) };
            c.send(&ClientMessage::Skip(report)).await.expect("skip");
            continue;
        }
        sleep_handling(&mut c, &mut log, s.uplink_s).await;
        let sent = Instant::now();
        seq += 1;
        let (idx, vals) = random_update(&mut rng, n, s.nnz, 0.01);
        let mut h = header(c.version(), seq, idx.len());
        h.loss = loss;
        loss *= s.loss_decay;
        c.push(&h, &idx, &vals).await.expect("push");
        log.pushes += 1;
        // Wait for the answer to this push, keeping the replica current meanwhile.
        loop {
            let e = c.next_event().await.expect("event");
            note(&mut log, &e);
            match e {
                Event::Ack(a) if a.seq == seq => break,
                Event::Reject(r) if r.seq == seq => break,
                _ => {}
            }
        }
        overhead = sent.elapsed().as_secs_f64() + s.uplink_s;
        let report = RoundTime { seconds: train_s, steps: s.steps, commit_overhead_s: Some(overhead) };
        c.send(&ClientMessage::RoundTime(report)).await.expect("round time");
    }
    let _ = overhead;
    c.close("script done").await;
    log
}

fn note(log: &mut Log, e: &Event) {
    match e {
        Event::Ack(_) => log.acks += 1,
        Event::Reject(_) => log.rejects += 1,
        Event::RoundDropped { .. } => log.round_dropped += 1,
        Event::Directive(d) => log.directives.push(d.clone()),
        _ => {}
    }
}

/// Sleeps `secs` while handling whatever the server sends.
async fn sleep_handling(c: &mut Connection, log: &mut Log, secs: f64) {
    let until = Instant::now() + Duration::from_secs_f64(secs.max(0.0));
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        if let Some(e) = c.next_event_within(left).await.expect("event") {
            note(log, &e);
        }
    }
}
