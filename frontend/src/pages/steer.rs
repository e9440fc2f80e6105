//! Steer page, `/steer?model=…&prompt=…&clamps=L:N:V,…&seed=…`: the same prompt answered twice
//! side by side, normal and steered, streamed token by token. The clamps are editable (each with
//! a slider and a number box); sampling settings, the seed and the number of samples live in the
//! URL with them, so a shared link reproduces the same comparison. Opening such a link runs it.
//! Each answer token shows, on hover or focus, its probability and the runner-up tokens. As an
//! embed (`embed=1`) the page shows the prompt, the clamps and the answers, and runs only when
//! its button is clicked: an iframe on a blog post costs the server nothing until a reader asks.

use leptos::prelude::*;
use leptos_router::hooks::use_navigate;
use shared::{limits, ApiError, ClampSpec, GenerateResponse, TokenEvent, TokenStep, Variant};

use crate::share::{self, CurlButton, ShareBar};
use crate::state::{self, SteerState, MAX_SAMPLES};
use crate::{api, show_token, use_search, Models};

/// One normal/steered pair as it streams in.
#[derive(Debug, Clone, Default, PartialEq)]
struct Sample {
    seed: u64,
    normal: Vec<Piece>,
    steered: Vec<Piece>,
    done: bool,
    error: Option<String>,
    speed: Option<f64>,
}

impl Sample {
    fn side(&mut self, v: Variant) -> &mut Vec<Piece> {
        match v {
            Variant::Normal => &mut self.normal,
            Variant::Steered => &mut self.steered,
        }
    }
}

/// A run of answer text with the tokens it comes from (usually one).
#[derive(Debug, Clone, Default, PartialEq)]
struct Piece {
    text: String,
    steps: Vec<TokenStep>,
}

fn text(pieces: &[Piece]) -> String {
    pieces.iter().map(|p| p.text.as_str()).collect()
}

/// A finished answer's steps as pieces: a step whose text is still empty (the first bytes of a
/// character that spans tokens) joins the next one's piece.
fn pieces(steps: &[TokenStep]) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut cur = Piece::default();
    for s in steps {
        cur.text.push_str(&s.text);
        cur.steps.push(s.clone());
        if !s.text.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.steps.is_empty() {
        out.push(cur);
    }
    out
}

