//! A plotly chart as a leptos component. The figure is built in Rust with the `plotly` crate and
//! drawn by plotly.js (its basic bundle, served locally as `/plotly-basic.min.js`) once the `<div>` is mounted. A new
//! figure means a new component, so listeners never pile up on a reused `<div>`.
//!
//! When a chart is drawn its `<div>` gets `data-drawn="1"` (the browser tests wait on it) and
//! the first one on the page records `window.__fiFirstPlot` (ms since navigation start), the
//! time to first plot that the tests report.

use leptos::html::Div;
use leptos::prelude::*;
use plotly::Plot;

/// A clicked point: its trace, its index in the trace, and its `customdata` as a string.
#[derive(Debug, Clone, PartialEq)]
pub struct Click {
    pub curve: usize,
    pub point: usize,
    pub custom: Option<String>,
}

#[cfg(target_arch = "wasm32")]
mod js {
    use wasm_bindgen::prelude::*;

    #[wasm_bindgen(inline_js = r#"
export function mark_drawn(id) {
  const el = document.getElementById(id);
  if (el) el.setAttribute('data-drawn', '1');
  if (window.__fiFirstPlot === undefined) window.__fiFirstPlot = performance.now();
}
export function on_click(id, cb) {
  const el = document.getElementById(id);
  if (!el || !el.on) return;
  el.on('plotly_click', (ev) => {
    const p = ev && ev.points && ev.points[0];
    if (!p) return;
    cb(p.curveNumber, p.pointNumber, p.customdata === undefined ? null : String(p.customdata));
  });
}
export function purge(id) {
  const el = document.getElementById(id);
  if (el && window.Plotly) window.Plotly.purge(el);
}
export function plotly_loaded() { return !!window.Plotly; }
"#)]
    extern "C" {
        pub fn mark_drawn(id: &str);
        pub fn on_click(id: &str, cb: &Closure<dyn FnMut(usize, usize, Option<String>)>);
        pub fn purge(id: &str);
        pub fn plotly_loaded() -> bool;
    }
}

/// Draw `plot` into the element `id`, then wire clicks.
#[cfg(target_arch = "wasm32")]
async fn draw(id: String, plot: Plot, on_click: Option<Callback<Click>>) -> Result<(), String> {
    use wasm_bindgen::prelude::*;
    if !js::plotly_loaded() {
        return Err("the charting library (plotly.js) did not load".into());
    }
    plotly::bindings::new_plot(&id, &plot).await;
    if let Some(cb) = on_click {
        let c = Closure::<dyn FnMut(usize, usize, Option<String>)>::new(move |curve, point, custom| cb.run(Click { curve, point, custom }));
        js::on_click(&id, &c);
        // The listener lives as long as the element; the element is purged when the component goes.
        c.forget();
    }
    js::mark_drawn(&id);
    Ok(())
}

#[cfg(not(target_arch = "wasm32"))]
async fn draw(_id: String, _plot: Plot, _on_click: Option<Callback<Click>>) -> Result<(), String> {
    Ok(())
}

/// A chart. `id` must be unique on the page.
#[component]
pub fn Chart(
    #[prop(into)] id: String,
    plot: Plot,
    #[prop(optional)] on_click: Option<Callback<Click>>,
    #[prop(optional, into)] class: String,
) -> impl IntoView {
    let node = NodeRef::<Div>::new();
    let (error, set_error) = signal(None::<String>);
    let mut pending = Some(plot);
    let draw_id = id.clone();
    Effect::new(move |_| {
        if node.get().is_some() {
            if let Some(plot) = pending.take() {
                let id = draw_id.clone();
                leptos::task::spawn_local(async move {
                    if let Err(e) = draw(id, plot, on_click).await {
                        set_error.set(Some(e));
                    }
                });
            }
        }
    });
    #[cfg(target_arch = "wasm32")]
    {
        let id = id.clone();
        on_cleanup(move || js::purge(&id));
    }
    view! {
        <div id=id node_ref=node class=format!("chart {class}")></div>
        {move || error.get().map(|e| view! { <p class="error">{e}</p> })}
    }
}
