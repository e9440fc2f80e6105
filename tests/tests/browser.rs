//! The web app in headless Chromium (Debian's chromium + chromedriver, driven with fantoccini)
//! against the real server with the real default model (plus two tiny random models of one shape
//! for the compare page). Screenshots land in target/screenshots/; look at them.
//!
//! The tests take a lock so that only one browser and one model run at a time on a small machine.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fantoccini::actions::{InputSource, MouseActions, PointerAction, MOUSE_BUTTON_LEFT};
use fantoccini::{Client, ClientBuilder, Locator};
use flash_interp::engine::{Engine, LoadOptions};
use flash_interp::server::ServerConfig;
use flash_interp::synthetic::{self, TinySpec};
use flash_interp_e2e::{load_default, spawn_server};

type R<T = ()> = Result<T, fantoccini::error::CmdError>;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Driver(Child);
impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn chromedriver() -> (Driver, String) {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("chromedriver not found: scripts/setup.sh installs Debian's chromium-driver");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    (Driver(child), format!("http://127.0.0.1:{port}"))
}

fn shot_dir() -> PathBuf {
    let d = repo().join("target").join("screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn shot(c: &Client, name: &str) -> R {
    std::fs::write(shot_dir().join(format!("{name}.png")), c.screenshot().await?).unwrap();
    Ok(())
}

/// A running server (real default model first, then tiny "base" and "tuned"), a chromedriver
/// and a browser session.
struct Session {
    base: String,
    c: Client,
    _driver: Driver,
    _profile: tempfile::TempDir,
    _models: tempfile::TempDir,
}

async fn start() -> Session {
    let models = tempfile::tempdir().unwrap();
    let mut engines = vec![Arc::new(load_default(&LoadOptions::default()))];
    for (name, spec) in [("base", TinySpec::default()), ("tuned", TinySpec { perturb: vec![(1, 2), (0, 7)], ..Default::default() })] {
        let p = models.path().join(format!("{name}.gguf"));
        synthetic::write_gguf(&TinySpec { scale: 2.0, ..spec }, &p).unwrap();
        let mut e = Engine::load(&p, &LoadOptions::default()).unwrap();
        e.cache_dir = models.path().join("cache");
        engines.push(Arc::new(e));
    }
    start_with(engines, models).await
}

/// A session whose server serves `engines` (the first is the picker's default).
async fn start_with(engines: Vec<Arc<Engine>>, models: tempfile::TempDir) -> Session {
    let dist = repo().join("dist");
    assert!(dist.join("index.html").exists(), "dist/ is not built: run `trunk build --release` (scripts/setup.sh does)");
    assert!(dist.join("plotly-basic.min.js").exists(), "dist/plotly-basic.min.js is missing: scripts/setup.sh runs npm ci before trunk");
    let base = spawn_server(engines, ServerConfig { dist, ..Default::default() });
    let (driver, url) = chromedriver();
    let profile = tempfile::tempdir().unwrap();
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     format!("--user-data-dir={}", profile.path().display()), "--window-size=1200,900"]
        }),
    );
    let http = hyper_util::client::legacy::connect::HttpConnector::new();
    let c = ClientBuilder::new(http).capabilities(caps).connect(&url).await.expect("connect to chromedriver");
    Session { base, c, _driver: driver, _profile: profile, _models: models }
}

async fn run(name: &str, steps: impl AsyncFnOnce(&Client, &str) -> R) {
    let _one = ONE_AT_A_TIME.lock().await;
    let s = start().await;
    finish(name, s, steps).await;
}

async fn finish(name: &str, s: Session, steps: impl AsyncFnOnce(&Client, &str) -> R) {
    let r = steps(&s.c, &s.base).await;
    if r.is_err() {
        let _ = shot(&s.c, &format!("{name}-failure")).await;
    }
    s.c.close().await.ok();
    r.expect("browser steps");
}

async fn wait(c: &Client, css: &str, secs: u64) -> R<fantoccini::elements::Element> {
    c.wait().at_most(Duration::from_secs(secs)).for_element(Locator::Css(css)).await
}

