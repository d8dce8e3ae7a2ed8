//! `idemq-bench` end to end with tiny counts against a real nats-server:
//! every pass runs and the counts add up. No timing is asserted: the
//! figures themselves depend on the machine.

// The workspace's nats-server fixture (one server per test), alone: the
// rest of tests/common/ drives the idemq binary.
#[path = "../../tests/common/server.rs"]
mod common;

use idemq_bench::{names, BenchError, BenchOptions, Mode, Report, Scenario};

const COUNT: usize = 200;
const COPIES: usize = 4;

fn scenario<'r>(report: &'r Report, name: &str) -> &'r Scenario {
    report
        .scenarios
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no scenario {name} in {:?}", report.scenarios))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pass_runs_and_the_counts_add_up() {
    let server = common::NatsServer::start();
    let options = BenchOptions {
        count: COUNT,
        concurrency: 16,
        copies: COPIES,
        rss_concurrency: 32,
        ..BenchOptions::default()
    };
    let mut progress_lines = 0;
    let report = idemq_bench::run(&idemq::nats::NatsArgs::new(server.url()), &options, |_| {
        progress_lines += 1
    })
    .await
    .expect("the bench runs");

    let all = [
        names::A_ECHO,
        names::B_CREATE_UPDATE,
        names::C_GET,
        names::D_NAIVE_FRESH,
        names::D_NAIVE_STORM,
        names::IDEMQ_FRESH,
        names::IDEMQ_REPLAYED,
        names::IDEMQ_STORM,
        names::IDEMQ_PACED,
        names::IDEMQ_SATURATED,
        names::B_PACED,
    ];
    assert!(report.skipped.is_empty(), "skipped: {:?}", report.skipped);
    assert_eq!(report.scenarios.len(), all.len());
    for name in all {
        let s = scenario(&report, name);
        assert_eq!(s.requests, s.ok, "{name}: every request answered: {s:?}");
        assert!(!s.truncated, "{name}");
        assert!(s.latency_ms.is_some(), "{name}");
        assert_eq!(s.curve.len(), 301, "{name}");
    }
    assert!(progress_lines > 0);

    // Nothing runs a handler in (a) and (c); (b) and (d) run it once per fresh key.
    assert_eq!(scenario(&report, names::A_ECHO).executions, None);
    assert_eq!(scenario(&report, names::C_GET).executions, None);
    for name in [names::B_CREATE_UPDATE, names::D_NAIVE_FRESH] {
        assert_eq!(
            scenario(&report, name).executions,
            Some(COUNT as u64),
            "{name}"
        );
    }

    // idemq: once per fresh key, never on replay, once per key in the storm.
    let fresh = scenario(&report, names::IDEMQ_FRESH);
    assert_eq!(
        (fresh.executions, fresh.duplicates),
        (Some(COUNT as u64), Some(0))
    );
    let replayed = scenario(&report, names::IDEMQ_REPLAYED);
    assert_eq!(
        (replayed.executions, replayed.duplicates),
        (Some(0), Some(0))
    );
    // The worker's cache holds every fresh outcome (and the warm-up's),
    // at a cost the report states per entry, beside the replies' size.
    let cache = replayed.cache.expect("the worker's cache read");
    assert!(cache.entries >= COUNT as u64, "{cache:?}");
    assert!(cache.per_entry().is_some_and(|bytes| bytes > 0.0));
    let reply = replayed.reply_bytes.expect("replies measured");
    assert!(reply > 0.0 && reply < 2.0 * report.settings.payload_bytes as f64 + 512.0);
    assert_eq!(
        scenario(&report, names::A_ECHO).cache.map(|c| c.entries),
        None
    );
    let storm = scenario(&report, names::IDEMQ_STORM);
    let storm_keys = (COUNT / COPIES) as u64;
    assert_eq!((storm.keys, storm.copies), (COUNT / COPIES, COPIES));
    assert_eq!(storm.requests, COUNT as u64);
    assert_eq!(
        (storm.executions, storm.duplicates),
        (Some(storm_keys), Some(0))
    );

    // The naive worker's duplicates are whatever it ran beyond one per key.
    let naive = scenario(&report, names::D_NAIVE_STORM);
    let executions = naive.executions.expect("counted");
    assert!(executions >= storm_keys);
    assert_eq!(naive.duplicates, Some(executions - storm_keys));

    // Ratios and targets are filled in; the storm's duplicates target holds.
    assert_eq!(fresh.ratios.len(), 2);
    assert_eq!(report.targets.len(), 9);
    let measured = |word: &str| {
        report
            .targets
            .iter()
            .find(|t| t.goal.contains(word))
            .and_then(|t| t.met)
    };
    assert!(measured("entry costs").is_some(), "{:?}", report.targets);
    assert!(measured("RSS").is_some(), "{:?}", report.targets);
    assert_eq!(
        report.settings.cache_budget_bytes,
        idemq::config::WorkerConfig::default().cache_bytes as u64
    );
    let zero_duplicates = report
        .targets
        .iter()
        .find(|t| t.goal.contains("duplicate"))
        .expect("a duplicates target");
    assert_eq!(zero_duplicates.met, Some(true));
    assert!(report.settings.paced_rate.is_some());

    // The three outputs: table, JSON, chart.
    let table = report.table();
    for name in all {
        assert!(table.contains(name), "{name} missing from\n{table}");
    }
    let json = serde_json::to_value(&report).expect("the report serialises");
    assert_eq!(json["scenarios"].as_array().map(Vec::len), Some(all.len()));
    let dir = tempfile::tempdir().expect("temp dir");
    let chart = dir.path().join("latency.svg");
    report.plot(&chart).expect("the chart is written");
    let svg = std::fs::read_to_string(&chart).expect("the chart is readable");
    assert!(svg.starts_with("<svg") && svg.contains(names::IDEMQ_STORM));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_mode_runs_every_pass_and_the_counts_add_up() {
    const JS_COUNT: usize = 300;
    let server = common::NatsServer::start();
    let options = BenchOptions {
        mode: Mode::JetStream,
        count: JS_COUNT,
        concurrency: 16,
        copies: COPIES,
        rss_concurrency: 32,
        ..BenchOptions::default()
    };
    let report = idemq_bench::run(&idemq::nats::NatsArgs::new(server.url()), &options, |_| {})
        .await
        .expect("the bench runs");

    let all = [
        names::E_PULL_ECHO,
        names::F_PULL_CREATE_UPDATE,
        names::IDEMQ_JS_FRESH,
        names::IDEMQ_JS_REPLAYED,
        names::IDEMQ_JS_STORM,
    ];
    assert!(report.skipped.is_empty(), "skipped: {:?}", report.skipped);
    let ran: Vec<&str> = report.scenarios.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(ran, all);
    for name in all {
        let s = scenario(&report, name);
        assert_eq!(
            (s.requests, s.ok),
            (JS_COUNT as u64, JS_COUNT as u64),
            "{name}: every intent answered: {s:?}"
        );
        assert!(!s.truncated && s.latency_ms.is_some(), "{name}");
    }

    // (e) runs no handler; (f) and idemq once per fresh key, never on replay.
    assert_eq!(scenario(&report, names::E_PULL_ECHO).executions, None);
    for name in [names::F_PULL_CREATE_UPDATE, names::IDEMQ_JS_FRESH] {
        let s = scenario(&report, name);
        assert_eq!(
            (s.executions, s.duplicates),
            (Some(JS_COUNT as u64), Some(0)),
            "{name}"
        );
    }
    let replayed = scenario(&report, names::IDEMQ_JS_REPLAYED);
    assert_eq!(
        (replayed.executions, replayed.duplicates),
        (Some(0), Some(0))
    );
    let storm = scenario(&report, names::IDEMQ_JS_STORM);
    assert_eq!((storm.keys, storm.copies), (JS_COUNT / COPIES, COPIES));
    assert_eq!(
        (storm.executions, storm.duplicates),
        (Some((JS_COUNT / COPIES) as u64), Some(0))
    );

    // The ratios, each against its baseline; the duplicates target holds.
    let against = |name| -> Vec<&str> {
        let s = scenario(&report, name);
        s.ratios.iter().map(|r| r.against).collect()
    };
    assert_eq!(
        against(names::IDEMQ_JS_FRESH),
        [names::F_PULL_CREATE_UPDATE]
    );
    assert_eq!(against(names::IDEMQ_JS_REPLAYED), [names::E_PULL_ECHO]);
    assert_eq!(against(names::IDEMQ_JS_STORM), [names::IDEMQ_JS_FRESH]);
    // Every target measured; the duplicates one is met (a debug build's
    // ratios say nothing).
    assert_eq!(report.targets.len(), 5);
    assert!(replayed.cache.is_some_and(|c| c.entries >= JS_COUNT as u64));
    assert!(report.targets.iter().all(|t| t.met.is_some()));
    let duplicates = report
        .targets
        .iter()
        .find(|t| t.goal.contains("duplicate"))
        .expect("the duplicates target");
    assert_eq!(duplicates.met, Some(true));

    let table = report.table();
    for name in all {
        assert!(table.contains(name), "{name} missing from\n{table}");
    }
    let json = serde_json::to_value(&report).expect("the report serialises");
    assert_eq!(json["settings"]["mode"], "jetstream");
    assert_eq!(json["scenarios"].as_array().map(Vec::len), Some(all.len()));
    assert_eq!(
        json["scenarios"][2]["ratios"][0]["against"],
        names::F_PULL_CREATE_UPDATE
    );
}

