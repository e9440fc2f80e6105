//! In-process route tests (actix_web::test) on tiny models: every endpoint, success and each
//! error class, through the same `configure` the server uses.

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{test, web, App};
use flash_interp::engine::{Engine, LoadOptions};
use flash_interp::server::{routes, AppState, ServerConfig};
use flash_interp::synthetic::{self, TinySpec};
use shared::*;

const MAX_BODY: usize = routes::MAX_BODY_BYTES;

struct Fixture {
    _dir: tempfile::TempDir,
    state: Arc<AppState>,
}

fn fixture(config: ServerConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut engines = Vec::new();
    for (name, spec) in [
        ("base", TinySpec::default()),
        ("tuned", TinySpec { perturb: vec![(1, 2)], ..Default::default() }),
        ("small", TinySpec { d_ff: 32, ..Default::default() }),
    ] {
        let p = dir.path().join(format!("{name}.gguf"));
        synthetic::write_gguf(&TinySpec { scale: 2.0, ..spec }, &p).unwrap();
        let mut e = Engine::load(&p, &LoadOptions::default()).unwrap();
        e.cache_dir = dir.path().join("cache");
        engines.push(Arc::new(e));
    }
    let dist = dir.path().join("dist");
    std::fs::create_dir_all(&dist).unwrap();
    std::fs::write(dist.join("index.html"), "<html>APP-INDEX</html>").unwrap();
    std::fs::write(dist.join("app-0123456789abcdef.js"), "console.log(1)").unwrap();
    std::fs::write(dist.join("plotly.min.js"), "var Plotly = {}").unwrap();
    Fixture { state: AppState::new(engines, ServerConfig { dist, ..config }), _dir: dir }
}

/// A fixture whose models have every map built already (as a server that has warmed up).
fn warm_fixture(config: ServerConfig) -> Fixture {
    let f = fixture(config);
    for m in &f.state.models {
        for view in View::ALL {
            m.engine.map(view, false, &|_, _| {}).unwrap();
        }
    }
    f.state.assets.build(&f.state.config.dist);
    f
}

macro_rules! app {
    ($f:expr) => {
        test::init_service(App::new().app_data(web::Data::from($f.state.clone())).configure(routes::configure)).await
    };
}

async fn error_of(resp: actix_web::dev::ServiceResponse) -> (StatusCode, ApiError) {
    let status = resp.status();
    let body: ApiError = test::read_body_json(resp).await;
    (status, body)
}

#[actix_web::test]
async fn models_tokens_and_meta_endpoints() {
    let f = fixture(ServerConfig::default());
    let app = app!(f);
    let models: Vec<ModelSummary> = test::call_and_read_body_json(&app, test::TestRequest::get().uri("/api/models").to_request()).await;
    assert_eq!(models.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), vec!["base", "tuned", "small"]);
    assert_eq!((models[0].layers, models[0].neurons_per_layer), (3, 64));
    assert_eq!(models[0].search_scale, None, "no map in memory yet");
    let t: TokenizeResponse = test::call_and_read_body_json(&app, test::TestRequest::get().uri("/api/models/base/tokens?q=th").to_request()).await;
    assert_eq!(t.tokens.len(), 2);
    assert!(t.suggestions.iter().any(|s| s.text == " the") && t.suggestions.iter().all(|s| s.text.trim_start().starts_with("th")));
    // A byte token is typed as it is shown: `\xC3` is one token, and the prefix suggests byte tokens.
    let t: TokenizeResponse = test::call_and_read_body_json(&app, test::TestRequest::get().uri("/api/models/base/tokens?q=%5CxC").to_request()).await;
    assert_eq!(t.tokens.len(), 3, "`\\xC` is no byte: three characters");
    assert!(t.suggestions.iter().any(|s| s.text == "\\xC3") && t.suggestions.iter().all(|s| s.text.starts_with("\\xC")), "{:?}", t.suggestions);
    let t: TokenizeResponse =
        test::call_and_read_body_json(&app, test::TestRequest::get().uri("/api/models/base/tokens?q=%5CxC3").to_request()).await;
    assert_eq!(t.tokens.iter().map(|s| s.text.as_str()).collect::<Vec<_>>(), ["\\xC3"]);
    // A phrase is read as written, as the phrase search scores it: four characters.
    let t: TokenizeResponse =
        test::call_and_read_body_json(&app, test::TestRequest::get().uri("/api/models/base/tokens?q=%5CxC3&phrase=true").to_request()).await;
    assert_eq!(t.tokens.len(), 4, "{:?}", t.tokens);
    let resp = test::call_service(&app, test::TestRequest::get().uri("/api/models/nope/tokens?q=a").to_request()).await;
    assert_eq!(error_of(resp).await.1.code, "unknown_model");
    // A random model has no curated gallery; an unknown one is a 404.
    let g: GalleryResponse = test::call_and_read_body_json(&app, test::TestRequest::get().uri("/api/models/base/gallery").to_request()).await;
    assert!(g.examples.is_empty());
    let resp = test::call_service(&app, test::TestRequest::get().uri("/api/models/nope/gallery").to_request()).await;
    assert_eq!(error_of(resp).await.0, StatusCode::NOT_FOUND);
    let resp = test::call_service(&app, test::TestRequest::get().uri("/api/models/base/tokens").to_request()).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = test::call_service(&app, test::TestRequest::get().uri("/api/nothing/here").to_request()).await;
    let (status, e) = error_of(resp).await;
    assert_eq!((status, e.code.as_str()), (StatusCode::NOT_FOUND, "not_found"));
    let doc: serde_json::Value = test::call_and_read_body_json(&app, test::TestRequest::get().uri("/api/openapi.json").to_request()).await;
    for p in ["/api/models", "/api/models/{model}/search", "/api/models/{model}/generate", "/api/models/{model}/gallery", "/api/compare"] {
        assert!(doc["paths"][p].is_object(), "openapi lacks {p}");
    }
    // Every parameter is documented where it is read: `{name}` in the path, the rest in the
    // query string, where only what the server cannot do without is required.
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            for p in op["parameters"].as_array().into_iter().flatten() {
                let name = p["name"].as_str().unwrap();
                let want = if path.contains(&format!("{{{name}}}")) { "path" } else { "query" };
                assert_eq!(p["in"], want, "{method} {path}: {name}");
            }
        }
    }
    let required = |path: &str, name: &str| {
        let ps = doc["paths"][path]["get"]["parameters"].as_array().unwrap();
        ps.iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("{path} lacks {name}"))["required"].as_bool().unwrap_or(false)
    };
    assert!(required("/api/models/{model}/search", "tokens") && !required("/api/models/{model}/search", "phrase"));
    assert!(required("/api/models/{model}/tokens", "q") && !required("/api/models/{model}/classes", "top"));
    // The errors a request can meet are documented for its endpoint.
    let documented = |path: &str, method: &str, status: u16| {
        doc["paths"][path][method]["responses"][status.to_string()]["description"].as_str().is_some_and(|d| !d.is_empty())
    };
    for (path, method, status) in [
        ("/api/models/{model}/next-token", "post", 413),
        ("/api/models/{model}/next-token", "post", 422),
        ("/api/models/{model}/sweep", "post", 422),
        ("/api/models/{model}/generate", "post", 413),
        ("/api/models/{model}/tokens", "get", 400),
        ("/api/models/{model}/neurons/{layer}/{index}", "get", 404),
    ] {
        assert!(documented(path, method, status), "{method} {path} does not document {status}");
    }
    let resp = test::call_service(&app, test::TestRequest::get().uri("/healthz").to_request()).await;
    assert!(resp.status().is_success());
    let metrics = test::call_and_read_body(&app, test::TestRequest::get().uri("/metrics").to_request()).await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(metrics.contains("flash_interp_requests_total{endpoint=\"/api/models\",status=\"200\"} 1"), "{metrics}");
}