/// Poll `f` until it returns `Some`, or fail with `what` after `secs`.
async fn until<T>(secs: u64, what: &str, mut f: impl AsyncFnMut() -> R<Option<T>>) -> R<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if start.elapsed() > Duration::from_secs(secs) {
            eprintln!("timed out: {what}");
            return Err(fantoccini::error::CmdError::WaitTimeout);
        }
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until the ranked table's first row is there and differs from `old`; returns its text.
async fn first_hit_other_than(c: &Client, old: &str, secs: u64, what: &str) -> R<String> {
    until(secs, what, async || {
        let rows = c.find_all(Locator::Css("tr.hit")).await?;
        let t = match rows.first() {
            Some(r) => r.text().await?,
            None => return Ok(None),
        };
        Ok((t != old).then_some(t))
    })
    .await
}

/// After a copy button's click: `""` when it says it copied, else the text it shows for copying
/// by hand (the clipboard is refused in some headless setups).
async fn copied_or_shown(c: &Client, what: &str) -> R<String> {
    until(10, &format!("{what} copied or shown"), async || {
        if !c.find_all(Locator::Css(".copied")).await?.is_empty() {
            return Ok(Some(String::new()));
        }
        let v = js(c, "const e = document.querySelector('input.copy-text'); return e ? e.value : null").await?;
        Ok(v.as_str().map(str::to_owned))
    })
    .await
}

async fn url(c: &Client) -> R<String> {
    Ok(c.current_url().await?.to_string())
}

async fn js(c: &Client, script: &str) -> R<serde_json::Value> {
    c.execute(script, vec![]).await
}

