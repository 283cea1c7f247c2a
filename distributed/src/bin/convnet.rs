//! The convnet example trained data-parallel over MPI: `mpirun -np N convnet --distributed
//! [flags]` takes the flags of `cargo run --example convnet` (`--help` lists them).

fn main() -> std::process::ExitCode {
    kron_mpi::example_main(&kron_examples::convnet::EXAMPLE)
}
