//! Every policy with real sessions on 127.0.0.1:0: four protocol-level clients of different
//! speeds train for a few seconds, and the policy's invariant is checked on the server's own
//! record of what happened.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use common::scripted::{self, Log, Script};
use common::*;
use sparsync::config::{PolicyKind, ServerConfig};
use sparsync::engine::OptimizerSettings;
use sparsync::engine::cpu::CpuAggregator;
use sparsync::policy::hermes::HermesSettings;
use sparsync::policy::staleness::WeightingKind;
use sparsync::server::record::Event;

/// The values a statistic of the population took since a step could have been formed. A
/// step's weights are fixed when it is formed; with two steps in flight (the default) that is
/// after the Aggregate event of the step two before it, and events recorded since (pushes
/// accepted while it ran) may already have changed the statistic.
struct SinceFormation<T>(std::collections::VecDeque<Vec<T>>);

impl<T: Clone> SinceFormation<T> {
    /// Windows for the first two steps, each starting with `first`.
    fn new(first: Vec<T>) -> Self {
        Self(vec![first; 2].into())
    }

    /// The statistic took the value `v`.
    fn saw(&mut self, v: T) {
        self.0.iter_mut().for_each(|w| w.push(v.clone()));
    }

    /// At an Aggregate event: the values its step may have been weighted with. A window for
    /// the step two after it starts with `restart`.
    fn aggregate(&mut self, restart: Vec<T>) -> Vec<T> {
        let possible = self.0.pop_front().unwrap_or_default();
        self.0.push_back(restart);
        possible
    }
}

const N: usize = 2000;

async fn run(cfg: ServerConfig, scripts: Vec<Script>) -> (Vec<Event>, Vec<Log>, HashMap<u64, String>) {
    let h = start(cfg, N, Box::new(CpuAggregator::new(init(N, 1), OptimizerSettings::default()))).await;
    let h = std::sync::Arc::new(h);
    let tasks: Vec<_> = scripts
        .into_iter()
        .map(|s| {
            let h = h.clone();
            tokio::spawn(async move { scripted::run(&h, s).await })
        })
        .collect();
    let mut logs = Vec::new();
    for t in tasks {
        logs.push(t.await.expect("client task"));
    }
    let (_, events) = h.record(0).await.unwrap();
    let names = events
        .iter()
        .filter_map(|e| match e {
            Event::Join { session, client_id, .. } => Some((*session, client_id.clone())),
            _ => None,
        })
        .collect();
    match std::sync::Arc::try_unwrap(h) {
        Ok(h) => {
            h.shutdown("test done").await.unwrap();
        }
        Err(_) => panic!("handle still shared"),
    }
    check_common(&events);
    (events, logs, names)
}

/// Every accepted push is answered exactly once (Ack or Drop) and aggregated at most once.
fn check_common(events: &[Event]) {
    let mut accepted = HashSet::new();
    let mut answered: HashMap<u64, u32> = HashMap::new();
    let mut aggregated: HashMap<u64, u32> = HashMap::new();
    for e in events {
        match e {
            Event::Accept { push, .. } => {
                accepted.insert(*push);
            }
            Event::Ack { push, .. } => *answered.entry(*push).or_default() += 1,
            Event::Aggregate { items, .. } => {
                for i in items {
                    assert!(accepted.contains(&i.push), "aggregated push {} was never accepted", i.push);
                    *aggregated.entry(i.push).or_default() += 1;
                }
            }
            _ => {}
        }
    }
    for p in &accepted {
        assert_eq!(answered.get(p), Some(&1), "push {p} answered {:?} times", answered.get(p));
    }
    assert!(aggregated.values().all(|&n| n == 1), "a push was aggregated twice");
    assert!(!accepted.is_empty(), "no push was accepted at all");
}

fn four(step_s: [f64; 4]) -> Vec<Script> {
    ["fast", "fast2", "slow", "slowest"].iter().zip(step_s).map(|(id, s)| Script::new(id, s)).collect()
}