#[actix_web::test]
async fn search_plot_neuron_page_and_sweep() {
    run("search", async |c, base| {
        // The home page opens on the gallery: measured examples, each linking to its search, its
        // neuron and the steer page of its very samples.
        c.goto(&format!("{base}/")).await?;
        wait(c, "#gallery .gallery-card", 30).await?;
        let cards = c.find_all(Locator::Css("#gallery .gallery-card")).await?;
        assert!(cards.len() >= 3, "{} gallery cards", cards.len());
        let figures = cards[0].find(Locator::Css(".figures")).await?.text().await?;
        assert!(figures.contains("at clamp") && figures.contains("steered answers"), "{figures}");
        let steer = cards[0].find(Locator::Css("a.button")).await?.attr("href").await?.unwrap_or_default();
        assert!(steer.starts_with("/steer?") && steer.contains("n=8") && steer.contains("word="), "{steer}");
        shot(c, "gallery").await?;

        // Cold load of a search permalink: the per-layer figure with one band and one tick per
        // layer, the ranked neurons with the map's first neuron for " dog" on top.
        c.goto(&format!("{base}/?q=%20dog")).await?;
        wait(c, "#search-plot[data-drawn='1']", 90).await?;
        let first_plot_ms = js(c, "return window.__fiFirstPlot").await?;
        let nav = js(c, "const n = performance.getEntriesByType('navigation')[0]; return [n.responseEnd, n.domContentLoadedEventEnd]").await?;
        println!("time to first plot on a cold load: {first_plot_ms} ms after navigation start (response end, DOMContentLoaded: {nav})");
        let layers = c.find(Locator::Css("section.figure")).await?.attr("data-layers").await?;
        assert_eq!(layers.as_deref(), Some("30"));
        assert_eq!(c.find_all(Locator::Css("#search-plot .xtick")).await?.len(), 30, "one tick per layer");
        assert_eq!(c.find_all(Locator::Css("#search-plot .scatterlayer .trace")).await?.len(), 2, "all neurons + the strongest");
        let rows = c.find_all(Locator::Css("tr.hit")).await?;
        assert_eq!(rows.len(), 20);
        let first = rows[0].text().await?;
        assert!(first.starts_with("1 29:808 neg"), "{first}");
        shot(c, "search").await?;

        // Hovering the strongest neuron's marker shows its address and top tokens; clicking it
        // opens its page. (Real pointer actions: plotly's drag layer covers the markers.)
        let marker = c.find(Locator::Css("#search-plot .scatterlayer .trace:nth-of-type(2) path.point")).await?;
        let mouse = |then: Option<()>| {
            let m = MouseActions::new("mouse".into()).then(PointerAction::MoveToElement { element: marker.clone(), duration: None, x: 0.0, y: 0.0 });
            match then {
                Some(()) => m.then(PointerAction::Down { button: MOUSE_BUTTON_LEFT }).then(PointerAction::Up { button: MOUSE_BUTTON_LEFT }),
                None => m,
            }
        };
        c.perform_actions(mouse(None)).await?;
        let hover = wait(c, "#search-plot .hoverlayer .hovertext", 10).await?.text().await?;
        assert!(hover.contains("layer 29 · neuron 808") && hover.contains("top:"), "{hover}");
        c.perform_actions(mouse(Some(()))).await?;
        let u = until(10, "clicking a marker opens the neuron page", async || {
            let u = url(c).await?;
            Ok(u.contains("/neuron/").then_some(u))
        })
        .await?;
        assert!(u.contains("/neuron/29/808"), "{u}");
        c.back().await?;
        wait(c, "#search-plot[data-drawn='1']", 30).await?;

        // Typing another concept puts it in the URL and shows its neurons; the view choice too.
        let input = c.find(Locator::Css("input#q")).await?;
        input.clear().await?;
        input.send_keys(" cat\n").await?;
        until(10, "the URL takes the new query", async || Ok(url(c).await?.contains("q=+cat").then_some(()))).await?;

        let cat_first = first_hit_other_than(c, &first, 30, "the results change").await?;
        c.find(Locator::Css("select#view")).await?.select_by_value("down").await?;
        until(10, "the URL takes the view", async || Ok(url(c).await?.contains("view=down").then_some(()))).await?;
        // The down view's map is built on first use (seconds).
        let down_first = first_hit_other_than(c, &cat_first, 120, "the down-view results").await?;
        // Reloading the permalink restores the same view.
        let permalink = url(c).await?;
        c.goto(&permalink).await?;
        wait(c, "#search-plot[data-drawn='1']", 30).await?;
        assert_eq!(c.find(Locator::Css("tr.hit")).await?.text().await?, down_first);
        assert_eq!(c.find(Locator::Css("input#q")).await?.prop("value").await?.as_deref(), Some(" cat"));

        // Scores σ-scaled on request (this model's default is the paper's): in the URL, said in
        // the caption, and kept by the links to the neurons.
        c.find(Locator::Css("select#scale")).await?.select_by_value("std").await?;
        until(10, "the URL takes the scale", async || Ok(url(c).await?.contains("scale=std").then_some(()))).await?;
        until(30, "the caption says the scores are σ-scaled", async || {
            let v = js(c, "return document.querySelector('section.figure .caption')?.textContent || ''").await?;
            Ok(v.as_str().is_some_and(|t| t.contains("σ-scaled")).then_some(()))
        })
        .await?;
        let href = js(c, "return document.querySelector('tr.hit a')?.getAttribute('href') || ''").await?;
        assert!(href.as_str().is_some_and(|h| h.contains("scale=std")), "{href}");

        // Suggestions as you type: the datalist offers single tokens completing the last piece.
        let input = c.find(Locator::Css("input#q")).await?;
        input.clear().await?;
        input.send_keys(" dog, pupp").await?;
        let opts = until(10, "token suggestions", async || {
            let v = js(c, "return [...document.querySelectorAll('#token-suggestions option')].map(o => o.value)").await?;
            let v: Vec<String> = serde_json::from_value(v).unwrap_or_default();
            Ok((!v.is_empty() && v.iter().all(|o| o.starts_with(" dog,"))).then_some(v))
        })
        .await?;
        assert!(opts.iter().any(|o| o.to_lowercase().contains("pupp")), "{opts:?}");

        // An error (a concept that is not one token) is shown, not swallowed.
        c.goto(&format!("{base}/?q=doggo")).await?;
        let err = wait(c, "main .error", 30).await?;
        assert!(err.text().await?.contains("not a single token"));

        // The neuron page: six token charts, activation statistics, similar neurons.
        c.goto(&format!("{base}/neuron/29/808")).await?;
        wait(c, "#similar tr", 60).await?;
        until(
            30,
            "six token charts",
            async || Ok((c.find_all(Locator::Css(".tokens-chart .chart[data-drawn='1']")).await?.len() == 6).then_some(())),
        )
        .await?;
        assert!(c.find(Locator::Css("#activation")).await?.text().await?.contains("positions"));
        assert!(c.find_all(Locator::Css("#similar tr")).await?.len() >= 5);
        let down_pos = c.find(Locator::Css("#tokens-down-pos")).await?.text().await?;
        assert!(down_pos.contains("dog") || down_pos.contains("cat"), "{down_pos}");
        shot(c, "neuron").await?;

        // The sweep: p(" dog") against the clamp value, drawn as a curve.
        let target = c.find(Locator::Css("#sweep-target")).await?;
        target.send_keys(" dog").await?;
        c.find(Locator::Css("form.sweep button[type=submit]")).await?.click().await?;
        until(10, "the sweep in the URL", async || Ok(url(c).await?.contains("target=+dog").then_some(()))).await?;
        wait(c, "#sweep-plot[data-drawn='1']", 60).await?;
        let d = js(c, "const p = document.querySelector('#sweep-plot .scatterlayer path.js-line'); return p ? p.getAttribute('d') : ''").await?;
        assert!(d.as_str().is_some_and(|d| d.matches('L').count() >= 10), "the sweep curve: {d}");
        let summary = c.find(Locator::Css("#sweep-summary")).await?.text().await?;
        // Clamped positive this neuron writes " dog": the highest p is at a positive clamp.
        let at: f32 = summary.rsplit("at clamp ").next().unwrap().trim_end_matches('.').parse().unwrap();
        assert!(at > 0.0, "{summary}");
        // Log axis, in the URL too; reloading restores the same figure.
        c.find(Locator::Css("#sweep-log")).await?.click().await?;
        until(10, "log in the URL", async || Ok(url(c).await?.contains("log=true").then_some(()))).await?;
        // (Polled: the old, linear figure is still drawn until the page redraws it.)
        until(30, "a log y axis", async || {
            Ok((js(c, "const p = document.getElementById('sweep-plot'); return p && p.layout ? p.layout.yaxis.type : ''").await? == "log")
                .then_some(()))
        })
        .await?;
        let permalink = url(c).await?;
        c.goto(&permalink).await?;
        wait(c, "#sweep-plot[data-drawn='1']", 60).await?;
        assert_eq!(c.find(Locator::Css("#sweep-summary")).await?.text().await?, summary);
        assert_eq!(js(c, "return document.getElementById('sweep-plot').layout.yaxis.type").await?, "log");
        js(c, "document.getElementById('sweep').scrollIntoView()").await?;
        shot(c, "neuron-sweep").await?;

        // "Steer with this neuron" opens the steer page prefilled with a clamp of this neuron.
        c.find(Locator::Css("#steer-link")).await?.click().await?;
        until(10, "the steer page", async || Ok(url(c).await?.contains("/steer?").then_some(()))).await?;
        let u = url(c).await?;
        assert!(u.contains("clamps=29%3A808%3A"), "{u}");
        wait(c, ".clamp-row", 10).await?;
        assert_eq!(c.find(Locator::Css(".clamp-layer")).await?.prop("value").await?.as_deref(), Some("29"));
        assert_eq!(c.find(Locator::Css(".clamp-neuron")).await?.prop("value").await?.as_deref(), Some("808"));
        Ok(())
    })
    .await;
}

