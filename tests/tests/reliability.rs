//! The reliability suite: the real server with the real default model on loopback, used the way a
//! hostile internet would. Bad input of every class is a 4xx JSON error; more requests than
//! workers get 200 or 503 with Retry-After and nothing hangs; a client that leaves frees its queue
//! place and its worker; a slow body is cut off; a map build does not hold up searches of a ready
//! map. Every loop is bounded in count and time, and only 127.0.0.1 is contacted. The tests run
//! one at a time, so their time bounds are not disturbed by each other.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use flash_interp::engine::{Engine, LoadOptions};
use flash_interp::server::ServerConfig;
use flash_interp_e2e::{get_when_built, load_default, spawn_server};
use shared::*;

const MODEL: &str = "smollm2-135m-instruct.q4-1";
/// How soon a departed client's queue place and worker must be free ("about a second").
const FREED_WITHIN: Duration = Duration::from_millis(1500);

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn engine() -> Arc<Engine> {
    static E: OnceLock<Arc<Engine>> = OnceLock::new();
    E.get_or_init(|| Arc::new(load_default(&LoadOptions::default()))).clone()
}

fn client() -> awc::Client {
    awc::Client::builder().timeout(Duration::from_secs(120)).finish()
}

fn port_of(base: &str) -> u16 {
    base.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port")
}

fn gen(text: &str, max: usize, clamps: Vec<ClampSpec>, compare: bool, stream: bool) -> GenerateRequest {
    GenerateRequest {
        prompt: PromptSpec { text: text.into(), chat: None, messages: None },
        clamps,
        sampling: SamplingParams { max_new_tokens: max, ..Default::default() },
        compare,
        stream,
        samples: 1,
    }
}

/// A long generation that cannot end early: the clamp makes the model repeat itself.
fn long_gen(stream: bool) -> GenerateRequest {
    gen("Tell me about your favourite animal.", 400, vec![ClampSpec { layer: 29, neuron: 808, value: 40.0 }], true, stream)
}

/// Send a whole request on a raw socket and return the socket (read it, or drop it to leave).
fn raw(port: u16, method: &str, path: &str, body: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .expect("send");
    s
}

/// Leave abruptly: close with a TCP reset (SO_LINGER 0), as a killed client or a proxy would.
fn reset(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, (&linger as *const libc::linger).cast(), size_of::<libc::linger>() as u32)
    };
    assert_eq!(rc, 0, "setsockopt SO_LINGER");
    drop(s);
}

/// Read whatever the server sends until it closes the connection or `limit` passes.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (String, bool) {
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let (start, mut out, mut buf) = (Instant::now(), Vec::new(), [0u8; 4096]);
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&out).into(), true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return (String::from_utf8_lossy(&out).into(), true),
        }
    }
    (String::from_utf8_lossy(&out).into(), false)
}

/// One unlabelled value from `/metrics`.
async fn metric(c: &awc::Client, base: &str, name: &str) -> f64 {
    let body = c.get(format!("{base}/metrics")).send().await.unwrap().body().await.unwrap();
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no metric {name}"))
}

