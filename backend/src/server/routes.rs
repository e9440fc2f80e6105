//! Routes and thin handlers: parse a `shared` type, run model work off the async executor,
//! answer JSON (or Server-Sent Events for streamed generation).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::{Compress, Next};
use actix_web::web::{self, Bytes, Data, Json, Path, Query};
use actix_web::{HttpRequest, HttpResponse};
use governor::clock::{Clock, DefaultClock};
use serde::{Deserialize, Serialize};
use shared::*;
use utoipa::OpenApi;

use super::{conn, AppState, Served, ServerError};
use crate::analysis;
use crate::batch::Job;
use crate::cancel::Cancel;

type Res = Result<HttpResponse, ServerError>;

/// Largest JSON body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// All routes: `/api/...`, `/healthz`, `/metrics`, then the web app with its deep-link fallback.
pub fn configure(cfg: &mut web::ServiceConfig) {
    use actix_web::error::JsonPayloadError as J;
    cfg.app_data(web::JsonConfig::default().limit(MAX_BODY_BYTES).error_handler(|e, req| {
        let err = match &e {
            J::Overflow { .. } | J::OverflowKnownLength { .. } => {
                ServerError::Engine(crate::Error::TooLarge(format!("request body over {MAX_BODY_BYTES} bytes")))
            }
            J::Payload(p) if conn::is_timeout(p) => {
                ServerError::BodyTimeout(req.app_data::<Data<AppState>>().map_or(0, |s| s.config.body_timeout.as_secs()))
            }
            _ => ServerError::BadRequest(format!("malformed JSON body: {e}")),
        };
        err.into()
    }))
    .app_data(web::QueryConfig::default().error_handler(|e, _| ServerError::BadRequest(format!("bad query: {e}")).into()))
    .app_data(web::PathConfig::default().error_handler(|e, _| ServerError::NotFound(format!("bad path: {e}")).into()))
    .service(
        web::scope("/api")
            .wrap(actix_web::middleware::from_fn(conn::body_deadline))
            .wrap(actix_web::middleware::from_fn(observe))
            .wrap(Compress::default())
            .service(endpoint("/models", GET, get().to(models)))
            .service(endpoint("/models/{model}/tokens", GET, get().to(tokens)))
            .service(endpoint("/models/{model}/search", GET, get().to(search)))
            .service(endpoint("/models/{model}/search/card.png", GET, get().to(search_card)))
            .service(endpoint("/models/{model}/neurons/{layer}/{index}", GET, get().to(neuron)))
            .service(endpoint("/models/{model}/neurons/{layer}/{index}/card.png", GET, get().to(neuron_card)))
            .service(endpoint("/models/{model}/classes", GET, get().to(classes)))
            .service(endpoint("/models/{model}/gallery", GET, get().to(gallery)))
            .service(endpoint("/models/{model}/verify", POST, web::post().to(verify)))
            .service(endpoint("/models/{model}/sweep", POST, web::post().to(sweep)))
            .service(endpoint("/models/{model}/next-token", POST, web::post().to(next_token)))
            .service(endpoint("/models/{model}/generate", POST, web::post().to(generate)))
            .service(endpoint("/compare", GET, get().to(compare)))
            .service(endpoint("/openapi.json", GET, get().to(openapi)))
            .default_service(web::to(|| async { Err::<HttpResponse, _>(ServerError::NotFound("no such API endpoint".into())) })),
    )
    .service(endpoint("/healthz", GET, get().to(|| async { HttpResponse::Ok().json(serde_json::json!({ "status": "ok" })) })))
    .service(endpoint("/readyz", GET, get().to(readyz)))
    .service(endpoint("/metrics", GET, get().to(metrics)))
    .service(web::scope("").wrap(actix_web::middleware::from_fn(observe)).wrap(Compress::default()).default_service(web::to(app)));
}

const GET: &str = "GET, HEAD";
const POST: &str = "POST";

/// A route for GET that answers HEAD too (the same headers, no body), as HTTP expects.
fn get() -> actix_web::Route {
    web::route().guard(actix_web::guard::Any(actix_web::guard::Get()).or(actix_web::guard::Head()))
}

/// One path with one method (`route`, named by `allow`); any other method is 405 with an
/// `Allow` header and a JSON error.
fn endpoint(path: &str, allow: &'static str, route: actix_web::Route) -> actix_web::Resource {
    web::resource(path).route(route).default_service(web::to(move || async move { Err::<HttpResponse, _>(ServerError::MethodNotAllowed(allow)) }))
}

/// One log line and the metrics for every request.
async fn observe(req: ServiceRequest, next: Next<impl MessageBody>) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.path().to_owned();
    let state = req.app_data::<Data<AppState>>().cloned();
    let res = next.call(req).await?;
    let pattern = res.request().match_pattern().unwrap_or_else(|| "other".into());
    let secs = start.elapsed().as_secs_f64();
    if let Some(s) = state {
        s.metrics.requests.with_label_values(&[pattern.as_str(), res.status().as_str()]).inc();
        s.metrics.latency.with_label_values(&[pattern.as_str()]).observe(secs);
    }
    tracing::info!(target: "flash_interp::http", "{method} {path} {} {:.1}ms", res.status().as_u16(), secs * 1000.0);
    Ok(res)
}