#[actix_web::test]
async fn steer_page_streams_two_different_answers() {
    run("steer", async |c, base| {
        let link = format!("{base}/steer?prompt=What+is+your+favourite+animal%3F&clamps=29%3A808%3A12&max=96&word=dog");
        c.goto(&link).await?;
        // Streaming: text shows up before the pair is done (96 tokens: seconds of streaming even on
        // a fast machine, so a poll every ~100 ms sees a partial answer).
        let mut saw_partial = false;
        until(120, "the comparison finishes", async || {
            let Ok(pair) = c.find(Locator::Css("#pair-0")).await else { return Ok(None) };
            let done = pair.attr("data-done").await?.as_deref() == Some("1");
            if !done && !c.find(Locator::Css("#pair-0 .answer.steered")).await?.text().await?.trim_end_matches('▍').is_empty() {
                saw_partial = true;
            }
            Ok(done.then_some(()))
        })
        .await?;
        assert!(saw_partial, "the answers should stream in token by token");
        let normal = c.find(Locator::Css("#pair-0 .answer.normal")).await?.text().await?;
        let steered = c.find(Locator::Css("#pair-0 .answer.steered")).await?.text().await?;
        assert_ne!(normal, steered);
        let s = steered.to_lowercase();
        assert!(s.contains("cat") || s.contains("dog"), "steered answer: {steered}");
        assert!(c.find(Locator::Css("#mentions")).await?.text().await?.contains("steered answers"));
        shot(c, "steer").await?;

        // Every token of an answer carries its probability and the runner-ups (greedy: the
        // chosen token is the most likely, marked first); focusing one shows them.
        let toks = c.find_all(Locator::Css("#pair-0 .answer.steered .tok")).await?;
        assert!(toks.len() > 5, "{} token spans", toks.len());
        let mut joined = String::new();
        for t in &toks {
            joined.push_str(&t.text().await?);
        }
        assert_eq!(joined, steered, "the token spans make up the answer");
        let tip = toks[2].attr("data-tip").await?.unwrap_or_default();
        let lines: Vec<&str> = tip.lines().collect();
        assert!(lines.len() == 1 + shared::STEP_TOP && lines[0].contains("p = ") && lines[1].starts_with('●'), "{tip}");
        js(c, "document.querySelector('#pair-0').scrollIntoView()").await?;
        toks[2].click().await?;
        assert_eq!(js(c, "return document.activeElement.classList.contains('tok')").await?, true);
        shot(c, "steer-token").await?;

        // Reloading the link reproduces the same comparison (greedy, same seed).
        c.goto(&link).await?;
        wait(c, "#pair-0[data-done='1']", 120).await?;
        assert_eq!(c.find(Locator::Css("#pair-0 .answer.normal")).await?.text().await?, normal);
        assert_eq!(c.find(Locator::Css("#pair-0 .answer.steered")).await?.text().await?, steered);

        // A clamp value the API refuses is caught in the form; the URL and answers stay.
        let before = url(c).await?;
        let value = c.find(Locator::Css(".clamp-value")).await?;
        value.clear().await?;
        value.send_keys("5000").await?;
        c.find(Locator::Css("#generate")).await?.click().await?;
        let err = wait(c, "form.steer .error", 10).await?.text().await?;
        assert!(err.contains("1000"), "{err}");
        assert_eq!(url(c).await?, before);

        // A second clamp and "regenerate" with a new seed put both in the URL.
        value.clear().await?;
        value.send_keys("12").await?;
        c.find(Locator::Css("#add-clamp")).await?.click().await?;
        let rows = c.find_all(Locator::Css(".clamp-row")).await?;
        assert_eq!(rows.len(), 2);
        let (l, n) = (c.find_all(Locator::Css(".clamp-layer")).await?, c.find_all(Locator::Css(".clamp-neuron")).await?);
        l[1].clear().await?;
        l[1].send_keys("20").await?;
        n[1].clear().await?;
        n[1].send_keys("5").await?;
        c.find(Locator::Css("#regenerate")).await?.click().await?;
        let u = until(10, "a new URL", async || {
            let u = url(c).await?;
            Ok((u != before).then_some(u))
        })
        .await?;
        assert!(u.contains("clamps=29%3A808%3A12%2C20%3A5%3A10"), "{u}");
        assert!(u.contains("seed="), "{u}");
        wait(c, "#pair-0[data-done='1']", 120).await?;

        // Readable on a phone.
        c.set_window_size(375, 900).await?;
        shot(c, "steer-375").await?;
        Ok(())
    })
    .await;
}