#[actix_web::test]
async fn app_deep_links_fall_back_to_index_and_assets_are_cached() {
    let f = fixture(ServerConfig::default());
    let app = app!(f);
    for uri in ["/", "/neuron/2/5?model=base", "/steer?prompt=hi&clamp=1:2:3"] {
        let body = test::call_and_read_body(&app, test::TestRequest::get().uri(uri).to_request()).await;
        assert_eq!(&body[..], b"<html>APP-INDEX</html>", "{uri}");
    }
    let resp = test::call_service(&app, test::TestRequest::get().uri("/app-0123456789abcdef.js").to_request()).await;
    assert!(resp.headers().get("cache-control").unwrap().to_str().unwrap().contains("immutable"));
    // A file without a content hash in its name (plotly.min.js) is revalidated, never pinned.
    let resp = test::call_service(&app, test::TestRequest::get().uri("/plotly.min.js").to_request()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers().get("cache-control").unwrap().to_str().unwrap(), "no-cache");
    assert!(resp.headers().contains_key("etag"));
    let resp = test::call_service(&app, test::TestRequest::get().uri("/../Cargo.toml").to_request()).await;
    assert_eq!(test::read_body(resp).await, &b"<html>APP-INDEX</html>"[..]);
}

fn body_contains_image(html: &str) -> bool {
    html.contains("<meta property=\"og:image\" content=\"http://demo.example/api/models/base/neurons/2/5/card.png\" />")
        && html.contains("<meta name=\"twitter:card\" content=\"summary_large_image\" />")
}