/// Poll `/metrics` until `name` equals `want`; how long that took (None: not within `limit`).
async fn until_metric(c: &awc::Client, base: &str, name: &str, want: f64, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if metric(c, base, name).await == want {
            return Some(start.elapsed());
        }
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// A request and what its answer must be: status and ApiError code (and a word of its message).
struct Bad {
    method: &'static str,
    path: String,
    body: Option<String>,
    status: u16,
    code: &'static str,
    says: &'static str,
}

#[actix_web::test]
async fn every_bad_input_class_is_a_clear_4xx_and_valid_extremes_work() {
    let _one = ONE_AT_A_TIME.lock().await;
    let base = spawn_server(vec![engine()], ServerConfig::default());
    let c = client();
    let api = format!("/api/models/{MODEL}");
    let long_prompt = "The quick brown fox jumps over the lazy dog. ".repeat(180); // ~1,800 tokens, under every size limit
    let b = |method, path: String, body: Option<String>, status, code, says| Bad { method, path, body, status, code, says };
    let cases = vec![
        b("PUT", "/api/models".into(), None, 405, "method_not_allowed", "GET"),
        b("GET", format!("{api}/generate"), None, 405, "method_not_allowed", "POST"),
        b("DELETE", format!("{api}/sweep"), None, 405, "method_not_allowed", "POST"),
        b("OPTIONS", "/healthz".into(), None, 405, "method_not_allowed", "GET"),
        b("PUT", "/metrics".into(), None, 405, "method_not_allowed", "GET"),
        b("DELETE", "/".into(), None, 405, "method_not_allowed", "GET"),
        b("POST", "/neuron/29/808".into(), Some("{}".into()), 405, "method_not_allowed", "GET"),
        b("GET", "/api/nothing".into(), None, 404, "not_found", "no such API endpoint"),
        b("POST", format!("{api}/generate"), Some("{nope".into()), 400, "bad_request", "malformed JSON"),
        b(
            "POST",
            format!("{api}/generate"),
            Some(r#"{"prompt":{"text":"hi"},"sampling":{"max_tokens":5}}"#.into()),
            400,
            "bad_request",
            "unknown field `max_tokens`",
        ),
        b(
            "POST",
            format!("{api}/generate"),
            Some(r#"{"prompt":{"text":"hi"},"stream":true,"comapre":true}"#.into()),
            400,
            "bad_request",
            "unknown field `comapre`",
        ),
        b("GET", format!("{api}/search?tokens=%20dog&topp=3"), None, 400, "bad_request", "unknown field `topp`"),
        b(
            "POST",
            format!("{api}/generate"),
            Some(r#"{"prompt":{"text":"hi"},"sampling":{"temperature":5.0001}}"#.into()),
            400,
            "bad_input",
            "temperature",
        ),
        b("POST", format!("{api}/generate"), Some(r#"{"prompt":{"text":"hi"},"sampling":{"top_p":0}}"#.into()), 400, "bad_input", "top_p"),
        b(
            "POST",
            format!("{api}/generate"),
            Some(r#"{"prompt":{"text":"hi"},"clamps":[{"layer":0,"neuron":0,"value":1e30}]}"#.into()),
            400,
            "bad_input",
            "outside the allowed range",
        ),
        b("POST", format!("{api}/next-token"), Some(r#"{"prompt":{"text":"  "},"top_k":3}"#.into()), 400, "bad_input", "empty"),
        b(
            "POST",
            format!("{api}/sweep"),
            Some(r#"{"prompt":{"text":"x"},"layer":0,"neuron":0,"target":"the cat","values":[1]}"#.into()),
            422,
            "unknown_token",
            "single token",
        ),
        b("GET", "/api/models/ghost/search?tokens=a".into(), None, 404, "unknown_model", "ghost"),
        // Within every size limit, but far more work than one request may take: refused, naming the limit.
        b(
            "POST",
            format!("{api}/sweep"),
            Some(
                serde_json::to_string(&SweepRequest {
                    prompt: PromptSpec { text: long_prompt.clone(), chat: Some(false), messages: None },
                    layer: 0,
                    neuron: 5,
                    target: " dog".into(),
                    values: (0..64).map(|i| i as f32 - 32.0).collect(),
                })
                .unwrap(),
            ),
            413,
            "over_budget",
            "--max-request-tflop",
        ),
    ];
    let mut tried = 0;
    for case in &cases {
        let req = c.request(case.method.parse().unwrap(), format!("{base}{}", case.path)).content_type("application/json");
        let mut r = match &case.body {
            Some(body) => req.send_body(body.clone()).await.unwrap(),
            None => req.send().await.unwrap(),
        };
        let e: ApiError = r.json().await.unwrap_or_else(|err| panic!("{} {}: not an ApiError ({err})", case.method, case.path));
        assert_eq!((r.status().as_u16(), e.code.as_str()), (case.status, case.code), "{} {}: {}", case.method, case.path, e.message);
        assert!(e.message.contains(case.says), "{} {}: {:?} should say {:?}", case.method, case.path, e.message, case.says);
        if case.status == 405 {
            assert!(r.headers().get("allow").is_some_and(|a| a.to_str().unwrap().contains(case.says)), "{} {}", case.method, case.path);
        }
        tried += 1;
    }
    assert_eq!(tried, cases.len());

    // Valid extremes: temperatures and top-p that once overflowed the sampler answer, greedily.
    let url = format!("{base}{api}/generate");
    let mut greedy = gen("What is the capital of France?", 6, vec![], false, false);
    let plain: GenerateResponse = c.post(&url).send_json(&greedy).await.unwrap().json().await.unwrap();
    for (t, p) in [(1e-38, None), (5e-324, None), (1.0, Some(1e-300))] {
        greedy.sampling.temperature = t;
        greedy.sampling.top_p = p;
        let mut r = c.post(&url).send_json(&greedy).await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "temperature {t} top_p {p:?}");
        let got: GenerateResponse = r.json().await.unwrap();
        assert_eq!(got.completions[0].text, plain.completions[0].text, "temperature {t} top_p {p:?}");
    }
    greedy.stream = true;
    let mut r = c.post(&url).send_json(&greedy).await.unwrap();
    let body = String::from_utf8_lossy(&r.body().await.unwrap()).into_owned();
    assert!(body.trim_end().rsplit("\n\n").next().unwrap().starts_with("event: done"), "{body}");
    // A stream read to its end (and every request above, answered) is not counted as abandoned.
    assert_eq!(metric(&c, &base, "flash_interp_requests_abandoned_total").await, 0.0);
    // Tiny scores no longer turn into NaN in the search answer (it decodes as numbers).
    let s: SearchResponse = get_when_built(&c, &format!("{base}{api}/search?tokens=%20dog,%20zebra&polarity=neg"), Duration::from_secs(300)).await;
    assert!(s.layers.iter().flat_map(|l| &l.scores).all(|x| x.is_finite()));
    let health = c.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
}

#[actix_web::test]
async fn more_requests_than_workers_get_200_or_503_and_none_hangs() {
    let _one = ONE_AT_A_TIME.lock().await;
    // Two rows of generation batch (two of these requests), one worker, two queue places.
    let base = spawn_server(vec![engine()], ServerConfig { workers: 1, queue: 2, batch_rows: 2, ..Default::default() });
    let url = format!("{base}/api/models/{MODEL}/generate");
    let start = Instant::now();
    let answers = futures_util::future::join_all((0..10u64).map(|seed| {
        let url = url.clone();
        async move {
            let mut body = gen("Name a colour.", 8, vec![], false, false);
            body.sampling.seed = seed;
            body.sampling.temperature = 0.7;
            let r = client().post(&url).send_json(&body).await.unwrap();
            (r.status().as_u16(), r.headers().contains_key("retry-after"))
        }
    }))
    .await;
    assert!(start.elapsed() < Duration::from_secs(60), "10 small generations took {:?}", start.elapsed());
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let busy = answers.iter().filter(|a| a.0 == 503 && a.1).count();
    assert_eq!(ok + busy, answers.len(), "{answers:?}");
    assert!(ok >= 1 && busy >= 1, "two batch rows and two queue places: some wait, some are refused: {answers:?}");
}

#[actix_web::test]
async fn a_client_that_leaves_frees_its_queue_place_and_its_worker() {
    let _one = ONE_AT_A_TIME.lock().await;
    // The generation batch has room for one long generation's two rows.
    let base = spawn_server(vec![engine()], ServerConfig { workers: 1, queue: 1, batch_rows: 2, ..Default::default() });
    let (c, port) = (client(), port_of(&base));
    let path = format!("/api/models/{MODEL}/generate");
    let long = serde_json::to_string(&long_gen(false)).unwrap();
    let small = serde_json::to_string(&gen("Hi!", 3, vec![], false, false)).unwrap();
    // A fills the batch (and holds the worker), B waits in the queue, C finds it full.
    let a = raw(port, "POST", &path, &long);
    assert!(until_metric(&c, &base, "flash_interp_generations_running", 1.0, Duration::from_secs(10)).await.is_some());
    let b = raw(port, "POST", &path, &serde_json::to_string(&gen("Hello there.", 3, vec![], false, false)).unwrap());
    assert!(until_metric(&c, &base, "flash_interp_queue_depth", 1.0, Duration::from_secs(10)).await.is_some());
    let r = c.post(format!("{base}{path}")).content_type("application/json").send_body(small.clone()).await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    // B leaves: its queue place is free at once.
    drop(b);
    let t = until_metric(&c, &base, "flash_interp_queue_depth", 0.0, FREED_WITHIN).await;
    assert!(t.is_some(), "a departed client kept its queue place");
    // A leaves in the middle of its generation: the worker comes free.
    drop(a);
    let t = until_metric(&c, &base, "flash_interp_generations_running", 0.0, FREED_WITHIN).await;
    assert!(t.is_some(), "a departed client's generation kept running");
    assert!(metric(&c, &base, "flash_interp_requests_abandoned_total").await >= 2.0);
    let r = c.post(format!("{base}{path}")).content_type("application/json").send_body(small.clone()).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // The same when clients reset their connections instead of closing them.
    let a = raw(port, "POST", &path, &long);
    assert!(until_metric(&c, &base, "flash_interp_generations_running", 1.0, Duration::from_secs(10)).await.is_some());
    let b = raw(port, "POST", &path, &serde_json::to_string(&gen("Hello there, again.", 3, vec![], false, false)).unwrap());
    assert!(until_metric(&c, &base, "flash_interp_queue_depth", 1.0, Duration::from_secs(10)).await.is_some());
    reset(b);
    assert!(until_metric(&c, &base, "flash_interp_queue_depth", 0.0, FREED_WITHIN).await.is_some(), "a reset client kept its queue place");
    reset(a);
    assert!(
        until_metric(&c, &base, "flash_interp_generations_running", 0.0, FREED_WITHIN).await.is_some(),
        "a reset client's generation kept running"
    );

    // The same for streams: one running (after its first tokens), one queued.
    let mut s1 = raw(port, "POST", &path, &serde_json::to_string(&long_gen(true)).unwrap());
    s1.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 512];
    let n = s1.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("text/event-stream"));
    let s2 = raw(port, "POST", &path, &serde_json::to_string(&gen("Hello.", 3, vec![], false, true)).unwrap());
    assert!(until_metric(&c, &base, "flash_interp_queue_depth", 1.0, Duration::from_secs(10)).await.is_some());
    drop(s2);
    assert!(until_metric(&c, &base, "flash_interp_queue_depth", 0.0, FREED_WITHIN).await.is_some(), "a departed stream kept its queue place");
    // Leaving mid-answer counts the stream as abandoned, as a request that leaves before its answer.
    let abandoned = metric(&c, &base, "flash_interp_requests_abandoned_total").await;
    drop(s1);
    assert!(until_metric(&c, &base, "flash_interp_generations_running", 0.0, FREED_WITHIN).await.is_some(), "a departed stream kept its worker");
    let t = until_metric(&c, &base, "flash_interp_requests_abandoned_total", abandoned + 1.0, FREED_WITHIN).await;
    assert!(t.is_some(), "a stream left mid-answer was not counted as abandoned");

    // A sweep is cancelled the same way.
    let sweep = SweepRequest {
        // ~50 tokens × 17 rows: within the budget and seconds long, so it is seen running, while
        // one layer of it (cancellation is checked between layers) stays a small part of
        // FREED_WITHIN even on a slow machine.
        prompt: PromptSpec { text: "The quick brown fox jumps over the lazy dog. ".repeat(5), chat: Some(false), messages: None },
        layer: 0,
        neuron: 5,
        target: " dog".into(),
        values: (0..16).map(|i| i as f32).collect(),
    };
    let s = raw(port, "POST", &format!("/api/models/{MODEL}/sweep"), &serde_json::to_string(&sweep).unwrap());
    assert!(until_metric(&c, &base, "flash_interp_generations_running", 1.0, Duration::from_secs(10)).await.is_some());
    drop(s);
    assert!(until_metric(&c, &base, "flash_interp_generations_running", 0.0, FREED_WITHIN).await.is_some(), "a departed sweep kept running");
}

#[actix_web::test]
async fn slow_and_unfinished_requests_are_cut_off() {
    let _one = ONE_AT_A_TIME.lock().await;
    let base = spawn_server(vec![engine()], ServerConfig { body_timeout: Duration::from_secs(1), ..Default::default() });
    let port = port_of(&base);
    // 20 clients promise 60,000 bytes of body and send 10.
    let mut slow: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            write!(s, "POST /api/models/{MODEL}/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n\r\n{{\"prompt\":")
                .unwrap();
            s
        })
        .collect();
    let start = Instant::now();
    for s in &mut slow {
        let (answer, closed) = read_until_closed(s, Duration::from_secs(5));
        assert!(closed, "a slow body kept its connection open for {:?}", start.elapsed());
        assert!(answer.starts_with("HTTP/1.1 408") && answer.contains("body_timeout"), "{answer}");
    }
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    // A request head that never ends is closed too (actix's 5 s head timeout).
    let mut head = TcpStream::connect(("127.0.0.1", port)).unwrap();
    head.write_all(b"GET /api/models HTTP/1.1\r\nHost: x\r\n").unwrap();
    let (_, closed) = read_until_closed(&mut head, Duration::from_secs(10));
    assert!(closed, "an unfinished request head kept its connection open");
    let r = client().get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[actix_web::test]
async fn a_map_build_does_not_hold_up_searches_of_a_ready_map() {
    let _one = ONE_AT_A_TIME.lock().await;
    // A private map cache, so the gate map is really built here (not loaded from disk).
    let cache = tempfile::tempdir().unwrap();
    let mut e = Engine::load(&flash_interp_e2e::default_model(), &LoadOptions::default()).unwrap();
    e.cache_dir = cache.path().to_owned();
    let base = spawn_server(vec![Arc::new(e)], ServerConfig::default());
    let c = client();
    let search = |view: &str, token: &str| format!("{base}/api/models/{MODEL}/search?tokens=%20{token}&view={view}");
    let _: SearchResponse = get_when_built(&c, &search("up", "dog"), Duration::from_secs(300)).await;
    // Ask for the gate view: its build starts, and the answer says so.
    let mut r = c.get(search("gate", "dog")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let e: ApiError = r.json().await.unwrap();
    assert!(e.code == "map_building" && e.message.contains("gate") && e.progress.is_some(), "{e:?}");
    // The 503 comes back as soon as the build is queued; the builder starts it a moment later.
    // Wait until the up build has let go of everything (its `pending` ends after its `running`)
    // and the gate build alone is pending and running, so the loop below times searches against
    // the gate build and not against nothing.
    let waited = Duration::from_secs(30);
    assert!(until_metric(&c, &base, "flash_interp_map_builds_pending", 1.0, waited).await.is_some(), "the gate build was not pending");
    assert!(until_metric(&c, &base, "flash_interp_map_builds_running", 1.0, waited).await.is_some(), "the gate build did not start");
    // While it builds, searches of the ready up map answer within a second (each a new concept,
    // so none comes from the result cache).
    let mut timed = 0;
    for token in ["cat", "house", "red", "music", "water", "king", "city", "happy"] {
        if metric(&c, &base, "flash_interp_map_builds_running").await != 1.0 {
            break;
        }
        let start = Instant::now();
        let mut r = c.get(search("up", token)).send().await.unwrap();
        let took = start.elapsed();
        assert_eq!(r.status().as_u16(), 200);
        let _: SearchResponse = r.json().limit(8 << 20).await.unwrap();
        assert!(took < Duration::from_secs(1), "a search of a ready map took {took:?} during another map's build");
        timed += 1;
    }
    assert!(timed >= 2, "the gate build ended before the searches could be timed ({timed})");
    let _: SearchResponse = get_when_built(&c, &search("gate", "dog"), Duration::from_secs(300)).await;
    let models: Vec<ModelSummary> = c.get(format!("{base}/api/models")).send().await.unwrap().json().await.unwrap();
    assert!(models[0].maps_ready.contains(&View::Gate));
    // The metrics show the finished build.
    let body = c.get(format!("{base}/metrics")).send().await.unwrap().body().await.unwrap();
    assert!(String::from_utf8_lossy(&body).contains(&format!("flash_interp_map_build_permille{{model=\"{MODEL}\",view=\"gate\"}} 1000")));
}