/// The second real model, Gemma 3 270M (a base model with a 262,144-token vocabulary): its steer
/// page answers the plain prompt (no chat template to apply) and a clamp of its dog neuron moves
/// the answer; concept search builds its map and finds that neuron.
#[actix_web::test]
async fn gemma_steer_and_search_pages() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut gemma = Engine::load(&flash_interp_e2e::gemma_model(), &LoadOptions::default()).unwrap();
    gemma.cache_dir = flash_interp_e2e::test_map_cache();
    let s = start_with(vec![Arc::new(gemma)], tempfile::tempdir().unwrap()).await;
    finish("gemma", s, async |c, base| {
        // With no clamp yet, the steer page suggests this model's own first gallery example.
        c.goto(&format!("{base}/steer")).await?;
        let try_link = wait(c, "#steer-try", 30).await?;
        let href = try_link.attr("href").await?.unwrap_or_default();
        assert!(href.contains("model=") && href.contains("clamps=17%3A676%3A") && href.contains("word=dog"), "{href}");
        c.goto(&format!("{base}/steer?prompt=My+favourite+animal+is+the&clamps=15%3A1781%3A-20&max=24")).await?;
        wait(c, "#pair-0[data-done='1']", 120).await?;
        let chat = c.find(Locator::Css("#chat")).await?;
        assert!(!chat.is_selected().await? && !chat.is_enabled().await?, "a base model has no chat template to apply");
        let normal = c.find(Locator::Css("#pair-0 .answer.normal")).await?.text().await?;
        let steered = c.find(Locator::Css("#pair-0 .answer.steered")).await?.text().await?;
        assert_ne!(normal, steered);
        assert!(steered.contains("dog") && !normal.contains("dog"), "normal {normal:?}, steered {steered:?}");
        shot(c, "gemma-steer").await?;

        c.goto(&format!("{base}/?q=%20dog")).await?;
        let first = first_hit_other_than(c, "", 600, "Gemma's dog search (its map is built first)").await?;
        assert!(first.contains("15:1781") && first.contains("canine"), "{first}");
        wait(c, "#search-plot[data-drawn='1']", 30).await?;
        // Gemma's raw logits are flat: its scores are σ-scaled by default, and the page says so.
        let caption = c.find(Locator::Css("section.figure .caption")).await?.text().await?;
        assert!(caption.contains("σ-scaled"), "{caption}");
        shot(c, "gemma-search").await?;
        Ok(())
    })
    .await;
}