/// The hover text of a piece: each token's probability and the most likely tokens it beat.
fn tip(steps: &[TokenStep]) -> String {
    let pct = crate::percent;
    steps
        .iter()
        .map(|s| {
            let top: Vec<String> =
                s.top.iter().map(|t| format!("{} {:<14} {:>7}", if t.id == s.id { "●" } else { " " }, show_token(&t.text), pct(t.prob))).collect();
            format!("{}  p = {}\n{}", show_token(&s.token), pct(s.prob), top.join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// Shading of a piece by its least likely token: the choices the model found unlikely stand out.
fn shade(steps: &[TokenStep]) -> &'static str {
    match steps.iter().map(|s| s.prob).fold(1.0f32, f32::min) {
        p if p < 0.01 => "tok p-low",
        p if p < 0.1 => "tok p-mid",
        _ => "tok",
    }
}

/// A clamp row of the editor; its fields are signals so typing never re-renders the row.
#[derive(Clone, Copy)]
struct Row {
    key: usize,
    layer: RwSignal<String>,
    neuron: RwSignal<String>,
    value: RwSignal<String>,
}

impl Row {
    fn new(key: usize, c: &ClampSpec) -> Self {
        Row { key, layer: RwSignal::new(c.layer.to_string()), neuron: RwSignal::new(c.neuron.to_string()), value: RwSignal::new(c.value.to_string()) }
    }
    fn clamp(&self) -> Result<ClampSpec, String> {
        format!("{}:{}:{}", self.layer.get_untracked().trim(), self.neuron.get_untracked().trim(), self.value.get_untracked().trim()).parse()
    }
}

/// The iframe height of a steer embed (two samples' answers).
const EMBED_HEIGHT: u32 = 520;

/// Slider range; the number box takes anything the API accepts.
const SLIDER: f32 = 50.0;

#[component]
pub fn Steer() -> impl IntoView {
    let embed = crate::embedded();
    // An embed waits for its button; the full page runs a link as it opens.
    let started = RwSignal::new(!embed);
    let search = use_search();
    let st = Memo::new(move |_| state::parse::<SteerState>(&search.get()));
    let models = Models::get();
    let model = Memo::new(move |_| match st.get() {
        Err(e) => Some(Err(e)),
        Ok(s) => models.pick(s.model.as_deref()),
    });

    // Whether the model has a chat template (a base model such as Gemma 3 270M has none).
    let has_chat = move || !matches!(model.get(), Some(Ok(m)) if !m.chat);

    // The form: a draft of the URL state, reset whenever the URL changes.
    let draft = RwSignal::new(SteerState::default());
    let rows = RwSignal::new(Vec::<Row>::new());
    let next_key = StoredValue::new(0usize);
    let set_rows = move |clamps: &[ClampSpec]| {
        let start = next_key.get_value();
        next_key.set_value(start + clamps.len());
        rows.set(clamps.iter().enumerate().map(|(i, c)| Row::new(start + i, c)).collect());
    };
    Effect::new(move || {
        let s = st.get().unwrap_or_default();
        set_rows(&s.clamp_list().unwrap_or_default());
        draft.set(s);
    });
    let add_row = move |_| {
        let k = next_key.get_value();
        next_key.set_value(k + 1);
        rows.update(|r| r.push(Row::new(k, &ClampSpec { layer: 0, neuron: 0, value: 10.0 })));
    };

    // Running: every URL change (or a Generate click on the same URL) starts a new comparison
    // and aborts the one in flight, which also stops it on the server.
    // One signal per sample, so a streamed token re-renders only its own pair.
    let samples = RwSignal::new(Vec::<RwSignal<Sample>>::new());
    let running = RwSignal::new(false);
    let run_error = RwSignal::new(None::<String>);
    let rerun = RwSignal::new(0u32);
    let abort = StoredValue::new_local(None::<web_sys::AbortController>);
    let stop = move || {
        abort.update_value(|a| {
            if let Some(a) = a.take() {
                a.abort();
            }
        });
        running.set(false);
    };
    Effect::new(move || {
        rerun.track();
        let (s, m, started) = (st.get(), model.get(), started.get());
        stop();
        samples.set(Vec::new());
        run_error.set(None);
        let (s, m) = match (s, m) {
            (Err(e), _) | (_, Some(Err(e))) => return run_error.set(Some(e)),
            // A base model (no chat template) answers the plain prompt.
            (Ok(s), Some(Ok(m))) if !s.clamps.is_empty() && started => (SteerState { chat: s.chat && m.chat, ..s }, m),
            _ => return,
        };
        let clamps = match s.validate() {
            Ok(c) => c,
            Err(e) => return run_error.set(Some(e)),
        };
        let Ok(ctrl) = web_sys::AbortController::new() else { return run_error.set(Some("this browser cannot stream".into())) };
        let signal = ctrl.signal();
        abort.set_value(Some(ctrl));
        samples.set((0..s.n).map(|i| RwSignal::new(Sample { seed: s.seed.wrapping_add(i as u64), ..Default::default() })).collect());
        running.set(true);
        let url = SteerState::generate_url(&m.id);
        // Every sample in one request: the server runs them as one batch and streams each
        // token event with its sample's index.
        leptos::task::spawn_local(async move {
            let req = s.request(clamps);
            let sample = |i: usize| samples.with_untracked(|v| v.get(i).copied());
            let r = api::post_sse(&url, &req, &signal, |ev| match ev.event.as_str() {
                "token" => {
                    if let Ok(t) = serde_json::from_str::<TokenEvent>(&ev.data) {
                        if let Some(x) = sample(t.sample) {
                            x.try_update(|x| x.side(t.variant).push(Piece { text: t.text, steps: t.steps }));
                        }
                    }
                }
                "done" => {
                    if let Ok(r) = serde_json::from_str::<GenerateResponse>(&ev.data) {
                        for c in &r.completions {
                            let Some(x) = sample(c.sample) else { continue };
                            x.try_update(|x| {
                                // The steps as pieces, unless they do not spell the answer (a
                                // tokenizer whose decoding rewrites earlier text): then the
                                // answer as one piece.
                                let p = pieces(&c.steps);
                                *x.side(c.variant) =
                                    if text(&p) == c.text { p } else { vec![Piece { text: c.text.clone(), steps: c.steps.clone() }] };
                                x.speed = Some(c.tokens_per_second);
                                x.done = true;
                            });
                        }
                    }
                }
                "error" => {
                    let e = serde_json::from_str::<ApiError>(&ev.data).map(|e| e.message).unwrap_or(ev.data.clone());
                    samples.with_untracked(|v| {
                        v.iter().for_each(|x| {
                            x.try_update(|x| x.error = Some(e.clone()));
                        })
                    });
                }
                _ => {}
            })
            .await;
            if signal.aborted() {
                return;
            }
            if let Err(e) = r {
                samples.with_untracked(|v| {
                    v.iter().for_each(|x| {
                        x.try_update(|x| x.error = Some(e.clone()));
                    })
                });
            }
            running.try_set(false);
        });
    });
    on_cleanup(move || {
        abort.try_update_value(|a| {
            if let Some(a) = a.take() {
                a.abort();
            }
        });
    });

    let navigate = use_navigate();
    let form_error = RwSignal::new(None::<String>);
    let collect = move || -> Result<SteerState, String> {
        let mut s = draft.get_untracked();
        let clamps = rows.get_untracked().iter().map(|r| r.clamp()).collect::<Result<Vec<_>, _>>()?;
        s.set_clamps(&clamps);
        if s.model.is_none() {
            s.model = model.get_untracked().and_then(|m| m.ok()).map(|m| m.id);
        }
        s.validate()?;
        Ok(s)
    };
    let go = move |s: Result<SteerState, String>| match s {
        Ok(s) => {
            form_error.set(None);
            let href = s.href();
            if Ok(s) == st.get_untracked() {
                rerun.update(|n| *n += 1);
            } else {
                navigate(&href, Default::default());
            }
        }
        Err(e) => form_error.set(Some(e)),
    };
    // The form's generation as it stands, for "Copy as curl": shown once the form is a request.
    let api_request = Signal::derive(move || {
        let mut s = draft.get();
        let clamps = rows.with(|rows| {
            rows.iter()
                .map(|r| {
                    r.layer.track();
                    r.neuron.track();
                    r.value.track();
                    r.clamp()
                })
                .collect::<Result<Vec<_>, _>>()
        });
        s.set_clamps(&clamps.ok()?);
        let m = model.get()?.ok()?;
        s.chat &= m.chat;
        share::generate_request(&s, &m.id).ok()
    });
    let go2 = go.clone();
    let submit = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        go(collect());
    };
    let regenerate = move |_| {
        go2(collect().map(|mut s| {
            s.seed = (js_sys::Math::random() * 1e9) as u64;
            s
        }))
    };

    let num_input = move |id: &'static str,
                          label: &'static str,
                          get: fn(&SteerState) -> String,
                          set: fn(&mut SteerState, &str),
                          attrs: (&'static str, &'static str, &'static str)| {
        view! {
            <label>
                {label}
                <input id=id type="number" min=attrs.0 max=attrs.1 step=attrs.2
                    prop:value=move || draft.with(get)
                    on:input=move |ev| { let v = event_target_value(&ev); draft.update(|d| set(d, &v)) } />
            </label>
        }
    };

    view! {
        {if embed {
            view! { <EmbedHead st=st started=started running=running rerun=rerun /> }.into_any()
        } else {
            view! {
        <h1>"Steer"</h1>
        <p class="caption">"The same prompt, answered normally and with neurons clamped, side by side with the same seed."</p>
        <ShareBar embed_height=EMBED_HEIGHT />
        <form class="steer" novalidate=true on:submit=submit>
            <label class="wide">
                "Prompt"
                <textarea id="prompt" rows="2" placeholder=state::DEFAULT_STEER_PROMPT maxlength=limits::MAX_PROMPT_BYTES
                    prop:value=move || draft.with(|d| d.prompt.clone())
                    on:input=move |ev| { let v = event_target_value(&ev); draft.update(|d| d.prompt = v) }></textarea>
            </label>
            <fieldset class="clamps">
                <legend>"Clamps (layer : neuron = value)"</legend>
                <For each=move || rows.get() key=|r| r.key let:row>
                    <div class="clamp-row">
                        <input class="clamp-layer" type="number" min="0" aria-label="layer" prop:value=row.layer on:input=move |ev| row.layer.set(event_target_value(&ev)) />
                        <input class="clamp-neuron" type="number" min="0" aria-label="neuron" prop:value=row.neuron on:input=move |ev| row.neuron.set(event_target_value(&ev)) />
                        <input class="clamp-slider" type="range" min=-SLIDER max=SLIDER step="0.5" aria-label="value"
                            prop:value=row.value on:input=move |ev| row.value.set(event_target_value(&ev)) />
                        <input class="clamp-value" type="number" step="any" min=-limits::MAX_CLAMP_ABS max=limits::MAX_CLAMP_ABS aria-label="value"
                            prop:value=row.value on:input=move |ev| row.value.set(event_target_value(&ev)) />
                        <button type="button" class="remove" aria-label="remove clamp"
                            on:click=move |_| rows.update(|r| r.retain(|x| x.key != row.key))>"×"</button>
                    </div>
                </For>
                <button type="button" id="add-clamp" on:click=add_row>"+ add clamp"</button>
                <p class="hint">"Find neurons with concept search; a neuron page's “Steer with this neuron” fills this in."</p>
            </fieldset>
            <fieldset class="settings">
                <legend>"Sampling"</legend>
                {num_input("temp", "temperature ", |d| d.temp.to_string(), |d, v| d.temp = v.parse().unwrap_or(f64::NAN), ("0", "5", "0.1"))}
                {num_input("top-p", "top-p ", |d| d.top_p.map(|p| p.to_string()).unwrap_or_default(), |d, v| d.top_p = v.parse().ok(), ("0", "1", "0.05"))}
                {num_input("max", "max tokens ", |d| d.max.to_string(), |d, v| d.max = v.parse().unwrap_or(0), ("1", "512", "1"))}
                {num_input("seed", "seed ", |d| d.seed.to_string(), |d, v| d.seed = v.parse().unwrap_or(0), ("0", "", "1"))}
                {num_input("samples", "samples ", |d| d.n.to_string(), |d, v| d.n = v.parse().unwrap_or(0), ("1", "8", "1"))}
                <label>
                    "count word "
                    <input id="word" type="text" placeholder="dog" prop:value=move || draft.with(|d| d.word.clone())
                        on:input=move |ev| { let v = event_target_value(&ev); draft.update(|d| d.word = v) } />
                </label>
                <label class="check" title=move || if has_chat() { "" } else { "this model has no chat template: the prompt is sent as it is" }>
                    <input id="chat" type="checkbox" prop:checked=move || draft.with(|d| d.chat) && has_chat() prop:disabled=move || !has_chat()
                        on:change=move |ev| { let v = event_target_checked(&ev); draft.update(|d| d.chat = v) } />
                    "chat template"
                </label>
            </fieldset>
            <div class="buttons">
                <button type="submit" id="generate">"Generate"</button>
                <button type="button" id="regenerate" on:click=regenerate>"Regenerate both (new seed)"</button>
                <CurlButton request=api_request id="curl-generate" title=share::GENERATE_CURL_TITLE />
                {move || running.get().then(|| view! { <button type="button" id="stop" class="secondary" on:click=move |_| stop()>"Stop"</button> })}
            </div>
            {move || form_error.get().map(|e| view! { <p class="error" role="alert">{e}</p> })}
            {move || (draft.with(|d| d.n > 1 && d.temp == 0.0)).then(|| view! {
                <p class="hint">{format!("With temperature 0 every sample is the same; raise it to see how often the steered model talks about the concept (up to {MAX_SAMPLES} samples).")}</p>
            })}
        </form>
            }
            .into_any()
        }}
        {move || run_error.get().map(|e| view! { <p class="error" role="alert" id="run-error">{e}</p> })}
        <Summary st=st samples=samples />
        {move || samples.with(|v| !v.is_empty()).then(|| view! {
            <p class="hint" id="token-hint">"Hover or tab to a token for its probability and the runner-ups; "
                <span class="tok p-mid">"shaded"</span>" tokens had p < 10%, "<span class="tok p-low">"darker"</span>" p < 1%."</p>
        })}
        <div id="samples">
            {move || {
                let clamps = st.get().ok().map(|s| s.clamps.replace(',', ", ")).unwrap_or_default();
                samples
                    .get()
                    .into_iter()
                    .enumerate()
                    .map(|(i, x)| view! { <Pair i=i x=x clamps=clamps.clone() running=running /> })
                    .collect_view()
            }}
        </div>
        {move || (samples.with(|v| v.is_empty()) && run_error.get().is_none() && st.get().is_ok_and(|s| s.clamps.is_empty())).then(|| view! {
            <p class="hint" id="steer-empty">"Add a clamp and press Generate."
                {move || model.get().and_then(|m| m.ok()).map(|m| view! { <crate::gallery::TryExample model=m.id /> })}
            </p>
        })}
    }
}

/// An embed's head: what the link runs, and the button that runs it.
#[component]
fn EmbedHead(st: Memo<Result<SteerState, String>>, started: RwSignal<bool>, running: RwSignal<bool>, rerun: RwSignal<u32>) -> impl IntoView {
    move || {
        let s = st.get().ok()?;
        let clamps =
            s.clamp_list().unwrap_or_default().iter().map(|c| format!("{}:{} = {}", c.layer, c.neuron, c.value)).collect::<Vec<_>>().join(", ");
        let sampling = if s.temp == 0.0 { "greedy".to_owned() } else { format!("temperature {}", s.temp) };
        Some(view! {
            <p class="embed-steer">
                <strong>"Steering "</strong>{clamps}" · "<q>{s.prompt_text().to_owned()}</q>
                {format!(" · {sampling} · {} sample{}", s.n, if s.n == 1 { "" } else { "s" })}
            </p>
            <button type="button" id="run-embed" disabled=move || running.get()
                on:click=move |_| if started.get_untracked() { rerun.update(|n| *n += 1) } else { started.set(true) }>
                {move || match (running.get(), started.get()) {
                    (true, _) => "Generating…",
                    (false, true) => "Generate again",
                    (false, false) => "Generate normal and steered answers",
                }}
            </button>
        })
    }
}

/// One side of a pair: a keyed list, so a streamed token adds its span and leaves the others
/// (and a token being hovered or focused) alone.
fn answer(x: RwSignal<Sample>, side: Variant) -> impl IntoView {
    let each = move || {
        x.with(|x| match side {
            Variant::Normal => x.normal.clone(),
            Variant::Steered => x.steered.clone(),
        })
        .into_iter()
        .enumerate()
        .collect::<Vec<_>>()
    };
    view! {
        <For
            each=each
            key=|(i, p)| (*i, p.text.clone(), p.steps.len())
            children=|(_, p): (usize, Piece)| view! { <span class=shade(&p.steps) tabindex="0" data-tip=tip(&p.steps)>{p.text}</span> }
        />
    }
}

#[component]
fn Pair(i: usize, x: RwSignal<Sample>, clamps: String, running: RwSignal<bool>) -> impl IntoView {
    let seed = x.with_untracked(|x| x.seed);
    let streaming = move || x.with(|x| !x.done && x.error.is_none()) && running.get();
    let cursor = move || streaming().then(|| view! { <span class="cursor">"▍"</span> });
    view! {
        <article class="pair" data-done=move || if x.with(|x| x.done) { "1" } else { "0" } id=format!("pair-{i}")>
            <h3>{format!("sample {} · seed {seed}", i + 1)}{move || x.with(|x| x.speed.map(|s| format!(" · {s:.1} tokens/s")))}</h3>
            <div class="cols">
                <div class="col">
                    <h4>"Normal"</h4>
                    <p class="answer normal">{answer(x, Variant::Normal)}{cursor}</p>
                </div>
                <div class="col steered">
                    <h4>{format!("Steered ({clamps})")}</h4>
                    <p class="answer steered">{answer(x, Variant::Steered)}{cursor}</p>
                </div>
            </div>
            {move || x.with(|x| x.error.clone()).map(|e| view! { <p class="error" role="alert">{e}</p> })}
        </article>
    }
}

/// How often each side mentions the count word, over the finished samples.
#[component]
fn Summary(st: Memo<Result<SteerState, String>>, samples: RwSignal<Vec<RwSignal<Sample>>>) -> impl IntoView {
    move || {
        let word = st.get().ok().map(|s| s.word).filter(|w| !w.trim().is_empty())?;
        let done: Vec<(String, String)> =
            samples.get().iter().filter_map(|x| x.with(|x| x.done.then(|| (text(&x.normal), text(&x.steered))))).collect();
        if done.is_empty() {
            return None;
        }
        let count = |f: fn(&(String, String)) -> &str| done.iter().filter(|x| state::mentions(f(x), &word)).count();
        let (n, s) = (count(|x| &x.0), count(|x| &x.1));
        Some(view! {
            <p class="result" id="mentions">
                {format!("“{}” appears in {n} of {} normal answers and {s} of {} steered answers.", word.trim(), done.len(), done.len())}
            </p>
        })
    }
}
