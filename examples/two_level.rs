//! `cargo run --release --example two_level -- --help` lists the flags.

fn main() -> std::process::ExitCode {
    kron_examples::two_level::main()
}