/// `?embed=1`: the neuron card, the concept plot and the steer panel without the site around
/// them, with a link back; a steer embed runs only when asked; "Embed" gives the iframe.
#[actix_web::test]
async fn embeds_and_the_embed_button() {
    run("embed", async |c, base| {
        let back = async |c: &Client| -> R<(String, Option<String>)> {
            let a = c.find(Locator::Css(".embed-footer a")).await?;
            Ok((a.attr("href").await?.unwrap_or_default(), a.attr("target").await?))
        };
        c.goto(&format!("{base}/neuron/29/808?embed=1")).await?;
        wait(c, ".tokens-chart .chart[data-drawn='1']", 60).await?;
        assert!(c.find_all(Locator::Css("header.top, #sweep, .share-bar, #steer-link, #similar")).await?.is_empty());
        assert_eq!(c.find_all(Locator::Css(".tokens-chart")).await?.len(), 6);
        assert_eq!(back(c).await?, (format!("{base}/neuron/29/808"), Some("_blank".to_owned())));
        shot(c, "embed-neuron").await?;

        c.goto(&format!("{base}/?q=+dog&view=down&embed=1")).await?;
        wait(c, "#search-plot[data-drawn='1']", 60).await?;
        assert!(c.find_all(Locator::Css("header.top, form.search, #verify, .share-bar")).await?.is_empty());
        let (href, _) = back(c).await?;
        assert!(href.starts_with(&format!("{base}/?")) && href.contains("view=down") && href.contains("dog") && !href.contains("embed"), "{href}");
        shot(c, "embed-search").await?;

        // A steer embed costs nothing until its button is pressed.
        c.goto(&format!("{base}/steer?clamps=29%3A808%3A12&max=12&embed=1")).await?;
        wait(c, "#run-embed", 30).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(c.find_all(Locator::Css("#pair-0, form.steer")).await?.is_empty());
        c.find(Locator::Css("#run-embed")).await?.click().await?;
        wait(c, "#pair-0[data-done='1']", 120).await?;
        assert!(!c.find(Locator::Css("#pair-0 .answer.steered")).await?.text().await?.is_empty());
        shot(c, "embed-steer").await?;

        // The full page's "Embed" button: the iframe of this page's embed, copied or shown.
        c.goto(&format!("{base}/neuron/29/808")).await?;
        wait(c, "#embed", 30).await?.click().await?;
        let shown = copied_or_shown(c, "the iframe").await?;
        assert!(shown.is_empty() || (shown.starts_with("<iframe src=\"http") && shown.contains("/neuron/29/808?embed=1\"")), "{shown}");
        Ok(())
    })
    .await;
}

