//! The Flash Interp web app (leptos, client-side rendered, built by Trunk). `main.rs` mounts;
//! this file holds the router; one page per file under `pages/`; `api.rs` is the one typed
//! fetch helper. (The full app — search plot, neuron pages, steering — is the web-app issue;
//! this is its start: concept search with a ranked table, model list, about page.)

use leptos::prelude::*;
use leptos_router::components::{Route, Router, Routes, A};
use leptos_router::path;

pub mod api;
pub mod pages;

#[component]
pub fn App() -> impl IntoView {
    view! {
        <Router>
            <header class="top">
                <A href="/">"Flash Interp"</A>
                <nav>
                    <A href="/models">"Models"</A>
                    <A href="/about">"About"</A>
                    <a href="/api/openapi.json">"API"</a>
                </nav>
            </header>
            <main>
                <Routes fallback=|| view! { <p class="error">"This page does not exist."</p> }>
                    <Route path=path!("/") view=pages::search::Search />
                    <Route path=path!("/models") view=pages::home::Home />
                    <Route path=path!("/about") view=pages::about::About />
                </Routes>
            </main>
        </Router>
    }
}