/// Readiness for a load balancer or an orchestrator: 200 once every view's map of every model is
/// built (searches answer at once) and the web app's files are compressed, else 503 listing what
/// is still being built, with progress.
async fn readyz(state: Data<AppState>) -> HttpResponse {
    let final_norm = state.config.final_norm;
    let models: Vec<serde_json::Value> = state
        .models
        .iter()
        .map(|m| {
            let (ready, pending): (Vec<View>, Vec<View>) = View::ALL.iter().partition(|&&v| m.engine.map_ready(v, final_norm));
            // Asking schedules a map that is not scheduled yet (as a search would), so a server
            // always gets to ready; a failed build shows as null progress.
            let progress: Vec<Option<f32>> = pending
                .iter()
                .map(|&v| match state.map(m, v) {
                    Err(ServerError::MapBuilding { permille, .. }) => Some(permille.unwrap_or(0) as f32 / 10.0),
                    _ => None,
                })
                .collect();
            serde_json::json!({ "id": m.id, "maps_ready": ready, "maps_pending": pending, "progress": progress })
        })
        .collect();
    let assets = state.assets.ready();
    let ready = assets && models.iter().all(|m| m["maps_pending"].as_array().is_some_and(|p| p.is_empty()));
    let body = serde_json::json!({ "ready": ready, "assets_compressed": assets, "models": models });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().insert_header((header::RETRY_AFTER, "5")).json(body)
    }
}

/// The built web app: files from `dist/`, and `index.html` for the app's own deep links.
/// Whether a dist path carries Trunk's content hash (`name-<16 hex digits>` in some segment).
fn content_hashed(rel: &str) -> bool {
    rel.split(['/', '.', '_']).any(|part| part.rsplit_once('-').is_some_and(|(_, h)| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit())))
}

async fn app(req: HttpRequest, state: Data<AppState>) -> Res {
    if !matches!(*req.method(), actix_web::http::Method::GET | actix_web::http::Method::HEAD) {
        return Err(ServerError::MethodNotAllowed(GET));
    }
    let dist = &state.config.dist;
    let rel = req.path().trim_start_matches('/');
    let safe = !rel.split('/').any(|p| p == ".." || p.starts_with('.'));
    if safe && !rel.is_empty() {
        let file = dist.join(rel);
        // Trunk names its assets by content hash: they never change under one name. Other
        // files (plotly-basic.min.js) are revalidated with their ETag.
        let policy = if content_hashed(rel) { "public, max-age=31536000, immutable" } else { "no-cache" };
        if let Some(asset) = state.assets.get(rel) {
            let accept = req.headers().get(header::ACCEPT_ENCODING).and_then(|v| v.to_str().ok()).unwrap_or("");
            if let Some(enc) = super::assets::pick(accept) {
                let etag = format!("{}-{enc}\"", asset.etag.trim_end_matches('"'));
                let matches =
                    req.headers().get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
                let mut resp = if matches { HttpResponse::NotModified() } else { HttpResponse::Ok() };
                resp.insert_header((header::CONTENT_ENCODING, enc))
                    .insert_header((header::VARY, "Accept-Encoding"))
                    .insert_header((header::ETAG, etag))
                    .insert_header((header::CACHE_CONTROL, policy))
                    .content_type(asset.mime.as_str());
                if matches || *req.method() == actix_web::http::Method::HEAD {
                    return Ok(resp.finish());
                }
                return Ok(resp.body(if enc == "br" { asset.br.clone() } else { asset.gzip.clone() }));
            }
        }
        if file.is_file() && rel != "index.html" {
            if let Ok(f) = actix_files::NamedFile::open(&file) {
                let mut resp = f.into_response(&req);
                resp.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static(policy));
                // The same address is sent compressed to clients that accept it (or will be, once
                // the compressed copies are made at start).
                if super::assets::worth(&file) {
                    resp.headers_mut().insert(header::VARY, header::HeaderValue::from_static("Accept-Encoding"));
                }
                return Ok(resp);
            }
        }
    }
    Ok(match std::fs::read_to_string(dist.join("index.html")) {
        Ok(html) => {
            // The page's own title and link-preview tags, so a shared permalink unfurls.
            let p = super::preview::for_page(&state, req.path(), req.query_string());
            let url = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let html = super::preview::inject(&html, &p, &origin(&state, &req), url);
            HttpResponse::Ok().content_type("text/html; charset=utf-8").insert_header((header::CACHE_CONTROL, "no-cache")).body(html)
        }
        Err(_) => HttpResponse::Ok().content_type("text/html; charset=utf-8").insert_header((header::CACHE_CONTROL, "no-cache")).body(
            "<!doctype html><title>Flash Interp</title><h1>Flash Interp</h1><p>The API is running (<a href=\"/api/models\">/api/models</a>, \
             <a href=\"/api/openapi.json\">/api/openapi.json</a>). The web app is not built: see the README.</p>",
        ),
    })
}

/// The site's scheme and host, for the absolute addresses of link previews: what the client
/// asked for (its Host header), or with `trust_forwarded_for` what the proxy in front says
/// (Forwarded / X-Forwarded-Host / -Proto). A Host that is not a plain host[:port] is replaced
/// by the server's own name.
fn origin(state: &AppState, req: &HttpRequest) -> String {
    let plain = |h: &&str| !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c));
    let cfg = req.app_config();
    let (mut scheme, mut host) = (if cfg.secure() { "https" } else { "http" }, req.headers().get(header::HOST).and_then(|h| h.to_str().ok()));
    let info;
    if state.config.trust_forwarded_for {
        info = req.connection_info();
        scheme = if info.scheme() == "https" { "https" } else { "http" };
        host = Some(info.host());
    }
    format!("{scheme}://{}", host.filter(plain).unwrap_or(cfg.host()))
}

