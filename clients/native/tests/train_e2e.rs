//! A server and three native clients (one four times slower) plus an evaluator train `mlp` on
//! the embedded Fashion-MNIST subset; the evaluator's accuracy rises well above chance.

use std::time::Duration;

use sparsync::config::{EngineChoice, ServerConfig};
use sparsync::protocol::message::Role;
use sparsync_client::emulate::Emulation;
use sparsync_client::run::{self, Config};

fn config(url: &str, id: &str, role: Role, shard: usize) -> Config {
    Config {
        role,
        shard: (shard, 3),
        seed: 11,
        max_rounds: Some(25),
        eval_every: 5,
        reconnect: false,
        ..Config::new(url, id, "mlp")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_and_an_evaluator_learn_fashion_mnist() {
    let cfg = ServerConfig {
        model: "mlp".into(),
        engine: EngineChoice::Cpu,
        learning_rate: 0.1,
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = sparsync::server::start(cfg, listener).await.unwrap();
    let url = format!("ws://{}/ws", h.addr);
    let data = sparsync::data::embedded();
    let mut trainers = Vec::new();
    for (i, slowdown) in [1.0, 1.0, 4.0].into_iter().enumerate() {
        let c = config(&url, &format!("trainer-{i}"), Role::Trainer, i);
        let emul = Emulation::new(slowdown, 0.0, 0.0, 0.0, i as u64);
        trainers.push(tokio::spawn(run::run(c, data.clone(), emul)));
    }
    let mut ev = config(&url, "evaluator", Role::Evaluator, 0);
    ev.max_rounds = None;
    ev.duration = Some(Duration::from_secs(120));
    let evaluator = tokio::spawn(run::run(ev, data.clone(), Emulation::none()));
    let mut rounds = Vec::new();
    for t in trainers {
        let s = t.await.unwrap().expect("trainer runs");
        assert_eq!(s.rejected, 0, "{s:?}");
        rounds.push(s.rounds);
    }
    assert_eq!(rounds, vec![25, 25, 25]);
    // Let the evaluator score the final replica, then stop everything.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = h.status();
    let best = status.evals.iter().map(|e| e.accuracy).fold(0.0, f64::max);
    let first = status.evals.first().map(|e| e.accuracy).unwrap_or(0.0);
    assert!(status.evals.len() >= 3, "the evaluator reported {} times", status.evals.len());
    // Chance is 10%; 75 pushes of 10 local steps reach well past 50% on this subset.
    assert!(best >= 0.5, "best accuracy {best:.3} (first {first:.3})");
    assert!(best > first + 0.2, "accuracy rose: {first:.3} → {best:.3}");
    h.shutdown("test done").await.unwrap();
    let ev = evaluator.await.unwrap().expect("evaluator runs");
    assert!(ev.evaluations >= 3);
}