#[actix_web::test]
async fn permalinks_unfurl_with_their_own_title_and_card_tags() {
    let f = warm_fixture(ServerConfig::default());
    let index = "<html><head>\n<meta name=\"description\" content=\"generic\" />\n<title>Flash Interp</title></head><body>APP</body></html>";
    std::fs::write(f.state.config.dist.join("index.html"), index).unwrap();
    let app = app!(f);
    let page = |uri: &str| test::TestRequest::get().uri(uri).insert_header(("Host", "demo.example")).to_request();
    let html = |b: actix_web::web::Bytes| String::from_utf8(b.to_vec()).unwrap();
    // A neuron: its top tokens from the map (the more peaked polarity of its up view).
    let m = f.state.models[0].engine.map_if_ready(View::Up, false).unwrap();
    let (pos, neg) = (m.top(Polarity::Pos, 2, 5), m.top(Polarity::Neg, 2, 5));
    let ids = if pos.1[0] >= neg.1[0] { pos.0 } else { neg.0 };
    let first = f.state.models[0].engine.tok.token_text(ids[0]).trim().to_owned();
    let body = html(test::call_and_read_body(&app, page("/neuron/2/5?model=base")).await);
    let title = body.split("<title>").nth(1).and_then(|t| t.split("</title>").next()).unwrap();
    assert!(title.starts_with("Neuron 2:5 — "), "{title}");
    assert!(title.contains(&flash_interp::server::preview::escape(&first)), "{title} lacks {first:?}");
    assert!(body.contains("<meta property=\"og:title\" content=\"Neuron 2:5 — "));

    assert!(body.contains("<meta property=\"og:url\" content=\"http://demo.example/neuron/2/5?model=base\" />"), "{body}");
    assert!(body.contains("<body>APP</body>") && !body.contains("generic"), "the app's page, with the page's description only");
    // A concept search, a steer link; text from the URL is escaped, never markup.
    let body = html(test::call_and_read_body(&app, page("/?q=%3Cscript%3Ealert(1)%3C/script%3E")).await);
    assert!(!body.contains("<script>alert(1)") && body.contains("&lt;script&gt;alert(1)"), "{body}");
    let body = html(test::call_and_read_body(&app, page("/steer?prompt=Hi%20there&clamps=1:2:3")).await);
    assert!(body.contains("<title>Steering base with 1:2:3</title>"), "{body}");
    // Its card: the PNG the og:image tag points to, at the size cards are shown.
    assert!(body_contains_image(&html(test::call_and_read_body(&app, page("/neuron/2/5?model=base")).await)));
    let resp = test::call_service(&app, page("/api/models/base/neurons/2/5/card.png")).await;
    assert_eq!(resp.headers().get("content-type").unwrap(), "image/png");
    let png_bytes = test::read_body(resp).await;
    let info = png::Decoder::new(&png_bytes[..]).read_info().unwrap().info().clone();
    assert_eq!((info.width, info.height), (1200, 630));
    // A concept search's card: every neuron's score, linked from its permalink with the same settings.
    let body = html(test::call_and_read_body(&app, page("/?q=%20the&view=down&polarity=pos&model=base")).await);
    let src = "http://demo.example/api/models/base/search/card.png?tokens=+the&amp;view=down&amp;polarity=pos";
    assert!(body.contains(&format!("<meta property=\"og:image\" content=\"{src}\" />")), "{body}");
    let resp = test::call_service(&app, page("/api/models/base/search/card.png?tokens=+the&view=down&polarity=pos")).await;
    assert_eq!(resp.headers().get("content-type").unwrap(), "image/png");
    let info = png::Decoder::new(&test::read_body(resp).await[..]).read_info().unwrap().info().clone();
    assert_eq!((info.width, info.height), (1200, 630));
    // The card reads `q` as the page does: a whitespace-only alternative is no token.
    let body = html(test::call_and_read_body(&app, page("/?q=%20the,%20,&model=base")).await);
    assert!(body.contains("/api/models/base/search/card.png?tokens=+the&amp;view=up\""), "{body}");
    // A link whose settings do not read, or whose concept the model does not have (the card
    // would be a 422), gets no image rather than a broken one.
    for uri in ["/?q=%20the&view=sideways", "/?q=notasingletokenatall", "/?q=,,,"] {
        let body = html(test::call_and_read_body(&app, page(uri)).await);
        assert!(!body.contains("og:image") && body.contains("content=\"summary\""), "{uri}: {body}");
    }
    // The page's address is its path and query on this site, whatever the request line or a
    // client's X-Forwarded-Host says (the server is not behind a trusted proxy here); a Host
    // that is not a host name gives way to the server's own.
    let req = test::TestRequest::get()
        .uri("http://evil.example/neuron/2/5")
        .insert_header(("Host", "demo.example"))
        .insert_header(("X-Forwarded-Host", "evil.example"))
        .insert_header(("X-Forwarded-Proto", "javascript"));
    let body = html(test::call_and_read_body(&app, req.to_request()).await);
    assert!(body.contains("<meta property=\"og:url\" content=\"http://demo.example/neuron/2/5\" />"), "{body}");
    assert!(!body.contains("evil") && !body.contains("javascript"), "{body}");
    let body = html(test::call_and_read_body(&app, test::TestRequest::get().uri("/steer").insert_header(("Host", "a\"b")).to_request()).await);
    assert!(body.contains("content=\"http://localhost:8080/steer\""), "{body}");
    // A long permalink's title and description are cut to what a card shows; control
    // characters become spaces.
    let many: Vec<String> = (0..400).map(|i| format!("1:{i}:3")).collect();
    let body = html(test::call_and_read_body(&app, page(&format!("/steer?prompt=a%10b&clamps={}", many.join(",")))).await);
    let title = body.split("<title>").nth(1).and_then(|t| t.split("</title>").next()).unwrap();
    assert_eq!(title.chars().count(), flash_interp::server::preview::TITLE_CHARS, "{title}");
    assert!(title.ends_with('…') && !body.contains('\u{10}') && body.contains("“a b”"), "{body}");
    for (uri, status) in [
        ("/api/models/base/neurons/3/0/card.png", StatusCode::BAD_REQUEST),
        ("/api/models/nope/neurons/0/0/card.png", StatusCode::NOT_FOUND),
        ("/api/models/base/search/card.png?tokens=", StatusCode::BAD_REQUEST),
        ("/api/models/base/search/card.png?tokens=+the&top=3", StatusCode::BAD_REQUEST),
        ("/api/models/base/search/card.png?tokens=+the&view=sideways", StatusCode::BAD_REQUEST),
    ] {
        assert_eq!(test::call_service(&app, page(uri)).await.status(), status, "{uri}");
    }
    // An out-of-range neuron or an unknown page still gets a title, and a 200 (the app explains).
    for uri in ["/neuron/99/99", "/nowhere", "/neuron/x/y"] {
        let resp = test::call_service(&app, page(uri)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(html(test::read_body(resp).await).contains("<meta property=\"og:title\""), "{uri}");
    }
}

#[actix_web::test]
async fn precompressed_assets_are_served_by_accept_encoding_and_revalidate() {
    use std::io::Read;
    let f = fixture(ServerConfig::default());
    let dist = f.state.config.dist.clone();
    let raw: Vec<u8> = (0..20_000u32).flat_map(|i| format!("var x{i} = {};\n", i % 7).into_bytes()).collect();
    std::fs::write(dist.join("big-0123456789abcdef.js"), &raw).unwrap();
    f.state.assets.build(&dist);
    let app = app!(f);
    let get = |enc: &str, etag: Option<&str>| {
        let mut r = test::TestRequest::get().uri("/big-0123456789abcdef.js").insert_header(("Accept-Encoding", enc.to_owned()));
        if let Some(e) = etag {
            r = r.insert_header(("If-None-Match", e.to_owned()));
        }
        r.to_request()
    };
    // Brotli when accepted, else gzip, else the file as it is; each decodes to the file.
    let resp = test::call_service(&app, get("gzip, deflate, br", None)).await;
    assert_eq!(resp.headers().get("content-encoding").unwrap(), "br");
    assert_eq!(resp.headers().get("vary").unwrap(), "Accept-Encoding");
    assert!(resp.headers().get("cache-control").unwrap().to_str().unwrap().contains("immutable"));
    let etag = resp.headers().get("etag").unwrap().to_str().unwrap().to_owned();
    let body = test::read_body(resp).await;
    assert!(body.len() * 10 < raw.len(), "brotli 11 of repetitive text: {} of {}", body.len(), raw.len());
    let mut out = Vec::new();
    brotli::Decompressor::new(&body[..], 4096).read_to_end(&mut out).unwrap();
    assert_eq!(out, raw);
    let resp = test::call_service(&app, get("gzip", None)).await;
    assert_eq!(resp.headers().get("content-encoding").unwrap(), "gzip");
    let body = test::read_body(resp).await;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut out).unwrap();
    assert_eq!(out, raw);
    let resp = test::call_service(&app, get("identity", None)).await;
    assert!(resp.headers().get("content-encoding").is_none());
    assert_eq!(resp.headers().get("vary").unwrap(), "Accept-Encoding", "a cache must not give this copy to a client that takes br");
    assert_eq!(test::read_body(resp).await, raw);
    // A cached copy is revalidated with its ETag: 304, no body.
    let resp = test::call_service(&app, get("br", Some(&etag))).await;
    assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);
    assert!(test::read_body(resp).await.is_empty());
}

