//! KFAC and KFC training keep their bits: the parameters after 20 steps of each pinned run
//! hash to the value `benches/pinned/kfac_hashes.txt` holds for this CPU's GEMM kernel.

use kron::autodiff::kernel_name;
use kron_benches::pinned::{kernel_key, pinned_path, read_pinned, runs};

#[test]
fn kfac_and_kfc_training_keep_their_pinned_bits() {
    let pinned = read_pinned(&pinned_path()).expect("the pinned file reads");
    let kernel = kernel_key();
    if !pinned.keys().any(|(k, _)| k == kernel) {
        // Only kernels of CPUs kron is checked on are pinned; others have nothing to compare.
        eprintln!(
            "no pinned hashes for the {} kernel: nothing to compare (record them with \
             `cargo run --release -p kron-benches --example kfac_hash -- --record`)",
            kernel_name()
        );
        return;
    }
    let mut differ = Vec::new();
    for r in runs() {
        let hash = format!("{:016x}", r.hash().expect("a finite run"));
        let want = pinned
            .get(&(kernel.to_string(), r.label.to_string()))
            .unwrap_or_else(|| panic!("no pinned hash for {} on {kernel}", r.label));
        if &hash != want {
            differ.push(format!("{}: {hash}, pinned {want}", r.label));
        }
    }
    assert!(
        differ.is_empty(),
        "parameters after 20 steps differ from the pinned bits on the {} kernel:\n{}",
        kernel_name(),
        differ.join("\n")
    );
}
