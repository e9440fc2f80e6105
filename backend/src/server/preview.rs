//! Link previews: every permalink of the web app is answered with `index.html` whose title and
//! Open Graph / Twitter card tags describe that page ("Neuron 29:808 — dog, Dog, dogs…"), so it
//! unfurls in chat apps and social sites without running any script. Built from what is at hand
//! (the URL, and a neuron's top tokens when its map is in memory); never waits for model work.

use std::collections::HashMap;

use shared::View;

use super::AppState;

/// What a link shows before it is opened.
#[derive(Debug, Clone, PartialEq)]
pub struct Preview {
    pub title: String,
    pub description: String,
    /// Path of an image for the card (the server renders it), if the page has one.
    pub image: Option<String>,
}

/// The longest title and description a preview carries, in characters.
pub const TITLE_CHARS: usize = 120;
pub const DESCRIPTION_CHARS: usize = 300;

const DEFAULT_DESCRIPTION: &str =
    "Find and steer feature neurons in language models: every MLP neuron decoded through the unembedding, searched by concept, and clamped to prove it.";

/// The preview of the app page at `path` with query string `query`.
pub fn for_page(state: &AppState, path: &str, query: &str) -> Preview {
    let q: HashMap<String, String> = actix_web::web::Query::<HashMap<String, String>>::from_query(query).map(|q| q.into_inner()).unwrap_or_default();
    let served = q.get("model").and_then(|id| state.models.iter().find(|m| &m.id == id)).or(state.models.first());
    let model = served.map(|m| m.engine.info.name.clone()).unwrap_or_else(|| "a language model".into());
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["neuron", l, n] => {
            let (Ok(layer), Ok(neuron)) = (l.parse::<usize>(), n.parse::<usize>()) else { return default() };
            let tokens = served.and_then(|m| {
                let cfg = m.engine.config();
                if layer >= cfg.n_layers || neuron >= cfg.d_ff {
                    return None;
                }
                let map = m.engine.map_if_ready(View::Up, state.config.final_norm)?;
                let ids = map.top(map.peaked_polarity(layer, neuron), layer, neuron).0;
                // Five distinct words (" dog" and "dog" read the same in a title).
                let mut words: Vec<String> = Vec::new();
                for w in ids.iter().map(|&t| m.engine.tok.token_text(t).trim().to_owned()) {
                    if !w.is_empty() && !words.contains(&w) && words.len() < 5 {
                        words.push(w);
                    }
                }
                Some(words)
            });
            match tokens {
                Some(t) if !t.is_empty() => Preview {
                    image: served.map(|m| format!("/api/models/{}/neurons/{layer}/{neuron}/card.png", m.id)),
                    title: format!("Neuron {layer}:{neuron} — {}…", t.join(", ")),
                    description: format!(
                        "MLP neuron {neuron} of layer {layer} of {model} decodes to {}. See what it reads and writes, and clamp it to steer the model.",
                        t.iter().take(3).map(|s| format!("“{s}”")).collect::<Vec<_>>().join(", ")
                    ),
                },
                _ => Preview {
                    image: None,
                    title: format!("Neuron {layer}:{neuron} of {model}"),
                    description: format!("What MLP neuron {neuron} of layer {layer} of {model} reads and writes, and what clamping it does."),
                },
            }
        }
        [""] => match q.get("q").map(|s| s.trim()).filter(|s| !s.is_empty()) {
            Some(concept) => Preview {
                image: served.and_then(|m| concept_card(state, m, &q)),
                title: format!("“{concept}” neurons of {model}"),
                description: format!(
                    "Concept search: every MLP neuron of {model} decoded through the unembedding and scored for “{concept}”, layer by layer, with the strongest neurons."
                ),
            },
            None => default(),
        },
        ["steer"] => {
            let clamps = q.get("clamps").cloned().unwrap_or_default();
            let prompt = q.get("prompt").map(|p| p.trim().to_owned()).unwrap_or_default();
            Preview {
                image: None,
                title: if clamps.is_empty() { format!("Steering {model}") } else { format!("Steering {model} with {}", clamps.replace(',', ", ")) },
                description: if prompt.is_empty() {
                    format!("Normal and steered answers of {model} side by side, with MLP neurons clamped.")
                } else {
                    format!("“{}”: the normal and the steered answer of {model} side by side, with MLP neurons clamped.", crate::card::shorten(&prompt, 121))
                },
            }
        }
        ["classes"] => Preview {
            image: None,
            title: format!("Neuron classes of {model}"),
            description: format!("Prediction, suppression and partition neurons of {model}, layer by layer, from the moments of their decoded directions."),
        },
        ["compare"] => Preview { title: "Base vs instruct: which neurons changed".into(), description: DEFAULT_DESCRIPTION.into(), image: None },
        _ => default(),
    }
}

