//! Records the versions of the inference crates that Cargo.lock resolved,
//! so `model-info` and `bench` can say exactly which engine build ran, and a
//! hash of the engine's sources, so that a cached INT8 check verdict is not
//! reused by a build whose rewrites or kernels changed under the same version.

fn main() {
    println!("cargo::rerun-if-changed=Cargo.lock");
    // A directory: Cargo reruns this script when any file under it changes.
    println!("cargo::rerun-if-changed=src/engine");
    println!(
        "cargo::rustc-env=LABELCAST_ENGINE_SOURCE={:016x}",
        engine_source_hash(std::path::Path::new("src/engine"))
    );
    let lock = std::fs::read_to_string("Cargo.lock").unwrap_or_default();
    for (package, variable) in [("tract-onnx", "LABELCAST_TRACT_VERSION"), ("ort", "LABELCAST_ORT_CRATE_VERSION")] {
        let version = locked_version(&lock, package).unwrap_or_else(|| "unknown".to_string());
        println!("cargo::rustc-env={variable}={version}");
    }
}

fn locked_version(lock: &str, package: &str) -> Option<String> {
    let marker = format!("name = \"{package}\"\nversion = \"");
    let start = lock.find(&marker)? + marker.len();
    let end = lock[start..].find('"')? + start;
    Some(lock[start..end].to_string())
}

/// FNV-1a (64-bit) over every Rust file under `dir` (not an editor's swap
/// files), paths and contents, in sorted order: stable across Rust
/// versions, unlike `DefaultHasher`.
fn engine_source_hash(dir: &std::path::Path) -> u64 {
    fn files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                files(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut paths = Vec::new();
    files(dir, &mut paths);
    paths.sort();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for path in paths.iter().filter(|p| p.extension().is_some_and(|e| e == "rs")) {
        let name = path.to_string_lossy();
        let bytes = std::fs::read(path).unwrap_or_default();
        // Each file as its name, its length and its bytes, so that no two
        // different trees hash the same stream.
        let lengths = [name.len() as u64, bytes.len() as u64].map(u64::to_le_bytes);
        for byte in name.as_bytes().iter().chain(lengths.iter().flatten()).chain(&bytes) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}