/// The address the rate limiter keys by: the connection's peer, or with `trust_forwarded_for`
/// the last valid address in `X-Forwarded-For` (what the proxy in front appended; the entries
/// before it are whatever the client sent). Without a usable header, the peer.
fn client_ip(state: &AppState, req: &HttpRequest) -> IpAddr {
    let peer = req.peer_addr().map(|a| a.ip()).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    if !state.config.trust_forwarded_for {
        return peer;
    }
    req.headers()
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse::<IpAddr>().ok())
        .last()
        .unwrap_or(peer)
}

fn check_rate(state: &AppState, req: &HttpRequest) -> Result<(), ServerError> {
    if let Some(limiter) = &state.limiter {
        if state.rate_checks.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 1024 == 1023 {
            limiter.retain_recent();
        }
        let ip = client_ip(state, req);
        if let Err(not_until) = limiter.check_key(&ip) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return Err(ServerError::RateLimited(wait.as_secs().max(1)));
        }
    }
    Ok(())
}

/// Run model work on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> crate::Result<T> + Send + 'static) -> Result<T, ServerError> {
    web::block(f).await.map_err(|e| ServerError::Internal(e.to_string()))?.map_err(ServerError::from)
}

fn json_body(body: Bytes) -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(body)
}

/// Answer from the result cache, or run `work` (a future: it starts only on a miss), cache and
/// answer. `work` is `blocking(..)` for light model work, `queued(..)` for expensive work.
async fn cached<T: Serialize>(state: &AppState, key: String, work: impl std::future::Future<Output = Result<T, ServerError>>) -> Res {
    let json = async { serde_json::to_vec(&work.await?).map_err(|e| ServerError::Internal(e.to_string())) };
    Ok(json_body(state.cache.get_or(key, json).await?))
}

/// A link-preview card: from the result cache, or drawn by `queued(..)` work (so that cards
/// wait their turn with the rest of the model work and stop when their client leaves), cached,
/// and answered as a PNG that proxies may keep for a day.
async fn cached_png(state: &AppState, key: String, work: impl std::future::Future<Output = Result<Vec<u8>, ServerError>>) -> Res {
    let png = state.cache.get_or(key, work).await?;
    Ok(HttpResponse::Ok().content_type("image/png").insert_header((header::CACHE_CONTROL, "public, max-age=86400")).body(png))
}

fn key<T: Serialize>(endpoint: &str, model: &str, v: &T) -> String {
    format!("{endpoint}|{model}|{}", serde_json::to_string(v).unwrap_or_default())
}

#[utoipa::path(get, path = "/api/models", responses((status = 200, body = Vec<ModelSummary>)))]
async fn models(state: Data<AppState>) -> HttpResponse {
    let list: Vec<ModelSummary> = state
        .models
        .iter()
        .map(|m| {
            let c = m.engine.config();
            ModelSummary {
                id: m.id.clone(),
                name: m.engine.info.name.clone(),
                architecture: c.arch.name().into(),
                format: m.engine.info.format.into(),
                layers: c.n_layers,
                neurons_per_layer: c.d_ff,
                d_model: c.d_model,
                vocab_size: c.vocab_size,
                context: c.max_seq_len,
                chat: m.engine.chat.is_some(),
                maps_ready: View::ALL.into_iter().filter(|&v| m.engine.map_ready(v, state.config.final_norm)).collect(),
                final_norm: state.config.final_norm,
                search_scale: loaded_scale(m, state.config.final_norm),
            }
        })
        .collect();
    HttpResponse::Ok().json(list)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct TokensQuery {
    /// The text to tokenize, and the prefix to suggest single tokens for.
    q: String,
    /// Tokenize `q` as a phrase search does: as written, `\xNN` and all (default: as a single
    /// token is read, where a token typed as it is shown is that one token).
    phrase: Option<bool>,
}

#[utoipa::path(get, path = "/api/models/{model}/tokens", params(("model" = String, Path), TokensQuery),
    responses((status = 200, body = TokenizeResponse), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 413, body = ApiError)))]
async fn tokens(state: Data<AppState>, model: Path<String>, q: Query<TokensQuery>) -> Res {
    let m = state.model(&model)?;
    if q.q.chars().count() > 256 {
        return Err(crate::Error::TooLarge("q is limited to 256 characters".into()).into());
    }
    let tok = &m.engine.tok;
    // A token typed as it is shown (a byte piece `\xE2\x80`, a piece that tokenizing the text
    // would not give) is that one token, as a token search reads it; a phrase is read as written.
    let ids = match q.phrase.unwrap_or(false) {
        false => tok.whole_token(&q.q).map_or_else(|| tok.encode_raw(&q.q), |id| Ok(vec![id]))?,
        true => tok.encode_raw(&q.q)?,
    };
    let tokens = ids.into_iter().map(|id| TokenInfo { id, text: tok.token_text(id) }).collect();
    let mut suggestions: Vec<&(String, u32)> = Vec::new();
    if !q.q.is_empty() {
        for prefix in [q.q.clone(), format!(" {}", q.q.trim_start())] {
            let start = m.vocab.partition_point(|(t, _)| t.as_str() < prefix.as_str());
            suggestions.extend(m.vocab[start..].iter().take_while(|(t, _)| t.starts_with(&prefix)).take(200));
        }
    }
    suggestions.sort_by_key(|(t, id)| (t.len(), *id));
    suggestions.dedup();
    let suggestions = suggestions.into_iter().take(10).map(|(t, id)| TokenInfo { id: *id, text: t.clone() }).collect();
    Ok(HttpResponse::Ok().json(TokenizeResponse { tokens, suggestions }))
}

