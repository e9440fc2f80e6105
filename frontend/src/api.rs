//! The typed fetch helper: every API call goes through here and returns `Result`, with the
//! server's `ApiError` message on failure.

use serde::de::DeserializeOwned;
use shared::ApiError;

pub async fn get<T: DeserializeOwned>(url: &str) -> Result<T, String> {
    let resp = gloo_net::http::Request::get(url).send().await.map_err(|e| format!("network error: {e}"))?;
    if resp.ok() {
        return resp.json::<T>().await.map_err(|e| format!("unexpected response: {e}"));
    }
    match resp.json::<ApiError>().await {
        Ok(e) => Err(e.message),
        Err(_) => Err(format!("HTTP {}", resp.status())),
    }
}
