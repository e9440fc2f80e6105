//! Black-box tests: the real server on port 0 with the real default model, over HTTP, decoding
//! into the shared types.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use flash_interp::engine::{Engine, LoadOptions};
use flash_interp::server::ServerConfig;
use flash_interp_e2e::{get_when_built, load_default, spawn_server};
use futures_util::StreamExt;
use shared::*;

const MODEL: &str = "smollm2-135m-instruct.q4-1";

fn engine() -> Arc<Engine> {
    static E: OnceLock<Arc<Engine>> = OnceLock::new();
    E.get_or_init(|| Arc::new(load_default(&LoadOptions::default()))).clone()
}

fn client() -> awc::Client {
    awc::Client::builder().timeout(Duration::from_secs(120)).finish()
}

fn gen_body(max: usize, clamps: Vec<ClampSpec>, compare: bool, stream: bool) -> GenerateRequest {
    GenerateRequest {
        prompt: PromptSpec { text: "What is your favourite animal?".into(), chat: None, messages: None },
        clamps,
        sampling: SamplingParams { max_new_tokens: max, ..Default::default() },
        compare,
        stream,
        samples: 1,
    }
}

/// Read a whole SSE response: (event, data) pairs.
async fn read_events(
    resp: &mut awc::ClientResponse<impl futures_util::Stream<Item = Result<actix_web::web::Bytes, awc::error::PayloadError>> + Unpin>,
) -> Vec<(String, String)> {
    let mut buf = String::new();
    while let Some(chunk) = resp.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    buf.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let ev = e.lines().find_map(|l| l.strip_prefix("event: ")).unwrap_or("").to_owned();
            let data = e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or("").to_owned();
            (ev, data)
        })
        .collect()
}

#[actix_web::test]
async fn serves_the_api_the_app_and_streams_two_different_answers() {
    let dist = tempfile::tempdir().unwrap();
    std::fs::write(dist.path().join("index.html"), "<html>FLASH-APP</html>").unwrap();
    let base = spawn_server(vec![engine()], ServerConfig { dist: dist.path().to_owned(), ..Default::default() });
    let c = client();
    let models: Vec<ModelSummary> = c.get(format!("{base}/api/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models[0].id, MODEL);
    assert_eq!((models[0].layers, models[0].neurons_per_layer), (30, 1536));
    // A permalink of the app on a cold load gets the app; unknown API paths get JSON.
    let mut r = c.get(format!("{base}/neuron/29/808?model={MODEL}")).send().await.unwrap();
    assert_eq!(r.body().await.unwrap(), "<html>FLASH-APP</html>");
    let mut r = c.get(format!("{base}/api/models/{MODEL}/nothing")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let e: ApiError = r.json().await.unwrap();
    assert_eq!(e.code, "not_found");
    // A search over HTTP.
    let s: SearchResponse = get_when_built(&c, &format!("{base}/api/models/{MODEL}/search?tokens=%20dog&top=3"), Duration::from_secs(300)).await;
    assert_eq!(s.layers.len(), 30);
    assert_eq!((s.top[0].layer, s.top[0].neuron), (29, 808));
    // Streamed compare: token events for both variants, then `done`, adding up to the answers.
    let mut r = c
        .post(format!("{base}/api/models/{MODEL}/generate"))
        .send_json(&gen_body(30, vec![ClampSpec { layer: 29, neuron: 808, value: 12.0 }], true, true))
        .await
        .unwrap();
    assert_eq!(r.headers().get("content-type").unwrap(), "text/event-stream");
    let events = read_events(&mut r).await;
    let (last, data) = events.last().unwrap();
    assert_eq!(last, "done");
    let done: GenerateResponse = serde_json::from_str(data).unwrap();
    for (i, variant) in [Variant::Normal, Variant::Steered].into_iter().enumerate() {
        let text: String = events
            .iter()
            .filter(|(e, _)| e == "token")
            .map(|(_, d)| serde_json::from_str::<TokenEvent>(d).unwrap())
            .filter(|t| t.variant == variant)
            .map(|t| t.text)
            .collect();
        assert_eq!(text, done.completions[i].text);
    }
    assert_ne!(done.completions[0].text, done.completions[1].text, "a strong clamp should change the answer");
    assert!(
        done.completions[1].text.to_lowercase().contains("cat") || done.completions[1].text.to_lowercase().contains("dog"),
        "{:?}",
        done.completions[1].text
    );
}

#[actix_web::test]
async fn a_full_queue_answers_503_and_a_disconnected_stream_frees_its_worker() {
    // Room in the generation batch for one row, and no queue.
    let base = spawn_server(vec![engine()], ServerConfig { workers: 1, queue: 0, batch_rows: 1, ..Default::default() });
    let c = client();
    let url = format!("{base}/api/models/{MODEL}/generate");
    // A long generation that cannot stop early: the clamp makes the model repeat itself.
    let mut a = c.post(&url).send_json(&gen_body(512, vec![ClampSpec { layer: 29, neuron: 808, value: 40.0 }], false, true)).await.unwrap();
    assert!(a.next().await.is_some(), "the first stream should start");
    let mut b = c.post(&url).send_json(&gen_body(2, vec![], false, false)).await.unwrap();
    assert_eq!(b.status().as_u16(), 503);
    assert!(b.headers().contains_key("retry-after"));
    assert_eq!(b.json::<ApiError>().await.unwrap().code, "busy");
    // The client goes away mid-stream; its worker must come free long before 512 tokens.
    drop(a);
    let start = Instant::now();
    loop {
        let r = c.post(&url).send_json(&gen_body(2, vec![], false, false)).await.unwrap();
        if r.status().is_success() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "worker still busy {:?} after the disconnect", start.elapsed());
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_web::test]
async fn the_server_still_answers_correctly_after_a_burst_of_malformed_requests() {
    let base = spawn_server(vec![engine()], ServerConfig::default());
    let c = client();
    let api = format!("{base}/api/models/{MODEL}");
    for i in 0..12 {
        let cases: Vec<(awc::ClientRequest, Option<String>)> = vec![
            (c.post(format!("{api}/generate")).content_type("application/json"), Some("{nope".into())),
            (
                c.post(format!("{api}/generate")).content_type("application/json"),
                Some(format!("{{\"prompt\":{{\"text\":\"x\"}},\"clamps\":[{{\"layer\":{i},\"neuron\":99999,\"value\":1}}]}}")),
            ),
            (
                c.post(format!("{api}/sweep")).content_type("application/json"),
                Some("{\"prompt\":{\"text\":\"x\"},\"layer\":0,\"neuron\":0,\"target\":\" dog\",\"values\":[1e30]}".into()),
            ),
            (c.get(format!("{api}/search?tokens=notasingletokenatall")), None),
            (c.get(format!("{api}/neurons/99/0")), None),
            (c.get(format!("{base}/api/models/ghost/search?tokens=a")), None),
            (c.post(format!("{api}/next-token")).content_type("text/plain"), Some("hello".into())),
        ];
        for (req, body) in cases {
            let mut r = match body {
                Some(b) => req.send_body(b).await.unwrap(),
                None => req.send().await.unwrap(),
            };
            assert!(r.status().is_client_error(), "{}", r.status());
            let e: ApiError = r.json().await.unwrap();
            assert!(!e.message.is_empty());
        }
    }
    let r: NextTokenResponse = c
        .post(format!("{api}/next-token"))
        .send_json(&NextTokenRequest {
            prompt: PromptSpec { text: "The capital of France is".into(), chat: Some(false), messages: None },
            clamps: vec![],
            top_k: 3,
        })
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r.top[0].text, " Paris");
}