#[derive(Deserialize, Serialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct SearchQuery {
    /// Comma-separated single tokens, e.g. ` dog, dogs` (URL-encoded; spaces matter); or with
    /// `phrase=true`, one phrase of up to 8 tokens, e.g. ` Sherlock Holmes`, scored as a whole.
    tokens: String,
    /// Score `tokens` as one phrase (the geometric mean of its tokens' normalised probabilities).
    phrase: Option<bool>,
    /// up (default), gate or down.
    view: Option<View>,
    /// Strongest neurons to list (default 20, at most 100).
    top: Option<usize>,
    /// Only this polarity (pos or neg); default: the stronger of the two for each neuron.
    polarity: Option<Polarity>,
    /// Most points per layer in `layers` (default 512; 0: every neuron). Fewer points keep the
    /// plot's envelope: each run of neurons keeps its highest and lowest score.
    points: Option<usize>,
    /// How each neuron's logits are scaled before the softmax: raw (the paper's) or std (divided
    /// by their standard deviation over the vocabulary). Default: raw, unless the model's raw
    /// logits are too flat to tell tokens apart (median std < 0.1 nat, e.g. Gemma 3); then std.
    scale: Option<Scale>,
}

/// A search query's concept: one phrase, or comma-separated alternatives.
pub(crate) fn concept_of(tokens: &str, phrase: bool) -> Concept {
    if phrase {
        Concept::Phrase(tokens.to_owned())
    } else {
        Concept::Tokens(tokens.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect())
    }
}

/// Round to 3 significant digits: plots need no more, and it keeps an 8B model's response small.
/// Computed in f64, where the scale of the smallest f32 (10^47) does not overflow.
fn round3(x: f32) -> f32 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let x = x as f64;
    let scale = 10f64.powi(2 - x.abs().log10().floor() as i32);
    ((x * scale).round() / scale) as f32
}

#[utoipa::path(get, path = "/api/models/{model}/search", params(("model" = String, Path), SearchQuery),
    responses((status = 200, body = SearchResponse), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 422, body = ApiError), (status = 429, body = ApiError), (status = 503, body = ApiError)))]
async fn search(req: HttpRequest, state: Data<AppState>, model: Path<String>, q: Query<SearchQuery>) -> Res {
    check_rate(&state, &req)?;
    let m = state.model(&model)?;
    let phrase = q.phrase.unwrap_or(false);
    let concept = concept_of(&q.tokens, phrase);
    let top = q.top.unwrap_or(20);
    if top == 0 || top > 100 {
        return Err(crate::Error::bad("top must be between 1 and 100").into());
    }
    let ids = analysis::ConceptIds::resolve(&m.engine, &concept)?.ids;
    let (engine, view, final_norm, only) = (m.engine.clone(), q.view.unwrap_or(View::Up), state.config.final_norm, q.polarity);
    let points = q.points.unwrap_or(limits::SEARCH_POINTS);
    let map = state.map(m, view)?;
    let scale = q.scale.unwrap_or_else(|| analysis::default_scale(&map));
    cached(
        &state,
        key("search", &m.id, &(&ids, phrase, view, top, only, points, scale)),
        blocking(move || {
            let r = analysis::search_concept(&engine, &map, &ids, phrase, top, only, scale)?;
            let layers = r
                .signed_layers(engine.config().d_ff)
                .into_iter()
                .map(|l| LayerScores::decimate(&l.into_iter().map(round3).collect::<Vec<_>>(), points))
                .collect();
            Ok(SearchResponse {
                tokens: ids.iter().map(|&id| TokenInfo { id, text: engine.tok.token_text(id) }).collect(),
                view,
                final_norm,
                layers,
                top: r.top,
                phrase,
                scale,
            })
        }),
    )
    .await
}

/// The scale a search of `m` uses by default, once its up map is in memory (never waits for one).
fn loaded_scale(m: &Served, final_norm: bool) -> Option<Scale> {
    m.engine.map_if_ready(View::Up, final_norm).map(|map| analysis::default_scale(&map))
}

/// The query of a concept card: a search's, without `top`.
#[derive(Deserialize, Serialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct SearchCardQuery {
    /// As for the search.
    pub tokens: String,
    pub phrase: Option<bool>,
    pub view: Option<View>,
    pub polarity: Option<Polarity>,
    pub scale: Option<Scale>,
}

#[utoipa::path(get, path = "/api/models/{model}/search/card.png", params(("model" = String, Path), SearchCardQuery),
    responses((status = 200, description = "a 1200 x 630 PNG of every neuron's score for the concept, layer by layer, for link previews", content_type = "image/png"),
        (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 422, body = ApiError), (status = 429, body = ApiError), (status = 503, body = ApiError)))]
