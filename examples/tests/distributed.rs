//! `--distributed`: the autoencoder and the conv net trained data-parallel (on ranks that are
//! threads of this process) report what one process reports, rank 0 alone printing (a build
//! without a transport refusing the flag is in `bad_input.rs`).

use kron_examples::data_parallel::on_threads;
use kron_examples::example::{Config, Example, Summary, run_example, run_example_on};

fn config(optimizer: &str) -> Config {
    let args = ["--fast", "--quiet", "--optimizer", optimizer];
    Config::from_args(args.iter().map(|s| s.to_string())).unwrap()
}

/// Every rank's summary of a `--distributed` run on `ranks` thread ranks.
fn on_ranks(ex: &'static Example, cfg: Config, ranks: usize) -> Vec<Summary> {
    let cfg = Config {
        distributed: true,
        ..cfg
    };
    on_threads(ranks, move |dp| run_example_on(ex, &cfg, Some(dp)).unwrap())
}

fn losses(s: &Summary) -> Vec<f32> {
    s.curves
        .points
        .iter()
        .flat_map(|p| [p.train_loss, p.test_loss])
        .collect()
}

#[test]
fn distributed_runs_report_what_one_process_reports() {
    for (ex, optimizer) in [
        (&kron_examples::autoencoder::EXAMPLE, "kfac"),
        (&kron_examples::convnet::EXAMPLE, "kfac"),
        (&kron_examples::convnet::EXAMPLE, "adam"),
    ] {
        let one = run_example(ex, &config(optimizer)).unwrap();
        let two = on_ranks(ex, config(optimizer), 2);
        for (a, b) in losses(&one).iter().zip(losses(&two[0])) {
            assert!(
                ((a - b) / a).abs() < 1e-4,
                "{} {optimizer}: one process {a}, 2 ranks {b}",
                ex.name
            );
        }
        assert_eq!(losses(&two[0]), losses(&two[1]), "the ranks agree");
        let note = two[0]
            .notes
            .iter()
            .find(|n| n.starts_with("data-parallel on 2 ranks"));
        assert!(note.is_some(), "{:?}", two[0].notes);
    }
}