#[actix_web::test]
async fn search_and_neuron_endpoints() {
    let f = warm_fixture(ServerConfig::default());
    let app = app!(f);
    let r: SearchResponse =
        test::call_and_read_body_json(&app, test::TestRequest::get().uri("/api/models/base/search?tokens=%20the,in&top=5").to_request()).await;
    assert_eq!(r.layers.len(), 3);
    assert!(r.layers.iter().all(|l| l.neurons == 64 && l.is_full()));
    assert_eq!(r.top.len(), 5);
    // At 16 points a layer: the envelope of the same scores, with the strongest neuron in it.
    let small: SearchResponse =
        test::call_and_read_body_json(&app, test::TestRequest::get().uri("/api/models/base/search?tokens=%20the,in&top=5&points=16").to_request())
            .await;
    assert_eq!(small.top, r.top);
    for (full, few) in r.layers.iter().zip(&small.layers) {
        assert!(!few.is_full() && few.neurons == 64 && few.scores.len() <= 16);
        assert!(few.points().all(|(n, s)| full.scores[n] == s));
        assert_eq!(*few, shared::LayerScores::decimate(&full.scores, 16));
    }
    let (l, n) = (r.top[0].layer, r.top[0].neuron);
    assert!(small.layers[l].points().any(|(i, _)| i == n));
    assert_eq!(r.tokens.iter().map(|t| t.text.as_str()).collect::<Vec<_>>(), vec![" the", "in"]);
    // Same request again: served from the cache, identical.
    let again: SearchResponse =
        test::call_and_read_body_json(&app, test::TestRequest::get().uri("/api/models/base/search?tokens=%20the,in&top=5").to_request()).await;
    assert_eq!(r, again);
    let resp = test::call_service(&app, test::TestRequest::get().uri("/api/models/base/search?tokens=the%20cat").to_request()).await;
    let (status, e) = error_of(resp).await;
    assert_eq!((status, e.code.as_str()), (StatusCode::UNPROCESSABLE_ENTITY, "unknown_token"));
    assert!(e.message.contains("tokenizes as"));
    let resp = test::call_service(&app, test::TestRequest::get().uri("/api/models/base/search?tokens=").to_request()).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = test::call_service(&app, test::TestRequest::get().uri("/api/models/base/search?tokens=a&view=sideways").to_request()).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // The tiny model's raw logits are not flat: the paper's scale by default; `std` on request,
    // said in the response, with other scores.
    assert_eq!(r.scale, shared::Scale::Raw);
    let models: Vec<ModelSummary> = test::call_and_read_body_json(&app, test::TestRequest::get().uri("/api/models").to_request()).await;
    assert_eq!(models[0].search_scale, Some(shared::Scale::Raw), "the model list says which scale its searches use");
    let std: SearchResponse =
        test::call_and_read_body_json(&app, test::TestRequest::get().uri("/api/models/base/search?tokens=%20the,in&top=5&scale=std").to_request())
            .await;
    assert_eq!((std.scale, std.layers.len()), (shared::Scale::Std, 3));
    assert_ne!(std.layers, r.layers);
    let resp = test::call_service(&app, test::TestRequest::get().uri("/api/models/base/search?tokens=a&scale=loud").to_request()).await;
    let (status, e) = error_of(resp).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(e.message.contains("expected `raw` or `std`"), "{}", e.message);
    let d: NeuronDetail =
        test::call_and_read_body_json(&app, test::TestRequest::get().uri("/api/models/base/neurons/2/5?tokens=4").to_request()).await;
    assert_eq!((d.layer, d.neuron, d.views.len(), d.views[0].tokens.len()), (2, 5, 6, 4));
    for (uri, status) in [
        ("/api/models/base/neurons/3/0", StatusCode::BAD_REQUEST),
        ("/api/models/base/neurons/0/64", StatusCode::BAD_REQUEST),
        ("/api/models/base/neurons/x/1", StatusCode::NOT_FOUND),
    ] {
        let resp = test::call_service(&app, test::TestRequest::get().uri(uri).to_request()).await;
        assert_eq!(resp.status(), status, "{uri}");
    }
}

