//! `cargo run --release --example autoencoder -- --help` lists the flags.

fn main() -> std::process::ExitCode {
    kron_examples::example::main(&kron_examples::autoencoder::EXAMPLE)
}