#[tokio::test]
async fn options_no_run_can_honour_are_refused() {
    let refused = |options: BenchOptions| matches!(options.validate(), Err(BenchError::Usage(_)));
    let base = BenchOptions::default();
    assert!(base.validate().is_ok());
    assert!(refused(BenchOptions {
        count: 0,
        ..base.clone()
    }));
    assert!(refused(BenchOptions {
        copies: 0,
        ..base.clone()
    }));
    assert!(refused(BenchOptions {
        copies: 65,
        ..base.clone()
    }));
    assert!(refused(BenchOptions {
        target: Some("intents.>".to_owned()),
        ..base.clone()
    }));
    // --target is core mode's.
    assert!(refused(BenchOptions {
        mode: Mode::JetStream,
        target: Some("intents.echo".to_owned()),
        ..base.clone()
    }));
    assert!(refused(BenchOptions {
        replicas: 0,
        ..base.clone()
    }));
    assert!(refused(BenchOptions {
        replicas: 6,
        ..base.clone()
    }));
    // Refused before anything connects.
    let result = idemq_bench::run(
        &idemq::nats::NatsArgs::new("nats://127.0.0.1:1"),
        &BenchOptions { count: 0, ..base },
        |_| {},
    )
    .await;
    assert!(matches!(result, Err(BenchError::Usage(_))));
}