#[actix_web::test]
async fn compare_models_picker_about_and_errors() {
    run("compare", async |c, base| {
        // The model list and its links.
        c.goto(&format!("{base}/models")).await?;
        wait(c, "li.model", 30).await?;
        let models = c.find_all(Locator::Css("li.model")).await?;
        assert_eq!(models.len(), 3);
        let text = models[0].text().await?;
        assert!(text.contains("SmolLM2") && text.contains("30 layers"), "{text}");
        shot(c, "models").await?;

        // The picker switches the model and keeps the rest of the URL.
        c.goto(&format!("{base}/?q=%20dog")).await?;
        wait(c, "#search-plot[data-drawn='1']", 90).await?;
        c.find(Locator::Css("#model-picker")).await?.select_by_value("base").await?;
        until(10, "the model in the URL", async || Ok(url(c).await?.contains("model=base").then_some(()))).await?;
        assert!(url(c).await?.contains("q=+dog") || url(c).await?.contains("q=%20dog"));
        // The tiny model's vocabulary has no " dog": the error is the API's, shown on the page.
        let err = wait(c, "main .error", 30).await?.text().await?;
        assert!(err.contains("not a single token") || err.contains("dog"), "{err}");

        // Compare two models of the same shape: per-layer share and the changed neurons.
        c.goto(&format!("{base}/compare?a=base&b=tuned")).await?;
        wait(c, "#compare-plot[data-drawn='1']", 60).await?;
        let overall = c.find(Locator::Css("#overall")).await?.text().await?;
        assert!(overall.contains("% of all neurons"), "{overall}");
        let first = c.find(Locator::Css("#changed tbody tr")).await?.text().await?;
        assert!(first.starts_with("1:2") || first.starts_with("0:7"), "the perturbed neurons changed most: {first}");
        shot(c, "compare").await?;
        c.find(Locator::Css("#changed tbody tr a")).await?.click().await?;
        until(10, "a changed neuron's page", async || Ok(url(c).await?.contains("/neuron/").then_some(()))).await?;
        wait(c, "#similar tr", 30).await?;
        // Models of different shapes: the API's error is shown.
        c.goto(&format!("{base}/compare?a=base&b={}", "smollm2-135m-instruct.q4-1")).await?;
        let err = wait(c, "main .error", 60).await?.text().await?;
        assert!(!err.is_empty());

        // A deep link opened cold renders its page (the server falls back to index.html).
        c.goto(&format!("{base}/about")).await?;
        let h1 = wait(c, "main h1", 30).await?;
        assert_eq!(h1.text().await?, "How it works");
        // A malformed link says so.
        c.goto(&format!("{base}/?view=sideways")).await?;
        assert!(wait(c, "main .error", 30).await?.text().await?.contains("malformed"));
        // Readable on a phone-sized screen.
        c.set_window_size(375, 800).await?;
        c.goto(&format!("{base}/?q=%20dog")).await?;
        wait(c, "#search-plot[data-drawn='1']", 60).await?;
        let overflow = js(c, "return document.documentElement.scrollWidth > window.innerWidth").await?;
        assert_eq!(overflow, false, "the search page scrolls sideways at 375 px");
        shot(c, "search-375").await?;
        c.goto(&format!("{base}/neuron/29/808")).await?;
        until(30, "token charts", async || Ok((c.find_all(Locator::Css(".tokens-chart .chart[data-drawn='1']")).await?.len() == 6).then_some(())))
            .await?;
        shot(c, "neuron-375").await?;
        // An unknown app path shows the app's own not-found message, not a blank page.
        c.goto(&format!("{base}/no/such/page")).await?;
        let err = wait(c, "main .error", 30).await?;
        assert!(err.text().await?.contains("does not exist"));
        Ok(())
    })
    .await;
}

