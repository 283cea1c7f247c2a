//! The autoencoder example trained data-parallel over MPI: `mpirun -np N autoencoder --distributed
//! [flags]` takes the flags of `cargo run --example autoencoder` (`--help` lists them).

fn main() -> std::process::ExitCode {
    kron_mpi::example_main(&kron_examples::autoencoder::EXAMPLE)
}
