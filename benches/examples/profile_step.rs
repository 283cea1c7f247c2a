//! Runs forward+backward steps of one benchmark model in a loop, for a profiler:
//!
//! ```text
//! cargo build --release -p kron-benches --example profile_step
//! perf record -g target/release/examples/profile_step convnet 10
//! ```
//!
//! Arguments: the model (`autoencoder` or `convnet`, default `convnet`) and the number of
//! steps (default 10). Prints the mean step time.

use kron_benches::{Workload, time};

fn main() {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| "convnet".into());
    let steps: usize = args.next().map_or(10, |s| s.parse().expect("a step count"));
    let w = match model.as_str() {
        "autoencoder" => Workload::autoencoder(1000, 3),
        "convnet" => Workload::convnet(128, 3),
        other => panic!("unknown model {other} (expected autoencoder or convnet)"),
    };
    std::hint::black_box(w.forward_backward());
    let (d, ()) = time(|| {
        for _ in 0..steps {
            std::hint::black_box(w.forward_backward());
        }
    });
    println!(
        "{}: {:.1} ms per forward+backward step ({steps} steps)",
        w.name,
        d.as_secs_f64() * 1e3 / steps as f64
    );
}