#[actix_web::test]
async fn classes_page_and_causal_verification() {
    run("classes", async |c, base| {
        // Classes of the real model's down view: the stacked per-layer chart and the strongest
        // prediction neurons, each a link to its page.
        c.goto(&format!("{base}/classes")).await?;
        wait(c, "#classes-chart[data-drawn='1']", 120).await?;
        let rows = c.find_all(Locator::Css("#classes-table tr.classed")).await?;
        assert!(rows.len() >= 10, "{} prediction neurons listed", rows.len());
        let summary = c.find(Locator::Css("#classes-summary")).await?.text().await?;
        assert!(summary.contains("prediction") && summary.contains("suppression"), "{summary}");
        shot(c, "classes").await?;
        // The class picker is in the URL, and the table follows it.
        c.find(Locator::Css("#classes-class")).await?.select_by_value("suppression").await?;
        until(10, "the class in the URL", async || Ok(url(c).await?.contains("class=suppression").then_some(()))).await?;
        wait(c, "#classes-table[data-class='suppression'] tr.classed", 30).await?;
        c.find(Locator::Css("#classes-table tr.classed a.neuron-link")).await?.click().await?;
        until(10, "a classed neuron's page", async || Ok(url(c).await?.contains("/neuron/").then_some(()))).await?;

        // Causal verification from the search page: on demand only, then a ranking whose first
        // row is the map's " dog" neuron 29:808, with its sweep curve and a steer link.
        c.goto(&format!("{base}/?q=%20dog")).await?;
        wait(c, "#search-plot[data-drawn='1']", 90).await?;
        actix_web::rt::time::sleep(Duration::from_secs(1)).await;
        assert!(c.find_all(Locator::Css("#verify-table, #verify-status")).await?.is_empty(), "verification must not run by itself");
        let prompt = wait(c, "#vp", 10).await?;
        prompt.clear().await?;
        prompt.send_keys("My dog and I went for a walk. The word I am thinking of is").await?;
        wait(c, "#verify-button", 10).await?.click().await?;
        let first = wait(c, "#verify-table tr.verified", 300).await?;
        let text = first.text().await?;
        assert!(text.contains("29:808"), "causal first: {text}");
        let title = js(c, "return document.querySelector('#verify-table tr.verified svg.sparkline title').textContent").await?;
        assert!(title.as_str().unwrap_or_default().contains("clamp"), "sparkline title: {title}");
        let steer = first.find(Locator::Css("a.steer-link")).await?.attr("href").await?.unwrap_or_default();
        assert!(steer.contains("clamps=29%3A808%3A") || steer.contains("clamps=29:808:"), "{steer}");
        assert!(url(c).await?.contains("vp="), "the verify prompt is in the URL");
        js(c, "document.querySelector('#verify h2').scrollIntoView()").await?;
        shot(c, "verify").await?;

        // Share and copy-as-curl: copied, or (where the clipboard is refused) shown selected.
        c.goto(&format!("{base}/neuron/29/808")).await?;
        wait(c, "button.share", 30).await?;
        wait(c, "#curl-neuron", 30).await?.click().await?;
        let shown = copied_or_shown(c, "the curl command").await?;
        assert!(shown.is_empty() || (shown.starts_with("curl '") && shown.contains("/api/models/")), "{shown}");

        // A phrase search says how the phrase tokenizes and draws its figure.
        c.goto(&format!("{base}/?q=%20Sherlock%20Holmes&phrase=1&view=down")).await?;
        wait(c, "#search-plot[data-drawn='1']", 90).await?;
        assert_eq!(js(c, "return document.querySelector('#phrase').checked").await?, true);
        shot(c, "phrase").await?;
        Ok(())
    })
    .await;
}

/// A cold first load of each page, each in a fresh browser profile: bytes transferred (the
/// document and every resource, compressed as sent) and the time until its first chart is drawn.
/// Printed for the README (`cargo test --release -p flash-interp-e2e --test browser first_load --
/// --nocapture`); the one assertion is the size budget, never a time.
#[actix_web::test]
async fn first_load_bytes_and_time_to_first_chart() {
    for (name, path, chart) in [
        ("search", "/?q=%20dog", "#search-plot[data-drawn='1']"),
        ("neuron", "/neuron/29/808", ".tokens-chart .chart[data-drawn='1']"),
        ("classes", "/classes", "#classes-chart[data-drawn='1']"),
    ] {
        run(&format!("first-load-{name}"), async |c, base| {
            // Wait until every map is built (a JSON page: nothing of the app is cached by it),
            // so the figure is about the load, not a map build.
            until(300, "the server ready", async || {
                c.goto(&format!("{base}/readyz")).await?;
                let body = js(c, "return document.body.innerText").await?;
                Ok(body.as_str().is_some_and(|b| b.contains("\"ready\":true")).then_some(()))
            })
            .await?;
            c.goto(&format!("{base}{path}")).await?;
            wait(c, chart, 120).await?;
            let m = js(
                c,
                "const nav = performance.getEntriesByType('navigation')[0];
                 const res = performance.getEntriesByType('resource');
                 const bytes = nav.transferSize + res.reduce((s, r) => s + (r.transferSize || 0), 0);
                 const each = res.map(r => r.name.replace(location.origin, '') + ' ' + r.transferSize).join(', ');
                 return { bytes, ms: Math.round(performance.now()), resources: res.length, each };",
            )
            .await?;
            let bytes = m["bytes"].as_f64().unwrap_or(0.0);
            eprintln!(
                "first load of {name}: {:.0} KB transferred in {} resources, first chart drawn by {} ms",
                bytes / 1024.0,
                m["resources"],
                m["ms"]
            );
            eprintln!("  {}", m["each"].as_str().unwrap_or_default());
            assert!(bytes > 100.0 * 1024.0, "the browser reported too little transfer for {name}: {bytes}");
            assert!(bytes <= 800.0 * 1024.0, "{name}: {bytes} bytes on a cold load, over the 800 KB budget");
            Ok(())
        })
        .await;
    }
}