/// The concept card of a search permalink, when its view's map is ready (the card's own request
/// must not wait for a build), the link's settings read right and its concept is one the model
/// has (else the card's own request would fail, and the preview show a broken image).
fn concept_card(state: &AppState, m: &super::Served, q: &HashMap<String, String>) -> Option<String> {
    let view = match q.get("view") {
        Some(v) => v.parse::<View>().ok()?,
        None => View::Up,
    };
    m.engine.map_if_ready(view, state.config.final_norm)?;
    let polarity = match q.get("polarity").map(String::as_str) {
        None | Some("both") => None,
        Some("pos") => Some(shared::Polarity::Pos),
        Some("neg") => Some(shared::Polarity::Neg),
        Some(_) => return None,
    };
    let scale = match q.get("scale") {
        Some(s) => Some(s.parse::<shared::Scale>().ok()?),
        None => None,
    };
    let phrase = matches!(q.get("phrase").map(String::as_str), Some("1" | "true")).then_some(true);
    // The page's own reading of `q`: whitespace-only alternatives are dropped, as it drops them.
    let text = q.get("q")?;
    let tokens = if phrase.is_some() { text.clone() } else { text.split(',').filter(|t| !t.trim().is_empty()).collect::<Vec<_>>().join(",") };
    crate::analysis::ConceptIds::resolve(&m.engine, &super::routes::concept_of(&tokens, phrase.is_some())).ok()?;
    let card = super::routes::SearchCardQuery { tokens, phrase, view: Some(view), polarity, scale };
    Some(format!("/api/models/{}/search/card.png?{}", m.id, serde_urlencoded::to_string(&card).ok()?))
}

fn default() -> Preview {
    Preview { title: "Flash Interp".into(), description: DEFAULT_DESCRIPTION.into(), image: None }
}

/// Escape text for an HTML attribute or element.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `index.html` with its title and description replaced by the page's, and the Open Graph and
/// Twitter card tags added. `origin` is the site's scheme and host, `url` the page's address.
/// Title and description are cut to what a card shows (a permalink's parameters can be long),
/// and control characters in them become spaces.
pub fn inject(html: &str, p: &Preview, origin: &str, url: &str) -> String {
    let clean = |s: &str, n: usize| crate::card::shorten(&s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect::<String>(), n);
    let (t, d, u) = (escape(&clean(&p.title, TITLE_CHARS)), escape(&clean(&p.description, DESCRIPTION_CHARS)), escape(&format!("{origin}{url}")));
    let image = match &p.image {
        Some(path) => {
            let src = escape(&format!("{origin}{path}"));
            format!(
                "\n    <meta property=\"og:image\" content=\"{src}\" />\n    <meta property=\"og:image:width\" content=\"{}\" />\n    \
                 <meta property=\"og:image:height\" content=\"{}\" />\n    <meta name=\"twitter:image\" content=\"{src}\" />",
                crate::card::WIDTH,
                crate::card::HEIGHT
            )
        }
        None => String::new(),
    };
    let card = if p.image.is_some() { "summary_large_image" } else { "summary" };
    let tags = format!(
        "<title>{t}</title>\n    <meta name=\"description\" content=\"{d}\" />\n    <meta property=\"og:type\" content=\"website\" />\n    \
         <meta property=\"og:site_name\" content=\"Flash Interp\" />\n    <meta property=\"og:title\" content=\"{t}\" />\n    \
         <meta property=\"og:description\" content=\"{d}\" />\n    <meta property=\"og:url\" content=\"{u}\" />\n    \
         <meta name=\"twitter:card\" content=\"{card}\" />\n    <meta name=\"twitter:title\" content=\"{t}\" />\n    \
         <meta name=\"twitter:description\" content=\"{d}\" />{image}"
    );
    let mut html = html.to_owned();
    // Drop the file's own description; put the page's tags where its title was.
    if let Some(start) = html.find("<meta name=\"description\"") {
        if let Some(len) = html[start..].find("/>") {
            let end = start + len + 2;
            let end = end + html[end..].len() - html[end..].trim_start().len();
            html.replace_range(start..end, "");
        }
    }
    match html.find("<title>").zip(html.find("</title>")) {
        Some((a, b)) if a < b => html.replace_range(a..b + "</title>".len(), &tags),
        _ => html = html.replacen("<head>", &format!("<head>\n    {tags}"), 1),
    }
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inject_replaces_title_and_description_and_escapes() {
        let html = "<html><head>\n    <meta name=\"description\" content=\"old\" />\n    <title>Flash Interp</title>\n</head><body></body></html>";
        let p = Preview { title: "A <b>\"x\" & 'y'".into(), description: "d<script>".into(), image: None };
        let out = inject(html, &p, "http://h", "/?q=<x>");
        assert!(!out.contains("content=\"old\"") && !out.contains("<title>Flash Interp</title>"), "{out}");
        assert!(out.contains("<title>A &lt;b&gt;&quot;x&quot; &amp; &#39;y&#39;</title>"), "{out}");
        assert!(out.contains("<meta property=\"og:description\" content=\"d&lt;script&gt;\" />"));
        assert!(out.contains("<meta property=\"og:url\" content=\"http://h/?q=&lt;x&gt;\" />"));
        assert_eq!(out.matches("name=\"description\"").count(), 1);
        // A file without a title still gets the tags, in its head.
        assert!(inject("<html><head></head></html>", &p, "http://h", "/").contains("<head>\n    <title>"));
        assert!(!out.contains("og:image") && out.contains("content=\"summary\""));
        let with = Preview { image: Some("/api/models/m/neurons/1/2/card.png".into()), ..p };
        let out = inject(html, &with, "http://h", "/neuron/1/2");
        assert!(out.contains("<meta property=\"og:image\" content=\"http://h/api/models/m/neurons/1/2/card.png\" />"), "{out}");
        assert!(out.contains("content=\"summary_large_image\""));
    }
}