async fn search_card(req: HttpRequest, state: Data<AppState>, model: Path<String>, q: Query<SearchCardQuery>) -> Res {
    check_rate(&state, &req)?;
    let m = state.model(&model)?;
    let phrase = q.phrase.unwrap_or(false);
    let concept = concept_of(&q.tokens, phrase);
    let ids = analysis::ConceptIds::resolve(&m.engine, &concept)?.ids;
    let (engine, view, only) = (m.engine.clone(), q.view.unwrap_or(View::Up), q.polarity);
    let map = state.map(m, view)?;
    let scale = q.scale.unwrap_or_else(|| analysis::default_scale(&map));
    let k = key("search-card", &m.id, &(&ids, phrase, view, only, scale));
    cached_png(
        &state,
        k,
        queued(&state, &req, move |_| {
            let r = analysis::search_concept(&engine, &map, &ids, phrase, 3, only, scale)?;
            let layers = r.signed_layers(engine.config().d_ff);
            let marks: Vec<(usize, usize, String)> = r.top.iter().map(|h| (h.layer, h.neuron, format!("{}:{}", h.layer, h.neuron))).collect();
            let words: Vec<String> = ids.iter().map(|&t| engine.tok.token_text(t)).collect();
            let title = if phrase {
                format!("“{}”", words.concat().trim())
            } else {
                format!("“{}”", words.iter().map(|w| w.trim()).collect::<Vec<_>>().join(", "))
            };
            let strongest = r.top.first().map(|h| format!(" · strongest {}:{} ({:.2})", h.layer, h.neuron, h.score)).unwrap_or_default();
            let scaled = if scale == Scale::Std { " · σ-scaled" } else { "" };
            let subtitle = format!("{} · {} view{scaled}{strongest}", engine.info.name, view.as_str());
            crate::card::layers_png(&title, &subtitle, &layers, &marks)
        }),
    )
    .await
}

#[utoipa::path(get, path = "/api/models/{model}/neurons/{layer}/{index}/card.png",
    params(("model" = String, Path), ("layer" = usize, Path), ("index" = usize, Path)),
    responses((status = 200, description = "a 1200 x 630 PNG of the neuron's top tokens (up view, its more peaked polarity), for link previews", content_type = "image/png"),
        (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 429, body = ApiError), (status = 503, body = ApiError)))]
async fn neuron_card(req: HttpRequest, state: Data<AppState>, path: Path<(String, usize, usize)>) -> Res {
    check_rate(&state, &req)?;
    let (model, layer, index) = path.into_inner();
    let m = state.model(&model)?;
    crate::limits::check_layer_neuron(layer, index, m.engine.config())?;
    let map = state.map(m, View::Up)?;
    let engine = m.engine.clone();
    cached_png(
        &state,
        key("neuron-card", &m.id, &(layer, index)),
        queued(&state, &req, move |_| {
            // On the scale the neuron's page shows by default.
            let scale = analysis::default_scale(&map);
            let polarity = map.peaked_polarity(layer, index);
            let ids = map.top(polarity, layer, index).0;
            let norms = map.normalised_top(polarity, layer, index, scale);
            let bars: Vec<(String, f32)> = ids.iter().zip(norms).take(10).map(|(&t, n)| (engine.tok.token_text(t), n)).collect();
            let pol = if polarity == Polarity::Pos { "pos" } else { "neg" };
            let scaled = if scale == Scale::Std { ", σ-scaled" } else { "" };
            let subtitle = format!("{} · up view, {pol} · p / mean top-100 p{scaled}", engine.info.name);
            crate::card::bars_png(&format!("Neuron {layer}:{index}"), &subtitle, &bars)
        }),
    )
    .await
}

#[derive(Deserialize, Serialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ClassesQuery {
    /// down (default: what a neuron writes, the view the classes are defined on), up or gate.
    view: Option<View>,
    /// The class whose strongest neurons to list (default prediction).
    class: Option<NeuronClass>,
    /// How many (default 20, at most 100).
    top: Option<usize>,
}

#[utoipa::path(get, path = "/api/models/{model}/classes", params(("model" = String, Path), ClassesQuery),
    responses((status = 200, body = ClassesResponse), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 429, body = ApiError), (status = 503, body = ApiError)))]
async fn classes(req: HttpRequest, state: Data<AppState>, model: Path<String>, q: Query<ClassesQuery>) -> Res {
    check_rate(&state, &req)?;
    let m = state.model(&model)?;
    let top = q.top.unwrap_or(20);
    if top == 0 || top > 100 {
        return Err(crate::Error::bad("top must be between 1 and 100").into());
    }
    let (engine, view, class) = (m.engine.clone(), q.view.unwrap_or(View::Down), q.class.unwrap_or(NeuronClass::Prediction));
    let map = state.map(m, view)?;
    cached(&state, key("classes", &m.id, &(view, class, top)), blocking(move || analysis::classes(&engine, &map, class, top))).await
}

#[utoipa::path(get, path = "/api/models/{model}/gallery", params(("model" = String, Path)),
    responses((status = 200, body = GalleryResponse), (status = 404, body = ApiError), (status = 429, body = ApiError)))]
async fn gallery(req: HttpRequest, state: Data<AppState>, model: Path<String>) -> Res {
    check_rate(&state, &req)?;
    let engine = state.model(&model)?.engine.clone();
    let examples = blocking(move || crate::gallery::Gallery::stored().for_engine(&engine)).await?;
    Ok(HttpResponse::Ok().json(GalleryResponse { examples }))
}

#[utoipa::path(post, path = "/api/models/{model}/verify", params(("model" = String, Path)), request_body = VerifyRequest,
    responses((status = 200, body = VerifyResponse), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 408, body = ApiError), (status = 413, body = ApiError), (status = 422, body = ApiError), (status = 429, body = ApiError), (status = 503, body = ApiError)))]
