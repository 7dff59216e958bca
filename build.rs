//! Records the versions of the inference crates that Cargo.lock resolved,
//! so `model-info` and `bench` can say exactly which engine build ran.

fn main() {
    println!("cargo::rerun-if-changed=Cargo.lock");
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
