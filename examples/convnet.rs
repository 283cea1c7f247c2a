//! `cargo run --release --example convnet -- --help` lists the flags.

fn main() -> std::process::ExitCode {
    kron_examples::example::main(&kron_examples::convnet::EXAMPLE)
}