async fn verify(req: HttpRequest, state: Data<AppState>, model: Path<String>, body: Json<VerifyRequest>) -> Res {
    check_rate(&state, &req)?;
    let m = state.model(&model)?;
    let (engine, body) = (m.engine.clone(), body.into_inner());
    let plan = analysis::VerifyPlan::new(&engine, &body)?;
    state.check_work(plan.cost(&engine))?;
    // Candidates come from every view's map: each must be built (503 map_building until then).
    let maps = View::ALL.iter().map(|&v| state.map(m, v)).collect::<Result<Vec<_>, _>>()?;
    cached(&state, key("verify", &m.id, &body), queued(&state, &req, move |c| analysis::verify(&engine, &maps, &plan, c))).await
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct NeuronQuery {
    /// Tokens per view and polarity (default 20, at most 100).
    tokens: Option<usize>,
    /// How the logits are scaled for the tokens' normalised probabilities: raw (the paper's) or
    /// std (divided by their standard deviation). Default: what a search of the model uses by
    /// default (std where its raw logits are flat, e.g. Gemma 3), once its up map is built.
    scale: Option<Scale>,
}

#[utoipa::path(get, path = "/api/models/{model}/neurons/{layer}/{index}",
    params(("model" = String, Path), ("layer" = usize, Path), ("index" = usize, Path), NeuronQuery),
    responses((status = 200, body = NeuronDetail), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 429, body = ApiError)))]
async fn neuron(req: HttpRequest, state: Data<AppState>, path: Path<(String, usize, usize)>, q: Query<NeuronQuery>) -> Res {
    check_rate(&state, &req)?;
    let (model, layer, index) = path.into_inner();
    let m = state.model(&model)?;
    let n = q.tokens.unwrap_or(20);
    if n == 0 || n > 100 {
        return Err(crate::Error::bad("tokens must be between 1 and 100").into());
    }
    crate::limits::check_layer_neuron(layer, index, m.engine.config())?;
    let (engine, final_norm) = (m.engine.clone(), state.config.final_norm);
    let scale = q.scale.unwrap_or_else(|| loaded_scale(m, final_norm).unwrap_or_default());
    cached(
        &state,
        key("neuron", &m.id, &(layer, index, n, scale)),
        blocking(move || analysis::neuron_detail(&engine, layer, index, final_norm, n, scale)),
    )
    .await
}

/// A worker, held while a request's model work runs: its queue permit, and one count in the
/// `generations_running` gauge, both given back when it is dropped (however the work ends).
struct Worker {
    permit: tokio::sync::OwnedSemaphorePermit,
    running: Running,
}

/// One count in the `generations_running` gauge, taken back when dropped.
struct Running(prometheus::IntGauge);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A worker from the bounded queue, given up if the client leaves while it waits.
async fn admit(state: &AppState, req: &HttpRequest) -> Result<Worker, ServerError> {
    tokio::select! {
        permit = state.queue.acquire() => permit.map(|p| {
            state.metrics.running.inc();
            Worker { permit: p, running: Running(state.metrics.running.clone()) }
        }),
        () = conn::client_gone(req) => {
            state.metrics.abandoned.inc();
            Err(ServerError::ClientGone)
        }
    }
}

/// Run expensive work (sweeps, next-token, generations) through the bounded worker queue. If the
/// client leaves, its queue place is freed at once, and running work is cancelled (it stops at
/// the next layer and frees the worker).
async fn queued<T: Send + 'static>(
    state: &Data<AppState>,
    req: &HttpRequest,
    f: impl FnOnce(&Cancel) -> crate::Result<T> + Send + 'static,
) -> Result<T, ServerError> {
    let worker = admit(state, req).await?;
    let cancel = Cancel::default();
    let c = cancel.clone();
    let work = blocking(move || {
        let _worker = worker;
        f(&c)
    });
    // However this function ends, the guard cancels the work: when the client is seen to leave,
    // when actix drops the handler (it does when the connection fails, e.g. a reset), and after
    // the work is done, where cancelling changes nothing.
    let _guard = CancelOnDrop(cancel);
    tokio::select! {
        r = work => r,
        () = conn::client_gone(req) => {
            state.metrics.abandoned.inc();
            Err(ServerError::ClientGone)
        }
    }
}

#[utoipa::path(post, path = "/api/models/{model}/sweep", params(("model" = String, Path)), request_body = SweepRequest,
    responses((status = 200, body = SweepResponse), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 408, body = ApiError), (status = 413, body = ApiError), (status = 422, body = ApiError), (status = 429, body = ApiError), (status = 503, body = ApiError)))]
async fn sweep(req: HttpRequest, state: Data<AppState>, model: Path<String>, body: Json<SweepRequest>) -> Res {
    check_rate(&state, &req)?;
    let m = state.model(&model)?;
    let (engine, body) = (m.engine.clone(), body.into_inner());
    state.check_work(engine.sweep_work(&body)?)?;
    cached(&state, key("sweep", &m.id, &body), queued(&state, &req, move |c| engine.sweep_request(&body, c))).await
}

#[utoipa::path(post, path = "/api/models/{model}/next-token", params(("model" = String, Path)), request_body = NextTokenRequest,
    responses((status = 200, body = NextTokenResponse), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 408, body = ApiError), (status = 413, body = ApiError), (status = 422, body = ApiError), (status = 429, body = ApiError), (status = 503, body = ApiError)))]
async fn next_token(req: HttpRequest, state: Data<AppState>, model: Path<String>, body: Json<NextTokenRequest>) -> Res {
    check_rate(&state, &req)?;
    let m = state.model(&model)?;
    let (engine, body) = (m.engine.clone(), body.into_inner());
    state.check_work(engine.next_token_work(&body)?)?;
    cached(&state, key("next", &m.id, &body), queued(&state, &req, move |c| engine.next_token_request(&body, c))).await
}

