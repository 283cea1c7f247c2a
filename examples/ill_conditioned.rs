//! `cargo run --release --example ill_conditioned -- --help` lists the flags.

fn main() -> std::process::ExitCode {
    kron_examples::ill_conditioned::main()
}