fn cfg(policy: PolicyKind) -> ServerConfig {
    ServerConfig { policy, rho_down: 0.02, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bsp_rounds_take_one_push_per_member_and_never_pass_the_deadline() {
    let deadline = 0.6;
    let mut c = cfg(PolicyKind::Bsp);
    c.policies.bsp.bsp_deadline_s = deadline;
    // The slowest client needs 1.0 s a round: past the 0.6 s deadline every time.
    let (events, logs, _) = run(c, four([0.01, 0.01, 0.03, 0.2])).await;
    let mut last_close = None;
    let mut first_join = None;
    let mut dropped = 0;
    for e in &events {
        match e {
            Event::Join { t, .. } => {
                first_join.get_or_insert(*t);
            }
            Event::Aggregate { t, items, .. } => {
                let clients: HashSet<u64> = items.iter().map(|i| i.session).collect();
                assert_eq!(clients.len(), items.len(), "one push per client per round");
                let start = last_close.or(first_join).unwrap();
                assert!(
                    t - start <= deadline + 0.25,
                    "round closed {:.3} s after it began (deadline {deadline})",
                    t - start
                );
                last_close = Some(*t);
            }
            Event::RoundDropped { .. } => dropped += 1,
            _ => {}
        }
    }
    assert!(dropped > 0, "the slowest client should have missed deadlines");
    assert!(logs[3].round_dropped > 0, "and been told so");
    // Acks of a round's pushes come after its aggregation.
    let agg_time: HashMap<u64, f64> = events
        .iter()
        .flat_map(|e| match e {
            Event::Aggregate { t, items, .. } => items.iter().map(|i| (i.push, *t)).collect(),
            _ => vec![],
        })
        .collect();
    for e in &events {
        if let Event::Ack { t, push, .. } = e
            && let Some(at) = agg_time.get(push)
        {
            assert!(t >= at, "push {push} acknowledged before its round was aggregated");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asp_acknowledges_at_once_and_batches_what_queued() {
    let (events, logs, _) = run(cfg(PolicyKind::Asp), four([0.005, 0.005, 0.01, 0.02])).await;
    let accepted: HashMap<u64, f64> = events
        .iter()
        .filter_map(|e| match e {
            Event::Accept { t, push, .. } => Some((*push, *t)),
            _ => None,
        })
        .collect();
    for e in &events {
        if let Event::Ack { t, push, .. } = e {
            assert!(t - accepted[push] < 0.05, "ASP held an ack");
        }
    }
    let fast: u64 = logs[0].pushes;
    let slowest: u64 = logs[3].pushes;
    assert!(fast > 2 * slowest, "nobody waits: the fast client pushed {fast}, the slowest {slowest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssp_never_lets_a_client_run_more_than_b_ahead() {
    let b = 1;
    let mut c = cfg(PolicyKind::Ssp);
    c.policies.ssp.ssp_bound = b;
    let (events, logs, _) = run(c, four([0.005, 0.005, 0.02, 0.04])).await;
    let mut clocks: BTreeMap<u64, u64> = BTreeMap::new();
    let mut push_client: HashMap<u64, u64> = HashMap::new();
    let mut held = 0;
    for e in &events {
        match e {
            Event::Join { session: client, .. } => {
                let start = clocks.values().copied().min().unwrap_or(0);
                clocks.insert(*client, start);
            }
            Event::Leave { session: client, .. } => {
                clocks.remove(client);
            }
            Event::Accept { session: client, push, .. } => {
                *clocks.get_mut(client).unwrap() += 1;
                push_client.insert(*push, *client);
            }
            Event::Ack { session: client, .. } => {
                let min = clocks.values().copied().min().unwrap();
                let mine = clocks[client];
                assert!(
                    mine <= min + b,
                    "client {client} released at clock {mine} with the slowest at {min}"
                );
                if mine > min {
                    held += 1;
                }
            }
            _ => {}
        }
    }
    assert!(held > 0, "the bound was exercised");
    // The fast clients are held back to the slowest's pace (within b + 1 pushes).
    assert!(logs[0].pushes <= logs[3].pushes + b + 1, "fast {} slowest {}", logs[0].pushes, logs[3].pushes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedbuff_aggregates_exactly_every_k() {
    let k = 5;
    let mut c = cfg(PolicyKind::Fedbuff);
    c.policies.fedbuff.fedbuff_k = k;
    let (events, _, _) = run(c, four([0.005, 0.01, 0.02, 0.04])).await;
    let sizes: Vec<usize> = events
        .iter()
        .filter_map(|e| match e {
            Event::Aggregate { items, .. } => Some(items.len()),
            _ => None,
        })
        .collect();
    assert!(sizes.len() > 3, "aggregated {} times", sizes.len());
    assert!(sizes.iter().all(|&s| s == k), "batch sizes {sizes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adsp_commits_equally_per_period_and_weights_by_active_clients() {
    let period = 1.0;
    let mut c = ServerConfig { sample_weighting: false, ..cfg(PolicyKind::Adsp) };
    c.policies.adsp.adsp_period_s = Some(period);
    c.policies.adsp.adsp_min_interval_s = Some(0.05);
    // Uplinks from fast to very slow: the commit overheads differ by 20×.
    let mut scripts = four([0.005, 0.005, 0.005, 0.005]);
    for (s, up) in scripts.iter_mut().zip([0.01, 0.02, 0.1, 0.2]) {
        s.uplink_s = up;
        s.run_for = Duration::from_secs(6);
        s.loss_decay = 0.97;
    }
    let (events, _, _) = run(c, scripts).await;
    let origin =
        events.iter().find_map(|e| if let Event::Join { t, .. } = e { Some(*t) } else { None }).unwrap();
    let mut per_period: BTreeMap<u64, BTreeMap<u64, u64>> = BTreeMap::new();
    let mut clients = HashSet::new();
    let mut active = 0usize;
    // M is any count of active clients since the step could have been formed.
    let mut counts = SinceFormation::new(vec![0usize]);
    for e in &events {
        match e {
            Event::Join { .. } | Event::Leave { .. } => {
                active = if matches!(e, Event::Join { .. }) { active + 1 } else { active - 1 };
                counts.saw(active);
            }
            Event::Accept { t, session: client, .. } => {
                *per_period.entry(((t - origin) / period) as u64).or_default().entry(*client).or_default() +=
                    1;
                clients.insert(*client);
            }
            Event::Aggregate { items, .. } => {
                let possible = counts.aggregate(vec![active]);
                for i in items {
                    assert!(
                        possible.iter().any(|&m| (i.weight - 1.0 / m as f32).abs() < 1e-6),
                        "w = 1/M with M among {possible:?}, got {}",
                        i.weight
                    );
                }
            }
            _ => {}
        }
    }
    // Skip the first two periods (directives arriving, first search step) and the last.
    let full: Vec<_> = per_period.iter().filter(|(p, _)| **p >= 2 && **p < 5).collect();
    assert!(!full.is_empty());
    let most = full.iter().flat_map(|(_, c)| c.values().copied()).max().unwrap();
    assert!(most >= 3, "the search raised C (most commits in a period: {most}); per period {per_period:?}");
    for (p, commits) in full {
        let counts: Vec<u64> = clients.iter().map(|c| commits.get(c).copied().unwrap_or(0)).collect();
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(hi - lo <= 1, "period {p}: commits per client {counts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hermes_reallocates_the_slow_client_and_weights_by_inverse_loss() {
    let mut c =
        ServerConfig { weighting: WeightingKind::Loss, sample_weighting: false, ..cfg(PolicyKind::Hermes) };
    c.policies.hermes =
        HermesSettings { hermes_samples: 64, hermes_batch: 16, hermes_epochs: 1, hermes_tolerance_s: 0.005 };
    // 4 steps a round (64 / 16): 0.04 s for the fast ones, 0.16 s for the 4× slower one.
    let mut scripts = four([0.01, 0.01, 0.01, 0.04]);
    for (s, loss) in scripts.iter_mut().zip([1.0, 0.5, 2.0, 1.0]) {
        s.loss = loss;
        s.skip_every = 3;
        s.run_for = Duration::from_secs(3);
    }
    let (events, logs, names) = run(c, scripts).await;
    let slow_dir = logs[3].directives.iter().rfind(|d| d.chunk_size.is_some()).unwrap();
    let (d, b) = (slow_dir.chunk_size.unwrap(), slow_dir.batch_size.unwrap());
    let predicted = d as f64 / b as f64 * 0.04;
    assert!(d < 64, "the slow client got less work: D {d}, b {b}");
    assert!((predicted - 0.04).abs() <= 0.005 + 1e-9, "predicted round {predicted:.3} s, median 0.04 s");
    for l in &logs[..3] {
        assert!(
            l.directives.iter().filter(|d| d.chunk_size.is_some()).count() == 1,
            "fast clients keep their allocation"
        );
    }
    // w_i = (1/L_i) / Σ_j 1/L_j over the active clients' latest losses (pushes and skips; a
    // client without one yet counts as the mean of the others), replayed from the record. Σ is
    // one of the values it took since the step could have been formed.
    let mut latest: BTreeMap<u64, Option<f64>> = BTreeMap::new();
    let mut push_loss: HashMap<u64, f64> = HashMap::new();
    let total = |latest: &BTreeMap<u64, Option<f64>>| {
        let known: Vec<f64> = latest.values().flatten().map(|l| 1.0 / l).collect();
        let mean = if known.is_empty() { 1.0 } else { known.iter().sum::<f64>() / known.len() as f64 };
        known.iter().sum::<f64>() + mean * (latest.len() - known.len()) as f64
    };
    let mut totals = SinceFormation::new(Vec::new());
    let mut checked = 0;
    for e in &events {
        match e {
            Event::Join { session: client, role, .. }
                if *role == sparsync::protocol::message::Role::Trainer =>
            {
                latest.insert(*client, None);
            }
            Event::Leave { session: client, .. } => {
                latest.remove(client);
            }
            Event::Accept { session: client, push, loss, .. } => {
                latest.insert(*client, Some(*loss as f64));
                push_loss.insert(*push, *loss as f64);
            }
            Event::Skip { session: client, loss, .. } => {
                if let Some(l) = latest.get_mut(client) {
                    *l = Some(*loss);
                }
            }
            Event::Aggregate { items, .. } => {
                let possible = totals.aggregate(Vec::new());
                for i in items {
                    let l = push_loss[&i.push];
                    assert!(
                        possible.iter().any(|t| (i.weight as f64 - (1.0 / l / t).min(1.0)).abs() < 1e-5),
                        "weight {} of a push with loss {l}; Σ 1/L since its step could form: {possible:?}",
                        i.weight
                    );
                    checked += 1;
                }
            }
            _ => {}
        }
        totals.saw(total(&latest));
    }
    assert!(checked > 0);
    let _ = &names;
    assert!(events.iter().any(|e| matches!(e, Event::Skip { .. })), "skips reach the server");
}
