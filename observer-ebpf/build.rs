//! Rebuild the programs when bpf-linker changes: cargo cannot see the linker otherwise.
fn main() {
    if let Ok(bpf_linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
