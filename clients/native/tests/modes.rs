//! Every client mode against the policy it is made for: two trainers of different speeds finish
//! their rounds, their pushes are accepted, and the server's record shows the mode's shape.

use std::time::Duration;

use sparsync::config::{EngineChoice, PolicyKind, ServerConfig};
use sparsync::server::record::Event;
use sparsync_client::emulate::Emulation;
use sparsync_client::run::{self, Config, Mode, Summary};

fn config(url: &str, id: &str, mode: Mode, shard: usize, rounds: u64) -> Config {
    Config {
        mode,
        shard: (shard, 2),
        seed: 3,
        local_steps: Some(4),
        batch_size: Some(16),
        learning_rate: Some(0.05),
        max_rounds: Some(rounds),
        duration: Some(Duration::from_secs(60)),
        reconnect: false,
        ..Config::new(url, id, "logreg")
    }
}

async fn run_two(cfg: ServerConfig, mode: Mode, rounds: u64) -> (Vec<Summary>, Vec<Event>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = sparsync::server::start(
        ServerConfig { model: "logreg".into(), engine: EngineChoice::Cpu, ..cfg },
        listener,
    )
    .await
    .unwrap();
    let url = format!("ws://{}/ws", h.addr);
    let data = sparsync::data::embedded();
    let tasks: Vec<_> = [1.0, 3.0]
        .into_iter()
        .enumerate()
        .map(|(i, slow)| {
            let c = config(&url, &format!("c{i}"), mode, i, rounds);
            tokio::spawn(run::run(c, data.clone(), Emulation::new(slow, 0.0, 0.0, 0.0, i as u64)))
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap().expect("client runs"));
    }
    let (_, events) = h.record(0).await.unwrap();
    h.shutdown("done").await.unwrap();
    (out, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_mode_on_asp() {
    let (s, _) = run_two(ServerConfig { policy: PolicyKind::Asp, ..Default::default() }, Mode::Auto, 8).await;
    for c in &s {
        assert_eq!((c.rounds, c.pushes, c.acked, c.rejected), (8, 8, 8, 0), "{c:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbsync_pipelines_over_bsp() {
    let mut cfg = ServerConfig { policy: PolicyKind::Bsp, ..Default::default() };
    cfg.policies.bsp.bsp_deadline_s = 5.0;
    let (s, events) = run_two(cfg, Mode::Nbsync, 6).await;
    for c in &s {
        assert!(c.pushes >= 6 && c.rejected == 0, "{c:?}");
    }
    // Deltas land one round late: every push but a client's first (made on the model it joined
    // with) is aggregated with staleness ≥ 1.
    let stale: Vec<u64> = events
        .iter()
        .filter_map(|e| if let Event::Aggregate { items, .. } = e { Some(items.clone()) } else { None })
        .flatten()
        .filter(|i| i.seq > 1)
        .map(|i| i.staleness)
        .collect();
    assert!(!stale.is_empty() && stale.iter().all(|&s| s >= 1), "staleness {stale:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adsp_mode_commits_on_the_server_interval() {
    let mut cfg = ServerConfig { policy: PolicyKind::Adsp, ..Default::default() };
    cfg.policies.adsp.adsp_period_s = Some(1.0);
    cfg.policies.adsp.adsp_min_interval_s = Some(0.05);
    let (s, events) = run_two(cfg, Mode::Auto, 10).await;
    for c in &s {
        assert_eq!((c.pushes, c.rejected), (10, 0), "{c:?}");
    }
    assert!(
        events.iter().any(
            |e| matches!(e, Event::Directive { directive, .. } if directive.commit_interval_s.is_some())
        )
    );
}

/// With Γ and T_min unset, the server derives them from the clients' round times and then
/// tells each client its commit interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adsp_derives_its_timescale_from_round_times() {
    let cfg = ServerConfig { policy: PolicyKind::Adsp, ..Default::default() };
    let adsp = &cfg.policies.adsp;
    assert_eq!((adsp.adsp_period_s, adsp.adsp_min_interval_s), (None, None), "unset by default");
    let (s, events) = run_two(cfg, Mode::Auto, 8).await;
    for c in &s {
        assert_eq!((c.pushes, c.rejected), (8, 0), "{c:?}");
    }
    let derived: Vec<f64> = events
        .iter()
        .filter_map(|e| match e {
            Event::Directive { directive, .. }
                if directive.reason.as_deref().is_some_and(|r| r.contains("derived from round times")) =>
            {
                directive.commit_interval_s
            }
            _ => None,
        })
        .collect();
    assert!(derived.len() >= 2, "both clients were told a derived interval: {events:?}");
    assert!(derived.iter().all(|t| *t > 0.0 && t.is_finite()), "{derived:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hermes_mode_gates_pushes() {
    let mut cfg = ServerConfig { policy: PolicyKind::Hermes, ..Default::default() };
    let hermes = &mut cfg.policies.hermes;
    (hermes.hermes_samples, hermes.hermes_batch, hermes.hermes_epochs) = (64, 16, 1);
    let (s, events) = run_two(cfg, Mode::Auto, 12).await;
    for c in &s {
        assert_eq!(c.rounds, 12, "{c:?}");
        assert_eq!(c.pushes + c.skipped, 12, "every round pushes or skips: {c:?}");
        assert!(c.pushes >= 1, "{c:?}");
    }
    assert!(events.iter().any(|e| matches!(e, Event::Skip { .. })) || s.iter().all(|c| c.skipped == 0));
}
