//! The web app in headless Chromium (Debian's chromium + chromedriver, driven with fantoccini)
//! against the real server and the real default model. Screenshots land in target/screenshots/.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fantoccini::{ClientBuilder, Locator};
use flash_interp::engine::{Engine, LoadOptions};
use flash_interp::server::ServerConfig;
use flash_interp_e2e::{default_model, spawn_server};

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

#[actix_web::test]
async fn search_permalinks_models_and_about_pages_work_in_a_browser() {
    let dist = repo().join("dist");
    assert!(dist.join("index.html").exists(), "dist/ is not built: run `trunk build --release` (scripts/setup.sh does)");
    let engine = Arc::new(Engine::load(&default_model(), &LoadOptions::default()).unwrap());
    let base = spawn_server(vec![engine], ServerConfig { dist, ..Default::default() });
    let (_driver, url) = chromedriver();
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
    let c = ClientBuilder::rustls().expect("rustls").capabilities(caps).connect(&url).await.expect("connect to chromedriver");
    let result = async {
        // Cold load of a search permalink: the per-layer bars and the ranked neurons, with the
        // map's first neuron for " dog" on top.
        c.goto(&format!("{base}/?q=%20dog")).await?;
        let row = c.wait().at_most(Duration::from_secs(60)).for_element(Locator::Css("tr.hit")).await?;
        let first = row.text().await?;
        assert!(first.starts_with("29 808 neg"), "{first}");
        assert_eq!(c.find_all(Locator::Css("li.bar-row")).await?.len(), 30, "one bar per layer");
        std::fs::write(shot_dir().join("search.png"), c.screenshot().await?).unwrap();
        // Typing another concept puts it in the URL and shows its neurons.
        let input = c.find(Locator::Css("input#q")).await?;
        input.clear().await?;
        input.send_keys(" cat\n").await?;
        let start = Instant::now();
        while !c.current_url().await?.as_str().contains("q=%20cat") {
            assert!(start.elapsed() < Duration::from_secs(10), "the URL did not take the new query");
            actix_web::rt::time::sleep(Duration::from_millis(100)).await;
        }
        let start = Instant::now();
        loop {
            // While the new search runs the table is replaced by the loading message.
            let rows = c.find_all(Locator::Css("tr.hit")).await?;
            let t = match rows.first() {
                Some(r) => r.text().await?,
                None => first.clone(),
            };
            if t != first {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "the results did not change");
            actix_web::rt::time::sleep(Duration::from_millis(200)).await;
        }
        // Reloading the permalink restores the same view.
        let permalink = c.current_url().await?;
        let before = c.find(Locator::Css("tr.hit")).await?.text().await?;
        c.goto(permalink.as_str()).await?;
        let after = c.wait().at_most(Duration::from_secs(30)).for_element(Locator::Css("tr.hit")).await?.text().await?;
        assert_eq!(before, after);
        // An error (a concept that is not one token) is shown, not swallowed.
        c.goto(&format!("{base}/?q=doggo")).await?;
        let err = c.wait().at_most(Duration::from_secs(30)).for_element(Locator::Css("main .error")).await?;
        assert!(err.text().await?.contains("not a single token"));
        // The model list.
        c.goto(&format!("{base}/models")).await?;
        let li = c.wait().at_most(Duration::from_secs(30)).for_element(Locator::Css("li.model")).await?;
        let text = li.text().await?;
        assert!(text.contains("SmolLM2") && text.contains("30 layers"), "{text}");
        std::fs::write(shot_dir().join("home.png"), c.screenshot().await?).unwrap();
        // A deep link opened cold renders its page (the server falls back to index.html).
        c.goto(&format!("{base}/about")).await?;
        let h1 = c.wait().at_most(Duration::from_secs(30)).for_element(Locator::Css("main h1")).await?;
        assert_eq!(h1.text().await?, "How it works");
        // Readable on a phone-sized screen.
        c.set_window_size(375, 800).await?;
        std::fs::write(shot_dir().join("about-375.png"), c.screenshot().await?).unwrap();
        // An unknown app path shows the app's own not-found message, not a blank page.
        c.goto(&format!("{base}/no/such/page")).await?;
        let err = c.wait().at_most(Duration::from_secs(30)).for_element(Locator::Css("main .error")).await?;
        assert!(err.text().await?.contains("does not exist"));
        Ok::<(), fantoccini::error::CmdError>(())
    }
    .await;
    c.close().await.ok();
    result.expect("browser steps");
}
