//! The typed fetch helpers: every API call goes through here and returns `Result`, with the
//! server's `ApiError` message on failure.

use gloo_net::http::{Request, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use shared::ApiError;

async fn decode<T: DeserializeOwned>(resp: Response) -> Result<T, String> {
    if resp.ok() {
        return resp.json::<T>().await.map_err(|e| format!("unexpected response: {e}"));
    }
    Err(error_of(resp).await)
}

async fn error_of(resp: Response) -> String {
    let status = resp.status();
    match resp.json::<ApiError>().await {
        Ok(e) if status == 429 || status == 503 => format!("{} (the server is busy; try again in a moment)", e.message),
        Ok(e) => e.message,
        Err(_) => format!("HTTP {status}"),
    }
}

fn network(e: gloo_net::Error) -> String {
    format!("network error: {e}")
}

pub async fn get<T: DeserializeOwned>(url: &str) -> Result<T, String> {
    decode(Request::get(url).send().await.map_err(network)?).await
}

/// Most retries of a request that waits for a neuron map's build (with the server's 2 s
/// Retry-After: about 10 minutes).
const MAX_BUILD_WAITS: usize = 300;

/// GET `url`, waiting while the server builds the neuron map the answer needs (503 with code
/// `map_building`): `on_progress` gets the server's message and percent before each retry.
pub async fn get_waiting<T: DeserializeOwned>(url: &str, on_progress: impl Fn(Option<(String, u8)>)) -> Result<T, String> {
    waiting(|| Request::get(url).send(), on_progress).await
}

/// POST `body` to `url`, waiting like [`get_waiting`] while the neuron maps it needs are built.
pub async fn post_waiting<B: Serialize, T: DeserializeOwned>(url: &str, body: &B, on_progress: impl Fn(Option<(String, u8)>)) -> Result<T, String> {
    waiting(|| async move { Request::post(url).json(body)?.send().await }, on_progress).await
}

/// Send a request (`send` makes it afresh for each try), retrying while the server answers 503
/// `map_building`; any other answer is decoded.
async fn waiting<T, F>(send: impl Fn() -> F, on_progress: impl Fn(Option<(String, u8)>)) -> Result<T, String>
where
    T: DeserializeOwned,
    F: std::future::Future<Output = Result<Response, gloo_net::Error>>,
{
    for _ in 0..MAX_BUILD_WAITS {
        let resp = send().await.map_err(network)?;
        if resp.status() == 503 {
            let retry = resp.headers().get("retry-after").and_then(|s| s.parse::<u32>().ok()).unwrap_or(2);
            if let Ok(e) = resp.json::<ApiError>().await {
                if e.code == "map_building" {
                    on_progress(Some((e.message, e.progress.unwrap_or(0))));
                    sleep_ms(retry.clamp(1, 10) * 1000).await;
                    continue;
                }
                on_progress(None);
                return Err(format!("{} (the server is busy; try again in a moment)", e.message));
            }
        }
        on_progress(None);
        return decode(resp).await;
    }
    on_progress(None);
    Err("the neuron map is taking too long to build; reload to try again".into())
}

/// Wait `ms` milliseconds (a browser timer).
async fn sleep_ms(ms: u32) {
    let promise = js_sys::Promise::new(&mut |resolve, _| {
        if let Some(w) = web_sys::window() {
            let _ = w.set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, ms as i32);
        }
    });
    let _ = wasm_bindgen_futures::JsFuture::from(promise).await;
}

pub async fn post<B: Serialize, T: DeserializeOwned>(url: &str, body: &B) -> Result<T, String> {
    decode(Request::post(url).json(body).map_err(network)?.send().await.map_err(network)?).await
}

/// POST `body` and read the answer as Server-Sent Events, calling `on_event` for each one as it
/// arrives. `abort` cancels the request (and so the generation on the server).
pub async fn post_sse<B: Serialize>(
    url: &str,
    body: &B,
    abort: &web_sys::AbortSignal,
    mut on_event: impl FnMut(crate::sse::Event),
) -> Result<(), String> {
    use wasm_bindgen::JsCast;
    use wasm_bindgen_futures::JsFuture;
    let resp = Request::post(url).abort_signal(Some(abort)).json(body).map_err(network)?.send().await.map_err(network)?;
    if !resp.ok() {
        return Err(error_of(resp).await);
    }
    let stream = resp.body().ok_or("the server sent no body")?;
    let reader: web_sys::ReadableStreamDefaultReader = stream.get_reader().unchecked_into();
    let mut parser = crate::sse::Parser::default();
    loop {
        let chunk = JsFuture::from(reader.read()).await.map_err(|e| format!("stream interrupted: {e:?}"))?;
        let done = js_sys::Reflect::get(&chunk, &"done".into()).ok().and_then(|d| d.as_bool()).unwrap_or(true);
        if done {
            return Ok(());
        }
        let value = js_sys::Reflect::get(&chunk, &"value".into()).map_err(|e| format!("stream interrupted: {e:?}"))?;
        let bytes = js_sys::Uint8Array::new(&value).to_vec();
        for ev in parser.push(&bytes) {
            on_event(ev);
        }
    }
}
