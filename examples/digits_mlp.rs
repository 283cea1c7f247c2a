//! `cargo run --release --example digits_mlp -- --help` lists the flags.

fn main() -> std::process::ExitCode {
    kron_examples::example::main(&kron_examples::digits_mlp::EXAMPLE)
}