/// Cancels work when dropped: a request's work once its handler or response stream is dropped.
struct CancelOnDrop(Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A streamed generation's hold on its job, kept by the response stream: when actix drops the
/// stream before it has ended (the client went away), the request counts as abandoned; either
/// way the job is cancelled (which changes nothing once it is done).
struct StreamHold {
    _cancel: CancelOnDrop,
    /// The counter to count the request in, until the stream has ended.
    abandoned: Option<prometheus::IntCounter>,
}

impl Drop for StreamHold {
    fn drop(&mut self) {
        if let Some(c) = self.abandoned.take() {
            c.inc();
        }
    }
}

fn sse(event: &str, data: &impl Serialize) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {}\n\n", serde_json::to_string(data).unwrap_or_default()))
}

#[utoipa::path(post, path = "/api/models/{model}/generate", params(("model" = String, Path)), request_body = GenerateRequest,
    responses((status = 200, description = "GenerateResponse JSON, or with stream: true a text/event-stream of `token` events (TokenEvent) and a final `done` event (GenerateResponse), or an `error` event (ApiError) if the generation fails after the stream began", body = GenerateResponse),
        (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 408, body = ApiError), (status = 413, body = ApiError), (status = 422, body = ApiError), (status = 429, body = ApiError), (status = 503, body = ApiError)))]
async fn generate(req: HttpRequest, state: Data<AppState>, model: Path<String>, body: Json<GenerateRequest>) -> Res {
    check_rate(&state, &req)?;
    let m = state.model(&model)?;
    let body = body.into_inner();
    // Fail fast on bad input or too much work, before taking a seat or starting a stream.
    state.check_work(m.engine.generate_work(&body)?)?;
    if !body.stream {
        let k = key("generate", &m.id, &body);
        let st = state.clone();
        let work = async {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let on_text = move |_: usize, _: Variant, _: &str, _: &[TokenStep]| {
                st.metrics.tokens.inc();
                true
            };
            let _guard = batched(&state, &req, m, &body, on_text, move |r| drop(tx.send(r))).await?;
            tokio::select! {
                r = rx => Ok(r.map_err(|_| ServerError::Internal("the generation batch dropped a request".into()))??),
                () = conn::client_gone(&req) => {
                    state.metrics.abandoned.inc();
                    Err(ServerError::ClientGone)
                }
            }
        };
        return cached(&state, k, work).await;
    }
    // The stream's channel is unbounded so that a slow reader never holds up the batch; what
    // it can hold is bounded by the request's own size (its rows × max_new_tokens).
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let (st, last) = (state.clone(), tx.clone());
    // Once the client has gone, actix drops the response stream: the cancel guard in it takes
    // the job out of the batch before the next step, and sends fail so no more text is made.
    let on_text = move |sample, variant, text: &str, steps: &[TokenStep]| {
        st.metrics.tokens.inc();
        tx.send(sse("token", &TokenEvent { sample, variant, text: text.to_owned(), steps: steps.to_vec() })).is_ok()
    };
    let done = move |r: crate::Result<GenerateResponse>| {
        let event = match r {
            Ok(resp) => sse("done", &resp),
            Err(crate::Error::Cancelled) => return,
            Err(e) => {
                let e = ServerError::from(e);
                sse("error", &ApiError::new(e.code(), e.public_message()))
            }
        };
        let _ = last.send(event);
    };
    let hold = StreamHold { _cancel: batched(&state, &req, m, &body, on_text, done).await?, abandoned: Some(state.metrics.abandoned.clone()) };
    // The answer is whole once its last event (`done` or `error`) is handed to the connection;
    // the stream ends after it, when the job has dropped both senders.
    let stream = futures_util::stream::unfold((rx, hold), |(mut rx, mut hold)| async move {
        let b = rx.recv().await?;
        if b.starts_with(b"event: done") || b.starts_with(b"event: error") {
            hold.abandoned.take();
        }
        Some((Ok::<_, actix_web::Error>(b), (rx, hold)))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(stream))
}

/// A generation into its model's batch: seats for its rows (waiting in the bounded queue while
/// the batch is full), a place under the batch's worker permit (a permit from the worker queue
/// when the batch holds none), then the job. `done` gets its response or error. Dropping the
/// returned guard cancels the job: it leaves the batch before the next step and frees its seats.
async fn batched(
    state: &Data<AppState>,
    req: &HttpRequest,
    m: &Served,
    body: &GenerateRequest,
    on_text: impl FnMut(usize, Variant, &str, &[TokenStep]) -> bool + Send + 'static,
    done: impl FnOnce(crate::Result<GenerateResponse>) + Send + 'static,
) -> Result<CancelOnDrop, ServerError> {
    let cancel = Cancel::default();
    let mut job = Job::request(&m.engine, body, cancel.clone(), on_text, done)?;
    let most = state.config.batch_rows.max(1);
    if job.rows() > most {
        let e = format!("{} rows (samples × variants) exceed this server's generation batch of {most} rows", job.rows());
        return Err(crate::Error::OverBudget(e).into());
    }
    let seats = tokio::select! {
        seats = m.seats.acquire_many(job.rows() as u32) => seats?,
        () = conn::client_gone(req) => {
            state.metrics.abandoned.inc();
            return Err(ServerError::ClientGone);
        }
    };
    let (member, running) = loop {
        // Listening before looking, so that a worker the batch takes in between is not missed.
        let gained = m.batch.worker_gained();
        tokio::pin!(gained);
        gained.as_mut().enable();
        if let Some(member) = m.batch.join() {
            state.metrics.running.inc();
            break (member, Running(state.metrics.running.clone()));
        }
        // The batch holds no worker: bring one from the worker queue, unless another request
        // brings one first (then join under it rather than wait for a second one).
        tokio::select! {
            worker = admit(state, req) => {
                let Worker { permit, running } = worker?;
                break (m.batch.join_with(Box::new(permit)), running);
            }
            () = &mut gained => {}
        }
    };
    job.hold = Some(Box::new((seats, member, running)));
    m.batch.submit(job);
    Ok(CancelOnDrop(cancel))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct CompareQuery {
    /// First model id (e.g. the base model).
    a: String,
    /// Second model id (e.g. the instruct model).
    b: String,
    /// Most-changed neurons to list (default 20, at most 200).
    top: Option<usize>,
}

#[utoipa::path(get, path = "/api/compare", params(CompareQuery),
    responses((status = 200, body = CompareResponse), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 429, body = ApiError), (status = 503, body = ApiError)))]