#[actix_web::test]
async fn phrase_search_classes_and_verify_endpoints() {
    let f = warm_fixture(ServerConfig::default());
    let app = app!(f);
    let get = |uri: &str| test::TestRequest::get().uri(uri).to_request();
    // A phrase: one string, tokenized as written, scored as a whole.
    let r: SearchResponse = test::call_and_read_body_json(&app, get("/api/models/base/search?tokens=%20the%20a&phrase=true&top=3")).await;
    assert!(r.phrase);
    assert_eq!(r.tokens.iter().map(|t| t.text.as_str()).collect::<Vec<_>>(), vec![" the", " a"]);
    let any: SearchResponse = test::call_and_read_body_json(&app, get("/api/models/base/search?tokens=%20the,%20a&top=3")).await;
    assert!(!any.phrase && any.top != r.top);
    let resp = test::call_service(&app, get("/api/models/base/search?tokens=a%20b%20c%20d%20e%20f%20g%20h%20i&phrase=true")).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    // Classes: per-layer counts that add up, and neurons of the class asked for.
    let c: ClassesResponse = test::call_and_read_body_json(&app, get("/api/models/base/classes?class=other&top=5")).await;
    assert_eq!((c.view, c.class, c.layers.len(), c.neurons.len()), (View::Down, NeuronClass::Other, 3, 5));
    assert!(c.layers.iter().all(|l| l.neurons == 64 && l.prediction + l.suppression + l.partition <= 64));
    for n in &c.neurons {
        assert_eq!(NeuronClass::of(&n.moments, c.median_std), NeuronClass::Other);
    }
    for uri in ["/api/models/base/classes?class=teacher", "/api/models/base/classes?top=0", "/api/models/base/classes?view=up&x=1"] {
        assert_eq!(test::call_service(&app, get(uri)).await.status(), StatusCode::BAD_REQUEST, "{uri}");
    }

    // Verify: a ranking of the asked-for size, sorted by effect; bad requests are 4xx.
    let post = |body: serde_json::Value| test::TestRequest::post().uri("/api/models/base/verify").set_json(body).to_request();
    let ok = serde_json::json!({"concept": {"tokens": [" the"]}, "prompts": [{"text": "in a", "chat": false}], "candidates": 3, "values": 3});
    let v: VerifyResponse = test::call_and_read_body_json(&app, post(ok.clone())).await;
    assert_eq!(v.neurons.len(), 3);
    assert!(v.neurons.windows(2).all(|w| w[0].effect >= w[1].effect) && v.neurons.iter().all(|n| n.curve.len() == 3));
    assert!(v.baseline > 0.0 && v.baseline < 1.0);
    for (body, status) in [
        (serde_json::json!({"concept": {"tokens": [" the"]}, "prompts": []}), StatusCode::BAD_REQUEST),
        (serde_json::json!({"concept": {"tokens": [" the"]}, "prompts": [{"text": "a"}], "values": 99}), StatusCode::BAD_REQUEST),
        (serde_json::json!({"concept": {"word": " the"}, "prompts": [{"text": "a"}]}), StatusCode::BAD_REQUEST),
        (serde_json::json!({"concept": {"tokens": ["the cat"]}, "prompts": [{"text": "a"}]}), StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let resp = test::call_service(&app, post(body.clone())).await;
        assert_eq!(resp.status(), status, "{body}");
    }
    // Priced before it runs: over a tiny budget it is refused without running.
    let small = warm_fixture(ServerConfig { max_request_flops: 1e6, ..Default::default() });
    let app = app!(small);
    let resp = test::call_service(&app, post(ok)).await;
    let (status, e) = error_of(resp).await;
    assert_eq!((status, e.code.as_str()), (StatusCode::PAYLOAD_TOO_LARGE, "over_budget"));
}

#[actix_web::test]
async fn readiness_follows_the_maps_and_the_limiter_can_trust_a_proxy() {
    // Not ready until every view's map of every model is built.
    let f = fixture(ServerConfig::default());
    let app = app!(f);
    let resp = test::call_service(&app, test::TestRequest::get().uri("/readyz").to_request()).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = test::read_body_json(resp).await;
    assert_eq!(body["ready"], false);
    assert_eq!(body["models"][0]["maps_pending"].as_array().unwrap().len(), 3);
    let f = warm_fixture(ServerConfig::default());
    let app = app!(f);
    let body: serde_json::Value = test::call_and_read_body_json(&app, test::TestRequest::get().uri("/readyz").to_request()).await;
    assert_eq!(body["ready"], true);
    assert_eq!(body["models"].as_array().unwrap().len(), 3);

    // One expensive request per minute per client. Behind a trusted proxy, the client is the last
    // X-Forwarded-For entry (what the proxy appended); a spoofed first entry changes nothing.
    let search = |xff: &str| {
        test::TestRequest::get()
            .uri("/api/models/base/search?tokens=%20the")
            .peer_addr("10.0.0.1:5000".parse().unwrap())
            .insert_header(("X-Forwarded-For", xff.to_owned()))
            .to_request()
    };
    for (trust, second, want) in [
        (true, "1.2.3.4, 203.0.113.9", StatusCode::OK),
        (true, "9.9.9.9, 203.0.113.7", StatusCode::TOO_MANY_REQUESTS),
        (false, "203.0.113.9", StatusCode::TOO_MANY_REQUESTS),
    ] {
        let f = warm_fixture(ServerConfig { rate_limit_per_minute: Some(1), trust_forwarded_for: trust, ..Default::default() });
        let app = app!(f);
        assert_eq!(test::call_service(&app, search("203.0.113.7")).await.status(), StatusCode::OK);
        assert_eq!(test::call_service(&app, search(second)).await.status(), want, "trust {trust}, second {second}");
    }
}

#[actix_web::test]
async fn sweep_next_token_and_generate_endpoints() {
    let f = fixture(ServerConfig::default());
    let app = app!(f);
    let prompt = PromptSpec { text: "the cat".into(), chat: Some(false), messages: None };
    let sweep = SweepRequest { prompt: prompt.clone(), layer: 1, neuron: 3, target: " the".into(), values: vec![-5.0, 0.0, 5.0] };
    let r: SweepResponse =
        test::call_and_read_body_json(&app, test::TestRequest::post().uri("/api/models/base/sweep").set_json(&sweep).to_request()).await;
    assert_eq!(r.points.len(), 3);
    let bad = SweepRequest { values: vec![1e9], ..sweep.clone() };
    let resp = test::call_service(&app, test::TestRequest::post().uri("/api/models/base/sweep").set_json(&bad).to_request()).await;
    assert_eq!(error_of(resp).await.1.code, "bad_input");
    let too_many = SweepRequest { values: vec![1.0; 100], ..sweep };
    let resp = test::call_service(&app, test::TestRequest::post().uri("/api/models/base/sweep").set_json(&too_many).to_request()).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let nt: NextTokenResponse = test::call_and_read_body_json(
        &app,
        test::TestRequest::post()
            .uri("/api/models/base/next-token")
            .set_json(&NextTokenRequest { prompt: prompt.clone(), clamps: vec![], top_k: 3 })
            .to_request(),
    )
    .await;
    assert_eq!(nt.top.len(), 3);
    let gen = GenerateRequest {
        prompt: PromptSpec { text: "hi".into(), chat: None, messages: None },
        clamps: vec![ClampSpec { layer: 1, neuron: 3, value: 9.0 }],
        sampling: SamplingParams { max_new_tokens: 6, ..Default::default() },
        compare: true,
        stream: false,
        samples: 1,
    };
    let g: GenerateResponse =
        test::call_and_read_body_json(&app, test::TestRequest::post().uri("/api/models/base/generate").set_json(&gen).to_request()).await;
    assert_eq!(g.completions.iter().map(|c| c.variant).collect::<Vec<_>>(), vec![Variant::Normal, Variant::Steered]);
    // Streamed: token events, then a done event with the same completions.
    let body = test::call_and_read_body(
        &app,
        test::TestRequest::post().uri("/api/models/base/generate").set_json(&GenerateRequest { stream: true, ..gen.clone() }).to_request(),
    )
    .await;
    let text = String::from_utf8_lossy(&body);
    let done = text.split("event: done\ndata: ").nth(1).expect("done event").trim();
    let streamed: GenerateResponse = serde_json::from_str(done).unwrap();
    assert_eq!(streamed.completions.iter().map(|c| &c.token_ids).collect::<Vec<_>>(), g.completions.iter().map(|c| &c.token_ids).collect::<Vec<_>>());
    // Error classes.
    let cases: Vec<(serde_json::Value, StatusCode, &str)> = vec![
        (serde_json::json!({"prompt": {"text": "x"}, "clamps": [{"layer": 9, "neuron": 0, "value": 1.0}]}), StatusCode::BAD_REQUEST, "bad_input"),
        (serde_json::json!({"prompt": {"text": "x"}, "sampling": {"temperature": -1}}), StatusCode::BAD_REQUEST, "bad_input"),
        (serde_json::json!({"prompt": {"text": "x"}, "sampling": {"max_new_tokens": 100000}}), StatusCode::BAD_REQUEST, "bad_input"),
        (serde_json::json!({"prompt": {"text": "x"}, "compare": true}), StatusCode::BAD_REQUEST, "bad_input"),
        (serde_json::json!({"prompt": {"text": "the ".repeat(300), "chat": false}}), StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
        (serde_json::json!({"prompt": "not an object"}), StatusCode::BAD_REQUEST, "bad_request"),
        (serde_json::json!({"prompt": {"text": "x".repeat(70_000)}}), StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
    ];
    for (mut body, status, code) in cases {
        // Streamed or not, bad input is refused before any work starts (the malformed-prompt and
        // oversized-body cases fail in the JSON extractor, so streaming makes no difference there).
        let extractor_fails = !body["prompt"].is_object() || body["prompt"]["text"].as_str().is_some_and(|t| t.len() > MAX_BODY);
        if !extractor_fails {
            let mut streamed = body.clone();
            streamed["stream"] = serde_json::json!(true);
            let resp = test::call_service(&app, test::TestRequest::post().uri("/api/models/base/generate").set_json(&streamed).to_request()).await;
            let (s, e) = error_of(resp).await;
            assert_eq!((s, e.code.as_str()), (status, code), "streamed: {}", e.message);
        }
        body["stream"] = serde_json::json!(false);
        let resp = test::call_service(&app, test::TestRequest::post().uri("/api/models/base/generate").set_json(&body).to_request()).await;
        let (s, e) = error_of(resp).await;
        assert_eq!((s, e.code.as_str()), (status, code), "{}", e.message);
    }
    let resp = test::call_service(
        &app,
        test::TestRequest::post()
            .uri("/api/models/base/generate")
            .insert_header(("content-type", "application/json"))
            .set_payload("{not json")
            .to_request(),
    )
    .await;
    assert_eq!(error_of(resp).await.1.code, "bad_request");
}

#[actix_web::test]
async fn compare_endpoint() {
    let f = warm_fixture(ServerConfig::default());
    let app = app!(f);
    let r: CompareResponse =
        test::call_and_read_body_json(&app, test::TestRequest::get().uri("/api/compare?a=base&b=tuned&top=1").to_request()).await;
    assert_eq!((r.changed[0].layer, r.changed[0].neuron), (1, 2));
    let resp = test::call_service(&app, test::TestRequest::get().uri("/api/compare?a=base&b=small").to_request()).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = test::call_service(&app, test::TestRequest::get().uri("/api/compare?a=base&b=gone").to_request()).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

#[actix_web::test]
async fn rate_limit_and_full_queue_answer_with_retry_after() {
    let f = warm_fixture(ServerConfig { rate_limit_per_minute: Some(2), workers: 1, queue: 0, ..Default::default() });
    let app = app!(f);
    let uri = "/api/models/base/search?tokens=in";
    for _ in 0..2 {
        let resp = test::call_service(&app, test::TestRequest::get().uri(uri).peer_addr("10.0.0.1:1".parse().unwrap()).to_request()).await;
        assert!(resp.status().is_success());
    }
    let resp = test::call_service(&app, test::TestRequest::get().uri(uri).peer_addr("10.0.0.1:1".parse().unwrap()).to_request()).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().contains_key("retry-after"));
    // Another client is not limited; with the only worker taken and no queue, it gets 503.
    let held = f.state.queue.acquire().await.unwrap();
    let gen = GenerateRequest {
        prompt: PromptSpec { text: "hi".into(), chat: None, messages: None },
        clamps: vec![],
        sampling: SamplingParams { max_new_tokens: 2, ..Default::default() },
        compare: false,
        stream: false,
        samples: 1,
    };
    let resp = test::call_service(
        &app,
        test::TestRequest::post().uri("/api/models/base/generate").peer_addr("10.0.0.2:1".parse().unwrap()).set_json(&gen).to_request(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key("retry-after"));
    drop(held);
    let resp = test::call_service(
        &app,
        test::TestRequest::post().uri("/api/models/base/generate").peer_addr("10.0.0.2:1".parse().unwrap()).set_json(&gen).to_request(),
    )
    .await;
    assert!(resp.status().is_success());
}

#[actix_web::test]
async fn a_map_not_yet_built_is_built_in_the_background_with_progress() {
    let f = fixture(ServerConfig::default());
    let app = app!(f);
    let uri = "/api/models/base/search?tokens=in&view=down";
    let resp = test::call_service(&app, test::TestRequest::get().uri(uri).to_request()).await;
    assert_eq!(resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned()), Some("2".into()));
    let (status, e) = error_of(resp).await;
    assert_eq!((status, e.code.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "map_building"));
    assert!(e.message.contains("down") && e.progress.is_some_and(|p| p <= 100), "{e:?}");
    // The build runs in the background; the same request then succeeds.
    let start = std::time::Instant::now();
    loop {
        let resp = test::call_service(&app, test::TestRequest::get().uri(uri).to_request()).await;
        if resp.status().is_success() {
            let r: SearchResponse = test::read_body_json(resp).await;
            assert_eq!(r.view, View::Down);
            break;
        }
        assert_eq!(error_of(resp).await.1.code, "map_building");
        assert!(start.elapsed() < std::time::Duration::from_secs(60), "the map was not built");
        actix_web::rt::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(f.state.models[0].engine.map_ready(View::Down, false));
    // Warming schedules the other views of every model.
    f.state.warm_maps();
    let start = std::time::Instant::now();
    while !f.state.models.iter().all(|m| View::ALL.iter().all(|&v| m.engine.map_ready(v, false))) {
        assert!(start.elapsed() < std::time::Duration::from_secs(60), "warm_maps did not build every map");
        actix_web::rt::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The builder thread updates its gauges just after a map is ready: poll for them.
    let start = std::time::Instant::now();
    loop {
        let metrics = test::call_and_read_body(&app, test::TestRequest::get().uri("/metrics").to_request()).await;
        let metrics = String::from_utf8_lossy(&metrics);
        if metrics.contains("flash_interp_map_builds_pending 0")
            && metrics.contains("flash_interp_map_build_permille{model=\"small\",view=\"gate\"} 1000")
        {
            break;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "the builds' gauges did not settle: {metrics}");
        actix_web::rt::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[actix_web::test]
async fn wrong_methods_are_405_and_tiny_scores_stay_numbers() {
    let f = warm_fixture(ServerConfig::default());
    let app = app!(f);
    for (method, uri, allow) in [
        ("PUT", "/api/models", "GET, HEAD"),
        ("GET", "/api/models/base/generate", "POST"),
        ("DELETE", "/api/models/base/sweep", "POST"),
        ("OPTIONS", "/healthz", "GET, HEAD"),
        ("PUT", "/metrics", "GET, HEAD"),
        ("DELETE", "/", "GET, HEAD"),
        ("POST", "/neuron/1/2", "GET, HEAD"),
    ] {
        let resp = test::call_service(&app, test::TestRequest::default().method(method.parse().unwrap()).uri(uri).to_request()).await;
        assert_eq!(resp.headers().get("allow").unwrap().to_str().unwrap(), allow, "{method} {uri}");
        let (status, e) = error_of(resp).await;
        assert_eq!((status, e.code.as_str()), (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"), "{method} {uri}");
    }
    for uri in ["/neuron/1/2", "/healthz", "/api/models"] {
        let resp = test::call_service(&app, test::TestRequest::default().method(actix_web::http::Method::HEAD).uri(uri).to_request()).await;
        assert_eq!(resp.status(), StatusCode::OK, "HEAD {uri}");
    }
    // Scores below ~1e-36 once became NaN (10^39 overflows f32), which JSON cannot carry.
    let body =
        test::call_and_read_body(&app, test::TestRequest::get().uri("/api/models/base/search?tokens=%20the,in,og&polarity=neg&top=3").to_request())
            .await;
    let r: SearchResponse = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body)));
    assert!(r.layers.iter().flat_map(|l| &l.scores).all(|x| x.is_finite()));
}

#[actix_web::test]
async fn concurrent_generations_share_the_batch_and_each_gets_its_own_answer() {
    let f = warm_fixture(ServerConfig { workers: 1, queue: 0, ..Default::default() });
    let app = app!(f);
    let e = f.state.models[0].engine.clone();
    let req = |text: &str, clamps: Vec<ClampSpec>, seed: u64, samples: usize, stream: bool| GenerateRequest {
        prompt: PromptSpec { text: text.into(), chat: None, messages: None },
        compare: !clamps.is_empty(),
        clamps,
        sampling: SamplingParams { max_new_tokens: 24, temperature: 0.8, seed, ..Default::default() },
        stream,
        samples,
    };
    let mut reqs = [
        req("hi there", vec![ClampSpec { layer: 1, neuron: 3, value: 9.0 }], 1, 2, false),
        req("the cat sat", vec![], 2, 1, true),
        req("a", vec![ClampSpec { layer: 0, neuron: 7, value: -5.0 }], 3, 3, false),
        req("once upon a time", vec![], 4, 4, true),
    ];
    // The first runs long enough that the others join it even when the machine is busy.
    reqs[0].sampling.max_new_tokens = 120;
    let calls =
        reqs.iter().map(|r| test::call_and_read_body(&app, test::TestRequest::post().uri("/api/models/base/generate").set_json(r).to_request()));
    let bodies = futures_util::future::join_all(calls).await;
    for (r, body) in reqs.iter().zip(bodies) {
        let text = String::from_utf8_lossy(&body);
        let got: GenerateResponse = if r.stream {
            serde_json::from_str(text.split("event: done\ndata: ").nth(1).expect("done event").trim()).unwrap()
        } else {
            serde_json::from_str(&text).unwrap()
        };
        let alone = e.generate_request(r, &flash_interp::Cancel::default(), &mut |_, _, _, _| true).unwrap();
        let ids = |g: &GenerateResponse| g.completions.iter().map(|c| (c.sample, c.variant, c.token_ids.clone(), c.text.clone())).collect::<Vec<_>>();
        assert_eq!(ids(&got), ids(&alone), "{:?}", r.prompt.text);
    }
    let (steps, job_steps) = f.state.models[0].batch.steps();
    assert!(job_steps > steps, "the requests never shared a step ({steps} steps, {job_steps} job-steps)");
    // With one worker and no queue, requests still join the running batch: the seats bound it.
    // All seats taken and no queue: 503, and nothing runs.
    // (A new seed: an identical request would be answered from the result cache.)
    let fresh = req("hi there", vec![], 99, 1, false);
    let seats = f.state.models[0].seats.acquire_many(32).await.unwrap();
    let resp = test::call_service(&app, test::TestRequest::post().uri("/api/models/base/generate").set_json(&fresh).to_request()).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(f.state.models[0].batch.steps().0, steps);
    // Each model has its own batch and seats: another model's generation still runs.
    let resp = test::call_service(&app, test::TestRequest::post().uri("/api/models/tuned/generate").set_json(&fresh).to_request()).await;
    assert!(resp.status().is_success(), "{}", resp.status());
    drop(seats);
    let resp = test::call_service(&app, test::TestRequest::post().uri("/api/models/base/generate").set_json(&fresh).to_request()).await;
    assert!(resp.status().is_success());
    let metrics = test::call_and_read_body(&app, test::TestRequest::get().uri("/metrics").to_request()).await;
    assert!(String::from_utf8_lossy(&metrics).contains("flash_interp_batch_rows 0"));
}

#[actix_web::test]
async fn a_generation_larger_than_the_batch_is_refused_before_it_runs() {
    let f = fixture(ServerConfig { batch_rows: 2, ..Default::default() });
    let app = app!(f);
    let gen = |samples| GenerateRequest {
        prompt: PromptSpec { text: "hi".into(), chat: None, messages: None },
        clamps: vec![ClampSpec { layer: 1, neuron: 3, value: 9.0 }],
        sampling: SamplingParams { max_new_tokens: 2, ..Default::default() },
        compare: true,
        stream: true,
        samples,
    };
    let resp = test::call_service(&app, test::TestRequest::post().uri("/api/models/base/generate").set_json(gen(2)).to_request()).await;
    let (status, e) = error_of(resp).await;
    assert_eq!((status, e.code.as_str()), (StatusCode::PAYLOAD_TOO_LARGE, "over_budget"), "{}", e.message);
    assert!(e.message.contains("4 rows") && e.message.contains("2 rows"), "{}", e.message);
    assert_eq!(f.state.models[0].batch.steps(), (0, 0));
    let resp = test::call_service(&app, test::TestRequest::post().uri("/api/models/base/generate").set_json(gen(1)).to_request()).await;
    assert!(resp.status().is_success());
}

/// Two generations waiting for the only worker (a sweep has it): when it frees, one brings it
/// into the batch and the other joins under it at once, rather than waiting for a second worker
/// until the first has finished.
#[actix_web::test]
async fn a_generation_waiting_for_a_worker_joins_the_batch_that_takes_one() {
    let f = warm_fixture(ServerConfig { workers: 1, queue: 4, ..Default::default() });
    let app = app!(f);
    let e = f.state.models[0].engine.clone();
    let req = |text: &str, seed: u64, n: usize| GenerateRequest {
        prompt: PromptSpec { text: text.into(), chat: None, messages: None },
        compare: false,
        clamps: vec![],
        sampling: SamplingParams { max_new_tokens: n, temperature: 0.8, seed, ..Default::default() },
        stream: false,
        samples: 1,
    };
    let reqs = [req("the cat sat", 1, 200), req("hi there", 2, 200)];
    let held = f.state.queue.acquire().await.unwrap();
    let calls =
        reqs.iter().map(|r| test::call_and_read_body(&app, test::TestRequest::post().uri("/api/models/base/generate").set_json(r).to_request()));
    let release = async {
        // Both are waiting for the worker before it frees.
        while f.state.queue.waiting() < 2 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        drop(held);
    };
    let (bodies, ()) = futures_util::future::join(futures_util::future::join_all(calls), release).await;
    for (r, body) in reqs.iter().zip(bodies) {
        let got: GenerateResponse = serde_json::from_slice(&body).unwrap();
        let alone = e.generate_request(r, &flash_interp::Cancel::default(), &mut |_, _, _, _| true).unwrap();
        assert_eq!(got.completions[0].token_ids, alone.completions[0].token_ids);
    }
    let (steps, job_steps) = f.state.models[0].batch.steps();
    assert!(job_steps > steps, "the second request waited for the first to finish ({steps} steps, {job_steps} job-steps)");
    assert_eq!(f.state.queue.waiting(), 0);
}