async fn compare(req: HttpRequest, state: Data<AppState>, q: Query<CompareQuery>) -> Res {
    check_rate(&state, &req)?;
    let (a, b) = (state.model(&q.a)?, state.model(&q.b)?);
    let top = q.top.unwrap_or(20);
    if top == 0 || top > 200 {
        return Err(crate::Error::bad("top must be between 1 and 200").into());
    }
    let (ea, eb) = (a.engine.clone(), b.engine.clone());
    let (ma, mb) = (state.map(a, View::Up)?, state.map(b, View::Up)?);
    cached(&state, key("compare", &format!("{}|{}", a.id, b.id), &top), blocking(move || analysis::compare_models(&ea, &eb, &ma, &mb, top))).await
}

async fn metrics(state: Data<AppState>) -> HttpResponse {
    state.metrics.queue_depth.set((state.queue.waiting() + state.models.iter().map(|m| m.seats.waiting()).sum::<usize>()) as i64);
    state.metrics.batch_rows.set(state.models.iter().map(|m| m.batch.rows()).sum::<usize>() as i64);
    state.metrics.prompt_hits.set(state.models.iter().map(|m| m.batch.prompts().stats().0).sum::<u64>() as i64);
    state.metrics.prompt_bytes.set(state.models.iter().map(|m| m.batch.prompts().bytes()).sum::<usize>() as i64);
    let text = prometheus::TextEncoder::new().encode_to_string(&state.metrics.registry.gather()).unwrap_or_default();
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(text)
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Flash Interp API", description = "Find and steer feature neurons of Llama-style models. Errors are ApiError {code, message}."),
    paths(models, tokens, search, search_card, neuron, neuron_card, classes, gallery, verify, sweep, next_token, generate, compare),
    components(schemas(
        ApiError,
        ModelSummary,
        TokenizeResponse,
        TokenInfo,
        SearchResponse,
        LayerScores,
        SearchHit,
        NeuronDetail,
        ViewTokens,
        TokenScore,
        ActivationStats,
        SimilarNeuron,
        ClassesResponse,
        GalleryResponse,
        GalleryExample,
        GalleryMeasured,
        LayerClassCounts,
        ClassedNeuron,
        ViewClass,
        Moments,
        NeuronClass,
        VerifyRequest,
        VerifyResponse,
        VerifiedNeuron,
        Concept,
        SweepRequest,
        SweepResponse,
        SweepPoint,
        NextTokenRequest,
        NextTokenResponse,
        TokenProb,
        GenerateRequest,
        GenerateResponse,
        Completion,
        TokenEvent,
        TokenStep,
        PromptSpec,
        ChatMessage,
        SamplingParams,
        ClampSpec,
        CompareResponse,
        LayerAgreement,
        ChangedNeuron,
        View,
        Polarity,
        Variant,
        StopReason
    )),
    modifiers(&ErrorDescriptions)
)]
pub struct ApiDoc;

/// What each error status means, written once for every endpoint's ApiError responses (the
/// handlers' `responses(..)` list only the statuses each can return).
struct ErrorDescriptions;

impl utoipa::Modify for ErrorDescriptions {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let describe = |status: &str| match status {
            "400" => "bad input",
            "404" => "unknown model",
            "408" => "the request body was not sent in time",
            "413" => "too large, or more work than one request may ask for",
            "422" => "a token the model does not have, or a value that is not a finite number",
            "429" => "rate limited (see Retry-After)",
            "503" => "busy, or the map this needs is still building (see Retry-After; `progress` says how far)",
            _ => "",
        };
        for item in doc.paths.paths.values_mut() {
            for op in [&mut item.get, &mut item.post].into_iter().flatten() {
                for (status, response) in op.responses.responses.iter_mut() {
                    if let utoipa::openapi::RefOr::T(r) = response {
                        if r.description.is_empty() {
                            r.description = describe(status).to_owned();
                        }
                    }
                }
            }
        }
    }
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok().json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::round3;

    #[test]
    fn round3_keeps_three_digits_at_every_magnitude() {
        assert_eq!(round3(1.23456), 1.23);
        assert_eq!(round3(-1234.5), -1230.0);
        assert_eq!(round3(0.0), 0.0);
        // Below ~1e-36 the f32 scale 10^(2 - log10 x) overflowed and the result was NaN.
        for x in [1e-36f32, 2.345e-38, 1e-40, 1e-45, f32::MIN_POSITIVE, 3e38] {
            let r = round3(x);
            assert!(r.is_finite() && (r - x).abs() <= x.abs() * 5e-3 + 1e-45, "{x} -> {r}");
        }
    }
}
